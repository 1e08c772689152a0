# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # jaxpost: teach a model to show its work, on Colab or Kaggle
#
# GRPO post-training on [Tunix](https://github.com/google/tunix) with LoRA: the model learns to answer as `<reasoning>...</reasoning><answer>...</answer>`. Every code cell after the install is one call into the `jaxpost` package, where the logic lives and is tested; run the cells top to bottom.
#
# Runtime: a TPU (Colab: *Runtime > Change runtime type > TPU v2-8* or *v5e-1*; Kaggle: *Settings > Accelerator > TPU v5e-8*), a GPU, or the CPU.

# %% [markdown]
# ## 1. Install
#
# Installs jaxpost from its git repository with the JAX build for this runtime: the `tpu` extra on a TPU, `cuda12` on an NVIDIA GPU, none on the CPU. To install from a wheel, a source directory (say, a Kaggle dataset) or another git ref, first run `%env JAXPOST_INSTALL_SOURCE=...` with its path or pip URL (`git+URL@REF` for a git ref). The cell ends by saying whether the runtime must be restarted (JAX or jaxpost was imported before, or the install changed a package already loaded) or is ready. Its code is `src/jaxpost/install.py`, copied here because jaxpost is not installed yet; the cell carries the tag `install`, which the tests skip.

# %% tags=["install"]
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

# %% [markdown]
# ## 2. Settings
#
# `PRESET = "auto"` picks the preset sized for this runtime's accelerator (`colab_tpu`, `colab_tpu_v5e1`, `kaggle_tpu`, `gpu`, `cpu`; see the README); name one to choose it yourself, or `smoke` for a tiny test run. `ALGORITHM` names the RL objective (`grpo` by default; see the README's *Algorithms*). An empty string keeps the preset's value. Each setting can also come from an environment variable, which is how the tests run this notebook.

# %% tags=["parameters"]
import os

PRESET = os.environ.get("JAXPOST_PRESET", "auto")
OUTPUT_DIR = os.environ.get("JAXPOST_OUTPUT_DIR", "")
MAX_STEPS = os.environ.get("JAXPOST_MAX_STEPS", "")
SAVE_TO_DRIVE = os.environ.get("JAXPOST_SAVE_TO_DRIVE", "")
ALGORITHM = os.environ.get("JAXPOST_ALGORITHM", "")  # grpo, dapo, dr_grpo, gspo, rloo, ppo, dpo
TEST_QUESTION = "A baker makes 23 muffins and sells 8. How many are left?"

# %% [markdown]
# ## 3. Credentials
#
# The TPU and GPU presets train Gemma 3 1B from Kaggle Models, which is gated: accept its terms at kaggle.com/models/google/gemma-3, then add the secrets `KAGGLE_USERNAME` and `KAGGLE_KEY` (and `HF_TOKEN` for a gated Hugging Face model). **Colab:** the key icon in the left sidebar, with *Notebook access* on. **Kaggle:** *Add-ons > Secrets*. jaxpost looks for each secret in values passed to `resolve_credentials(...)`, then Colab's secrets, then Kaggle's, then environment variables, and only ever shows whether it is set.

# %%
from jaxpost.colab_pipeline import (detect_platform, export_checkpoint, held_out_comparison,
                                    make_config,
                                    prepare_colab_session, quick_test,
                                    resolve_credentials, run_full_pipeline,
                                    show_training_curves, train_policy, train_sft)

credentials = resolve_credentials()
credentials

# %% [markdown]
# ## 4. Accelerator and configuration
#
# Detects the TPU, GPU or CPU and builds the run's configuration. With `save_to_drive` on Colab, Google Drive is mounted (it asks for access once) and the output directory goes there, so a fresh runtime that reruns this notebook resumes from the last checkpoint instead of starting over.

# %%
accelerator = detect_platform()
config = make_config(PRESET, accelerator, output_dir=OUTPUT_DIR, max_steps=MAX_STEPS,
                     save_to_drive=SAVE_TO_DRIVE, algorithm=ALGORITHM)
print(accelerator)

# %% [markdown]
# ## 5. Train, export and test in one call
#
# Prints the configuration, loads the model (one summary line: platform, devices, mesh, model, parameter and LoRA parameter counts), runs the SFT warm-up when the preset has one (`sft_steps`), trains with GRPO while checkpointing, exports the LoRA adapters answers a held-out question, and prints a base-vs-trained table on held-out examples.

# %%
session, state, export_path = run_full_pipeline(config, credentials=credentials)

# %% [markdown]
# ## 6. Results
#
# Reward, KL to the reference model, loss and completion length by step, read from `metrics.jsonl` in the output directory; then the trained model's answer to `TEST_QUESTION`, and where the adapters went with how to load them.

# %%
show_training_curves(config.output_dir)

# %%
answer = quick_test(config, session, TEST_QUESTION, trainer_state=state)

# %%
print((export_path / "README.md").read_text())

# %% [markdown]
# ### Base vs trained, on held-out questions
#
# The base model and the trained adapters (the run's newest checkpoint) answer the same 16 held-out questions with the same prompts, greedily, reusing the loaded model: GSM8K's test split for a GSM8K run, else the run's task drawn with another seed. The table gives accuracy, format rate, partial credit, pass@1 and completion length side by side; read format rate and accuracy together (format up with accuracy down is reward hacking). `jaxpost eval --compare` does the same from the command line.

# %%
comparison = held_out_comparison(config, session, num_examples=16)

# %% [markdown]
# ## 7. The same run, step by step
#
# For looking between stages. The first run's model is released to free its memory. With the same output directory `train_sft` and `train_policy` resume from that run's newest checkpoints (already at their last steps, so they only load them); raise `MAX_STEPS` to train on.

# %%
del session, state
session = prepare_colab_session(config, credentials=credentials)

# %%
sft_state = train_sft(config, session)  # None without a warm-up (sft_steps=0)
state = train_policy(config, session)  # the config's algorithm: GRPO, PPO, DPO, ...
state.history[-1]

# %%
export_path = export_checkpoint(config, state)
answer = quick_test(config, session, TEST_QUESTION, trainer_state=state)
