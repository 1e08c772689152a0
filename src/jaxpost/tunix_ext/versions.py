"""The Tunix and qwix versions that jaxpost's patches of their code were written for.

jaxpost replaces or calls private parts of Tunix and qwix (``docs/tunix_patches.md``
lists each). Those names may change, or mean something else, in any release, so the
functions that install the patches call :func:`check_versions` first: another installed
version is refused with a message naming both versions and the command that installs
the pinned one, rather than failing later inside a traced step or, worse, computing
something else. ``pyproject.toml`` pins the same versions (a test checks that they
agree), so an upgrade changes the pin, this table and the patches together.
"""

from __future__ import annotations

from importlib import metadata
from typing import Mapping

# Distribution name -> the version the patches were written and tested against.
WRITTEN_FOR = {"google-tunix": "0.1.7", "qwix": "0.1.8"}


def installed_version(package: str) -> str | None:
    """The installed version of the distribution ``package``, or None if it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_version(package: str, installed: str | None) -> None:
    """Refuses ``installed`` (a version string, None: not installed) for ``package``
    unless it is the version of :data:`WRITTEN_FOR`.

    Raises:
      ValueError: ``package`` is not one of :data:`WRITTEN_FOR`.
      RuntimeError: another version, or none, is installed; the message names both
        versions and the ``pip install`` command of the pinned one.
    """
    if package not in WRITTEN_FOR:
        raise ValueError(f"no patches are written for {package!r} "
                         f"(allowed: {sorted(WRITTEN_FOR)})")
    wanted = WRITTEN_FOR[package]
    if installed == wanted:
        return
    fix = f"install the pinned version: pip install {package}=={wanted}"
    if installed is None:
        raise RuntimeError(f"{package} is not installed; jaxpost needs version {wanted}: {fix}")
    raise RuntimeError(
        f"jaxpost's patches of {package} were written for version {wanted}, but "
        f"{package} {installed} is installed. They replace and call private parts of it "
        f"(docs/tunix_patches.md), which another version may lack or change; {fix}")


def check_versions(installed: Mapping[str, str | None] | None = None) -> None:
    """Refuses installed Tunix and qwix versions other than those of :data:`WRITTEN_FOR`.

    Args:
      installed: ``{distribution: version}`` to check instead of what is installed
        (None as a version: not installed); by default every package of
        :data:`WRITTEN_FOR`, as installed now.

    Raises:
      RuntimeError: from :func:`check_version`, for the first package that differs.
    """
    if installed is None:
        installed = {package: installed_version(package) for package in WRITTEN_FOR}
    for package, version in installed.items():
        check_version(package, version)
