"""A training run's directory: where each of its files lives.

    RUN_DIR/
      config.yaml                  the config that ran
      metrics.jsonl                one line per recorded value (appended on resume)
      tensorboard/                 event files
      checkpoints/sft/<step>/      the SFT warm-up's Orbax checkpoints
      checkpoints/actor/<step>/    the RL policy's (Tunix's RL cluster names them after the actor)
      checkpoints/critic/<step>/   PPO's critic (value model)
      checkpoints/dpo/<step>/      DPO's (a run trains GRPO or DPO, not both)
      checkpoints/unreadable/      checkpoints moved aside because they could not be read
      export/                      jaxpost's LoRA adapters (``jaxpost export RUN_DIR``)
      export-peft/, export-merged/, export-gguf-f16/, export-gguf-q8_0/
                                   the other formats, one directory per format and type

Training writes into the config's ``output_dir``; everything that reads a finished run
(export, evaluation, quick test) takes the directory it is given and derives every path
from it, never from the ``output_dir`` recorded in its ``config.yaml``: a run copied or
moved elsewhere is read where it lies. This module names the paths and reads nothing:
:func:`jaxpost.config.load_run_config` reads a run's config and
:func:`jaxpost.checkpoints.final_stage_dir` finds its latest LoRA weights.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
SFT_STAGE = "sft"
# Tunix's RL cluster writes the policy's checkpoints under <checkpoint root>/actor.
GRPO_STAGE = "actor"
CRITIC_STAGE = "critic"
DPO_STAGE = "dpo"
UNREADABLE_DIR = "unreadable"
LORA_EXPORT_DIR = "export"


def export_suffix(fmt: str, gguf_type: str = "f16") -> str:
    """The suffix that names a format's export directory beside the LoRA export.

    ``"lora"`` -> ``""``; ``"peft"`` -> ``"-peft"``; ``"merged"`` -> ``"-merged"``;
    ``"gguf"`` -> ``"-gguf-<gguf_type>"`` (one directory per tensor type, so exports of
    several types live side by side).

    Raises:
      ValueError: an unknown format.
    """
    if fmt == "lora":
        return ""
    if fmt in ("peft", "merged"):
        return f"-{fmt}"
    if fmt == "gguf":
        return f"-gguf-{gguf_type}"
    raise ValueError(f"format={fmt!r} is invalid: use one of ['lora', 'peft', 'merged', 'gguf']")


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The layout of one run directory (see the module docstring).

    Attributes:
      path: the directory, as given (relative paths stay relative to the current
        directory; Orbax needs absolute ones, which the checkpoint properties give).
    """

    path: Path

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", Path(path).expanduser())

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def checkpoint_dir(self) -> Path:
        """The root of both stages' checkpoints."""
        return self.path / CHECKPOINTS_DIR

    @property
    def sft_checkpoint_dir(self) -> Path:
        """The SFT warm-up's checkpoints (absolute)."""
        return self.checkpoint_dir.absolute() / SFT_STAGE

    @property
    def grpo_checkpoint_dir(self) -> Path:
        """GRPO's checkpoints (absolute)."""
        return self.checkpoint_dir.absolute() / GRPO_STAGE

    @property
    def critic_checkpoint_dir(self) -> Path:
        """PPO's critic's checkpoints (absolute), written beside the policy's."""
        return self.checkpoint_dir.absolute() / CRITIC_STAGE

    @property
    def unreadable_dir(self) -> Path:
        """Where checkpoints that could not be read are moved (absolute)."""
        return self.checkpoint_dir.absolute() / UNREADABLE_DIR

    def export_dir(self, fmt: str = "lora", gguf_type: str = "f16") -> Path:
        """The default export directory of a format (``export``, ``export-gguf-q8_0``, ...)."""
        return self.path / (LORA_EXPORT_DIR + export_suffix(fmt, gguf_type))

    def is_run(self) -> bool:
        """Whether the directory holds a run's ``config.yaml``."""
        return self.config_file.is_file()
