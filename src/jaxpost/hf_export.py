"""Exports a trained run for the Hugging Face ecosystem: PEFT adapters and a merged model.

Two formats, each a directory that also carries the run's ``config.yaml``,
``metrics.json`` and a ``README.md`` on how to load it:

* **PEFT** -- ``adapter_config.json`` + ``adapter_model.safetensors``, the LoRA adapters
  under Hugging Face module names
  (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, ``[r, in]`` and
  ``[out, r]``), to apply with ``peft.PeftModel.from_pretrained`` on the base model.
* **merged** -- the LoRA update folded into the base weights, written as a Hugging Face
  Gemma 3 checkpoint (``config.json``, ``generation_config.json``, ``model.safetensors``)
  that ``transformers`` and :func:`jaxpost.models.load_model` both load.

Both also hold the tokenizer files with the run's prompt format
(:mod:`jaxpost.hf_tokenizer`: ``tokenizer.json``, ``tokenizer_config.json`` with the chat
template, ...).

Why the conversion is exact: qwix puts one LoRA pair on each fused Tunix einsum.
``q_einsum`` (``BTD,NDH->BTNH``) gets ``A [D, r]`` and ``B [r, N, H]``; ``kv_einsum``
(``BSD,CKDH->CBSKH``) gets one ``A [D, r]`` shared by keys and values and
``B [r, 2, K, H]``; ``attn_vec_einsum`` (``BTNH,NHD->BTD``) gets ``A [N, H, r]`` and
``B [r, D]``; the MLP kernels ``A [in, r]``, ``B [r, out]``. Each delta ``A @ B`` is a
rank-r matrix once the head axes are flattened in the order Tunix's safetensors loader
uses (``out = n * head_dim + h``), so ``k_proj`` and ``v_proj`` each receive a copy of the
shared A and their half of B, and PEFT's ``(lora_alpha / r) * B @ A`` equals qwix's
``(alpha / rank) * A @ B`` with ``r = rank`` and ``lora_alpha = alpha``.

Gemma's RMSNorm computes ``x * (1 + w)`` in both Tunix and transformers, so norm weights
are written as they are (llama.cpp's GGUF adds 1; see :mod:`jaxpost.gguf_export`).

:func:`push_to_hub` uploads either directory to the Hugging Face Hub.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

# TOKENIZER_FILE and tokenizer_model_bytes lived here; the names stay importable.
from jaxpost.hf_tokenizer import (  # noqa: F401
    TOKENIZER_FILE,
    generation_config,
    tokenizer_files,
    tokenizer_model_bytes,
)


PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_ADAPTER_FILE = "adapter_model.safetensors"
HF_MODEL_FILE = "model.safetensors"
FORMATS = ("lora", "peft", "merged", "gguf")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")

# Base model of the embedded GGUF (a Q4_K_M quantisation of Google's Gemma 3 270M).
EMBEDDED_BASE_REPOS = {"embedded:gemma3-270m": "google/gemma-3-270m"}

# qwix LoRA parameter -> (weight axes, axes contracted with the input). The delta of the
# weight is einsum("<contracted>r,r<rest>-><weight axes>", A, B) (see module docstring).
_LORA_AXES = {
    "attn.q_einsum.w": ("NDH", "D"),
    "attn.kv_einsum.w": ("CKDH", "D"),
    "attn.qkv_einsum.w": ("SNDH", "D"),
    "attn.attn_vec_einsum.w": ("NHD", "NH"),
    "mlp.gate_proj.kernel": ("io", "i"),
    "mlp.up_proj.kernel": ("io", "i"),
    "mlp.down_proj.kernel": ("io", "i"),
}
_LORA_NAME = re.compile(r"layers\.(\d+)\.(.+)_lora_([ab])")


def _split_lora(lora: Mapping[str, np.ndarray]) -> dict[tuple[int, str], tuple[np.ndarray, ...]]:
    """``{(layer, weight): (A, B)}`` from qwix names; ValueError for anything else."""
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, value in lora.items():
        m = _LORA_NAME.fullmatch(name)
        if m is None or m.group(2) not in _LORA_AXES:
            raise ValueError(
                f"LoRA parameter {name!r} cannot be exported: only Gemma 3 attention "
                f"(q/kv/qkv/attn_vec einsums) and MLP projections are supported "
                f"(expected names like 'layers.0.attn.q_einsum.w_lora_a')")
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = np.asarray(value)
    out = {}
    for key, ab in pairs.items():
        if set(ab) != {"a", "b"}:
            raise ValueError(f"LoRA parameters of layers.{key[0]}.{key[1]} are incomplete: "
                             f"found only lora_{''.join(ab)}")
        out[key] = (ab["a"], ab["b"])
    return out


def lora_rank_of(lora: Mapping[str, np.ndarray]) -> int:
    """The rank r of qwix LoRA arrays (the last axis of every A); ValueError if they differ."""
    ranks = {np.shape(v)[-1] for k, v in lora.items() if k.endswith("_lora_a")}
    if len(ranks) != 1:
        raise ValueError(f"LoRA parameters have ranks {sorted(ranks)}: expected one rank")
    return int(ranks.pop())


def lora_delta(weight: str, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """qwix's update of a Tunix weight, ``scale * A @ B`` in the weight's own axes.

    Args:
      weight: the weight's path inside a layer, e.g. ``"attn.kv_einsum.w"``.
      a, b: qwix's ``*_lora_a`` ``[contracted..., r]`` and ``*_lora_b`` ``[r, rest...]``.
      scale: ``alpha / rank``.
    """
    axes, contracted = _LORA_AXES[weight]
    rest = "".join(c for c in axes if c not in contracted)
    delta = np.einsum(f"{contracted}r,r{rest}->{axes}", a.astype(np.float32),
                      b.astype(np.float32))
    return delta * np.float32(scale)


def merge_lora(params: Mapping[str, np.ndarray], lora: Mapping[str, np.ndarray], *,
               alpha: float) -> dict[str, np.ndarray]:
    """Base parameters (Tunix names) with the LoRA update added, in float32.

    Args:
      params: flattened Tunix parameters, e.g. ``{"layers.0.attn.q_einsum.w": array}``.
      lora: flattened qwix LoRA parameters (``jaxpost.export.lora_arrays``).
      alpha: the LoRA alpha; the update is ``(alpha / rank) * A @ B``.

    Raises:
      ValueError: a LoRA parameter has no base weight, or the shapes disagree.
    """
    scale = alpha / lora_rank_of(lora)
    out = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
    for (layer, weight), (a, b) in _split_lora(lora).items():
        name = f"layers.{layer}.{weight}"
        if name not in out:
            raise ValueError(f"LoRA parameters for {name} but the base model has no such weight")
        delta = lora_delta(weight, a, b, scale)
        if delta.shape != out[name].shape:
            raise ValueError(f"LoRA update of {name} has shape {delta.shape}, the weight "
                             f"{out[name].shape} (adapters of another model?)")
        out[name] = out[name] + delta
    return out


def _check_gemma3(loaded) -> None:
    if loaded.family != "gemma3":
        raise ValueError(f"model family {loaded.family!r} ({loaded.source}) cannot be exported "
                         "to PEFT, merged or GGUF form yet: only Gemma 3 is supported. "
                         "Use --format lora, which works for every family")


def hf_tensors(params: Mapping[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    """Tunix Gemma 3 parameters -> Hugging Face tensors (the inverse of Tunix's loader).

    Shapes follow PyTorch's ``[out_features, in_features]``; head axes are flattened as
    ``n * head_dim + h``. Norm weights are copied unchanged (both sides use ``1 + w``).

    Raises:
      ValueError: a parameter outside the Gemma 3 text model (e.g. a vision tower).
    """
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
    norms = {"pre_attention_norm": "input_layernorm",
             "post_attention_norm": "post_attention_layernorm",
             "pre_ffw_norm": "pre_feedforward_layernorm",
             "post_ffw_norm": "post_feedforward_layernorm",
             "attn._query_norm": "self_attn.q_norm", "attn._key_norm": "self_attn.k_norm"}
    out: dict[str, np.ndarray] = {}
    for name, value in params.items():
        value = np.asarray(value)
        if name == "embedder.input_embedding":
            out["model.embed_tokens.weight"] = value
            continue
        if name == "final_norm.scale":
            out["model.norm.weight"] = value
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if m is None:
            raise ValueError(f"parameter {name!r} has no Hugging Face Gemma 3 text equivalent")
        p, rest = f"model.layers.{m.group(1)}.", m.group(2)
        if rest.endswith(".scale") and rest[: -len(".scale")] in norms:
            out[p + norms[rest[: -len(".scale")]] + ".weight"] = value
        elif rest == "attn.q_einsum.w":  # [N, D, H]
            out[p + "self_attn.q_proj.weight"] = value.transpose(0, 2, 1).reshape(n * h, d)
        elif rest == "attn.kv_einsum.w":  # [2, K, D, H]
            for i, proj in enumerate(("k_proj", "v_proj")):
                out[p + f"self_attn.{proj}.weight"] = value[i].transpose(0, 2, 1).reshape(k * h, d)
        elif rest == "attn.qkv_einsum.w":  # [3, N, D, H]
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                out[p + f"self_attn.{proj}.weight"] = value[i].transpose(0, 2, 1).reshape(n * h, d)
        elif rest == "attn.attn_vec_einsum.w":  # [N, H, D]
            out[p + "self_attn.o_proj.weight"] = value.reshape(n * h, d).T
        elif rest in ("mlp.gate_proj.kernel", "mlp.up_proj.kernel", "mlp.down_proj.kernel"):
            out[p + rest.replace(".kernel", ".weight")] = value.T  # [in, out] -> [out, in]
        else:
            raise ValueError(f"parameter {name!r} has no Hugging Face Gemma 3 text equivalent")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


_PEFT_MODULES = {"attn.q_einsum.w": ("self_attn", ("q_proj",)),
                 "attn.kv_einsum.w": ("self_attn", ("k_proj", "v_proj")),
                 "attn.qkv_einsum.w": ("self_attn", ("q_proj", "k_proj", "v_proj")),
                 "attn.attn_vec_einsum.w": ("self_attn", ("o_proj",)),
                 "mlp.gate_proj.kernel": ("mlp", ("gate_proj",)),
                 "mlp.up_proj.kernel": ("mlp", ("up_proj",)),
                 "mlp.down_proj.kernel": ("mlp", ("down_proj",))}


def peft_tensors(lora: Mapping[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    """qwix LoRA arrays -> PEFT adapter tensors for ``Gemma3ForCausalLM``.

    Returns ``{"base_model.model.model.layers.N.<module>.lora_A.weight": [r, in],
    "...lora_B.weight": [out, r]}`` in float32, such that PEFT's ``B @ A`` equals qwix's
    ``A @ B`` in Hugging Face layout (see the module docstring).
    """
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    out: dict[str, np.ndarray] = {}
    for (layer, weight), (a, b) in _split_lora(lora).items():
        a, b = a.astype(np.float32), b.astype(np.float32)
        r = a.shape[-1]
        parent, modules = _PEFT_MODULES[weight]
        if weight == "attn.attn_vec_einsum.w":  # A [N, H, r], B [r, D]
            pairs = [(a.reshape(n * h, r).T, b.T)]
        elif weight.startswith("mlp."):  # A [in, r], B [r, out]
            pairs = [(a.T, b.T)]
        elif weight == "attn.q_einsum.w":  # A [D, r], B [r, N, H]
            pairs = [(a.T, b.reshape(r, n * h).T)]
        else:  # kv / qkv: A [D, r] shared, B [r, S, heads, H]
            heads = [n, k, k] if weight == "attn.qkv_einsum.w" else [k, k]
            pairs = [(a.T, b[:, i].reshape(r, heads[i] * h).T) for i in range(len(modules))]
        for module, (pa, pb) in zip(modules, pairs):
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            out[prefix + ".lora_A.weight"] = np.ascontiguousarray(pa)
            out[prefix + ".lora_B.weight"] = np.ascontiguousarray(pb)
    return out


def peft_target_modules(tensors: Mapping[str, np.ndarray], num_layers: int) -> list[str] | str:
    """PEFT ``target_modules``: module names when every layer carries the same adapters,
    else a regular expression naming exactly the adapted modules (PEFT full-matches it)."""
    found = sorted({re.sub(r"^base_model\.model\.|\.lora_[AB]\.weight$", "", k) for k in tensors})
    names = sorted({f.rsplit(".", 1)[1] for f in found})
    mlp = ("gate_proj", "up_proj", "down_proj")
    parent = {m: "mlp" if m in mlp else "self_attn" for m in names}
    every = sorted(f"model.layers.{i}.{parent[m]}.{m}" for i in range(num_layers) for m in names)
    if found == every:
        return names
    return "(" + "|".join(re.escape(f) for f in found) + ")"


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
    :func:`jaxpost.models.gemma3_config_from_hf`).

    ``max_position_embeddings`` comes from the source's own ``config.json`` when there is
    one (32768, Gemma 3 270M's, otherwise).
    """
    from tunix.models.gemma3 import model as gemma3

    _check_gemma3(loaded)
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
    tok = loaded.tokenizer
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
        "bos_token_id": int(tok.bos_id()),
        "eos_token_id": [int(i) for i in loaded.eos_ids],
        "pad_token_id": int(tok.pad_id()),
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        # The first transformers release with Gemma 3. Without a version, transformers 5
        # suspects a Mistral tokenizer and warns about its regex.
        "transformers_version": "4.50.0",
    }
    if cfg.global_scale_factor != 1.0:
        out["rope_scaling"] = {"rope_type": "linear", "factor": float(cfg.global_scale_factor)}
    return out


