"""Writes a merged Gemma 3 as a GGUF file for llama.cpp and Ollama (``f16`` or ``q8_0``).

The reverse of :mod:`jaxpost.models.gguf`: Hugging Face tensor names become llama.cpp's
(``model.layers.N.self_attn.q_proj.weight`` -> ``blk.N.attn_q.weight``), Gemma's RMSNorm
weights are stored with 1 added (llama.cpp computes ``x * w``, Gemma ``x * (1 + w)``),
and the SentencePiece tokenizer becomes GGUF's ``tokenizer.ggml.*`` arrays. Norms stay
float32; the other tensors are stored as ``f16`` or ``q8_0`` (blocks of 32 values with one
f16 scale), as llama.cpp's own converter does.

The file carries the run's prompt format as ``tokenizer.chat_template`` and Gemma's
``<end_of_turn>`` as ``tokenizer.ggml.eot_token_id``. The export directory holds the
``.gguf`` file, an Ollama ``Modelfile`` (the same prompt format and system prompt), the
run's ``config.yaml`` and ``metrics.json`` and a ``README.md``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import gguf
import numpy as np
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from jaxpost.runtime.atomic import atomic_file
from jaxpost.export.cards import gguf_readme
from jaxpost.export.directory import README_FILE, export_directory, write_record
from jaxpost.export.huggingface import hf_config
from jaxpost.export.tokenizer import (
    END_OF_TURN,
    TURN_MARKERS,
    prompt_format,
    tokenizer_model_bytes,
)
from jaxpost.export.weights import merged_hf_tensors
from jaxpost.data.prompts import jinja_chat_template, stop_strings

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
_GGUF_CONTROL_PIECES = ("<mask>", *TURN_MARKERS)
_CONTROL, _UNKNOWN, _USER_DEFINED = 3, 2, 4

# Ollama templates (Go's text/template, Ollama's single-turn form: .System, .Prompt,
# .Response) that render jaxpost.data.prompts.format_prompt's text for each prompt format.
_OLLAMA_TEMPLATES = {
    "gemma": ("<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"
              "<end_of_turn>\n<start_of_turn>model\n{{ .Response }}<end_of_turn>\n"),
    "chatml": ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
               "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n"
               "{{ .Response }}<|im_end|>\n"),
    "llama3": ("{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}"
               "<|eot_id|>{{ end }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}"
               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}"
               "<|eot_id|>"),
    "none": "{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}\n{{ .Response }}",
}


def check_gguf_type(gguf_type: str) -> None:
    """Raises ValueError unless ``gguf_type`` is one of :data:`GGUF_TYPES`."""
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r} is invalid: use one of {list(GGUF_TYPES)}")


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
    shares), ``bos``/``eos``/``unk``/``pad`` ids and ``eot``, the id of Gemma's
    ``<end_of_turn>`` (None if the vocabulary has none).
    """
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
    eot = tokens.index(END_OF_TURN) if END_OF_TURN in tokens else None
    return {"tokens": tokens, "scores": [float(p.score) for p in m.pieces], "types": types,
            "bos": int(ts.bos_id), "eos": int(ts.eos_id), "unk": int(ts.unk_id),
            "pad": int(ts.pad_id), "eot": eot}


def write_gguf(tensors: Mapping[str, np.ndarray], hf_cfg: Mapping[str, Any],
               tokenizer_model: bytes, out_file: str | os.PathLike, *, gguf_type: str = "f16",
               name: str = "jaxpost Gemma 3", chat_template: str | None = None) -> Path:
    """Writes a Gemma 3 GGUF file.

    Args:
      tensors: float32 Hugging Face tensors (:func:`jaxpost.export.weights.merged_hf_tensors`).
      hf_cfg: the matching ``config.json`` dict (:func:`jaxpost.export.huggingface.hf_config`).
      tokenizer_model: the serialized SentencePiece model.
      out_file: the ``.gguf`` path (written to a temporary name, then renamed).
      gguf_type: ``"f16"`` or ``"q8_0"`` for 2-D tensors; norms are always float32.
      name: ``general.name``.
      chat_template: ``tokenizer.chat_template``, the Jinja template llama.cpp formats
        chat messages with (:func:`jaxpost.data.prompts.jinja_chat_template`).

    Raises:
      ValueError: an invalid ``gguf_type``, a config GGUF cannot express, or a tensor
        without a llama.cpp name.
    """
    check_gguf_type(gguf_type)
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
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="gemma3")
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
        if tok["eot"] is not None:
            w.add_eot_token_id(tok["eot"])  # ends a turn: llama.cpp stops generating there
        if chat_template is not None:
            w.add_chat_template(chat_template)
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
    return out


def modelfile(file_name: str, template: str, system: str) -> str:
    """An Ollama Modelfile for ``file_name`` in the prompt format ``template`` with the
    run's ``system`` text as its default system prompt.

    Raises:
      ValueError: ``system`` holds the Modelfile's own quote (three double quotes).
    """
    if '"""' in system:
        raise ValueError('the system prompt holds """, which an Ollama Modelfile cannot quote')
    lines = [f"FROM ./{file_name}", f'TEMPLATE """{_OLLAMA_TEMPLATES[template]}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {stop}" for stop in stop_strings(template)]
    return "\n".join(lines) + "\n"


def write_gguf_export(loaded, out_dir: str | os.PathLike, *, lora=None, alpha: float | None = None,
                      gguf_type: str = "f16", config=None,
                      metrics: Mapping[str, Any] | None = None) -> Path:
    """Writes a GGUF export directory (see module docstring) and returns its path.

    Args:
      loaded: the base Gemma 3 model.
      out_dir: the directory to write (replaced if it is a previous export).
      lora, alpha: qwix LoRA arrays and alpha to merge (None exports the base model).
      gguf_type: ``"f16"`` or ``"q8_0"``.
      config, metrics: the run's config and metrics, stored beside the file; the config's
        prompt format (chat template, system prompt) goes into the file's
        ``tokenizer.chat_template`` and the Modelfile (None: the family's, no system
        prompt).
    """
    check_gguf_type(gguf_type)
    hf_cfg = hf_config(loaded)
    tok_bytes = tokenizer_model_bytes(loaded)
    template, system = prompt_format(loaded, config)
    file_name = f"model-{gguf_type}.gguf"
    model_file = modelfile(file_name, template, system)
    tensors = merged_hf_tensors(loaded, lora, alpha=alpha)
    out = Path(out_dir)
    with export_directory(out) as tmp:
        write_gguf(tensors, hf_cfg, tok_bytes, tmp / file_name, gguf_type=gguf_type,
                   name=f"jaxpost {loaded.source}",
                   chat_template=jinja_chat_template(template, system))
        (tmp / "Modelfile").write_text(model_file)
        write_record(tmp, config, metrics)
        (tmp / README_FILE).write_text(gguf_readme(out, file_name, gguf_type))
    return out
