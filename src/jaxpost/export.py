"""Exports a run's LoRA adapters, with the config that produced them and its final metrics.

An export directory holds:

* ``adapter.safetensors`` -- the LoRA parameters, named by their module path
  (``layers.0.attn.q_einsum.w_lora_a``);
* ``config.yaml`` -- the run's config (a config never holds secrets);
* ``metrics.json`` -- the step, the first and final rewards and the last step's metrics;
* ``README.md`` -- how to load it.

:func:`load_lora_export` rebuilds the adapted model from these files alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
from flax import nnx

from jaxpost.config import ColabTrainingConfig, load_yaml, save_yaml

ADAPTER_FILE = "adapter.safetensors"
EXPORT_CONFIG = "config.yaml"
EXPORT_METRICS = "metrics.json"


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(_flatten(value, name))
        else:
            flat[name] = np.asarray(value)
    return flat


def lora_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's LoRA parameters as ``{"layers.0.attn.q_einsum.w_lora_a": array}``."""
    state = nnx.state(model, nnx.LoRAParam).to_pure_dict()
    return _flatten(state)


def set_lora_arrays(model: nnx.Module, arrays: dict[str, np.ndarray]) -> None:
    """Writes named LoRA arrays into ``model`` in place, checking names and shapes.

    Raises:
      ValueError: when a name is missing or extra, or a shape differs.
    """
    state = nnx.state(model, nnx.LoRAParam)
    pure = state.to_pure_dict()
    expected = _flatten(pure)
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(f"LoRA parameters do not match the model: missing {missing[:3]}, "
                         f"unexpected {extra[:3]} (was it exported with other "
                         f"lora_target_modules?)")
    for name, value in arrays.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(f"LoRA parameter {name} has shape {value.shape}, the model "
                             f"expects {expected[name].shape} (different lora_rank?)")

    def fill(tree, prefix=""):
        for key in tree:
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(tree[key], dict):
                fill(tree[key], name)
            else:
                old = tree[key]
                tree[key] = jax.device_put(arrays[name].astype(old.dtype), old.sharding)

    fill(pure)
    state.replace_by_pure_dict(pure)
    nnx.update(model, state)


def export_lora(model: nnx.Module, config: ColabTrainingConfig, out_dir: str | os.PathLike,
                metrics: dict[str, Any] | None = None) -> Path:
    """Writes an export directory (see module docstring) atomically and returns its path."""
    return _write_export(lora_arrays(model), config, Path(out_dir), metrics or {})


def _instructions(path: Path) -> str:
    return (
        "# jaxpost LoRA export\n\n"
        "Command line:\n\n"
        f"    jaxpost generate \"What is 7 + 5?\" --chat --lora {path}\n\n"
        "Python:\n\n"
        "    from jaxpost.export import load_lora_export\n"
        "    from jaxpost.models import load_model\n"
        "    from jaxpost.sampling import generate\n"
        f"    loaded = load_model(<the config's model>)\n"
        f"    model = load_lora_export(\"{path}\", loaded)\n"
        "    print(generate(loaded, \"What is 7 + 5?\", model=model, chat=True))\n")


def load_lora_export(path: str | os.PathLike, loaded) -> nnx.Module:
    """Rebuilds the adapted model from an export directory and a loaded base model.

    Args:
      path: an export directory written by :func:`export_lora`.
      loaded: the base model (``jaxpost.models.load_model`` of the config's ``model``).

    Raises:
      FileNotFoundError: when the directory lacks the adapter or config file.
    """
    from safetensors.numpy import load_file

    from jaxpost.lora import apply_lora

    path = Path(path)
    for name in (ADAPTER_FILE, EXPORT_CONFIG):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: --lora expects a directory "
                                    "written by jaxpost export / jaxpost train")
    config = load_yaml(str(path / EXPORT_CONFIG))
    model = apply_lora(loaded.model, loaded.mesh, rank=config.lora_rank, alpha=config.lora_alpha,
                       target_modules=config.lora_target_modules)
    set_lora_arrays(model, load_file(str(path / ADAPTER_FILE)))
    return model