def base_params(loaded) -> dict[str, np.ndarray]:
    """The base model's parameters, flattened with Tunix names (no LoRA parameters)."""
    from flax import nnx

    from jaxpost.export import _flatten

    state = nnx.state(loaded.model, nnx.Param).to_pure_dict()
    flat = _flatten(state)
    lora = [k for k in flat if "_lora_" in k]
    if lora:
        raise ValueError(f"loaded.model carries LoRA parameters ({lora[0]}, ...): pass the "
                         "base model and the LoRA arrays separately")
    return flat


def write_record(tmp: Path, config=None, metrics: Mapping[str, Any] | None = None) -> None:
    """Writes the run's ``config.yaml`` and ``metrics.json`` beside an export's files."""
    from jaxpost.config import save_yaml
    from jaxpost.export import EXPORT_CONFIG, EXPORT_METRICS

    if config is not None:
        save_yaml(config, str(tmp / EXPORT_CONFIG))
    (tmp / EXPORT_METRICS).write_text(json.dumps(dict(metrics or {}), indent=2, default=float))


def _card_metadata(**fields: str) -> str:
    """A model card's YAML front matter (the Hub reads library and base model from it)."""
    lines = [f"{k}: {v}" for k, v in fields.items() if v]
    return "---\n" + "\n".join(lines) + "\n---\n\n"


