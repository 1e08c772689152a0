"""Where Tunix's trainers write a run's checkpoints, and reading them back.

Each stage's trainer (GRPO's actor, the SFT warm-up, DPO) writes its Orbax checkpoints
in its own folder under the run's ``checkpoint_dir``; the layout belongs to
:mod:`jaxpost.rundir` and reading checkpoints to :mod:`jaxpost.checkpoints`. These
functions name them for the code that builds and resumes Tunix's trainers.
"""

from __future__ import annotations

import os

from jaxpost import checkpoints
from jaxpost.rundir import DPO_STAGE, GRPO_STAGE, SFT_STAGE


def actor_checkpoint_dir(checkpoint_dir) -> str:
    """Where Tunix's trainer writes the actor's (GRPO's) checkpoints under ``checkpoint_dir``."""
    return os.path.join(os.path.abspath(checkpoint_dir), GRPO_STAGE)


def sft_checkpoint_dir(checkpoint_dir) -> str:
    """Where the SFT warm-up's trainer writes its checkpoints under ``checkpoint_dir``."""
    return os.path.join(os.path.abspath(checkpoint_dir), SFT_STAGE)


def dpo_checkpoint_dir(checkpoint_dir) -> str:
    """Where the DPO stage's trainer writes its checkpoints under ``checkpoint_dir``."""
    return os.path.join(os.path.abspath(checkpoint_dir), DPO_STAGE)


def final_checkpoint_dir(checkpoint_dir) -> str:
    """The checkpoints holding a run's latest LoRA weights under ``checkpoint_dir``
    (:func:`jaxpost.checkpoints.final_stage_dir`)."""
    return str(checkpoints.final_stage_dir(checkpoint_dir))


def latest_checkpoint_step(checkpoint_dir: str) -> int | None:
    """The newest finished checkpoint step under ``checkpoint_dir`` (None if there is none)."""
    return checkpoints.latest_step(checkpoint_dir)


def restore_lora_params(checkpoint_dir: str, step: int | None = None) -> tuple[int, dict]:
    """The LoRA parameters of a checkpoint (:func:`jaxpost.checkpoints.restore_lora_params`)."""
    return checkpoints.restore_lora_params(checkpoint_dir, step)
