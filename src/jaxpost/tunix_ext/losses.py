"""jaxpost's policy and preference losses, registered with Tunix in place of its own.

Tunix's GRPO, PPO and DPO losses (``tunix.rl.algo_core.grpo_loss_fn``,
``ppo_policy_loss_fn``, ``tunix.sft.dpo.dpo_trainer.dpo_loss_fn``) score completions from
full ``[batch, completion, vocab]`` logits, most of a step's memory with Gemma 3's
262,144-entry vocabulary. These compute the same objectives from chunked log-probs
(:func:`jaxpost.tunix_ext.logps.completion_logps`), and hand models or settings they do
not cover to Tunix's own loss. The GRPO and PPO losses are registered with Tunix's
``function_registry`` when this module is imported, under :data:`CHUNKED_GRPO_LOSS` and
:data:`CHUNKED_PPO_LOSS`, the names the algorithm configs of
:mod:`jaxpost.tunix_ext.learners` give as their ``policy_loss_fn`` (google-tunix 0.1.7;
docs/tunix_patches.md).
"""

from __future__ import annotations

import contextvars
import logging

import jax
import jax.numpy as jnp
import numpy as np
from tunix.rl import algo_core, common, function_registry
from tunix.sft.dpo import dpo_trainer

from jaxpost.tunix_ext.gemma3 import Gemma3TrimmedLogits
from jaxpost.tunix_ext.logps import completion_logps

# Name under which jaxpost's memory-lean GRPO loss is registered with Tunix.
CHUNKED_GRPO_LOSS = "jaxpost_grpo_chunked"

# While an update is traced: the layer inputs its rollout kept, or None (see
# jaxpost.tunix_ext.sampler.rollout_layer_inputs and jaxpost.tunix_ext.train_step).
_ROLLOUT_LAYER_INPUTS = contextvars.ContextVar("jaxpost_rollout_layer_inputs", default=None)


def grpo_loss_chunked(model, train_example, algo_config, pad_id, eos_id, **kwargs):
    """Tunix's GRPO loss (its ``grpo_loss_fn``), with log-probs computed in chunks.

    Tunix materialises ``[batch, completion, vocab]`` logits (and a second copy for the
    entropy); with a 262k vocabulary that is most of a step's memory. This computes the
    same per-token log-probabilities with :func:`jaxpost.tunix_ext.logps.completion_logps`
    and then applies Tunix's objective unchanged: the clipped ratio (epsilon, and
    epsilon_high when set), the KL penalty beta * KL(policy || reference) with Tunix's
    estimator, and its loss aggregation. Models without trimmed-logit support use
    Tunix's own loss. Covers Tunix's GRPO-family variants (loss aggregation modes,
    upper clip, ``gspo-token``); a test checks that loss and gradients match Tunix's
    for each algorithm of :func:`jaxpost.tunix_ext.learners.rl_algorithm_config`.
    """
    tunix_only = (getattr(train_example, "segment_ids", None) is not None
                  or getattr(train_example, "sampler_is_weights", None) is not None
                  or getattr(algo_config, "epsilon_c", None) is not None
                  or algo_config.loss_algo not in ("grpo", "gspo-token"))
    if not isinstance(model, Gemma3TrimmedLogits) or tunix_only:
        # Logged when the step is traced, i.e. once per compilation, not per step.
        why = (f"{type(model).__name__} is not a Gemma 3 model" if not tunix_only else
               "this GRPO variant (segment ids, sampler weights, epsilon_c or another "
               "loss_algo) is Tunix's alone")
        logging.getLogger(__name__).info(
            "GRPO loss: Tunix's full-logits loss, not jaxpost's chunked one: %s", why)
        return algo_core.grpo_loss_fn(model, train_example, algo_config, pad_id, eos_id,
                                      **kwargs)

    mask = train_example.completion_mask
    mode = algo_config.loss_agg_mode
    eps_low = algo_config.epsilon
    eps_high = getattr(algo_config, "epsilon_high", None) or eps_low
    logps, entropy = completion_logps(model, train_example.prompt_ids,
                                      train_example.completion_ids, pad_id,
                                      temperature=algo_config.temperature,
                                      prompt_group=getattr(model, "prompt_group", 1),
                                      layer_inputs=_ROLLOUT_LAYER_INPUTS.get())
    if train_example.old_per_token_logps is None:
        old = jax.lax.stop_gradient(logps)
    else:
        old = train_example.old_per_token_logps.astype(jnp.float32)
    log_ratio = jnp.clip(logps - old, min=-20.0, max=20.0)
    if algo_config.loss_algo == "gspo-token":
        # GSPO: every token takes its sequence's mean log-ratio as value, and its own
        # log-prob's gradient (Zheng et al. 2025, eq. 10), as Tunix computes it.
        seq = (log_ratio * mask).sum(axis=-1) / jnp.clip(mask.sum(-1), min=1)
        log_ratio = logps - jax.lax.stop_gradient(logps) + jax.lax.stop_gradient(seq)[:, None]
        log_ratio = jnp.clip(log_ratio, max=10.0)
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


# Name under which jaxpost's memory-lean PPO policy loss is registered with Tunix.
CHUNKED_PPO_LOSS = "jaxpost_ppo_chunked"