def _hub_id(name: str) -> str:
    return name if _REPO_ID.fullmatch(name) else ""


def _packages(extra: str = "") -> str:
    return (f"Packages: `pip install torch transformers{extra}` (and `sentencepiece protobuf` "
            "where this directory has no `tokenizer.json`).\n\n")


def _generate_snippet(model_var: str = "model") -> str:
    """Python lines that answer one question with the run's chat template, greedily."""
    return (
        '    messages = [{"role": "user", "content": "What is 7 + 5?"}]\n'
        "    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,\n"
        '                                           return_dict=True, return_tensors="pt")\n'
        f"    out = {model_var}.generate(**inputs, max_new_tokens=128, do_sample=False)\n"
        '    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], '
        "skip_special_tokens=True))\n\n")


_PROMPT_FORMAT = ("The tokenizer files carry the prompt format the run trained with: BOS is "
                  "added, and `tokenizer_config.json`'s chat template puts the run's system prompt "
                  "(unless the conversation starts with its own) where jaxpost did.\n\n")


def _peft_readme(path: Path, base: str, source: str) -> str:
    if source in EMBEDDED_BASE_REPOS:
        load_base = (
            "    # jaxpost's embedded model is a Q4_K_M quantisation of google/gemma-3-270m: its\n"
            "    # dequantized weights (a Hugging Face directory in jaxpost's cache) give\n"
            f"    # jaxpost's numbers; \"{base}\" itself gives close but not identical ones.\n"
            "    from jaxpost.models import embedded_model_dir\n"
            "    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), "
            "dtype=torch.float32)\n")
    else:
        load_base = (f"    base = AutoModelForCausalLM.from_pretrained(\"{base}\", "
                     "dtype=torch.float32)\n")
    return (
        _card_metadata(library_name="peft", base_model=_hub_id(base),
                       pipeline_tag="text-generation")
        + "# jaxpost PEFT (LoRA) adapters\n\n"
        f"Adapters for `{base}` in Hugging Face PEFT format. " + _PROMPT_FORMAT
        + _packages(" peft")
        + "    import torch\n"
        "    from peft import PeftModel\n"
        "    from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"    tokenizer = AutoTokenizer.from_pretrained(\"{path}\")\n"
        + load_base
        + f"    model = PeftModel.from_pretrained(base, \"{path}\").eval()\n"
        + _generate_snippet()
        + "`model.merge_and_unload()` gives a plain transformers model. `config.yaml` is the "
        "training config, `metrics.json` its final metrics.\n")


def _merged_readme(path: Path) -> str:
    return (
        _card_metadata(library_name="transformers", pipeline_tag="text-generation")
        + "# jaxpost merged model (Hugging Face format)\n\n"
        "The LoRA adapters are merged into the base weights (float32). " + _PROMPT_FORMAT
        + "transformers. " + _packages()
        + "    import torch\n"
        "    from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"    tokenizer = AutoTokenizer.from_pretrained(\"{path}\")\n"
        f"    model = AutoModelForCausalLM.from_pretrained(\"{path}\", dtype=torch.float32)\n"
        + _generate_snippet()
        + "jaxpost (the run's system prompt included):\n\n"
        f"    jaxpost generate \"What is 7 + 5?\" --chat --model {path}\n\n"
        "llama.cpp / Ollama: `jaxpost export RUN_DIR --format gguf` writes a GGUF file.\n")


def write_peft_adapter(loaded, lora: Mapping[str, np.ndarray], out_dir: str | os.PathLike, *,
                       alpha: float, config=None, metrics: Mapping[str, Any] | None = None,
                       base_model: str | None = None) -> Path:
    """Writes a PEFT adapter directory (atomically) and returns its path.

    Args:
      loaded: the base model the adapters belong to (its config gives the head layout).
      lora: qwix LoRA arrays (``jaxpost.export.lora_arrays`` or an ``adapter.safetensors``).
      out_dir: the directory to write (replaced if it is a previous export).
      alpha: the LoRA alpha the adapters were trained with.
      config, metrics: the run's config and metrics, stored beside the adapters; the
        config's prompt format also becomes the tokenizer's chat template.
      base_model: ``base_model_name_or_path`` (default: from ``loaded.source``).
    """
    from safetensors.numpy import save_file

    from jaxpost.export import export_directory

    _check_gemma3(loaded)
    if not lora:
        raise ValueError("lora is empty: there are no adapters to export")
    tensors = peft_tensors(lora, loaded.model_config)
    base = base_model or base_model_name(loaded.source)
    adapter_cfg = peft_config(tensors, loaded.model_config, rank=lora_rank_of(lora), alpha=alpha,
                              base_model=base)
    tokenizer = tokenizer_files(loaded, config,
                                max_length=hf_config(loaded)["max_position_embeddings"])
    out = Path(out_dir)
    with export_directory(out) as tmp:
        save_file(tensors, str(tmp / PEFT_ADAPTER_FILE), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(adapter_cfg, indent=2))
        for name, data in tokenizer.items():
            (tmp / name).write_bytes(data)
        write_record(tmp, config, metrics)
        (tmp / "README.md").write_text(_peft_readme(out, base, loaded.source))
    return out


def merged_hf_tensors(loaded, lora: Mapping[str, np.ndarray] | None = None, *,
                      alpha: float | None = None) -> dict[str, np.ndarray]:
    """The model's weights (LoRA merged in when ``lora`` is given) under Hugging Face names."""
    _check_gemma3(loaded)
    params = base_params(loaded)
    if lora:
        if alpha is None:
            raise ValueError("alpha is required to merge LoRA parameters")
        params = merge_lora(params, lora, alpha=alpha)
    return hf_tensors({k: np.asarray(v, np.float32) for k, v in params.items()},
                      loaded.model_config)


def write_hf_model(loaded, out_dir: str | os.PathLike, *,
                   lora: Mapping[str, np.ndarray] | None = None, alpha: float | None = None,
                   config=None, metrics: Mapping[str, Any] | None = None) -> Path:
    """Writes a Hugging Face Gemma 3 checkpoint of ``loaded`` (with ``lora`` merged in).

    The directory holds ``config.json``, ``generation_config.json``, ``model.safetensors``
    (float32), the tokenizer files with the run's prompt format
    (:func:`jaxpost.hf_tokenizer.tokenizer_files`; ``config`` None: the family's template
    and no system prompt), the run's config and metrics and a README.
    ``jaxpost.models.load_model(out_dir)`` and
    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` both load it.
    Without ``lora`` it exports the base model itself (e.g. ``random:gemma3-tiny``).
    """
    from safetensors.numpy import save_file

    from jaxpost.export import export_directory

    hf_cfg = hf_config(loaded)
    tokenizer = tokenizer_files(loaded, config, max_length=hf_cfg["max_position_embeddings"])
    tensors = merged_hf_tensors(loaded, lora, alpha=alpha)
    out = Path(out_dir)
    with export_directory(out) as tmp:
        save_file(tensors, str(tmp / HF_MODEL_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        (tmp / "generation_config.json").write_text(
            json.dumps(generation_config(hf_cfg), indent=2))
        for name, data in tokenizer.items():
            (tmp / name).write_bytes(data)
        write_record(tmp, config, metrics)
        (tmp / "README.md").write_text(_merged_readme(out))
    return out


def read_lora_export(path: str | os.PathLike):
    """``(config, lora arrays, metrics)`` of a LoRA export directory (``jaxpost export``)."""
    from safetensors.numpy import load_file

    from jaxpost.config import load_yaml
    from jaxpost.export import ADAPTER_FILE, EXPORT_CONFIG, EXPORT_METRICS

    path = Path(path)
    for name in (ADAPTER_FILE, EXPORT_CONFIG):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: expected a LoRA export "
                                    "directory (written by jaxpost train / jaxpost export)")
    metrics_file = path / EXPORT_METRICS
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return load_yaml(str(path / EXPORT_CONFIG)), load_file(str(path / ADAPTER_FILE)), metrics


def export_from_lora_dir(lora_dir: str | os.PathLike, fmt: str,
                         out_dir: str | os.PathLike | None = None, *,
                         gguf_type: str = "f16", loaded=None) -> Path:
    """Converts a LoRA export directory into ``fmt`` (``"peft"``, ``"merged"``, ``"gguf"``).

    Args:
      lora_dir: a directory written by ``jaxpost export`` (``--format lora``).
      fmt: the target format.
      out_dir: where to write; default beside ``lora_dir``, one directory per format and
        type: ``<lora_dir>-peft``, ``<lora_dir>-merged``, ``<lora_dir>-gguf-<gguf_type>``.
        It must be absent, empty or a previous export
        (:func:`jaxpost.export.check_export_target`), checked before any work.
      gguf_type: ``"f16"`` or ``"q8_0"`` (GGUF only).
      loaded: the base model, if already loaded (default: loads the config's ``model``
        with its ``dtype`` and ``seed``).

    Returns:
      The export directory.
    """
    from jaxpost.export import check_export_target
    from jaxpost.gguf_export import GGUF_TYPES, write_gguf_export
    from jaxpost.rundir import export_suffix

    if fmt not in ("peft", "merged", "gguf"):
        raise ValueError(f"format={fmt!r} is invalid here: use 'peft', 'merged' or 'gguf' "
                         "(the LoRA export directory itself is the 'lora' format)")
    if fmt == "gguf" and gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r} is invalid: use one of {list(GGUF_TYPES)}")
    config, lora, metrics = read_lora_export(lora_dir)
    lora_dir = Path(lora_dir)
    out = (Path(out_dir) if out_dir else
           lora_dir.with_name(lora_dir.name + export_suffix(fmt, gguf_type)))
    if out.resolve() == lora_dir.resolve():
        raise ValueError(f"out_dir={str(out)!r} is the LoRA export being converted: give "
                         "another directory")
    check_export_target(out)
    if loaded is None:
        from jaxpost.models import load_model

        loaded = load_model(config.model, dtype=config.dtype, seed=config.seed)
    _check_gemma3(loaded)
    if fmt == "peft":
        return write_peft_adapter(loaded, lora, out, alpha=config.lora_alpha, config=config,
                                  metrics=metrics)
    if fmt == "merged":
        return write_hf_model(loaded, out, lora=lora, alpha=config.lora_alpha, config=config,
                              metrics=metrics)
    return write_gguf_export(loaded, out, lora=lora, alpha=config.lora_alpha,
                             gguf_type=gguf_type, config=config, metrics=metrics)


def is_lora_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a LoRA export directory (adapter + config), not a training run."""
    from jaxpost.export import ADAPTER_FILE, EXPORT_CONFIG

    return (Path(path) / ADAPTER_FILE).is_file() and (Path(path) / EXPORT_CONFIG).is_file()


def export_run(run_dir: str | os.PathLike, fmt: str = "lora",
               out_dir: str | os.PathLike | None = None, *, gguf_type: str = "f16") -> Path:
    """Exports a training run, or converts a LoRA export, into ``fmt``.

    Args:
      run_dir: a training run's directory (``config.yaml`` + checkpoints) or a LoRA
        export directory (``adapter.safetensors`` + ``config.yaml``). Everything is read
        from this directory (``jaxpost.rundir``), wherever the run was trained.
      fmt: ``"lora"`` (jaxpost's own adapters), ``"peft"``, ``"merged"`` or ``"gguf"``.
      out_dir: the export directory. Default, one per format and type: for a run,
        ``RUN_DIR/export`` (lora), ``RUN_DIR/export-peft``, ``RUN_DIR/export-merged``,
        ``RUN_DIR/export-gguf-f16``, ``RUN_DIR/export-gguf-q8_0``; for a LoRA export
        ``DIR``, the same suffixes beside it. An existing directory is replaced only
        when it is a previous export (:func:`jaxpost.export.check_export_target`).
      gguf_type: ``"f16"`` or ``"q8_0"`` (GGUF only).

    A training run is first exported as LoRA (its newest readable checkpoint, into
    ``RUN_DIR/export`` unless ``fmt`` is ``lora`` and ``out_dir`` is given), so every other
    format is built from that record.

    Raises:
      ValueError: an unknown ``fmt`` or ``gguf_type``, or an ``out_dir`` jaxpost may not
        replace (before any work).
      FileNotFoundError: ``run_dir`` is neither a run nor a LoRA export.
    """
    from jaxpost.export import check_export_target, export_directory
    from jaxpost.config import load_run_config
    from jaxpost.gguf_export import GGUF_TYPES
    from jaxpost.rundir import RunDir

    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is invalid: use one of {list(FORMATS)}")
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r} is invalid: use one of {list(GGUF_TYPES)}")
    if out_dir is not None:
        check_export_target(out_dir)
    path = Path(run_dir)
    if is_lora_export(path):
        lora_dir = path
        if fmt == "lora":
            if out_dir is None or Path(out_dir).resolve() == path.resolve():
                return path
            with export_directory(out_dir) as tmp:
                shutil.copytree(path, tmp, dirs_exist_ok=True)
            return Path(out_dir)
    else:
        from jaxpost.export import export_checkpoint

        run = RunDir(path)
        if not run.is_run():
            raise FileNotFoundError(f"{run.config_file} is missing: RUN_DIR must be the "
                                    "output_dir of a jaxpost train run or a LoRA export "
                                    "directory (adapter.safetensors + config.yaml)")
        lora_dir = export_checkpoint(load_run_config(path), out_dir=out_dir if fmt == "lora" else None,
                                     run_dir=path)
        if fmt == "lora":
            return lora_dir
    return export_from_lora_dir(lora_dir, fmt, out_dir, gguf_type=gguf_type)


def hub_write_token(repo_id: str, token: str | None = None):
    """Checks a Hub repo id and finds the token to push with, before any export work.

    Returns:
      The token as a ``jaxpost.credentials.Secret`` (``token``, else ``HF_TOKEN`` from the
      Colab/Kaggle secrets or the environment).

    Raises:
      ValueError: ``repo_id`` is not ``USER/NAME`` or breaks the Hub's naming rules.
      PermissionError: no token was found.
    """
    from huggingface_hub.utils import validate_repo_id

    from jaxpost.credentials import WHERE_TO_ADD, resolve_credentials

    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id):
        raise ValueError(f"repo_id={repo_id!r} is malformed: expected USER/NAME or ORG/NAME, "
                         "e.g. 'my-name/gemma3-gsm8k-grpo'")
    validate_repo_id(repo_id)
    secret = resolve_credentials(hf_token=token).hf_token
    if secret is None:
        raise PermissionError(f"pushing to the Hugging Face Hub needs a write token: set the "
                              f"HF_TOKEN secret ({WHERE_TO_ADD}) or pass token=")
    return secret


def push_to_hub(export_dir: str | os.PathLike, repo_id: str, token: str | None = None,
                private: bool = True, *, endpoint: str | None = None) -> str:
    """Uploads an export directory to a Hugging Face model repository.

    Creates the repository if needed (``create_repo(exist_ok=True)``), then uploads every
    file of the directory in one commit (``upload_folder``).

    Args:
      export_dir: a directory written by any ``jaxpost export`` format.
      repo_id: ``USER/NAME`` or ``ORG/NAME``.
      token: a write token; None takes ``HF_TOKEN`` from jaxpost's credentials (Colab
        secret, Kaggle secret or environment). It is never printed.
      private: create the repository as private.
      endpoint: a Hub URL (default ``HF_ENDPOINT`` or huggingface.co).

    Returns:
      The repository URL.

    Raises:
      ValueError: ``repo_id`` is malformed or ``export_dir`` is not an export directory.
      PermissionError: no token, or the Hub refused it.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    path = Path(export_dir)
    if not path.is_dir() or not (path / "README.md").is_file():
        raise ValueError(f"export_dir={str(export_dir)!r} is not an export directory (no "
                         "README.md): write one with jaxpost export first")
    secret = hub_write_token(repo_id, token)
    api = HfApi(endpoint=endpoint, token=secret.reveal())
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(path), repo_id=repo_id, repo_type="model",
                          commit_message="Upload jaxpost export")
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise PermissionError(f"the Hugging Face Hub refused to write to {repo_id!r} "
                                  f"(HTTP {status}): HF_TOKEN must be a write token of an "
                                  "account that owns this namespace") from None
        raise
    base = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    return f"{base}/{repo_id}"
