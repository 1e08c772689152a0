"""Tunix's RL learners and algorithm configs for jaxpost's algorithms.

:func:`build_grpo_learner` builds Tunix's learner for a run's ``algorithm``: a
GRPO-family learner with the config of :func:`rl_algorithm_config`, or PPO's
(:class:`PPOGroupLearner`, :func:`ppo_algorithm_config`). Every config names jaxpost's
chunked loss (:mod:`jaxpost.tunix_ext.losses`) as its ``policy_loss_fn``.
:class:`PPOGroupLearner` overrides private methods of Tunix's ``PPOLearner`` and keeps
its rewards fractional (:func:`float_token_rewards`; google-tunix 0.1.7,
docs/tunix_patches.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import jax.numpy as jnp
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import dapo_learner, drgrpo_learner, grpo_learner
from tunix.rl.ppo import ppo_learner

from jaxpost.tunix_ext.losses import CHUNKED_GRPO_LOSS, CHUNKED_PPO_LOSS


@dataclasses.dataclass(kw_only=True)
class GRPOClipConfig(grpo_learner.GRPOConfig):
    """Tunix's ``GRPOConfig`` with an upper clip ``epsilon_high`` (epsilon_high in DAPO).

    Only Tunix's ``DAPOConfig`` declares the field; its GRPO loss reads it from any
    config that has it, as jaxpost's chunked loss does.
    """

    epsilon_high: float = 0.2


@dataclasses.dataclass(kw_only=True)
class DrGRPOClipConfig(drgrpo_learner.DrGRPOConfig):
    """Tunix's ``DrGRPOConfig`` with an upper clip ``epsilon_high`` (see GRPOClipConfig)."""

    epsilon_high: float = 0.2


def rl_algorithm_config(config: Any) -> grpo_learner.GRPOConfig:
    """Tunix's algorithm config for ``config.algorithm``, with G, mu, beta and epsilons.

    Every algorithm is a GRPO-family config of Tunix's, with jaxpost's chunked loss as
    its policy loss (which computes Tunix's objective for each, see
    :func:`jaxpost.tunix_ext.losses.grpo_loss_chunked`):

    - ``grpo``: group-normalised advantages, sequence-mean-token-mean loss.
    - ``dapo``: Tunix's ``DAPOConfig``: clip-higher, token-mean loss, no KL. Its
      overlong-length reward shaping is off: Tunix measures the length in characters,
      against token budgets; the run's ``max_new_tokens`` already bounds completions.
    - ``dr_grpo``: Tunix's ``DrGRPOConfig``: advantages minus the group mean (no std
      division), each completion's loss summed and divided by the longest possible.
    - ``gspo``: Tunix's ``gspo-token`` loss: the sequence's mean log-ratio as every
      token's ratio (gradient per token), clipped to [1 - epsilon, 1 + epsilon_high].
    - ``rloo``: leave-one-out baseline: each completion's reward minus the mean of the
      others in its group.
    """
    common_args = dict(num_generations=config.num_generations,
                       num_iterations=config.num_iterations, beta=config.kl_beta,
                       epsilon=config.clip_low, epsilon_high=config.clip_high,
                       policy_loss_fn=CHUNKED_GRPO_LOSS)
    if config.algorithm == "dapo":
        # Tunix's DAPOConfig accepts only beta=None, and its learner then runs the
        # reference model for a KL term it never uses (None != 0.0): 0 once validated.
        algo = dapo_learner.DAPOConfig(overlong_buffer=None, dynamic_sampling=False,
                                       **(common_args | {"beta": None}))
        algo.beta = 0.0
        return algo
    if config.algorithm == "dr_grpo":
        return DrGRPOClipConfig(**common_args)
    if config.algorithm == "gspo":
        return GRPOClipConfig(loss_algo="gspo-token", **common_args)
    if config.algorithm == "rloo":
        return GRPOClipConfig(advantage_estimator="rloo", **common_args)
    if config.algorithm != "grpo":
        raise ValueError(f"algorithm={config.algorithm!r} has no Tunix learner here")
    return GRPOClipConfig(**common_args)


