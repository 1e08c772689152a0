"""Install jaxpost on this runtime, with the JAX build for its accelerator.

This module is the notebook's install cell, word for word (``demo/sync_notebook.py``
copies it there; a test checks the copy), so it runs before jaxpost exists: it imports
the standard library only. In a shell: ``python src/jaxpost/install.py`` (not ``python -m
jaxpost.install``, which would import the jaxpost it is about to replace).

* :func:`detect_accelerator` tells a TPU, an NVIDIA GPU or neither from device files, a
  program on ``PATH`` and environment variables (JAX itself is not imported: a notebook
  kernel that imported it before the install must be restarted).
* :func:`pip_command` installs ``jaxpost[tpu]``, ``jaxpost[cuda12]`` or plain ``jaxpost``
  from :data:`REPOSITORY` (the ``Repository`` URL of pyproject.toml), or from
  ``JAXPOST_INSTALL_SOURCE``: a wheel, a source directory or any pip URL.
* :func:`restart_reasons` says whether the kernel runs stale code after the install.
"""

import glob
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

REPOSITORY = "https://github.com/jaxpost/jaxpost"
SOURCE_VARIABLE = "JAXPOST_INSTALL_SOURCE"
# Accelerator -> the pyproject.toml extra that installs the matching jaxlib build.
EXTRAS = {"tpu": "tpu", "gpu": "cuda12", "cpu": None}
# TPU VMs: v2-v4 chips appear as /dev/accel0..., v5e and later as VFIO groups
# /dev/vfio/0...; Colab and Kaggle also name the TPU in these variables.
TPU_DEVICE_PATTERNS = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")
TPU_VARIABLES = ("TPU_ACCELERATOR_TYPE", "COLAB_TPU_ADDR", "TPU_NAME")
GPU_DEVICE_PATTERNS = ("/dev/nvidia[0-9]*",)
# Loaded before the install, these are stale after it even at an unchanged version:
# a reinstall replaces jaxpost's files, and JAX finds its TPU or CUDA plugin once.
RESTART_IF_IMPORTED = ("jax", "jaxlib", "jaxpost")


def detect_accelerator(environ: Mapping[str, str],
                       glob_paths: Callable[[str], list[str]] = glob.glob,
                       which: Callable[[str], str | None] = shutil.which) -> str:
    """``"tpu"``, ``"gpu"`` (NVIDIA) or ``"cpu"``: the accelerator this runtime has.

    Args:
      environ: the environment, e.g. ``os.environ``.
      glob_paths: the paths matching a glob pattern (``glob.glob``).
      which: the path of a program on ``PATH``, or None (``shutil.which``).
    """
    if any(environ.get(name) for name in TPU_VARIABLES) or any(
            glob_paths(pattern) for pattern in TPU_DEVICE_PATTERNS):
        return "tpu"
    # Colab sets COLAB_GPU on every runtime: "1" with a GPU, "0" or empty without.
    if environ.get("COLAB_GPU", "0") not in ("", "0") or which("nvidia-smi") or any(
            glob_paths(pattern) for pattern in GPU_DEVICE_PATTERNS):
        return "gpu"
    return "cpu"


def package_spec(accelerator: str, source: str | None = None,
                 glob_paths: Callable[[str], list[str]] = glob.glob) -> str:
    """The pip requirement for jaxpost with the extra for ``accelerator``.

    Args:
      accelerator: a key of :data:`EXTRAS`.
      source: where to install from (None or empty: :data:`REPOSITORY` with git): a
        pip URL (``git+https://...@v0.1.0``, ``https://.../jaxpost-0.1.0-py3-none-any.whl``)
        or a local wheel or source directory.
      glob_paths: as in :func:`detect_accelerator`, to check that a local source exists.

    Raises:
      ValueError: an unknown accelerator, or a local source that does not exist.
    """
    if accelerator not in EXTRAS:
        raise ValueError(f"accelerator {accelerator!r}: expected one of {sorted(EXTRAS)}")
    extra = EXTRAS[accelerator]
    name = f"jaxpost[{extra}]" if extra else "jaxpost"
    if not source:
        return f"{name} @ git+{REPOSITORY}"
    if "://" in source:
        return f"{name} @ {source}"
    path = Path(source).expanduser().absolute()
    if not glob_paths(glob.escape(str(path))):
        raise ValueError(f"{SOURCE_VARIABLE}={source!r}: no such file or directory "
                         f"(expected a jaxpost wheel, a jaxpost source directory or a URL)")
    return f"{name} @ {path.as_uri()}"