def ppo_loss_chunked(model, train_example, algo_config, pad_id, eos_id, **kwargs):
    """Tunix's PPO policy loss (its ``ppo_policy_loss_fn``), with log-probs in chunks.

    The clipped surrogate ``max(-r A, -clip(r, 1 - epsilon_low, 1 + epsilon_high) A)``
    per token, with per-token advantages A (GAE from the critic's values), the
    dual clip ``epsilon_c`` on negative advantages when set, averaged over the batch's
    completion tokens. The KL penalty is not here: Tunix's PPO subtracts it from the
    rewards.

    One difference from Tunix 0.1.7, on purpose: Tunix's PPO loss scores the new
    log-probabilities at temperature 1 while the old ones (and the rollout) use the
    sampling temperature, so with temperature != 1 the ratio starts away from 1; this
    loss divides by ``algo_config.temperature`` as jaxpost's old log-probs do. At
    temperature 1 both are equal in value and gradient (tested). Models without
    trimmed-logit support, packed sequences, ``kl_coef`` and ``entropy_coef`` (an
    entropy bonus) use Tunix's loss.
    """
    # jaxpost's entropy carries no gradient, so an entropy bonus is Tunix's alone.
    tunix_only = (getattr(train_example, "segment_ids", None) is not None
                  or getattr(algo_config, "kl_coef", 0.0) or algo_config.entropy_coef)
    if not isinstance(model, Gemma3TrimmedLogits) or tunix_only:
        why = (f"{type(model).__name__} is not a Gemma 3 model" if not tunix_only else
               "packed sequences, kl_coef and entropy_coef are Tunix's alone")
        logging.getLogger(__name__).info(
            "PPO loss: Tunix's full-logits loss, not jaxpost's chunked one: %s", why)
        return algo_core.ppo_policy_loss_fn(model, train_example, algo_config, pad_id,
                                            eos_id, **kwargs)
    mask = train_example.completion_mask
    logps, _ = completion_logps(model, train_example.prompt_ids,
                                train_example.completion_ids, pad_id,
                                temperature=getattr(algo_config, "temperature", 1.0),
                                prompt_group=getattr(model, "prompt_group", 1),
                                layer_inputs=_ROLLOUT_LAYER_INPUTS.get())
    ratio = jnp.exp(logps - train_example.old_per_token_logps.astype(jnp.float32))
    adv = train_example.advantages.astype(jnp.float32)  # [batch, completion]
    pg1 = -ratio * adv
    pg2 = -jnp.clip(ratio, 1 - algo_config.epsilon_low, 1 + algo_config.epsilon_high) * adv
    per_token = jnp.maximum(pg1, pg2)
    dual = per_token if algo_config.epsilon_c is None else -algo_config.epsilon_c * adv
    lower_clipped = ((per_token > dual) & (adv < 0.0)).astype(jnp.float32)
    per_token = jnp.where(adv < 0.0, jnp.minimum(dual, per_token), per_token)
    loss = algo_core.masked_mean(per_token, mask)
    aux = {"pg_clipfrac": algo_core.masked_mean(jnp.greater(pg2, pg1), mask),
           "pg_clipfrac_lower": algo_core.masked_mean(lower_clipped, mask)}
    return loss, aux


function_registry.register_policy_loss_fn(CHUNKED_PPO_LOSS)(ppo_loss_chunked)


def dpo_loss_chunked(model, train_example, algorithm: str, beta: float,
                     label_smoothing: float, *, pad_id: int):
    """Tunix's DPO loss (``dpo_trainer.dpo_loss_fn``), with log-probs computed in chunks.

    Tunix scores the chosen and rejected completions from full ``[2 * batch, completion,
    vocab]`` logits. This computes the same sequence log-probabilities with
    :func:`jaxpost.tunix_ext.logps.completion_logps`, each pair's two rows side by side so
    that their shared prompt runs through the layers once, and applies Tunix's
    objective unchanged: ``-log sigmoid(beta * margin)`` (with label smoothing),
    margin = (chosen - reference chosen) - (rejected - reference rejected) summed
    log-probs, and its metrics (``rewards/*``: beta times each log-ratio;
    ``rewards/accuracy``: the share of pairs whose chosen reward is higher).
    A test checks value and gradient against Tunix's. Models without trimmed-logit
    support, and ORPO, use Tunix's own loss.

    Args:
      train_example: Tunix's DPO ``TrainExample``: rows ``[chosen..., rejected...]``,
        ids ``[2 * batch, prompt + completion]`` whose padding is ``pad_id``.
    """
    if (not isinstance(model, Gemma3TrimmedLogits) or algorithm != "dpo"
            or train_example.images is not None):
        return dpo_trainer.dpo_loss_fn(model, train_example, algorithm=algorithm, beta=beta,
                                       label_smoothing=label_smoothing)
    comp = train_example.logits_to_keep
    ids = train_example.input_ids
    n = ids.shape[0] // 2
    # [c0, r0, c1, r1, ...]: each prompt twice in a row, computed once.
    pairs = np.stack([np.arange(n), np.arange(n) + n], axis=1).reshape(-1)
    logps, _ = completion_logps(model, ids[pairs, :-comp], ids[pairs, -comp:], pad_id,
                                prompt_group=2, layer_inputs=None)
    mask = train_example.completion_mask[pairs].astype(jnp.float32)
    seq = (logps * mask).sum(axis=-1).reshape(n, 2)
    chosen, rejected = seq[:, 0], seq[:, 1]
    chosen_ratio, rejected_ratio = chosen, rejected
    if train_example.ref_chosen_logps is not None:
        chosen_ratio = chosen - train_example.ref_chosen_logps
    if train_example.ref_rejected_logps is not None:
        rejected_ratio = rejected - train_example.ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    losses = -(jax.nn.log_sigmoid(beta * delta) * (1 - label_smoothing)
               + jax.nn.log_sigmoid(-beta * delta) * label_smoothing)
    chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
    aux = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).mean(),
        "log_probs/chosen": chosen.mean(),
        "log_probs/rejected": rejected.mean(),
    }
    return losses.mean(), aux
