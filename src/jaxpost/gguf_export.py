"""Writes a merged Gemma 3 as a GGUF file for llama.cpp and Ollama (``f16`` or ``q8_0``).

The reverse of :mod:`jaxpost.gguf_import`: Hugging Face tensor names become llama.cpp's
(``model.layers.N.self_attn.q_proj.weight`` -> ``blk.N.attn_q.weight``), Gemma's RMSNorm
weights are stored with 1 added (llama.cpp computes ``x * w``, Gemma ``x * (1 + w)``),
and the SentencePiece tokenizer becomes GGUF's ``tokenizer.ggml.*`` arrays. Norms stay
float32; the other tensors are stored as ``f16`` or ``q8_0`` (blocks of 32 values with one
f16 scale), as llama.cpp's own converter does.

The export directory holds the ``.gguf`` file, an Ollama ``Modelfile``, the run's
``config.yaml`` and ``metrics.json`` and a ``README.md``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np


GGUF_TYPES = ("f16", "q8_0")

_BLOCK_NAMES = {  # Hugging Face module (within a layer) -> llama.cpp name
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
                 "model.norm.weight": "output_norm.weight"}
# Chat markers: user-defined pieces in Gemma's tokenizer.model, control tokens in Gemma's
# GGUF files (what llama.cpp expects); gguf_import maps them back.
_GGUF_CONTROL_PIECES = ("<mask>", "<start_of_turn>", "<end_of_turn>")
_CONTROL, _UNKNOWN, _USER_DEFINED = 3, 2, 4

_GEMMA_TEMPLATE = ('{{- range .Messages }}<start_of_turn>'
                   '{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}\n'
                   '{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n')


def gguf_tensor_name(hf_name: str) -> str:
    """Maps a Hugging Face Gemma 3 tensor name to llama.cpp's.

    Raises:
      ValueError: for a name outside the Gemma 3 text architecture.
    """
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    prefix, _, rest = hf_name.partition("model.layers.")
    layer, _, module = rest.partition(".")
    module = module.removesuffix(".weight")
    if prefix or not layer.isdigit() or module not in _BLOCK_NAMES:
        raise ValueError(f"tensor {hf_name!r} has no llama.cpp Gemma 3 equivalent")
    return f"blk.{layer}.{_BLOCK_NAMES[module]}.weight"


def tokenizer_fields(tokenizer_model: bytes) -> dict[str, Any]:
    """GGUF tokenizer arrays and ids from a serialized Gemma SentencePiece model.

    Returns ``tokens``, ``scores``, ``types`` (SentencePiece's numbering, which GGUF
    shares) and ``bos``/``eos``/``unk``/``pad`` ids.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    m = sp_pb2.ModelProto()
    m.ParseFromString(tokenizer_model)
    ts = m.trainer_spec
    tokens = [p.piece for p in m.pieces]
    types = []
    for i, p in enumerate(m.pieces):
        if i == ts.unk_id:
            types.append(_UNKNOWN)
        elif p.type == _USER_DEFINED and p.piece in _GGUF_CONTROL_PIECES:
            types.append(_CONTROL)
        else:
            types.append(int(p.type))
    return {"tokens": tokens, "scores": [float(p.score) for p in m.pieces], "types": types,
            "bos": int(ts.bos_id), "eos": int(ts.eos_id), "unk": int(ts.unk_id),
            "pad": int(ts.pad_id)}


