"""Tunix's RL cluster as jaxpost builds it: one mesh, shared frozen weights, chunked passes.

:func:`build_cluster` builds Tunix's ``RLCluster`` (actor, reference, rollout and PPO's
critic, colocated) and installs on it jaxpost's replacements of some of its methods:
the anchor policy shares the frozen base weights (:func:`share_frozen_weights_with_anchor`),
the reference and old log-probs are computed in chunks (:func:`chunk_reference_logps`,
:func:`chunk_old_logps`), the trainers update only the LoRA weights
(:func:`jaxpost.tunix_ext.train_step.keep_frozen_weights_in_place`), the critic's last
metrics are written on close (:func:`write_critic_metrics_on_close`), and the rollout's
sampler gets jaxpost's hooks (:mod:`jaxpost.tunix_ext.sampler`). Each replaces or reads
private parts of google-tunix 0.1.7 (docs/tunix_patches.md).
"""

from __future__ import annotations

import contextlib
import os
import types
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl import utils as rl_utils
from tunix.rl.rollout import base_rollout
from tunix.sft import metrics_logger
from tunix.sft import utils as sft_utils

from jaxpost.runtime.memory import release_free_memory
from jaxpost.tunix_ext.gemma3 import Gemma3TrimmedLogits
from jaxpost.tunix_ext.logps import chunked_logps_fn
from jaxpost.tunix_ext.sampler import keep_layer_inputs, speed_up_sampler
from jaxpost.tunix_ext.train_step import keep_frozen_weights_in_place
from jaxpost.tunix_ext.versions import check_versions

Role = rl_cluster_lib.Role


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
      critic, critic_optimizer: PPO's value model (:class:`jaxpost.models.critic.ValueModel`)
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
    speed_up_sampler(sampler)
    if keep_layer_inputs(sampler, cluster.actor_trainer.model):
        cluster.actor_trainer._jaxpost_rollout_sampler = sampler

    release_free_memory()  # what loading and building freed, before the first rollout
    return cluster


def write_critic_metrics_on_close(cluster: rl_cluster_lib.RLCluster) -> None:
    """Makes ``cluster.close()`` write PPO's critic's last metrics before closing.

    The actor's and the critic's trainers share one metrics logger, and Tunix 0.1.7
    closes it with the actor's trainer, before the critic's trainer writes its last
    step's metrics: those were lost. A trainer writes a step's metrics one step late
    (the first call moves the last buffer up, the second writes it), hence two calls.
    """
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


def chunk_reference_logps(worker) -> None:
    """Makes ``worker`` (Tunix's inference worker) score the reference model in chunks.

    Tunix's reference pass materialises ``[batch, completion, vocab]`` logits and their
    log-softmax (1.1 GB for 8 x 64 tokens of Gemma 3);
    :func:`jaxpost.tunix_ext.logps.completion_logps` gives the same log-probabilities (a
    test checks it) holding one chunk at a time. Models without trimmed-logit support
    keep Tunix's pass.
    """
    if "reference" not in worker._model_states:
        return
    if not isinstance(worker.get_model("reference"), Gemma3TrimmedLogits):
        return
    graphdef, _ = worker._model_states["reference"]
    reference_logps = chunked_logps_fn(graphdef)

    def get_ref_per_token_logps(self, prompt_tokens, completion_tokens, pad_id, eos_id,
                                temperature=1.0):
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
    model = cluster.rollout.model()
    if not isinstance(model, Gemma3TrimmedLogits):
        return
    graphdef, _ = nnx.split(model)
    policy_logps = chunked_logps_fn(graphdef)

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
