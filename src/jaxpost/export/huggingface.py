"""Writes a trained run as a Hugging Face directory: PEFT adapters or a merged model.

Two formats, each a directory that also carries the run's ``config.yaml``,
``metrics.json`` and a ``README.md`` on how to load it (:mod:`jaxpost.export.cards`):

* **PEFT** (:func:`write_peft_adapter`) -- ``adapter_config.json`` +
  ``adapter_model.safetensors``, the LoRA adapters under Hugging Face module names
  (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, ``[r, in]`` and
  ``[out, r]``), to apply with ``peft.PeftModel.from_pretrained`` on the base model.
* **merged** (:func:`write_hf_model`) -- the LoRA update folded into the base weights,
  written as a Hugging Face Gemma 3 checkpoint (``config.json``,
  ``generation_config.json``, ``model.safetensors``) that ``transformers`` and
  :func:`jaxpost.models.loading.load_model` both load.

Both also hold the tokenizer files with the run's prompt format
(:mod:`jaxpost.export.tokenizer`: ``tokenizer.json``, ``tokenizer_config.json`` with the
chat template, ...). The tensors come from :mod:`jaxpost.export.weights`, which says why
the conversion is exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import save_file

from jaxpost.export.cards import merged_readme, peft_readme
from jaxpost.export.directory import README_FILE, export_directory, write_record
from jaxpost.export.tokenizer import generation_config, special_token_ids, tokenizer_files
from jaxpost.export.weights import (
    check_gemma3,
    lora_rank_of,
    merged_hf_tensors,
    peft_target_modules,
    peft_tensors,
)
from jaxpost.tunix_ext.architectures import gemma3

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_ADAPTER_FILE = "adapter_model.safetensors"
HF_MODEL_FILE = "model.safetensors"

# Base model of the embedded GGUF (a Q4_K_M quantisation of Google's Gemma 3 270M).
EMBEDDED_BASE_REPOS = {"embedded:gemma3-270m": "google/gemma-3-270m"}


def base_model_name(source: str) -> str:
    """``base_model_name_or_path`` for a jaxpost model source.

    ``hf:ORG/NAME`` -> ``ORG/NAME``; the embedded model -> the Hub repo it was quantised
    from; a local directory -> its absolute path; ``random:`` -> the source itself (a
    random model has no published base; export it with :func:`write_hf_model`).
    """
    if source.startswith("hf:"):
        return source[3:]
    if source in EMBEDDED_BASE_REPOS:
        return EMBEDDED_BASE_REPOS[source]
    if os.path.isdir(os.path.expanduser(source)):
        return str(Path(source).expanduser().resolve())
    return source


def peft_config(tensors: Mapping[str, np.ndarray], cfg, *, rank: int, alpha: float,
                base_model: str) -> dict:
    """The ``adapter_config.json`` dict for :func:`peft_tensors`' output."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": int(rank),
        "lora_alpha": float(alpha),
        "lora_dropout": 0.0,
        "target_modules": peft_target_modules(tensors, cfg.num_layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "revision": None,
    }


def hf_config(loaded) -> dict:
    """A ``gemma3_text`` ``config.json`` dict for a loaded Gemma 3 (the inverse of
    :func:`jaxpost.models.loading.gemma3_config_from_hf`).

    ``max_position_embeddings`` comes from the source's own ``config.json`` when there is
    one (32768, Gemma 3 270M's, otherwise).
    """
    check_gemma3(loaded)
    cfg = loaded.model_config
    if cfg.vision_config is not None:
        raise ValueError(f"{loaded.source}: only Gemma 3 text models can be exported")
    if cfg.local_scale_factor != 1.0:
        raise ValueError(f"local_scale_factor={cfg.local_scale_factor} cannot be written to "
                         "config.json (Gemma 3 scales only global RoPE)")
    source_cfg = {}
    if loaded.path is not None and (loaded.path / "config.json").is_file():
        source_cfg = json.loads((loaded.path / "config.json").read_text())
        source_cfg = source_cfg.get("text_config", source_cfg)
    norm_kind = gemma3.QueryPreAttentionNormalisation
    by_head = cfg.query_pre_attn_norm == norm_kind.BY_ONE_OVER_SQRT_HEAD_DIM
    pattern = gemma3.GEMMA3_ATTENTION_PATTERN
    local = gemma3.AttentionType.LOCAL_SLIDING
    layer_types = ["sliding_attention" if pattern[i % len(pattern)] == local else "full_attention"
                   for i in range(cfg.num_layers)]
    out = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "query_pre_attn_scalar": cfg.head_dim if by_head else cfg.embed_dim // cfg.num_heads,
        "vocab_size": cfg.num_embed,
        "rms_norm_eps": 1e-6,  # hard-coded in Tunix's Gemma 3 RMSNorm
        "rope_theta": float(cfg.global_base_frequency),
        "rope_local_base_freq": float(cfg.local_base_frequency),
        "sliding_window": cfg.sliding_window_size,
        "layer_types": layer_types,
        "max_position_embeddings": int(source_cfg.get("max_position_embeddings", 32768)),
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        **special_token_ids(loaded),
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        # The first transformers release with Gemma 3. Without a version, transformers 5
        # suspects a Mistral tokenizer and warns about its regex.
        "transformers_version": "4.50.0",
    }
    if cfg.global_scale_factor != 1.0:
        out["rope_scaling"] = {"rope_type": "linear", "factor": float(cfg.global_scale_factor)}
    return out


