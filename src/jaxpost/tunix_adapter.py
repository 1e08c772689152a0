"""Every use of ``tunix.rl`` and ``tunix.sft`` goes through this module.

Tunix moves fast (its RLCluster is becoming RLEngine, configs move between modules);
keeping the imports here means an upgrade changes one file. Pinned: google-tunix 0.1.7.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Iterator, Sequence

import jax
import optax
import orbax.checkpoint as ocp
from flax import nnx

from tunix.rl import algo_core, common, function_registry
from tunix.rl import utils as rl_utils
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import drgrpo_learner, grpo_learner
from tunix.rl.ppo import ppo_learner
from tunix.rl.rollout import base_rollout
from tunix.sft import metrics_logger, peft_trainer
from tunix.sft.dpo import dpo_trainer

from jaxpost import fast_logits
from jaxpost.tunix_ext.versions import check_versions

Role = rl_cluster_lib.Role

# Name under which jaxpost's memory-lean GRPO loss is registered with Tunix.
CHUNKED_GRPO_LOSS = "jaxpost_grpo_chunked"

# While an update is traced: the layer inputs its rollout kept, or None (see
# fast_logits.rollout_layer_inputs).
_ROLLOUT_LAYER_INPUTS = contextvars.ContextVar("jaxpost_rollout_layer_inputs", default=None)


def grpo_loss_chunked(model, train_example, algo_config, pad_id, eos_id, **kwargs):
    """Tunix's GRPO loss (its ``grpo_loss_fn``), with log-probs computed in chunks.

    Tunix materialises ``[batch, completion, vocab]`` logits (and a second copy for the
    entropy); with a 262k vocabulary that is most of a step's memory. This computes the
    same per-token log-probabilities with :func:`jaxpost.fast_logits.completion_logps`
    and then applies Tunix's objective unchanged: the clipped ratio (epsilon, and
    epsilon_high when set), the KL penalty beta * KL(policy || reference) with Tunix's
    estimator, and its loss aggregation. Models without trimmed-logit support use
    Tunix's own loss. Covers Tunix's GRPO-family variants (loss aggregation modes,
    upper clip, ``gspo-token``); a test checks that loss and gradients match Tunix's
    for each algorithm of :func:`rl_algorithm_config`.
    """
    from jaxpost.fast_logits import Gemma3TrimmedLogits, completion_logps

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
    import jax.numpy as jnp

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
    import jax.numpy as jnp

    from jaxpost.fast_logits import Gemma3TrimmedLogits, completion_logps

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
    critic: nnx.Module | None = None,
    critic_optimizer: optax.GradientTransformation | None = None,
) -> rl_cluster_lib.RLCluster:
    """An RLCluster with actor, reference and rollout (and PPO's critic) on one mesh.

    Colocation lets Tunix share the base weights between the LoRA actor and the
    reference model, and sample from the actor's live weights without a copy.

    Args:
      actor: the LoRA-wrapped policy (only ``nnx.LoRAParam`` train).
      reference: the frozen base model the actor wraps.
      metric_backends: factories of logging backends (``log_scalar``/``close``).
      critic, critic_optimizer: PPO's value model (:class:`jaxpost.critic.ValueModel`)
        and its optimizer; Tunix checkpoints it beside the actor, under ``critic/``.

    Raises:
      RuntimeError: the installed Tunix or qwix is not the version the cluster's patches
        were written for (:func:`jaxpost.tunix_ext.versions.check_versions`).
    """
    check_versions()
    cache_size = config.max_prompt_length + config.max_new_tokens
    training = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optimizer,
        critic_optimizer=critic_optimizer,
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
        role_to_mesh={Role.ACTOR: mesh, Role.REFERENCE: mesh, Role.ROLLOUT: mesh,
                      Role.CRITIC: mesh},
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=training,
        rollout_config=rollout,
    )
    with _no_anchor_snapshot(actor):
        cluster = rl_cluster_lib.RLCluster(actor=actor, critic=critic, reference=reference,
                                           tokenizer=tokenizer, cluster_config=cluster_config)
    keep_frozen_weights_in_place(cluster.actor_trainer)
    if critic is not None:
        keep_frozen_weights_in_place(cluster.critic_trainer)
        write_critic_metrics_on_close(cluster)
    chunk_reference_logps(cluster.inference_worker)
    chunk_old_logps(cluster)
    share_frozen_weights_with_anchor(cluster)
    sampler = getattr(cluster.rollout, "_sampler", None)
    fast_logits.speed_up_sampler(sampler)
    if fast_logits.keep_layer_inputs(sampler, cluster.actor_trainer.model):
        cluster.actor_trainer._jaxpost_rollout_sampler = sampler
    from jaxpost.memory import release_free_memory

    release_free_memory()  # what loading and building freed, before the first rollout
    return cluster


def write_critic_metrics_on_close(cluster: rl_cluster_lib.RLCluster) -> None:
    """Makes ``cluster.close()`` write PPO's critic's last metrics before closing.

    The actor's and the critic's trainers share one metrics logger, and Tunix 0.1.7
    closes it with the actor's trainer, before the critic's trainer writes its last
    step's metrics: those were lost. A trainer writes a step's metrics one step late
    (the first call moves the last buffer up, the second writes it), hence two calls.
    """
    import types

    critic = getattr(cluster, "_critic_trainer", None)
    if critic is None:
        return
    original = cluster.close

    def close(self):
        for _ in range(2):
            critic._write_train_metrics()
        original()

    cluster.close = types.MethodType(close, cluster)


@contextlib.contextmanager
def _no_anchor_snapshot(actor: nnx.Module) -> Iterator[None]:
    """While Tunix builds an RLCluster for a LoRA ``actor``, its anchor snapshot copies nothing.

    Tunix 0.1.7 snapshots the whole actor into host memory when it builds the cluster
    (1.07 GB for Gemma 3 270M in float32), and :func:`share_frozen_weights_with_anchor`
    replaces that snapshot right after with a copy of the LoRA weights alone. Skipping
    the first copy keeps it out of the run's memory peak. Without LoRA, Tunix's snapshot
    is kept.
    """
    from tunix.sft import utils as sft_utils

    if not sft_utils.is_lora_enabled(actor):
        yield
        return
    original = rl_utils.put_params_on_memory_kind

    def put_params_on_memory_kind(params, memory_kind):
        # With offloading off (build_cluster's setting), the anchor snapshot is the only
        # transfer to host memory while the cluster is built.
        return params if memory_kind == "pinned_host" else original(params, memory_kind)

    rl_utils.put_params_on_memory_kind = put_params_on_memory_kind
    try:
        yield
    finally:
        rl_utils.put_params_on_memory_kind = original


def _chunked_logps_fn(graphdef):
    """A ``(state, prompt, completion, pad_id, temperature) -> logps`` for the model
    ``graphdef``, jitted, computing each distinct prompt once (see
    :func:`jaxpost.fast_logits.prompt_group_size`)."""
    from jaxpost.fast_logits import completion_logps, prompt_group_size

    @functools.partial(jax.jit, static_argnames=("pad_id", "temperature", "prompt_group"))
    def jitted(state, prompt_tokens, completion_tokens, pad_id, temperature, prompt_group):
        model = nnx.merge(graphdef, state)
        logps, _ = completion_logps(model, prompt_tokens, completion_tokens, pad_id,
                                    temperature=temperature, prompt_group=prompt_group)
        return jax.lax.stop_gradient(logps)

    def logps_fn(state, prompt_tokens, completion_tokens, pad_id, temperature):
        return jitted(state, prompt_tokens, completion_tokens, pad_id=pad_id,
                      temperature=temperature, prompt_group=prompt_group_size(prompt_tokens))

    return logps_fn


def chunk_reference_logps(worker) -> None:
    """Makes ``worker`` (Tunix's inference worker) score the reference model in chunks.

    Tunix's reference pass materialises ``[batch, completion, vocab]`` logits and their
    log-softmax (1.1 GB for 8 x 64 tokens of Gemma 3); :func:`completion_logps` gives the
    same log-probabilities (a test checks it) holding one chunk at a time. Models
    without trimmed-logit support keep Tunix's pass.
    """
    import types

    from jaxpost.fast_logits import Gemma3TrimmedLogits

    if "reference" not in worker._model_states:
        return
    if not isinstance(worker.get_model("reference"), Gemma3TrimmedLogits):
        return
    graphdef, _ = worker._model_states["reference"]
    reference_logps = _chunked_logps_fn(graphdef)

    def get_ref_per_token_logps(self, prompt_tokens, completion_tokens, pad_id, eos_id,
                                temperature=1.0):
        from jaxpost.memory import release_free_memory

        release_free_memory()  # start from what is in use, not what the rollout freed
        _, state = self._model_states["reference"]
        return reference_logps(state, prompt_tokens, completion_tokens, pad_id=pad_id,
                               temperature=float(temperature))

    worker.get_ref_per_token_logps = types.MethodType(get_ref_per_token_logps, worker)


def chunk_old_logps(cluster) -> None:
    """Makes ``cluster`` score the policy's "old" log-probabilities in chunks, tempered.

    With ``num_iterations`` (mu) > 1, GRPO divides the new log-probabilities by the
    ones the policy gave before this batch's updates. Tunix 0.1.7 computes the old ones
    from full ``[batch, completion, vocab]`` logits at temperature 1, while its loss
    divides the new ones' logits by the sampling temperature, so with temperature != 1
    the ratio starts away from 1 and is clipped for no reason. This computes them in
    chunks at the sampling temperature, like the loss. Models without trimmed-logit
    support keep Tunix's pass.
    """
    import types

    import jax.numpy as jnp

    from jaxpost.fast_logits import Gemma3TrimmedLogits

    model = cluster.rollout.model()
    if not isinstance(model, Gemma3TrimmedLogits):
        return
    graphdef, _ = nnx.split(model)
    policy_logps = _chunked_logps_fn(graphdef)

    def get_old_per_token_logps(self, prompt_tokens, completion_tokens, micro_batch_size=None):
        if prompt_tokens.shape[0] == 0:
            raise ValueError("Cannot get old log probabilities from an empty batch.")
        _, state = nnx.split(self.rollout.model())
        temperature = float(self.get_rollout_config(mode=rl_cluster_lib.Mode.TRAIN).temperature)
        pad_id = self.rollout.pad_id()
        size = micro_batch_size or prompt_tokens.shape[0]
        outs = [policy_logps(state, prompt_tokens[i:i + size], completion_tokens[i:i + size],
                             pad_id=pad_id, temperature=temperature)
                for i in range(0, prompt_tokens.shape[0], size)]
        return jnp.concatenate(outs, axis=0)

    cluster.get_old_per_token_logps = types.MethodType(get_old_per_token_logps, cluster)


def share_frozen_weights_with_anchor(cluster) -> None:
    """Makes ``cluster``'s anchor policy copy only the LoRA weights.

    Tunix 0.1.7 snapshots the whole actor as its "anchor policy" at start-up and after
    every step (``sync_weights``), in host memory: a second 1.07 GB copy of Gemma 3
    270M's float32 base weights, although those never change under LoRA. Here the
    anchor holds a copy of the LoRA weights (the train step updates them in place) and
    the very buffers of the frozen base weights. Models without LoRA keep Tunix's copy.
    """
    import types

    import jax.numpy as jnp
    from tunix.sft import utils as sft_utils

    if not sft_utils.is_lora_enabled(cluster.actor_trainer.model):
        return

    def anchor_state(model):
        _, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
        return nnx.merge_state(jax.tree.map(jnp.copy, lora), frozen)

    def sync_weights(self):
        model = self.actor_trainer.model
        self.rollout.update_params(nnx.state(model, nnx.LoRAParam), (nnx.LoRAParam,))
        self._anchor_policy_state = anchor_state(model)
        # Tunix's sync marks the end of a full batch.
        self.global_steps += 1

    cluster._anchor_policy_state = anchor_state(cluster.actor_trainer.model)
    cluster.sync_weights = types.MethodType(sync_weights, cluster)


class _LoraTrainStep:
    """A jitted train step whose inputs and outputs hold only the trainable state.

    Tunix jits its train step over the whole model, so the step returns every variable,
    and XLA writes a fresh copy of the frozen base weights (1.07 GB for Gemma 3 270M in
    float32) each step. The reference model still holds the old buffers, so from the first
    update on, two copies live and a third exists while a step runs. Here the base weights
    go in as a read-only argument and only ``nnx.LoRAParam`` and the optimizer state come
    back (donated, so they are updated in place).

    Each batch's prompt ids are checked for GRPO's grouping (each prompt repeated G times
    in a row, :func:`jaxpost.fast_logits.prompt_group_size`); the step is compiled per
    grouping, and the loss runs the layers over each distinct prompt once. When the
    rollout kept its layer inputs for this batch and these weights
    (:func:`jaxpost.fast_logits.rollout_layer_inputs`), the loss takes them instead of
    running the layers forward.
    """

    def __init__(self, trainer):
        self._trainer = trainer
        self._model_def, _, _ = nnx.split(trainer.model, nnx.LoRAParam, ...)
        self._optimizer_def, _ = nnx.split(trainer.optimizer)
        self._steps = {}  # prompt group -> (jitted step, compiled steps by input shapes)
        self.jitted_fn = self._step(1)[0]

    def _step(self, prompt_group: int):
        if prompt_group not in self._steps:
            # The graph definitions are fixed for a trainer; they hold the model config,
            # which is not hashable, so they are closed over rather than passed as static
            # arguments.
            jitted = jax.jit(functools.partial(self._pure_step, self._model_def,
                                               self._optimizer_def, prompt_group),
                             donate_argnums=(0, 2))
            self._steps[prompt_group] = (jitted, {})
        return self._steps[prompt_group]

    def _pure_step(self, model_def, optimizer_def, prompt_group, lora, frozen, opt_state,
                   inputs, layer_inputs):
        model = nnx.merge(model_def, lora, frozen)
        # Read by grpo_loss_chunked: rows repeat each prompt this many times.
        model.prompt_group = prompt_group
        optimizer = nnx.merge(optimizer_def, opt_state)
        token = _ROLLOUT_LAYER_INPUTS.set(layer_inputs)
        try:
            loss, aux, grad_norm = self._trainer.create_train_step_fn()(model, optimizer,
                                                                        inputs)
        finally:
            _ROLLOUT_LAYER_INPUTS.reset(token)
        return nnx.state(model, nnx.LoRAParam), nnx.state(optimizer), (loss, aux, grad_norm)

    def __call__(self, inputs):
        from jaxpost.fast_logits import prompt_group_size
        from jaxpost.memory import compiled_ahead, release_free_memory

        # The update is a step's memory peak: start it from what is in use.
        release_free_memory()
        model, optimizer = self._trainer.model, self._trainer.optimizer
        _, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
        _, opt_state = nnx.split(optimizer)
        layer_inputs = None
        sampler = getattr(self._trainer, "_jaxpost_rollout_sampler", None)
        if sampler is not None and hasattr(inputs, "completion_mask"):
            layer_inputs = fast_logits.rollout_layer_inputs(
                sampler, inputs.prompt_ids, inputs.completion_ids, inputs.completion_mask, lora)
        self.used_rollout_layer_inputs = layer_inputs is not None
        args = (lora, frozen, opt_state, inputs, layer_inputs)
        group = prompt_group_size(inputs.prompt_ids) if hasattr(inputs, "prompt_ids") else 1
        self.jitted_fn, compiled = self._step(group)
        lora, opt_state, out = compiled_ahead(self.jitted_fn, compiled, *args)(*args)
        nnx.update(model, lora)
        nnx.update(optimizer, opt_state)
        return out


def keep_frozen_weights_in_place(trainer) -> None:
    """Makes ``trainer`` (a Tunix LoRA trainer) update only the LoRA weights in its step.

    The base weights stay the buffers the reference model and the rollout already
    share, instead of being rewritten each step (see :class:`_LoraTrainStep`). Models
    without LoRA keep Tunix's own step.

    Raises:
      RuntimeError: the installed Tunix is not the version this step was written for
        (:func:`jaxpost.tunix_ext.versions.check_versions`).
    """
    import types

    check_versions()

    if not getattr(trainer, "_lora_enabled", False):
        return
    original = trainer.jit_train_and_eval_step

    def jit_train_and_eval_step(self, skip_jit=False, cache_nnx_graph=False):
        if skip_jit:
            return original(skip_jit, cache_nnx_graph)
        if getattr(self, "_jaxpost_train_step", None) is None:
            _, self._jaxpost_eval_step = original(skip_jit, cache_nnx_graph)
            # Tunix reads ``train_step.func.jitted_fn._cache_size()`` for its logs.
            self._jaxpost_train_step = functools.partial(_LoraTrainStep(self))
        return self._jaxpost_train_step, self._jaxpost_eval_step

    original_clear = trainer.clear_jit_cache

    def clear_jit_cache(self):
        # Tunix clears its cache when the loss or input function changes; so do we.
        self._jaxpost_train_step = None
        original_clear()

    trainer.jit_train_and_eval_step = types.MethodType(jit_train_and_eval_step, trainer)
    trainer.clear_jit_cache = types.MethodType(clear_jit_cache, trainer)


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
    :func:`grpo_loss_chunked`):

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
    from tunix.rl.grpo import dapo_learner

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
    rollout's, which :func:`ppo_loss_chunked` divides the logits by.
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
        import jax.numpy as jnp

        return getattr(jnp, name)

    @staticmethod
    def zeros_like(a, dtype=None, **kwargs):
        import jax.numpy as jnp

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


def build_sft_trainer(model: nnx.Module, optimizer: optax.GradientTransformation, *,
                      checkpoint_dir: str, tensorboard_dir: str, max_steps: int,
                      save_interval_steps: int, max_to_keep: int,
                      metric_backends: Sequence[Callable[[], Any]], loss_fn: Callable):
    """Tunix's ``PeftTrainer`` for the SFT warm-up (``jaxpost.sft``).

    It restores the newest checkpoint under ``checkpoint_dir`` (LoRA weights and
    optimizer state) when built, skips the batches already trained, saves every
    ``save_interval_steps`` and at the end, and logs ``sft/train/<metric>``. Batches are
    dicts passed to ``loss_fn(model, **batch)`` as keyword arguments. As in GRPO, the
    step updates only the LoRA weights (:func:`keep_frozen_weights_in_place`).
    """
    training = peft_trainer.TrainingConfig(
        eval_every_n_steps=10**9,
        max_steps=max_steps,
        checkpoint_root_directory=checkpoint_dir,
        checkpointing_options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps, max_to_keep=max_to_keep),
        metrics_logging_options=metrics_logger.MetricsLoggerOptions(
            log_dir=tensorboard_dir, flush_every_n_steps=1,
            backend_kwargs={"custom_backend": list(metric_backends)}),
        metrics_prefix="sft",
        pbar_description=None,
    )
    trainer = peft_trainer.PeftTrainer(model, optimizer, training)
    trainer.with_loss_fn(loss_fn)
    keep_frozen_weights_in_place(trainer)
    return trainer


def dpo_loss_chunked(model, train_example, algorithm: str, beta: float,
                     label_smoothing: float, *, pad_id: int):
    """Tunix's DPO loss (``dpo_trainer.dpo_loss_fn``), with log-probs computed in chunks.

    Tunix scores the chosen and rejected completions from full ``[2 * batch, completion,
    vocab]`` logits. This computes the same sequence log-probabilities with
    :func:`jaxpost.fast_logits.completion_logps`, each pair's two rows side by side so
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
    import jax.numpy as jnp
    import numpy as np

    from jaxpost.fast_logits import Gemma3TrimmedLogits, completion_logps

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


class _DPOTrainer(dpo_trainer.DPOTrainer):
    """Tunix's DPO trainer whose loss and reference pass use chunked log-probs on Gemma 3.

    On a model with trimmed-logit support (:class:`jaxpost.fast_logits.Gemma3TrimmedLogits`)
    the reference's sequence log-probs come from :func:`_chunked_logps_fn` and the loss
    is :func:`dpo_loss_chunked`; other models keep Tunix's full-logits passes, and
    ``chunked`` says which applies.
    """

    def __init__(self, model, ref_model, optimizer, training_config, *, pad_id: int):
        super().__init__(model, ref_model, optimizer, training_config)
        from jaxpost.fast_logits import Gemma3TrimmedLogits

        self.chunked = isinstance(model, Gemma3TrimmedLogits)
        self._pad_id = pad_id
        if not self.chunked:
            return
        self._ref_graphdef, self._ref_state = nnx.split(ref_model)
        self._ref_logps = _chunked_logps_fn(self._ref_graphdef)

        # Tunix passes the inputs as keyword arguments, and nnx.value_and_grad needs them
        # to bind to positional parameters (a partial's keyword-only pad_id does not).
        def loss(model, train_example, algorithm, beta, label_smoothing):
            return dpo_loss_chunked(model, train_example, algorithm, beta, label_smoothing,
                                    pad_id=pad_id)

        self.with_loss_fn(loss, has_aux=True)

    def _prepare_inputs(self, training_input):
        if not self.chunked or not isinstance(training_input, dict):
            return super()._prepare_inputs(training_input)
        import jax.numpy as jnp
        import numpy as np

        from tunix.rl import common as rl_common

        prompt = np.asarray(training_input["prompt_ids"])
        chosen = np.asarray(training_input["chosen_ids"])
        rejected = np.asarray(training_input["rejected_ids"])
        n, comp = chosen.shape
        prompt_ids = np.concatenate([prompt, prompt])
        completion_ids = np.concatenate([chosen, rejected])
        completion_mask = np.concatenate([training_input["chosen_mask"],
                                          training_input["rejected_mask"]])
        mask = np.concatenate([np.concatenate([training_input["prompt_mask"]] * 2),
                               completion_mask], axis=1)
        pairs = np.stack([np.arange(n), np.arange(n) + n], axis=1).reshape(-1)
        ref = self._ref_logps(self._ref_state, prompt_ids[pairs], completion_ids[pairs],
                              pad_id=self._pad_id, temperature=1.0)
        ref = (ref * completion_mask[pairs]).sum(axis=-1).reshape(n, 2)
        mask = jnp.asarray(mask)
        input_ids = jnp.asarray(np.concatenate([prompt_ids, completion_ids], axis=1))
        # As Tunix builds it, for its loss; the chunked one builds its own from the ids.
        if hasattr(self.model, "get_attention_mask"):
            attention_mask = self.model.get_attention_mask(input_ids, inputs_mask=mask)
        else:
            attention_mask = rl_common.make_causal_attn_mask(mask)
        return dpo_trainer.TrainExample(
            input_ids=input_ids,
            positions=rl_common.build_positions_from_mask(mask),
            attention_mask=attention_mask,
            ref_chosen_logps=ref[:, 0], ref_rejected_logps=ref[:, 1],
            completion_mask=jnp.asarray(completion_mask), logits_to_keep=comp)


def build_dpo_trainer(model: nnx.Module, reference: nnx.Module,
                      optimizer: optax.GradientTransformation, *, beta: float, pad_id: int,
                      checkpoint_dir: str, tensorboard_dir: str, max_steps: int,
                      save_interval_steps: int, max_to_keep: int,
                      metric_backends: Sequence[Callable[[], Any]]):
    """Tunix's ``DPOTrainer`` (a ``PeftTrainer``) for ``jaxpost.dpo``.

    Batches are dicts of Tunix's tokenized DPO input (``prompt_ids``/``prompt_mask``
    left-padded, ``chosen_ids``/``chosen_mask`` and ``rejected_ids``/``rejected_mask``
    right-padded with ``pad_id``, the masks equal to ``ids != pad_id``). ``reference``
    (frozen) scores each batch before its step. Like the SFT trainer, it restores the
    newest checkpoint under ``checkpoint_dir`` when built, skips the batches already
    trained, saves every ``save_interval_steps`` and at the end, logs
    ``dpo/train/<metric>`` (loss, ``rewards/margin``, ``rewards/accuracy``, ...) and
    updates only the LoRA weights (:func:`keep_frozen_weights_in_place`). Its
    ``chunked`` attribute says whether the log-probs are jaxpost's chunked ones.
    """
    training = dpo_trainer.DPOTrainingConfig(
        algorithm="dpo",
        beta=beta,
        eval_every_n_steps=10**9,
        max_steps=max_steps,
        checkpoint_root_directory=checkpoint_dir,
        checkpointing_options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps, max_to_keep=max_to_keep),
        metrics_logging_options=metrics_logger.MetricsLoggerOptions(
            log_dir=tensorboard_dir, flush_every_n_steps=1,
            backend_kwargs={"custom_backend": list(metric_backends)}),
        metrics_prefix="dpo",
        pbar_description=None,
    )
    trainer = _DPOTrainer(model, reference, optimizer, training, pad_id=pad_id)
    keep_frozen_weights_in_place(trainer)
    return trainer


def frozen_copy(model: nnx.Module) -> nnx.Module:
    """``model`` as it is now, for a reference policy: a copy of its LoRA weights, and the
    very arrays of its frozen base weights (which no LoRA update writes)."""
    import jax.numpy as jnp

    graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, lora), frozen)


