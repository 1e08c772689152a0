"""Local Hugging Face checkpoints of the families Tunix 0.1.7 reads from safetensors.

Gemma 3 lives in :mod:`jaxpost.models.loading`; this module adds Gemma 2, Qwen 2.5, Qwen 3 (dense
and MoE) and Llama 3.x. Each loader has the signature
``(path, source, mesh, dtype) -> LoadedModel`` and is registered in
``jaxpost.models.loading.LOCAL_LOADERS`` under its ``config.json`` ``model_type``.

A loader reads ``config.json``, builds the Tunix ``ModelConfig`` field by field (a
required key that is missing, or a value Tunix cannot represent, raises ``ValueError``
naming the key), checks the safetensors headers against that config (names and shapes,
so a truncated download or a mismatched config fails with the tensor's name rather than
deep inside Tunix), then calls Tunix's ``create_model_from_safe_tensors`` on the mesh.

``jaxpost.models.loading`` imports this module to fill its loader table; the types both use
live in :mod:`jaxpost.models.types`.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable

from jaxpost.models.types import (LoadedModel, eos_ids,  # noqa: F401 (re-exported)
                                  load_sentencepiece)
from jaxpost.runtime.mesh import use_mesh
from jaxpost.tunix_ext.architectures import (gemma, gemma_safetensors, llama3, llama3_params,
                                             qwen2_modules, qwen3_modules)
from jaxpost.tunix_ext.rope import honour_rope_theta
from jaxpost.tunix_ext.sampler import tokenizer_adapter

# Safetensors dtypes that Tunix's memory-mapped loader can read (it assumes one dtype per
# file; anything else goes through its slower per-tensor path).
_MMAP_DTYPES = {"F32", "BF16", "F16", "F64"}


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; ValueError naming the file if it is not one."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _required(hf: dict, key: str, where: str, field: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"{where}: required key {key!r} is missing (it sets Tunix's "
                         f"ModelConfig.{field})")
    return hf[key]


def _int(hf: dict, key: str, where: str, field: str) -> int:
    value = _required(hf, key, where, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {key}={value!r} is invalid: expected a positive integer")
    return value


def _head_dim(hf: dict, where: str, *, required: bool) -> int:
    """``head_dim``, or ``hidden_size // num_attention_heads`` where HF derives it."""
    if hf.get("head_dim") is not None or required:
        return _int(hf, "head_dim", where, "head_dim")
    hidden = _int(hf, "hidden_size", where, "embed_dim")
    heads = _int(hf, "num_attention_heads", where, "num_heads")
    if hidden % heads:
        raise ValueError(f"{where}: hidden_size={hidden} is not divisible by "
                         f"num_attention_heads={heads}; set head_dim explicitly")
    return hidden // heads


def _rope_theta(hf: dict, where: str) -> float:
    """``rope_theta`` (top level, or inside transformers 5's ``rope_parameters``)."""
    theta = hf.get("rope_theta")
    if theta is None:
        theta = (hf.get("rope_parameters") or {}).get("rope_theta")
    if theta is None:
        raise ValueError(f"{where}: required key 'rope_theta' is missing (it sets Tunix's "
                         "ModelConfig.rope_theta)")
    return theta


def _rope_scaling(hf: dict) -> dict | None:
    """The RoPE scaling settings, or None for plain RoPE."""
    scaling = hf.get("rope_scaling")
    if scaling is None:
        params = hf.get("rope_parameters") or {}
        if params.get("rope_type", "default") != "default":
            scaling = params
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        return scaling
    return None


def _warn_rope_scaling_ignored(hf: dict, where: str, family: str) -> None:
    scaling = _rope_scaling(hf)
    if scaling is not None:
        # Tunix's own Llama 3.1/3.2 presets drop it too; refusing would block every
        # Llama 3.1/3.2 checkpoint, so it is reported instead.
        warnings.warn(
            f"{where}: rope_scaling={scaling} is ignored: Tunix 0.1.7's {family} model has "
            "no RoPE scaling (its own presets drop it too), so its low RoPE frequencies, "
            "and hence its outputs, differ from the reference model's",
            stacklevel=3)


