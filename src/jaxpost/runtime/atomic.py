"""Writing a file all-or-nothing, and giving what was written through private temporary
files the permissions of any file the user creates.

A reader (or a crash) never sees a half-written file: it is written under a temporary
name beside its target, flushed to disk, and renamed over it as the last step
(:func:`atomic_file` for a writer that takes a path, :func:`write_atomic` for text or
bytes in memory). Temporary files are
private (``tempfile`` makes them 0600 and directories 0700), so what is renamed into
place is first given the user's usual permissions (``0666`` / ``0777`` less the umask).
This module imports nothing of jaxpost, so any module may use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def make_shareable(path: Path) -> None:
    """Gives ``path`` (and, for a directory, everything in it) the permissions of any file
    the user creates: temporary files and directories are private (0600 and 0700)."""
    umask = _umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; once the body has written it, it replaces
    ``path`` with the user's usual file permissions.

    The temporary file is flushed to disk and then renamed, so neither a reader nor a
    crash sees a half-written file. On error the temporary file is removed and ``path``
    is left as it was. Missing parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        make_shareable(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Writes ``data`` to ``path`` whole or not at all (:func:`atomic_file`): ``str`` as
    UTF-8 text (newlines as given), ``bytes`` as they are.

    Returns:
      ``path``, as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    with atomic_file(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8", newline="")
    return path
