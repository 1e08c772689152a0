"""Converts a Gemma 3 GGUF file (llama.cpp's format) into a Hugging Face model directory.

The output directory holds ``config.json`` (``model_type: gemma3_text``),
``model.safetensors`` (float32, Hugging Face tensor names) and ``tokenizer.model``
(SentencePiece), which is exactly what :func:`jaxpost.models.loading.load_model` reads from any
local Hugging Face checkpoint. Converting once and loading through the common path keeps
one loader for every source.

llama.cpp's converter changes two things that we undo here:
  * tensor names (``blk.N.attn_q`` for ``model.layers.N.self_attn.q_proj`` ...);
  * Gemma's RMSNorm weights are stored with 1 added (Gemma computes ``x * (1 + w)``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Callable

import numpy as np

# llama.cpp tensor name -> Hugging Face name (per block, then global).
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.weight")

# GGUF token types use SentencePiece's numbering (1 normal, 2 unknown, 3 control,
# 4 user-defined, 5 unused, 6 byte).
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6


def hf_tensor_name(gguf_name: str) -> str:
    """Maps a llama.cpp Gemma tensor name to its Hugging Face name.

    Raises:
      ValueError: for a name outside the Gemma 3 text architecture.
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"
    raise ValueError(f"unexpected tensor {gguf_name!r} in a Gemma 3 GGUF file")


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def read_hf_config(reader) -> dict:
    """Builds a Hugging Face ``gemma3_text`` config.json dict from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "gemma3":
        raise ValueError(f"only Gemma 3 GGUF files are supported, this one is {arch!r}")
    g = lambda k: _field(reader, f"gemma3.{k}")  # noqa: E731
    head_dim = int(g("attention.key_length"))
    n_layers = int(g("block_count"))
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": int(g("embedding_length")),
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": int(g("attention.head_count")),
        "num_key_value_heads": int(g("attention.head_count_kv")),
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(g("rope.freq_base")),
        "rope_local_base_freq": 10000.0,
        "sliding_window": int(g("attention.sliding_window")),
        "max_position_embeddings": int(g("context_length")),
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": [int(_field(reader, "tokenizer.ggml.eos_token_id")), 106],
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id")),
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def dequantized_tensors(reader, progress: Callable[[int], None] | None = None):
    """Yields ``(hf_name, float32 array)`` for every tensor, dequantized, norms un-shifted.

    Array shapes follow PyTorch's convention (``[out_features, in_features]``), which is
    GGUF's dimension order reversed.
    """
    # the GGUF reader and writer load only for a GGUF file
    import gguf

    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        arr = np.asarray(arr, dtype=np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))
        if name.endswith("norm.weight"):
            arr = arr - 1.0  # llama.cpp stores Gemma's (1 + w) norm weights as w + 1.
        yield name, arr
        if progress is not None:
            progress(1)


def sentencepiece_model_bytes(reader) -> bytes:
    """Rebuilds Gemma's SentencePiece model from the GGUF vocabulary.

    BPE with byte fallback, identity normalizer, no dummy prefix; ``<pad>``/``<eos>``/
    ``<bos>``/``<unk>`` at ids 0/1/2/3. Chat markers such as ``<start_of_turn>`` are
    control tokens in the GGUF file but must be matched in prompt text, so they become
    user-defined pieces (as in Gemma's own tokenizer.model); ``<unusedN>`` stay control.
    """
    # only for a SentencePiece tokenizer
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    tokens_f = reader.fields["tokenizer.ggml.tokens"]
    scores_f = reader.fields["tokenizer.ggml.scores"]
    types_f = reader.fields["tokenizer.ggml.token_type"]
    # Field parts are memory-mapped slices; indexing them directly is much faster than
    # contents(), which builds Python objects element by element.
    tokens = [bytes(tokens_f.parts[i]).decode("utf-8") for i in tokens_f.data]
    scores = np.concatenate([scores_f.parts[i] for i in scores_f.data]).astype(float)
    types = np.concatenate([types_f.parts[i] for i in types_f.data]).astype(int)

    bos = int(_field(reader, "tokenizer.ggml.bos_token_id"))
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    unk = int(_field(reader, "tokenizer.ggml.unknown_token_id"))
    pad = int(_field(reader, "tokenizer.ggml.padding_token_id"))

    m = sp_pb2.ModelProto()
    for i, (piece, score, typ) in enumerate(zip(tokens, scores, types)):
        p = m.pieces.add()
        p.piece = piece
        p.score = float(score)
        if i == unk:
            p.type = _SP_UNKNOWN
        elif i in (bos, eos, pad):
            p.type = _SP_CONTROL
        elif typ == _SP_CONTROL and not piece.startswith("<unused"):
            p.type = _SP_USER_DEFINED
        else:
            p.type = int(typ)
    ts = m.trainer_spec
    ts.model_type = sp_pb2.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = True
    ts.split_digits = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = unk, bos, eos, pad
    ts.unk_piece, ts.bos_piece, ts.eos_piece, ts.pad_piece = (
        tokens[unk], tokens[bos], tokens[eos], tokens[pad])
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = False
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return m.SerializeToString()


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: Path, *, show_progress: bool = True) -> None:
    """Writes ``config.json``, ``model.safetensors`` and ``tokenizer.model`` into ``out_dir``.

    Args:
      gguf_path: a Gemma 3 GGUF file (any mix of F32/F16/Q8_0/Q5_0/Q4_K/Q6_K tensors).
      out_dir: an existing, empty directory.
      show_progress: print a progress bar while dequantizing.
    """
    # the GGUF reader and writer load only for a GGUF file
    import gguf
    from safetensors.numpy import save_file
    from tqdm.auto import tqdm

    # Progress goes to stderr: stdout may be the generated text (jaxpost generate).
    print(f"jaxpost: reading {gguf_path} (first use only; the result is cached)",
          file=sys.stderr, flush=True)
    reader = gguf.GGUFReader(str(gguf_path))
    config = read_hf_config(reader)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "tokenizer.model").write_bytes(sentencepiece_model_bytes(reader))
    with tqdm(total=len(reader.tensors), desc="dequantizing", unit="tensor",
              disable=not show_progress) as bar:
        tensors = dict(dequantized_tensors(reader, progress=bar.update))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