def export_checkpoint(config: ColabTrainingConfig, trainer_state=None,
                      out_dir: str | os.PathLike | None = None, *,
                      run_dir: str | os.PathLike | None = None) -> Path:
    """Exports a run's latest readable checkpoint: LoRA parameters, config, final metrics.

    Reads the checkpoint from disk rather than the live model, so it works the same in
    a fresh session after the run (``trainer_state`` may be None). Also writes
    ``<export>.zip`` when ``config.save_to_drive`` is set, and prints how to load it.

    Args:
      config: the run's config (written into the export as its record).
      out_dir: the export directory; default ``RUN_DIR/export``.
      run_dir: the run directory to read; default ``config.output_dir`` (the run just
        trained). Checkpoints, metrics and the default export directory all come from
        it, so a run that was copied or moved exports from where it lies.

    Returns:
      The export directory.
    """
    from jaxpost.checkpoints import final_stage_dir
    from jaxpost.rundir import RunDir
    from jaxpost.train import read_metrics

    run = RunDir(config.output_dir if run_dir is None else run_dir)
    step, arrays = checkpoint_lora_arrays(final_stage_dir(run.checkpoint_dir))
    history = read_metrics(run.path)
    rewards = [h["reward"] for h in history if "reward" in h]
    metrics = {
        "step": step,
        "first_reward": rewards[0] if rewards else None,
        "final_reward": rewards[-1] if rewards else None,
        "final": history[-1] if history else {},
    }
    out = Path(out_dir) if out_dir is not None else run.export_dir()
    out = _write_export(arrays, config, out, metrics)
    if config.save_to_drive:
        zip_path = shutil.make_archive(str(out), "zip", root_dir=out)
        print(f"jaxpost: zipped export to {zip_path}", flush=True)
    print(f"jaxpost: exported LoRA adapters of step {step} to {out}\n"
          f"  load it: jaxpost generate \"What is 7 + 5?\" --chat --lora {out}", flush=True)
    return out


def checkpoint_lora_arrays(checkpoint_dir, step: int | None = None) -> tuple[int, dict]:
    """A training checkpoint's LoRA parameters, named as in an export.

    Args:
      checkpoint_dir: a stage's checkpoint directory, e.g.
        ``jaxpost.checkpoints.final_stage_dir(RunDir(run_dir).checkpoint_dir)``.
      step: the checkpoint step; the newest readable one when None.

    Returns:
      ``(step, {"layers.0.attn.q_einsum.w_lora_a": array, ...})``, ready for
      :func:`set_lora_arrays`.
    """
    from jaxpost.checkpoints import restore_lora_params

    step, params = restore_lora_params(checkpoint_dir, step)
    return step, _flatten(_strip_value_keys(params))


def _strip_value_keys(tree):
    """Orbax restores nnx variables as ``{"value": array}`` leaves; keep the arrays."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {k: _strip_value_keys(v) for k, v in tree.items()}
    return tree


def _write_export(arrays: dict[str, np.ndarray], config, out: Path, metrics) -> Path:
    from safetensors.numpy import save_file

    with export_directory(out) as tmp:
        save_file({k: np.asarray(v) for k, v in arrays.items()}, str(tmp / ADAPTER_FILE))
        save_yaml(config, str(tmp / EXPORT_CONFIG))
        (tmp / EXPORT_METRICS).write_text(json.dumps(metrics, indent=2, default=float))
        (tmp / "README.md").write_text(_instructions(out))
    return out


def _files(directory: Path) -> set[str]:
    if not directory.is_dir():
        return set()
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if not p.is_dir()}


def check_export_target(out: str | os.PathLike) -> None:
    """Checks that an export may be written to ``out``: it is absent, an empty directory
    or a previous jaxpost export (which holds ``metrics.json`` and ``README.md``, as every
    export does).

    Raises:
      ValueError: ``out`` is a file, or a non-empty directory that jaxpost did not write.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"export directory {out} is a file: give a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not ((out / EXPORT_METRICS).is_file() and (out / "README.md").is_file()):
        raise ValueError(f"{out} is not empty and is not a jaxpost export (it lacks "
                         f"{EXPORT_METRICS} and README.md): jaxpost replaces only its own "
                         "exports; choose another --out, or empty it yourself")


def _shareable(directory: Path) -> None:
    """Gives an export the permissions of any file the user creates: the temporary files
    and directory it was written through are private (0600 and 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def export_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary directory that replaces ``out`` once the body has filled it.

    ``out`` is checked first (:func:`check_export_target`), so a directory jaxpost did not
    write is never replaced. Files of a previous export that the new one does not write
    again are named on stderr, since they are gone. On error ``out`` is left as it was.

    Raises:
      ValueError: from :func:`check_export_target`.
    """
    from jaxpost.cache import replacing_dir

    out = Path(out)
    check_export_target(out)
    before = _files(out)
    with replacing_dir(out) as tmp:
        yield tmp
        removed = sorted(before - _files(tmp))
        _shareable(tmp)
    if removed:
        print(f"jaxpost: replaced the previous export in {out}; removed its files that the "
              f"new export does not write: {', '.join(removed)}", file=sys.stderr, flush=True)
