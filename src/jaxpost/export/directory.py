"""An export directory on disk: its record files, and writing it all-or-nothing.

Every export format (:mod:`jaxpost.export`) is a directory that holds the run's
``config.yaml`` and ``metrics.json`` and a ``README.md`` beside its own files. It is
written into a temporary directory that replaces the target only once it is complete
(:func:`export_directory`), and only where the target is absent, empty or a previous
export (:func:`check_export_target`), so a directory jaxpost did not write is never
replaced. :func:`jaxpost.runtime.atomic.atomic_file` does the same for a single file.

A LoRA export (jaxpost's own format) also holds ``adapter.safetensors``; other formats
are built from it (:func:`read_lora_export`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

from safetensors.numpy import load_file

from jaxpost.runtime.atomic import make_shareable
from jaxpost.runtime.cache import replacing_dir
from jaxpost.config import load_yaml, save_yaml

ADAPTER_FILE = "adapter.safetensors"
EXPORT_CONFIG = "config.yaml"
EXPORT_METRICS = "metrics.json"
README_FILE = "README.md"


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
    if not ((out / EXPORT_METRICS).is_file() and (out / README_FILE).is_file()):
        raise ValueError(f"{out} is not empty and is not a jaxpost export (it lacks "
                         f"{EXPORT_METRICS} and {README_FILE}): jaxpost replaces only its own "
                         "exports; choose another --out, or empty it yourself")


@contextlib.contextmanager
def export_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary directory that replaces ``out`` once the body has filled it.

    ``out`` is checked first (:func:`check_export_target`), so a directory jaxpost did not
    write is never replaced. Files of a previous export that the new one does not write
    again are named on stderr, since they are gone. On error ``out`` is left as it was.

    Raises:
      ValueError: from :func:`check_export_target`.
    """
    out = Path(out)
    check_export_target(out)
    before = _files(out)
    with replacing_dir(out) as tmp:
        yield tmp
        removed = sorted(before - _files(tmp))
        make_shareable(tmp)
    if removed:
        print(f"jaxpost: replaced the previous export in {out}; removed its files that the "
              f"new export does not write: {', '.join(removed)}", file=sys.stderr, flush=True)


def write_record(directory: Path, config=None, metrics: Mapping[str, Any] | None = None) -> None:
    """Writes the run's ``config.yaml`` (when ``config`` is given) and ``metrics.json``
    into ``directory``, beside an export's files."""
    if config is not None:
        save_yaml(config, str(directory / EXPORT_CONFIG))
    (directory / EXPORT_METRICS).write_text(json.dumps(dict(metrics or {}), indent=2,
                                                       default=float))


def is_lora_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a LoRA export directory (adapter + config), not a training run."""
    return (Path(path) / ADAPTER_FILE).is_file() and (Path(path) / EXPORT_CONFIG).is_file()


def read_lora_export(path: str | os.PathLike):
    """``(config, lora arrays, metrics)`` of a LoRA export directory (``jaxpost export``).

    The arrays are named as :func:`jaxpost.export.lora_arrays` names them; ``metrics``
    is ``{}`` where the directory has no ``metrics.json``.

    Raises:
      FileNotFoundError: the directory lacks the adapter or config file.
    """
    path = Path(path)
    for name in (ADAPTER_FILE, EXPORT_CONFIG):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: expected a LoRA export "
                                    "directory (written by jaxpost train / jaxpost export)")
    metrics_file = path / EXPORT_METRICS
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return load_yaml(str(path / EXPORT_CONFIG)), load_file(str(path / ADAPTER_FILE)), metrics
