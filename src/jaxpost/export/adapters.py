"""jaxpost's own export format: a run's LoRA adapters, with its config and final metrics.

A LoRA export directory holds:

* ``adapter.safetensors`` -- the LoRA parameters, named by their module path
  (``layers.0.attn.q_einsum.w_lora_a``);
* ``config.yaml`` -- the run's config (a config never holds secrets);
* ``metrics.json`` -- the step, the first and final rewards and the last step's metrics;
* ``README.md`` -- how to load it.

:func:`load_lora_export` rebuilds the adapted model from these files alone; the other
formats (:mod:`jaxpost.export.formats`) are built from them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jaxpost.checkpoints import final_stage_dir, restore_lora_params
from jaxpost.config import ColabTrainingConfig
from jaxpost.export.cards import lora_readme
from jaxpost.export.directory import (
    ADAPTER_FILE,
    README_FILE,
    export_directory,
    read_lora_export,
    write_record,
)
from jaxpost.models.lora import apply_lora
from jaxpost.rundir import RunDir
from jaxpost.train import read_metrics


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """A nested dict of arrays as ``{"layers.0.attn.q_einsum.w": array}`` (keys joined by
    dots, leaves as numpy arrays)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = np.asarray(value)
    return flat


def lora_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's LoRA parameters as ``{"layers.0.attn.q_einsum.w_lora_a": array}``."""
    state = nnx.state(model, nnx.LoRAParam).to_pure_dict()
    return flatten(state)


def set_lora_arrays(model: nnx.Module, arrays: dict[str, np.ndarray]) -> None:
    """Writes named LoRA arrays into ``model`` in place, checking names and shapes.

    Raises:
      ValueError: when a name is missing or extra, or a shape differs.
    """
    state = nnx.state(model, nnx.LoRAParam)
    pure = state.to_pure_dict()
    expected = flatten(pure)
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


def load_lora_export(path: str | os.PathLike, loaded) -> nnx.Module:
    """Rebuilds the adapted model from an export directory and a loaded base model.

    Args:
      path: an export directory written by :func:`export_lora`.
      loaded: the base model (``jaxpost.models.loading.load_model`` of the config's ``model``).

    Raises:
      FileNotFoundError: when the directory lacks the adapter or config file.
    """
    config, arrays, _ = read_lora_export(path)
    return apply_lora_arrays(loaded, config, arrays)


def apply_lora_arrays(loaded, config: ColabTrainingConfig,
                      arrays: dict[str, np.ndarray]) -> nnx.Module:
    """``loaded.model`` with LoRA adapters of ``config``'s rank, alpha and target modules
    holding ``arrays`` (as :func:`lora_arrays` names them); the base weights are shared.

    Raises:
      ValueError: from :func:`set_lora_arrays`, when the arrays do not fit the config.
    """
    model = apply_lora(loaded.model, loaded.mesh, rank=config.lora_rank, alpha=config.lora_alpha,
                       target_modules=config.lora_target_modules)
    set_lora_arrays(model, arrays)
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
    step, params = restore_lora_params(checkpoint_dir, step)
    return step, flatten(_strip_value_keys(params))


def _strip_value_keys(tree):
    """Orbax restores nnx variables as ``{"value": array}`` leaves; keep the arrays."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {k: _strip_value_keys(v) for k, v in tree.items()}
    return tree


def _write_export(arrays: dict[str, np.ndarray], config, out: Path, metrics) -> Path:
    with export_directory(out) as tmp:
        save_file({k: np.asarray(v) for k, v in arrays.items()}, str(tmp / ADAPTER_FILE))
        write_record(tmp, config, metrics)
        (tmp / README_FILE).write_text(lora_readme(out))
    return out