@dataclasses.dataclass(kw_only=True)
class PPOGroupConfig(ppo_learner.PPOConfig):
    """Tunix's ``PPOConfig`` with G completions per prompt and the sampling temperature.

    ``num_generations`` completions are sampled per prompt, each its own episode (the
    advantages come from the critic, not from the group); ``temperature`` is the
    rollout's, which :func:`jaxpost.tunix_ext.losses.ppo_loss_chunked` divides the
    logits by.
    """

    num_generations: int = 1
    temperature: float = 1.0


class PPOGroupLearner(ppo_learner.PPOLearner):
    """Tunix's ``PPOLearner``, sampling ``num_generations`` completions per prompt.

    Tunix's PPO samples one completion per prompt; its base learner repeats each prompt
    as many times as ``_num_generations`` says, so this gives PPO the same rollout
    budget per step as GRPO's G completions.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.algo_config.temperature = self.rl_cluster.get_rollout_config(
            mode=rl_cluster_lib.Mode.TRAIN).temperature

    def _num_generations(self) -> int:
        return self.algo_config.num_generations

    def _generate_and_compute_advantage(self, training_input, mode=rl_cluster_lib.Mode.TRAIN):
        with float_token_rewards():
            return super()._generate_and_compute_advantage(training_input, mode)


class _FloatZerosLike:
    """``jax.numpy`` whose ``zeros_like`` makes float32 arrays (see float_token_rewards)."""

    def __getattr__(self, name):
        return getattr(jnp, name)

    @staticmethod
    def zeros_like(a, dtype=None, **kwargs):
        return jnp.zeros_like(a, dtype=jnp.float32 if dtype is None else dtype, **kwargs)


@contextlib.contextmanager
def float_token_rewards() -> Iterator[None]:
    """Within the block, Tunix's PPO keeps fractional rewards.

    Tunix 0.1.7 builds PPO's per-token rewards as ``jnp.zeros_like(completion_ids)``, an
    int32 array, and adds each completion's score at its last token: a score of 0.75
    becomes 0 and 2.5 becomes 2 (JAX warns "scatter inputs have incompatible types").
    Here that module's ``zeros_like`` makes float32 arrays; its other uses of
    ``jax.numpy`` are unchanged. A test checks that a score of 0.25 reaches the rewards.
    """
    original = ppo_learner.jnp
    ppo_learner.jnp = _FloatZerosLike()
    try:
        yield
    finally:
        ppo_learner.jnp = original


def ppo_algorithm_config(config: Any) -> PPOGroupConfig:
    """Tunix's PPO config for ``config``: clipped surrogate, GAE, clipped value loss.

    The KL penalty beta * KL(policy || reference) is subtracted from each token's
    reward (Tunix's PPO); the reward itself comes at the completion's last token.
    """
    ppo = config.ppo_settings()
    return PPOGroupConfig(num_generations=config.num_generations,
                          num_iterations=config.num_iterations, beta=config.kl_beta,
                          epsilon=config.clip_low, epsilon_low=config.clip_low,
                          epsilon_high=config.clip_high, gamma=ppo["gamma"],
                          gae_lambda=ppo["gae_lambda"], clip_range_value=ppo["value_clip"],
                          policy_loss_fn=CHUNKED_PPO_LOSS)


def build_grpo_learner(cluster, config: Any, reward_fns: list[Callable],
                       metric_fns: Sequence[Callable] = ()):
    """Tunix's learner for ``config.algorithm``: a GRPO-family learner (see
    :func:`rl_algorithm_config`), or PPO's (:func:`ppo_algorithm_config`; the cluster
    must then hold a critic).

    ``metric_fns`` are called once per rollout batch after the rewards, with Tunix's
    metric-function signature, and return ``{name: (value, aggregate_fn)}``.
    """
    if config.algorithm == "ppo":
        return PPOGroupLearner(rl_cluster=cluster, ppo_config=ppo_algorithm_config(config),
                               reward_fns=reward_fns, metric_fns=list(metric_fns) or None)
    algo = rl_algorithm_config(config)
    return grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=reward_fns,
                                    metric_fns=list(metric_fns) or None)
