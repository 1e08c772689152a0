"""The jaxpost cache: converted models live here, written atomically and verified on read.

A cache entry is a directory holding its files and a ``manifest.json`` written last,
which records each file's size and xxh3-64 digest. An entry without a manifest, or
whose files do not match it, is treated as absent (and rebuilt by the caller); an entry
is only ever published by renaming a finished temporary directory into place, so a
conversion killed halfway never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import contextlib
from pathlib import Path
from typing import Iterator

import xxhash

MANIFEST = "manifest.json"
_CHUNK = 16 * 1024 * 1024


def cache_root() -> Path:
    """Returns the cache root: ``$JAXPOST_CACHE`` or ``~/.cache/jaxpost``."""
    return Path(os.environ.get("JAXPOST_CACHE", "~/.cache/jaxpost")).expanduser()


def file_digest(path: Path) -> str:
    """xxh3-64 hex digest of a file's bytes (fast enough to check 1 GB in well under a second)."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, meta: dict | None = None) -> None:
    """Records every file in ``directory`` (sizes and digests) in its manifest."""
    files = {}
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            files[p.name] = {"size": p.stat().st_size, "xxh3": file_digest(p)}
    manifest = {"files": files, "meta": meta or {}}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))


def verify_entry(directory: Path) -> str | None:
    """Checks a cache entry against its manifest.

    Returns:
      None when the entry is complete and intact, otherwise a sentence saying what is
      wrong (missing manifest, missing file, size or digest mismatch).
    """
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return f"{directory} has no {MANIFEST} (conversion did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"{manifest_path} is unreadable ({e})"
    for name, rec in files.items():
        p = directory / name
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != rec["size"]:
            return f"{p} has {p.stat().st_size} bytes, expected {rec['size']}"
        if file_digest(p) != rec["xxh3"]:
            return f"{p} does not match its recorded digest (corrupt)"
    return None


@contextlib.contextmanager
def replacing_dir(directory: Path) -> Iterator[Path]:
    """Yields a temporary directory beside ``directory``; on success it replaces it.

    The rename is the last step, so a reader never sees a half-written directory. On
    error the temporary directory is removed and ``directory`` is left as it was.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        yield tmp
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def building_entry(directory: Path) -> Iterator[Path]:
    """Yields a temporary directory to fill; on success it replaces ``directory``.

    The manifest is written after the body finishes, then the temporary directory is
    renamed into place (:func:`replacing_dir`).
    """
    with replacing_dir(directory) as tmp:
        yield tmp
        write_manifest(tmp)


def enable_compilation_cache() -> Path:
    """Keeps XLA's compiled programs under ``<cache root>/xla`` across processes.

    Compiling the GRPO step of the 270M model takes over a minute on two CPU cores; a
    rerun (a resumed Colab session, a second ``jaxpost train``) then loads it instead.
    Set ``JAXPOST_COMPILATION_CACHE=0`` to turn this off.
    """
    # not at the top: this module is read before JAX starts (the CLI, the config)
    import jax

    path = cache_root() / "xla"
    if os.environ.get("JAXPOST_COMPILATION_CACHE", "1") == "0":
        return path
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    return path