def _expect(hf: dict, key: str, allowed: tuple, where: str, why: str, default: Any) -> None:
    value = hf.get(key)
    value = default if value is None else value
    if value not in allowed:
        raise ValueError(f"{where}: {key}={value!r} is not supported: {why} "
                         f"(allowed: {list(allowed)})")


def _check_eps(hf: dict, where: str) -> float:
    eps = _required(hf, "rms_norm_eps", where, "norm_eps")
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"{where}: rms_norm_eps={eps!r} is invalid: expected a positive number")
    return float(eps)


def gemma2_config_from_hf(hf: dict, where: str = "config.json") -> Any:
    """Tunix Gemma 2 ``ModelConfig`` (``tunix.models.gemma``) from a ``config.json`` dict.

    Tunix's Gemma 2 hard-codes RMSNorm epsilon 1e-6, RoPE base 10000, tanh-approximated
    GELU, tied embeddings and query scaling by ``head_dim ** -0.5``; a config asking for
    anything else raises ``ValueError`` instead of loading into a different model.
    """
    num_layers = _int(hf, "num_hidden_layers", where, "num_layers")
    head_dim = _head_dim(hf, where, required=True)
    if head_dim % 2:
        raise ValueError(f"{where}: head_dim={head_dim} must be even for RoPE")
    scalar = hf.get("query_pre_attn_scalar", head_dim)
    if scalar != head_dim:
        raise ValueError(f"{where}: query_pre_attn_scalar={scalar!r} is not supported: Tunix's "
                         f"Gemma 2 scales queries by head_dim ** -0.5 (head_dim={head_dim})")
    eps = _check_eps(hf, where)
    if not math.isclose(eps, 1e-6):
        raise ValueError(f"{where}: rms_norm_eps={eps!r} is not supported: Tunix's Gemma 2 "
                         "uses 1e-06")
    theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10_000))
    if theta != 10_000:
        raise ValueError(f"{where}: rope_theta={theta!r} is not supported: Tunix's Gemma 2 "
                         "uses 10000")
    if _rope_scaling(hf) is not None:
        raise ValueError(f"{where}: rope_scaling is not supported by Tunix's Gemma 2")
    _expect(hf, "hidden_activation", ("gelu_pytorch_tanh",), where,
            "Tunix's Gemma 2 uses tanh-approximated GELU",
            hf.get("hidden_act", "gelu_pytorch_tanh"))
    _expect(hf, "tie_word_embeddings", (True,), where,
            "Tunix's Gemma 2 decodes with the input embedding", True)
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    kinds = {"sliding_attention": gemma.AttentionType.LOCAL_SLIDING,
             "full_attention": gemma.AttentionType.GLOBAL}
    if len(layer_types) != num_layers or any(t not in kinds for t in layer_types):
        raise ValueError(f"{where}: layer_types={layer_types!r} is invalid: expected "
                         f"{num_layers} entries from {sorted(kinds)}")
    attention_types = tuple(kinds[t] for t in layer_types)
    sliding = None
    if gemma.AttentionType.LOCAL_SLIDING in attention_types:
        sliding = _int(hf, "sliding_window", where, "sliding_window_size")
    return gemma.ModelConfig(
        num_layers=num_layers,
        num_embed=_int(hf, "vocab_size", where, "num_embed"),
        embed_dim=_int(hf, "hidden_size", where, "embed_dim"),
        hidden_dim=_int(hf, "intermediate_size", where, "hidden_dim"),
        num_heads=_int(hf, "num_attention_heads", where, "num_heads"),
        head_dim=head_dim,
        num_kv_heads=_int(hf, "num_key_value_heads", where, "num_kv_heads"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
        attn_logits_soft_cap=hf.get("attn_logit_softcapping"),
        use_post_attn_norm=True,
        use_post_ffw_norm=True,
        attention_types=attention_types,
        sliding_window_size=sliding,
    )


def _qwen_llama_common(hf: dict, where: str, family: str, *, head_dim_required: bool) -> dict:
    """Fields shared by Tunix's Qwen 2, Qwen 3 and Llama 3 ``ModelConfig``."""
    _expect(hf, "hidden_act", ("silu",), where, f"Tunix's {family} MLP uses SiLU", "silu")
    _warn_rope_scaling_ignored(hf, where, family)
    return dict(
        num_layers=_int(hf, "num_hidden_layers", where, "num_layers"),
        vocab_size=_int(hf, "vocab_size", where, "vocab_size"),
        embed_dim=_int(hf, "hidden_size", where, "embed_dim"),
        num_heads=_int(hf, "num_attention_heads", where, "num_heads"),
        head_dim=_head_dim(hf, where, required=head_dim_required),
        num_kv_heads=_int(hf, "num_key_value_heads", where, "num_kv_heads"),
        rope_theta=_rope_theta(hf, where),
        norm_eps=_check_eps(hf, where),
    )


def qwen2_config_from_hf(hf: dict, dtype, where: str = "config.json") -> Any:
    """Tunix Qwen 2 ``ModelConfig`` (``tunix.models.qwen2``) from a ``config.json`` dict.

    Covers Qwen 2 / 2.5 and their distillations (``model_type`` ``"qwen2"``). ``dtype``
    is both the parameter and the compute dtype. Tunix's Qwen 2 has no sliding-window
    attention, so ``use_sliding_window: true`` is refused.
    """
    qwen2, _ = qwen2_modules()

    _expect(hf, "use_sliding_window", (False,), where,
            "Tunix's Qwen 2 has no sliding-window attention", False)
    return qwen2.ModelConfig(
        **_qwen_llama_common(hf, where, "Qwen 2", head_dim_required=False),
        hidden_dim=_int(hf, "intermediate_size", where, "hidden_dim"),
        use_tied_embedding=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype,
        param_dtype=dtype,
    )


def qwen3_config_from_hf(hf: dict, dtype, where: str = "config.json") -> Any:
    """Tunix Qwen 3 ``ModelConfig`` (``tunix.models.qwen3``) from a ``config.json`` dict.

    Dense (``model_type`` ``"qwen3"``) and mixture-of-experts (``"qwen3_moe"``: every
    layer sparse, top-k weights renormalised, as in Qwen3-30B-A3B). ``dtype`` is both
    the parameter and the compute dtype.
    """
    qwen3, _ = qwen3_modules()
    _expect(hf, "attention_bias", (False,), where,
            "Tunix's Qwen 3 attention has no bias", False)
    _expect(hf, "use_sliding_window", (False,), where,
            "Tunix's Qwen 3 has no sliding-window attention", False)
    common = _qwen_llama_common(hf, where, "Qwen 3", head_dim_required=True)
    if hf.get("model_type") == "qwen3_moe":
        _expect(hf, "decoder_sparse_step", (1,), where,
                "Tunix's Qwen 3 MoE makes every layer sparse", 1)
        _expect(hf, "norm_topk_prob", (True,), where,
                "Tunix's Qwen 3 MoE renormalises the top-k router weights", True)
        if hf.get("mlp_only_layers"):
            raise ValueError(f"{where}: mlp_only_layers={hf['mlp_only_layers']!r} is not "
                             "supported: Tunix's Qwen 3 MoE makes every layer sparse")
        moe = dict(
            hidden_dim=_int(hf, "moe_intermediate_size", where, "hidden_dim"),
            num_experts=_int(hf, "num_experts", where, "num_experts"),
            num_experts_per_tok=_int(hf, "num_experts_per_tok", where, "num_experts_per_tok"),
        )
    else:
        moe = dict(hidden_dim=_int(hf, "intermediate_size", where, "hidden_dim"))
    return qwen3.ModelConfig(
        **common,
        **moe,
        use_tied_embedding=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype,
        param_dtype=dtype,
    )


def llama3_config_from_hf(hf: dict, where: str = "config.json") -> Any:
    """Tunix Llama 3 ``ModelConfig`` (``tunix.models.llama3``) from a ``config.json`` dict.

    Tunix's Llama 3 has no RoPE scaling: Llama 3.1/3.2's ``rope_scaling`` (type
    ``llama3``) is ignored with a warning, as Tunix's own presets do. Its parameters
    take the dtype they are loaded in (the ModelConfig has no dtype field).
    """
    _expect(hf, "attention_bias", (False,), where, "Tunix's Llama 3 attention has no bias",
            False)
    _expect(hf, "mlp_bias", (False,), where, "Tunix's Llama 3 MLP has no bias", False)
    return llama3.ModelConfig(
        **_qwen_llama_common(hf, where, "Llama 3", head_dim_required=False),
        hidden_dim=_int(hf, "intermediate_size", where, "hidden_dim"),
        weight_tying=bool(hf.get("tie_word_embeddings", False)),
    )


def expected_tensors(model_type: str, cfg: Any) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes that Tunix's loader needs for ``cfg``.

    Shapes are PyTorch ``nn.Linear`` layout, ``[out_features, in_features]``.
    """
    gemma = model_type == "gemma2"
    vocab = cfg.num_embed if gemma else cfg.vocab_size
    d, f, hd = cfg.embed_dim, cfg.hidden_dim, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    tied = True if gemma else getattr(cfg, "use_tied_embedding", getattr(cfg, "weight_tying", None))
    out = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not tied:
        out["lm_head.weight"] = (vocab, d)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        }
        if model_type == "qwen3_moe":
            out[p + "mlp.gate.weight"] = (cfg.num_experts, d)
            for e in range(cfg.num_experts):
                out |= {p + f"mlp.experts.{e}.gate_proj.weight": (f, d),
                        p + f"mlp.experts.{e}.up_proj.weight": (f, d),
                        p + f"mlp.experts.{e}.down_proj.weight": (d, f)}
        else:
            out |= {p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                    p + "mlp.down_proj.weight": (d, f)}
        if model_type == "qwen2":
            out |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,)}
        if model_type in ("qwen3", "qwen3_moe"):
            out |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
        if gemma:
            out |= {p + "pre_feedforward_layernorm.weight": (d,),
                    p + "post_feedforward_layernorm.weight": (d,)}
    return out


def check_safetensors(path: Path, expected: dict[str, tuple[int, ...]]) -> str:
    """Checks the safetensors headers in ``path`` against ``expected`` names and shapes.

    Reads headers only. Returns the Tunix loading mode: ``"auto"`` (memory-mapped) when
    every file holds a single float dtype, else ``"original"``: Tunix 0.1.7's
    memory-mapped loader reads a whole file with its first tensor's dtype, which would
    garble a file that mixes dtypes.

    Raises:
      ValueError: a tensor is missing or has another shape, naming it.
    """
    # only when safetensors files are read or written
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    mode = "auto"
    for file in sorted(path.glob("*.safetensors")):
        dtypes = set()
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                shapes[name] = tuple(sl.get_shape())
                dtypes.add(sl.get_dtype())
        if len(dtypes) > 1 or not dtypes <= _MMAP_DTYPES:
            mode = "original"
    missing = [n for n in expected if n not in shapes]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"{path}: the safetensors files lack {len(missing)} tensor(s) that config.json "
            f"implies: {', '.join(missing[:5])}{more}. Is the download complete, and does "
            "config.json (num_hidden_layers, tie_word_embeddings, ...) belong to these weights?")
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise ValueError(f"{path}: tensor {name} has shape {list(shapes[name])} but "
                             f"config.json implies {list(shape)}")
    return mode


def load_tokenizer(path: Path):
    """A Tunix ``TokenizerAdapter`` for the tokenizer files in ``path``.

    ``tokenizer.model`` (SentencePiece, adds BOS) when present, else the Hugging Face
    ``tokenizer.json`` through ``transformers.AutoTokenizer`` (for Qwen its ``bos_id()``
    is None, which Tunix's sampler accepts).
    """
    if (path / "tokenizer.model").is_file():
        return load_sentencepiece(path / "tokenizer.model")
    if (path / "tokenizer.json").is_file():
        # transformers takes seconds to import: only for a tokenizer that needs it
        from transformers import AutoTokenizer

        return tokenizer_adapter(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
    raise FileNotFoundError(f"{path} has no tokenizer: expected tokenizer.model (SentencePiece) "
                            "or tokenizer.json (Hugging Face) beside config.json")


def _load_dir(path: Path, source: str, mesh, dtype, *, family: str,
              config_from_hf: Callable[[dict, str], Any], create: Callable) -> Any:
    cfg_file = path / "config.json"
    hf = read_json(cfg_file)
    model_type = hf.get("model_type")
    cfg = config_from_hf(hf, str(cfg_file))
    mode = check_safetensors(path, expected_tensors(model_type, cfg))
    tokenizer = load_tokenizer(path)
    gen_file = path / "generation_config.json"
    gen = read_json(gen_file) if gen_file.is_file() else {}
    with use_mesh(mesh):
        model = create(str(path), cfg, mesh=mesh, dtype=dtype, mode=mode)
    return LoadedModel(model, tokenizer, cfg, mesh, family, source, path,
                       eos_ids(tokenizer, hf, gen))


def load_gemma2_dir(path: Path, source: str, mesh, dtype) -> Any:
    """Loads a Gemma 2 Hugging Face directory (``model_type`` ``"gemma2"``)."""
    return _load_dir(path, source, mesh, dtype, family="gemma2",
                     config_from_hf=gemma2_config_from_hf,
                     create=gemma_safetensors.create_model_from_safe_tensors)


def load_qwen2_dir(path: Path, source: str, mesh, dtype) -> Any:
    """Loads a Qwen 2 / 2.5 Hugging Face directory (``model_type`` ``"qwen2"``)."""
    _, params = qwen2_modules()
    return _load_dir(path, source, mesh, dtype, family="qwen2",
                     config_from_hf=lambda hf, where: qwen2_config_from_hf(hf, dtype, where),
                     create=params.create_model_from_safe_tensors)


def load_qwen3_dir(path: Path, source: str, mesh, dtype) -> Any:
    """Loads a Qwen 3 Hugging Face directory (``model_type`` ``"qwen3"``/``"qwen3_moe"``)."""
    qwen3, params = qwen3_modules()
    honour_rope_theta(qwen3)
    return _load_dir(path, source, mesh, dtype, family="qwen3",
                     config_from_hf=lambda hf, where: qwen3_config_from_hf(hf, dtype, where),
                     create=params.create_model_from_safe_tensors)


def load_llama3_dir(path: Path, source: str, mesh, dtype) -> Any:
    """Loads a Llama 3.x Hugging Face directory (``model_type`` ``"llama"``)."""
    honour_rope_theta(llama3)
    return _load_dir(path, source, mesh, dtype, family="llama3",
                     config_from_hf=llama3_config_from_hf,
                     create=llama3_params.create_model_from_safe_tensors)


# Hugging Face ``model_type`` -> loader; merged into jaxpost.models.loading.LOCAL_LOADERS.
LOADERS: dict[str, Callable] = {
    "gemma2": load_gemma2_dir,
    "qwen2": load_qwen2_dir,
    "qwen3": load_qwen3_dir,
    "qwen3_moe": load_qwen3_dir,
    "llama": load_llama3_dir,
}
