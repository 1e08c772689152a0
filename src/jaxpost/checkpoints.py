"""Reading a run's Orbax checkpoints, and stepping past the ones that cannot be read.

A stage's checkpoint directory (``jaxpost.rundir``) holds one directory per finished
step, written by Tunix's checkpoint manager: ``<step>/model_params`` (the LoRA weights),
``<step>/optimizer_state`` and ``<step>/_CHECKPOINT_METADATA``. Orbax writes a step into
a temporary directory and renames it when the save has finished, so a save cut short (a
killed process, a full disk) never shows up as a step. A finished step can still become
unreadable later: a disk error, a copy cut short, a file edited by hand. Tunix restores
the newest step when it builds a trainer and stops on Orbax's raw error, on every rerun.

So before a trainer is built, :func:`resume_step` reads the newest step in full; one
that cannot be read is moved aside (never deleted) into ``checkpoints/unreadable/``, with
a message naming it and why, and the next newest is tried. Readers of a finished run
(export, evaluation) call :func:`newest_readable_step`, which skips such steps without
moving anything.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxpost.rundir import DPO_STAGE, GRPO_STAGE, SFT_STAGE, UNREADABLE_DIR

# What Tunix's trainers save at every step (jaxpost's trainers always pass the optimizer).
ITEMS = ("model_params", "optimizer_state")
_REASON_CHARS = 300


def finished_steps(checkpoint_dir: str | os.PathLike) -> list[int]:
    """The finished checkpoint steps under ``checkpoint_dir``, oldest first ([] if none)."""
    path = os.path.abspath(checkpoint_dir)
    if not os.path.isdir(path):
        return []
    with ocp.CheckpointManager(path) as manager:
        return sorted(manager.all_steps())


def latest_step(checkpoint_dir: str | os.PathLike) -> int | None:
    """The newest finished checkpoint step under ``checkpoint_dir`` (None if there is none),
    readable or not."""
    steps = finished_steps(checkpoint_dir)
    return steps[-1] if steps else None


def final_stage_dir(checkpoint_dir: str | os.PathLike) -> Path:
    """The stage directory under a checkpoint root that holds the latest LoRA weights:
    GRPO's or DPO's once one has a finished step (a run holds one of the two), else the
    SFT warm-up's when it has one, else GRPO's (which then holds none, for the caller's
    error message). Absolute."""
    root = Path(checkpoint_dir).expanduser().absolute()
    for stage in (GRPO_STAGE, DPO_STAGE, SFT_STAGE):
        if latest_step(root / stage) is not None:
            return root / stage
    return root / GRPO_STAGE


def _short(error: BaseException) -> str:
    # TensorStore errors quote a whole JSON spec; the first line says what went wrong.
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if len(text) > _REASON_CHARS:
        text = text[:_REASON_CHARS] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _restore_on_cpu(item_dir: Path):
    """One saved pytree, restored onto this host's first CPU device.

    Passing target shardings makes Orbax read what Tunix's restore reads (tree, sharding
    and array metadata, every chunk) without needing the devices it was saved from.
    """

    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    tree = ocp.PyTreeCheckpointHandler().metadata(item_dir).tree
    args = jax.tree.map(lambda m: ocp.ArrayRestoreArgs(sharding=cpu, global_shape=m.shape,
                                                      dtype=m.dtype), tree)
    return ocp.PyTreeCheckpointer().restore(item_dir, args=ocp.args.PyTreeRestore(
        restore_args=args))


def unreadable_reason(step_dir: str | os.PathLike) -> str | None:
    """Why a checkpoint step cannot be restored, or None when it reads in full.

    Reads every item of :data:`ITEMS` in full, as Tunix's restore does, onto this host's
    CPU, so the answer does not depend on the devices the step was saved from.

    Returns:
      None, or a one-line reason such as ``"model_params: ValueError: ...Invalid JSON"``.
    """
    step_dir = Path(step_dir)
    for item in ITEMS:
        path = step_dir / item
        if not path.is_dir():
            return f"{item}/ is missing"
        try:
            _restore_on_cpu(path)
        # Any failure to read the files means the step cannot be resumed from; the
        # caller reports it with this reason and never deletes the step.
        except Exception as e:  # noqa: BLE001
            return f"{item}: {_short(e)}"
    return None


def _say(message: str) -> None:
    print(f"jaxpost: {message}", file=sys.stderr, flush=True)


def newest_readable_step(checkpoint_dir: str | os.PathLike) -> int | None:
    """The newest finished step that reads in full (None if none does).

    Each newer step that cannot be read is reported on stderr and skipped; nothing is
    moved (use :func:`resume_step` before training).
    """
    for step in reversed(finished_steps(checkpoint_dir)):
        reason = unreadable_reason(Path(checkpoint_dir) / str(step))
        if reason is None:
            return step
        _say(f"checkpoint step {step} in {checkpoint_dir} cannot be read ({reason}); "
             "skipping it")
    return None


def resume_step(checkpoint_dir: str | os.PathLike) -> int | None:
    """The newest readable step, after moving every newer unreadable one aside.

    Call it before building a trainer on ``checkpoint_dir``: Tunix then restores the step
    returned. An unreadable step ``<dir>/<step>`` moves to
    ``<dir>/../unreadable/<dir name>-<step>-<UTC time>``, and a message on stderr names
    it, the reason and where it went. Nothing is deleted.

    Returns:
      The step training resumes from, or None when no step is left (a fresh start).
    """
    checkpoint_dir = Path(checkpoint_dir).absolute()
    for step in reversed(finished_steps(checkpoint_dir)):
        step_dir = checkpoint_dir / str(step)
        reason = unreadable_reason(step_dir)
        if reason is None:
            return step
        target = move_aside(step_dir)
        _say(f"checkpoint step {step} in {checkpoint_dir} cannot be read ({reason}); moved "
             f"it to {target} (nothing was deleted)")
    return None


def move_aside(step_dir: Path) -> Path:
    """Moves a step directory to ``../unreadable/<stage>-<step>-<UTC time>`` and returns
    the new path; the stage directory then no longer lists the step."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    stage = step_dir.parent
    target = stage.parent / UNREADABLE_DIR / f"{stage.name}-{step_dir.name}-{stamp}"
    n = 1
    while target.exists():  # two moves within a second
        target = target.with_name(f"{target.name}.{n}")
        n += 1
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(step_dir, target)
    return target


def restore_lora_params(checkpoint_dir: str | os.PathLike,
                        step: int | None = None) -> tuple[int, dict]:
    """Reads the LoRA parameters of a checkpoint as a nested dict of arrays.

    Args:
      checkpoint_dir: a stage's checkpoint directory.
      step: the step to read; default the newest readable one (newer unreadable steps
        are reported on stderr and skipped).

    Returns:
      ``(step, params)``.

    Raises:
      FileNotFoundError: the directory holds no finished, readable checkpoint.
    """
    if step is None:
        step = newest_readable_step(checkpoint_dir)
    if step is None:
        raise FileNotFoundError(f"no finished, readable checkpoint in {checkpoint_dir}")
    return step, _restore_on_cpu(Path(checkpoint_dir).absolute() / str(step) / "model_params")
