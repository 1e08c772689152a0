"""Exports a run, or converts a LoRA export, into any format by name (:func:`export_run`).

The formats (:data:`FORMATS`): ``lora``, jaxpost's own adapters
(:mod:`jaxpost.export.adapters`), ``peft`` and ``merged`` for the Hugging Face ecosystem
(:mod:`jaxpost.export.huggingface`), and ``gguf`` for llama.cpp and Ollama
(:mod:`jaxpost.export.gguf_file`). Every other format is built from a LoRA export, the
record of a run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from jaxpost.config import load_run_config
from jaxpost.export.adapters import export_checkpoint
from jaxpost.export.directory import (
    check_export_target,
    export_directory,
    is_lora_export,
    read_lora_export,
)
from jaxpost.export.gguf_file import check_gguf_type, write_gguf_export
from jaxpost.export.huggingface import write_hf_model, write_peft_adapter
from jaxpost.export.weights import check_gemma3
from jaxpost.models.loading import load_model
from jaxpost.rundir import RunDir, export_suffix

FORMATS = ("lora", "peft", "merged", "gguf")


def check_format(fmt: str) -> None:
    """Raises ValueError unless ``fmt`` is one of :data:`FORMATS`."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is invalid: use one of {list(FORMATS)}")


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
    if fmt not in ("peft", "merged", "gguf"):
        raise ValueError(f"format={fmt!r} is invalid here: use 'peft', 'merged' or 'gguf' "
                         "(the LoRA export directory itself is the 'lora' format)")
    if fmt == "gguf":
        check_gguf_type(gguf_type)
    config, lora, metrics = read_lora_export(lora_dir)
    lora_dir = Path(lora_dir)
    out = (Path(out_dir) if out_dir else
           lora_dir.with_name(lora_dir.name + export_suffix(fmt, gguf_type)))
    if out.resolve() == lora_dir.resolve():
        raise ValueError(f"out_dir={str(out)!r} is the LoRA export being converted: give "
                         "another directory")
    check_export_target(out)
    if loaded is None:
        loaded = load_model(config.model, dtype=config.dtype, seed=config.seed)
    check_gemma3(loaded)
    if fmt == "peft":
        return write_peft_adapter(loaded, lora, out, alpha=config.lora_alpha, config=config,
                                  metrics=metrics)
    if fmt == "merged":
        return write_hf_model(loaded, out, lora=lora, alpha=config.lora_alpha, config=config,
                              metrics=metrics)
    return write_gguf_export(loaded, out, lora=lora, alpha=config.lora_alpha,
                             gguf_type=gguf_type, config=config, metrics=metrics)


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
    check_format(fmt)
    check_gguf_type(gguf_type)
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
        run = RunDir(path)
        if not run.is_run():
            raise FileNotFoundError(f"{run.config_file} is missing: RUN_DIR must be the "
                                    "output_dir of a jaxpost train run or a LoRA export "
                                    "directory (adapter.safetensors + config.yaml)")
        lora_dir = export_checkpoint(load_run_config(path),
                                     out_dir=out_dir if fmt == "lora" else None,
                                     run_dir=path)
        if fmt == "lora":
            return lora_dir
    return export_from_lora_dir(lora_dir, fmt, out_dir, gguf_type=gguf_type)