def write_peft_adapter(loaded, lora: Mapping[str, np.ndarray], out_dir: str | os.PathLike, *,
                       alpha: float, config=None, metrics: Mapping[str, Any] | None = None,
                       base_model: str | None = None) -> Path:
    """Writes a PEFT adapter directory (atomically) and returns its path.

    Args:
      loaded: the base model the adapters belong to (its config gives the head layout).
      lora: qwix LoRA arrays (:func:`jaxpost.export.lora_arrays` or an ``adapter.safetensors``).
      out_dir: the directory to write (replaced if it is a previous export).
      alpha: the LoRA alpha the adapters were trained with.
      config, metrics: the run's config and metrics, stored beside the adapters; the
        config's prompt format also becomes the tokenizer's chat template.
      base_model: ``base_model_name_or_path`` (default: from ``loaded.source``).
    """
    check_gemma3(loaded)
    if not lora:
        raise ValueError("lora is empty: there are no adapters to export")
    tensors = peft_tensors(lora, loaded.model_config)
    base = base_model or base_model_name(loaded.source)
    adapter_cfg = peft_config(tensors, loaded.model_config, rank=lora_rank_of(lora), alpha=alpha,
                              base_model=base)
    tokenizer = tokenizer_files(loaded, config,
                                max_length=hf_config(loaded)["max_position_embeddings"])
    out = Path(out_dir)
    readme = peft_readme(out, base, embedded_base=loaded.source in EMBEDDED_BASE_REPOS)
    return _write_hf_directory(out, PEFT_ADAPTER_FILE, tensors, {PEFT_CONFIG_FILE: adapter_cfg},
                               tokenizer, readme, config, metrics)


def write_hf_model(loaded, out_dir: str | os.PathLike, *,
                   lora: Mapping[str, np.ndarray] | None = None, alpha: float | None = None,
                   config=None, metrics: Mapping[str, Any] | None = None) -> Path:
    """Writes a Hugging Face Gemma 3 checkpoint of ``loaded`` (with ``lora`` merged in).

    The directory holds ``config.json``, ``generation_config.json``, ``model.safetensors``
    (float32), the tokenizer files with the run's prompt format
    (:func:`jaxpost.export.tokenizer.tokenizer_files`; ``config`` None: the family's template
    and no system prompt), the run's config and metrics and a README.
    ``jaxpost.models.loading.load_model(out_dir)`` and
    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` both load it.
    Without ``lora`` it exports the base model itself (e.g. ``random:gemma3-tiny``).
    """
    hf_cfg = hf_config(loaded)
    tokenizer = tokenizer_files(loaded, config, max_length=hf_cfg["max_position_embeddings"])
    tensors = merged_hf_tensors(loaded, lora, alpha=alpha)
    out = Path(out_dir)
    json_files = {"config.json": hf_cfg, "generation_config.json": generation_config(hf_cfg)}
    return _write_hf_directory(out, HF_MODEL_FILE, tensors, json_files, tokenizer,
                               merged_readme(out), config, metrics)


def _write_hf_directory(out: Path, weights_file: str, tensors: Mapping[str, np.ndarray],
                        json_files: Mapping[str, dict], tokenizer: Mapping[str, bytes],
                        readme: str, config, metrics) -> Path:
    """Writes a Hugging Face format's export directory (atomically): the safetensors
    file, the JSON files, the tokenizer files, the run's record and the README."""
    with export_directory(out) as tmp:
        # transformers reads safetensors files marked as PyTorch's ("pt").
        save_file(dict(tensors), str(tmp / weights_file), metadata={"format": "pt"})
        for name, data in json_files.items():
            (tmp / name).write_text(json.dumps(data, indent=2))
        for name, data in tokenizer.items():
            (tmp / name).write_bytes(data)
        write_record(tmp, config, metrics)
        (tmp / README_FILE).write_text(readme)
    return out
