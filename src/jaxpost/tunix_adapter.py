"""Every use of ``tunix.rl`` and ``tunix.sft`` goes through :mod:`jaxpost.tunix_ext`.

Tunix moves fast (its RLCluster is becoming RLEngine, configs move between modules);
keeping its imports in one subpackage means an upgrade changes one place. Pinned:
google-tunix 0.1.7 (:mod:`jaxpost.tunix_ext.versions`). What this module held now lives
in a module per concern, and is re-exported here, kept for one release:

* :mod:`jaxpost.tunix_ext.cluster`: :func:`build_cluster` and its replacements of the
  RL cluster's methods;
* :mod:`jaxpost.tunix_ext.learners`: the algorithm configs and :func:`build_grpo_learner`;
* :mod:`jaxpost.tunix_ext.losses`: the chunked GRPO, PPO and DPO losses;
* :mod:`jaxpost.tunix_ext.train_step`: :func:`keep_frozen_weights_in_place`;
* :mod:`jaxpost.tunix_ext.trainers`: :func:`build_sft_trainer`, :func:`build_dpo_trainer`,
  :func:`frozen_copy`;
* :mod:`jaxpost.tunix_ext.checkpointing`: where each stage's trainer writes its
  checkpoints (:func:`actor_checkpoint_dir`, :func:`sft_checkpoint_dir`, ...), and
  :func:`restore_lora_params`.
"""

from __future__ import annotations

from jaxpost.tunix_ext.checkpointing import (actor_checkpoint_dir, dpo_checkpoint_dir,
                                             final_checkpoint_dir, latest_checkpoint_step,
                                             restore_lora_params, sft_checkpoint_dir)
from jaxpost.tunix_ext.cluster import (Role, build_cluster, chunk_old_logps,
                                       chunk_reference_logps, share_frozen_weights_with_anchor,
                                       write_critic_metrics_on_close)
from jaxpost.tunix_ext.learners import (DrGRPOClipConfig, GRPOClipConfig, PPOGroupConfig,
                                        PPOGroupLearner, build_grpo_learner,
                                        float_token_rewards, ppo_algorithm_config,
                                        rl_algorithm_config)
from jaxpost.tunix_ext.losses import (CHUNKED_GRPO_LOSS, CHUNKED_PPO_LOSS, dpo_loss_chunked,
                                      grpo_loss_chunked, ppo_loss_chunked)
# _LoraTrainStep and _DPOTrainer too: code and tests written against this module wrap them.
from jaxpost.tunix_ext.train_step import _LoraTrainStep, keep_frozen_weights_in_place  # noqa: F401
from jaxpost.tunix_ext.trainers import (_DPOTrainer, build_dpo_trainer,  # noqa: F401
                                        build_sft_trainer, frozen_copy)

__all__ = [
    "CHUNKED_GRPO_LOSS", "CHUNKED_PPO_LOSS", "DrGRPOClipConfig", "GRPOClipConfig",
    "PPOGroupConfig", "PPOGroupLearner", "Role", "actor_checkpoint_dir", "build_cluster",
    "build_dpo_trainer", "build_grpo_learner", "build_sft_trainer", "chunk_old_logps",
    "chunk_reference_logps", "dpo_checkpoint_dir", "dpo_loss_chunked", "final_checkpoint_dir",
    "float_token_rewards", "frozen_copy", "grpo_loss_chunked", "keep_frozen_weights_in_place",
    "latest_checkpoint_step", "ppo_algorithm_config", "ppo_loss_chunked", "restore_lora_params",
    "rl_algorithm_config", "sft_checkpoint_dir", "share_frozen_weights_with_anchor",
    "write_critic_metrics_on_close",
]
