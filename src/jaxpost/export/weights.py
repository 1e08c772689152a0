"""Converts Tunix Gemma 3 weights and qwix LoRA adapters to Hugging Face's layout.

:func:`hf_tensors` names and shapes base weights as ``transformers`` does,
:func:`merge_lora` folds the LoRA update into them, and :func:`peft_tensors` writes the
adapters as PEFT's ``lora_A`` / ``lora_B`` (``[r, in]`` and ``[out, r]``).

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
are written as they are (llama.cpp's GGUF adds 1; see :mod:`jaxpost.export.gguf_file`).
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np
from flax import nnx

from jaxpost.export.adapters import flatten

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


def split_lora(lora: Mapping[str, np.ndarray]) -> dict[tuple[int, str], tuple[np.ndarray, ...]]:
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
    for (layer, weight), (a, b) in split_lora(lora).items():
        name = f"layers.{layer}.{weight}"
        if name not in out:
            raise ValueError(f"LoRA parameters for {name} but the base model has no such weight")
        delta = lora_delta(weight, a, b, scale)
        if delta.shape != out[name].shape:
            raise ValueError(f"LoRA update of {name} has shape {delta.shape}, the weight "
                             f"{out[name].shape} (adapters of another model?)")
        out[name] = out[name] + delta
    return out


def check_gemma3(loaded) -> None:
    """Raises ValueError unless ``loaded`` is a Gemma 3, the one family whose weights
    these conversions know (the LoRA format works for every family)."""
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
    for (layer, weight), (a, b) in split_lora(lora).items():
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


def base_params(loaded) -> dict[str, np.ndarray]:
    """The base model's parameters, flattened with Tunix names (no LoRA parameters)."""
    state = nnx.state(loaded.model, nnx.Param).to_pure_dict()
    flat = flatten(state)
    lora = [k for k in flat if "_lora_" in k]
    if lora:
        raise ValueError(f"loaded.model carries LoRA parameters ({lora[0]}, ...): pass the "
                         "base model and the LoRA arrays separately")
    return flat


def merged_hf_tensors(loaded, lora: Mapping[str, np.ndarray] | None = None, *,
                      alpha: float | None = None) -> dict[str, np.ndarray]:
    """The model's weights (LoRA merged in when ``lora`` is given) under Hugging Face names."""
    check_gemma3(loaded)
    params = base_params(loaded)
    if lora:
        if alpha is None:
            raise ValueError("alpha is required to merge LoRA parameters")
        params = merge_lora(params, lora, alpha=alpha)
    return hf_tensors({k: np.asarray(v, np.float32) for k, v in params.items()},
                      loaded.model_config)