def pip_command(accelerator: str, source: str | None = None, python: str = sys.executable,
                glob_paths: Callable[[str], list[str]] = glob.glob) -> list[str]:
    """The command that installs jaxpost into ``python``'s environment (what ``%pip`` runs).

    Args: ``accelerator``, ``source`` and ``glob_paths`` as in :func:`package_spec`.
    """
    return [python, "-m", "pip", "install", "-q",
            package_spec(accelerator, source, glob_paths=glob_paths)]


def loaded_distributions(modules: Iterable[str]) -> dict[str, str]:
    """The installed distributions (name -> version) that the given modules come from.

    Args:
      modules: module names, e.g. ``sys.modules``; submodules count as their top level.
    """
    tops = {name.partition(".")[0] for name in modules}
    owners = importlib.metadata.packages_distributions()
    found = {}
    for top in sorted(tops & owners.keys()):
        for dist in owners[top]:
            try:
                found[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                pass  # a distribution that lists the module but has no metadata left
    return found


def installed_versions(distributions: Iterable[str]) -> dict[str, str | None]:
    """The version of each distribution installed now, None for one that is gone."""
    importlib.invalidate_caches()  # see what pip has just written
    versions: dict[str, str | None] = {}
    for dist in distributions:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def restart_reasons(imported: Iterable[str], loaded: Mapping[str, str],
                    installed: Mapping[str, str | None]) -> list[str]:
    """Why this kernel must restart to use what was installed; empty when it need not.

    Args:
      imported: names of the modules imported before the install (``sys.modules``).
      loaded: distribution -> version, for those modules, before the install.
      installed: distribution -> version (None: uninstalled) after the install.
    """
    tops = {name.partition(".")[0] for name in imported}
    reasons = [f"{name} was imported before the install"
               for name in RESTART_IF_IMPORTED if name in tops]
    for dist, before in sorted(loaded.items()):
        after = installed.get(dist, before)
        if after != before:
            now = f"now {after}" if after else "now uninstalled"
            reasons.append(f"{dist} {before} is loaded and the install made it {now}")
    return reasons


def readiness_message(reasons: list[str]) -> str:
    """What the user does next: restart the runtime, or go on."""
    if not reasons:
        return "jaxpost is installed and ready: run the next cells."
    return ("jaxpost is installed, but restart the runtime before going on (Colab: Runtime > "
            "Restart session; Kaggle: Run > Restart & clear cell outputs), because "
            + "; ".join(reasons) + ". Then run the next cells; this one need not run again.")


def run_streaming(command: list[str]) -> int:
    """Runs ``command``, printing its output line by line (a notebook shows a
    subprocess's own stdout only on some kernels); returns its exit status."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
    return process.returncode


def install(environ: Mapping[str, str] = os.environ,
            glob_paths: Callable[[str], list[str]] = glob.glob,
            which: Callable[[str], str | None] = shutil.which,
            modules: Iterable[str] = sys.modules,
            run: Callable[[list[str]], int] = run_streaming) -> list[str]:
    """Installs jaxpost for this runtime's accelerator and prints whether to restart.

    Args: ``environ``, ``glob_paths`` and ``which`` as in :func:`detect_accelerator`;
      modules: the modules loaded now (``sys.modules``);
      run: runs a command and returns its exit status.

    Returns:
      The reasons to restart the runtime, empty when it is ready.

    Raises:
      RuntimeError: pip failed (its output is printed above).
    """
    accelerator = detect_accelerator(environ, glob_paths, which)
    command = pip_command(accelerator, environ.get(SOURCE_VARIABLE), glob_paths=glob_paths)
    imported = list(modules)
    loaded = loaded_distributions(imported)
    print(f"jaxpost install: {accelerator.upper()} runtime, {command[-1]!r} "
          f"(a few minutes)", flush=True)
    status = run(command)
    if status != 0:
        raise RuntimeError(f"pip exited with status {status} (its output is above): "
                           + " ".join(command))
    reasons = restart_reasons(imported, loaded, installed_versions(loaded))
    print(readiness_message(reasons), flush=True)
    return reasons


if __name__ == "__main__":
    install()