def write_gguf(tensors: Mapping[str, np.ndarray], hf_cfg: Mapping[str, Any],
               tokenizer_model: bytes, out_file: str | os.PathLike, *, gguf_type: str = "f16",
               name: str = "jaxpost Gemma 3") -> Path:
    """Writes a Gemma 3 GGUF file.

    Args:
      tensors: float32 Hugging Face tensors (``hf_export.merged_hf_tensors``).
      hf_cfg: the matching ``config.json`` dict (``hf_export.hf_config``).
      tokenizer_model: the serialized SentencePiece model.
      out_file: the ``.gguf`` path (written to a temporary name, then renamed).
      gguf_type: ``"f16"`` or ``"q8_0"`` for 2-D tensors; norms are always float32.
      name: ``general.name``.

    Raises:
      ValueError: an invalid ``gguf_type``, a config GGUF cannot express, or a tensor
        without a llama.cpp name.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r} is invalid: use one of {list(GGUF_TYPES)}")
    if hf_cfg.get("query_pre_attn_scalar") != hf_cfg["head_dim"]:
        raise ValueError(f"query_pre_attn_scalar={hf_cfg.get('query_pre_attn_scalar')} differs "
                         f"from head_dim={hf_cfg['head_dim']}: GGUF cannot express it")
    if float(hf_cfg.get("rope_local_base_freq", 10000.0)) != 10000.0:
        raise ValueError(f"rope_local_base_freq={hf_cfg['rope_local_base_freq']} is not "
                         "10000, which llama.cpp's Gemma 3 assumes for sliding layers")
    qtype = {"f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    tok = tokenizer_fields(tokenizer_model)
    if len(tok["tokens"]) != hf_cfg["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tok['tokens'])} pieces but vocab_size is "
                         f"{hf_cfg['vocab_size']}")

    out = Path(out_file)
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), arch="gemma3")
    try:
        w.add_name(name)
        w.add_file_type(int(ftype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(int(hf_cfg["max_position_embeddings"]))
        w.add_embedding_length(int(hf_cfg["hidden_size"]))
        w.add_block_count(int(hf_cfg["num_hidden_layers"]))
        w.add_feed_forward_length(int(hf_cfg["intermediate_size"]))
        w.add_head_count(int(hf_cfg["num_attention_heads"]))
        w.add_head_count_kv(int(hf_cfg["num_key_value_heads"]))
        w.add_key_length(int(hf_cfg["head_dim"]))
        w.add_value_length(int(hf_cfg["head_dim"]))
        w.add_layer_norm_rms_eps(float(hf_cfg["rms_norm_eps"]))
        w.add_rope_freq_base(float(hf_cfg["rope_theta"]))
        w.add_rope_freq_base_swa(float(hf_cfg.get("rope_local_base_freq", 10000.0)))
        w.add_sliding_window(int(hf_cfg["sliding_window"]))
        scaling = hf_cfg.get("rope_scaling")
        if scaling:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(scaling["factor"]))
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tok["tokens"])
        w.add_token_scores(tok["scores"])
        w.add_token_types(tok["types"])
        w.add_bos_token_id(tok["bos"])
        w.add_eos_token_id(tok["eos"])
        w.add_unk_token_id(tok["unk"])
        w.add_pad_token_id(tok["pad"])
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(False)
        for hf_name in sorted(tensors):
            arr = np.asarray(tensors[hf_name], dtype=np.float32)
            gname = gguf_tensor_name(hf_name)
            if hf_name.endswith("norm.weight"):
                w.add_tensor(gname, arr + np.float32(1.0))  # llama.cpp multiplies by w
            elif qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(gname, arr.astype(np.float16))
            else:
                if arr.shape[-1] % 32:
                    raise ValueError(f"{hf_name} has rows of {arr.shape[-1]} values: q8_0 needs "
                                     "a multiple of 32; use gguf_type='f16'")
                w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _readme(path: Path, file_name: str, gguf_type: str) -> str:
    return (
        f"# jaxpost GGUF export ({gguf_type})\n\n"
        "The trained LoRA adapters merged into the base model, for llama.cpp and Ollama.\n\n"
        "llama.cpp:\n\n"
        f"    llama-cli -m {path / file_name} -p \"What is 7 + 5?\" -n 128\n\n"
        "Ollama (the Modelfile holds Gemma's chat template):\n\n"
        f"    cd {path} && ollama create my-model -f Modelfile && ollama run my-model\n\n"
        "jaxpost:\n\n"
        f"    jaxpost generate \"What is 7 + 5?\" --chat --model gguf:{path / file_name}\n")


def write_gguf_export(loaded, out_dir: str | os.PathLike, *, lora=None, alpha: float | None = None,
                      gguf_type: str = "f16", config=None,
                      metrics: Mapping[str, Any] | None = None) -> Path:
    """Writes a GGUF export directory (see module docstring) and returns its path.

    Args:
      loaded: the base Gemma 3 model.
      out_dir: the directory to write (replaced if it exists).
      lora, alpha: qwix LoRA arrays and alpha to merge (None exports the base model).
      gguf_type: ``"f16"`` or ``"q8_0"``.
      config, metrics: the run's config and metrics, stored beside the file.
    """
    from jaxpost import hf_export
    from jaxpost.export import export_directory

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r} is invalid: use one of {list(GGUF_TYPES)}")
    hf_cfg = hf_export.hf_config(loaded)
    tok_bytes = hf_export.tokenizer_model_bytes(loaded)
    tensors = hf_export.merged_hf_tensors(loaded, lora, alpha=alpha)
    out = Path(out_dir)
    file_name = f"model-{gguf_type}.gguf"
    with export_directory(out) as tmp:
        write_gguf(tensors, hf_cfg, tok_bytes, tmp / file_name, gguf_type=gguf_type,
                   name=f"jaxpost {loaded.source}")
        (tmp / "Modelfile").write_text(
            f"FROM ./{file_name}\nTEMPLATE \"\"\"{_GEMMA_TEMPLATE}\"\"\"\n"
            "PARAMETER stop <end_of_turn>\n")
        hf_export.write_record(tmp, config, metrics)
        (tmp / "README.md").write_text(_readme(out, file_name, gguf_type))
    return out