# The checkpoint layout belongs to jaxpost.rundir and reading checkpoints to
# jaxpost.checkpoints; these names stay for code written against them.


def actor_checkpoint_dir(checkpoint_dir) -> str:
    """Where Tunix's trainer writes the actor's (GRPO's) checkpoints under ``checkpoint_dir``."""
    from jaxpost.rundir import GRPO_STAGE

    return os.path.join(os.path.abspath(checkpoint_dir), GRPO_STAGE)


def sft_checkpoint_dir(checkpoint_dir) -> str:
    """Where the SFT warm-up's trainer writes its checkpoints under ``checkpoint_dir``."""
    from jaxpost.rundir import SFT_STAGE

    return os.path.join(os.path.abspath(checkpoint_dir), SFT_STAGE)


def dpo_checkpoint_dir(checkpoint_dir) -> str:
    """Where the DPO stage's trainer writes its checkpoints under ``checkpoint_dir``."""
    from jaxpost.rundir import DPO_STAGE

    return os.path.join(os.path.abspath(checkpoint_dir), DPO_STAGE)


def final_checkpoint_dir(checkpoint_dir) -> str:
    """The checkpoints holding a run's latest LoRA weights under ``checkpoint_dir``
    (:meth:`jaxpost.rundir.RunDir.final_checkpoint_dir`)."""
    from jaxpost.rundir import final_stage_dir

    return str(final_stage_dir(checkpoint_dir))


def latest_checkpoint_step(checkpoint_dir: str) -> int | None:
    """The newest finished checkpoint step under ``checkpoint_dir`` (None if there is none)."""
    from jaxpost.checkpoints import latest_step

    return latest_step(checkpoint_dir)


def restore_lora_params(checkpoint_dir: str, step: int | None = None) -> tuple[int, dict]:
    """The LoRA parameters of a checkpoint (:func:`jaxpost.checkpoints.restore_lora_params`)."""
    from jaxpost.checkpoints import restore_lora_params as restore

    return restore(checkpoint_dir, step)
