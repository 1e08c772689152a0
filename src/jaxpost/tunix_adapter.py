"""Every use of ``tunix.rl`` and ``tunix.sft`` goes through this module.

Tunix moves fast (its RLCluster is becoming RLEngine, configs move between modules);
keeping the imports here means an upgrade changes one file. Pinned: google-tunix 0.1.7.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import optax
import orbax.checkpoint as ocp
from flax import nnx

from tunix.rl import algo_core, common, function_registry
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout
from tunix.sft import metrics_logger

Role = rl_cluster_lib.Role

# Name under which jaxpost's memory-lean GRPO loss is registered with Tunix.
CHUNKED_GRPO_LOSS = "jaxpost_grpo_chunked"


def grpo_loss_chunked(model, train_example, algo_config, pad_id, eos_id, **kwargs):
    """Tunix's GRPO loss (its ``grpo_loss_fn``), with log-probs computed in chunks.

    Tunix materialises ``[batch, completion, vocab]`` logits (and a second copy for the
    entropy); with a 262k vocabulary that is most of a step's memory. This computes the
    same per-token log-probabilities with :func:`jaxpost.fast_logits.completion_logps`
    and then applies Tunix's objective unchanged: the clipped ratio (epsilon, and
    epsilon_high when set), the KL penalty beta * KL(policy || reference) with Tunix's
    estimator, and its loss aggregation. Models without trimmed-logit support use
    Tunix's own loss. A test checks that loss and gradients match Tunix's.
    """
    from jaxpost.fast_logits import Gemma3TrimmedLogits, completion_logps

    tunix_only = (getattr(train_example, "segment_ids", None) is not None
                  or getattr(train_example, "sampler_is_weights", None) is not None
                  or getattr(algo_config, "epsilon_c", None) is not None
                  or algo_config.loss_algo != "grpo")
    if not isinstance(model, Gemma3TrimmedLogits) or tunix_only:
        return algo_core.grpo_loss_fn(model, train_example, algo_config, pad_id, eos_id,
                                      **kwargs)
    import jax.numpy as jnp

    mask = train_example.completion_mask
    mode = algo_config.loss_agg_mode
    eps_low = algo_config.epsilon
    eps_high = getattr(algo_config, "epsilon_high", None) or eps_low
    logps, entropy = completion_logps(model, train_example.prompt_ids,
                                      train_example.completion_ids, pad_id,
                                      temperature=algo_config.temperature)
    if train_example.old_per_token_logps is None:
        old = jax.lax.stop_gradient(logps)
    else:
        old = train_example.old_per_token_logps.astype(jnp.float32)
    log_ratio = jnp.clip(logps - old, min=-20.0, max=20.0)
    ratio = jnp.exp(log_ratio)
    adv = train_example.advantages.astype(jnp.float32)
    adv = adv if adv.ndim == 2 else adv[:, None]
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1 - eps_low, 1 + eps_high)
    per_token = jnp.maximum(pg1, pg2)
    loss = common.aggregate_loss(per_token, mask, mode)
    aux = {
        "kl": 0.0,
        "pg_loss": loss,
        "pg_clipfrac": algo_core.masked_mean(jnp.greater(pg2, pg1), mask),
        "entropy": common.aggregate_loss(entropy, mask, mode),
    }
    if train_example.ref_per_token_logps is not None:
        kl = common.compute_kl_divergence(logps, train_example.ref_per_token_logps,
                                          algo_config.kl_loss_mode,
                                          clamp_value=algo_config.kl_clamp_value)
        aux["kl"] = (kl * mask).sum() / jnp.clip(mask.sum(), min=1)
        if algo_config.beta:
            loss = loss + algo_config.beta * common.aggregate_loss(kl, mask, mode)
    return loss, aux


function_registry.register_policy_loss_fn(CHUNKED_GRPO_LOSS)(grpo_loss_chunked)


def build_cluster(
    *,
    actor: nnx.Module,
    reference: nnx.Module,
    tokenizer: Any,
    mesh: jax.sharding.Mesh,
    optimizer: optax.GradientTransformation,
    config: Any,
    eos_ids: Sequence[int],
    metric_backends: Sequence[Callable[[], Any]],
) -> rl_cluster_lib.RLCluster:
    """An RLCluster with actor, reference and rollout colocated on one mesh.

    Colocation lets Tunix share the base weights between the LoRA actor and the
    reference model, and sample from the actor's live weights without a copy.

    Args:
      actor: the LoRA-wrapped policy (only ``nnx.LoRAParam`` train).
      reference: the frozen base model the actor wraps.
      metric_backends: factories of logging backends (``log_scalar``/``close``).
    """
    cache_size = config.max_prompt_length + config.max_new_tokens
    training = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optimizer,
        eval_every_n_steps=10**9,  # evaluation is jaxpost's own, after training
        max_steps=config.total_steps,
        mini_batch_size=config.mini_batch_size,
        train_micro_batch_size=config.micro_batch_size,
        # Orbax refuses relative paths; output_dir may well be "runs/default".
        checkpoint_root_directory=os.path.abspath(config.checkpoint_dir),
        checkpointing_options=ocp.CheckpointManagerOptions(
            save_interval_steps=config.save_interval_steps,
            max_to_keep=config.max_to_keep,
        ),
        metrics_logging_options=metrics_logger.MetricsLoggerOptions(
            log_dir=os.path.abspath(config.tensorboard_dir),
            flush_every_n_steps=1,
            backend_kwargs={"custom_backend": list(metric_backends)},
        ),
        pbar_description=None,
    )
    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=config.max_new_tokens,
        max_prompt_length=config.max_prompt_length,
        kv_cache_size=cache_size,
        temperature=config.temperature,
        top_p=config.top_p if config.top_p is not None else 1.0,
        top_k=config.top_k,
        eos_tokens=list(eos_ids),
        # An int: Tunix donates a key array to the first rollout and fails on the second.
        seed=int(config.seed),
    )
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={Role.ACTOR: mesh, Role.REFERENCE: mesh, Role.ROLLOUT: mesh},
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=training,
        rollout_config=rollout,
    )
    return rl_cluster_lib.RLCluster(actor=actor, reference=reference, tokenizer=tokenizer,
                                    cluster_config=cluster_config)


def build_grpo_learner(cluster, config: Any, reward_fns: list[Callable],
                       metric_fns: Sequence[Callable] = ()):
    """Tunix's GRPO learner with G, mu, beta and epsilon from ``config``.

    ``metric_fns`` are called once per rollout batch after the rewards, with Tunix's
    metric-function signature, and return ``{name: (value, aggregate_fn)}``.
    """
    algo = grpo_learner.GRPOConfig(
        num_generations=config.num_generations,
        num_iterations=config.num_iterations,
        beta=config.beta,
        epsilon=config.epsilon,
        policy_loss_fn=CHUNKED_GRPO_LOSS,
    )
    return grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=reward_fns,
                                    metric_fns=list(metric_fns) or None)


def actor_checkpoint_dir(checkpoint_dir) -> str:
    """Where Tunix's trainer writes the actor's checkpoints under ``checkpoint_dir``."""
    import os

    return os.path.join(os.path.abspath(checkpoint_dir), "actor")


def latest_checkpoint_step(checkpoint_dir: str) -> int | None:
    """The newest finished checkpoint step under ``checkpoint_dir`` (None if there is none).

    Orbax writes each step into a temporary directory and renames it when complete,
    so only finished checkpoints are listed.
    """
    import os

    if not os.path.isdir(checkpoint_dir):
        return None
    with ocp.CheckpointManager(checkpoint_dir) as manager:
        return manager.latest_step()


def restore_lora_params(checkpoint_dir: str, step: int | None = None) -> tuple[int, dict]:
    """Reads the LoRA parameters of a checkpoint as a nested dict of numpy arrays.

    Returns:
      ``(step, params)``; ``step`` is the latest one when not given.

    Raises:
      FileNotFoundError: when the directory holds no finished checkpoint.
    """
    import os

    if step is None:
        step = latest_checkpoint_step(checkpoint_dir)
    if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {checkpoint_dir}")
    path = os.path.join(checkpoint_dir, str(step), "model_params")
    restored = ocp.PyTreeCheckpointer().restore(path)
    return step, restored
