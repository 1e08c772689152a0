"""Tunix's SFT and DPO trainers as jaxpost uses them.

:func:`build_sft_trainer` (the SFT warm-up) and :func:`build_dpo_trainer` build Tunix's
``PeftTrainer`` and ``DPOTrainer`` whose step updates only the LoRA weights
(:func:`jaxpost.tunix_ext.train_step.keep_frozen_weights_in_place`). The DPO trainer,
:class:`_DPOTrainer`, overrides Tunix's private ``_prepare_inputs`` to score the
reference in chunks and uses :func:`jaxpost.tunix_ext.losses.dpo_loss_chunked`
(google-tunix 0.1.7; docs/tunix_patches.md). :func:`frozen_copy` takes a reference
policy that shares the base weights.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tunix.rl import common as rl_common
from tunix.sft import metrics_logger, peft_trainer
from tunix.sft.dpo import dpo_trainer

from jaxpost.tunix_ext.gemma3 import Gemma3TrimmedLogits
from jaxpost.tunix_ext.logps import chunked_logps_fn
from jaxpost.tunix_ext.losses import dpo_loss_chunked
from jaxpost.tunix_ext.train_step import keep_frozen_weights_in_place


def _training_options(prefix: str, max_steps: int, checkpoint_dir: str, tensorboard_dir: str,
                      save_interval_steps: int, max_to_keep: int,
                      metric_backends) -> dict:
    """The settings the SFT and DPO trainers share: checkpoints every
    ``save_interval_steps``, metrics under ``<prefix>/`` to TensorBoard and jaxpost's
    backends, no evaluation and no progress bar."""
    return dict(
        eval_every_n_steps=10**9,
        max_steps=max_steps,
        checkpoint_root_directory=checkpoint_dir,
        checkpointing_options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps, max_to_keep=max_to_keep),
        metrics_logging_options=metrics_logger.MetricsLoggerOptions(
            log_dir=tensorboard_dir, flush_every_n_steps=1,
            backend_kwargs={"custom_backend": list(metric_backends)}),
        metrics_prefix=prefix,
        pbar_description=None,
    )


def build_sft_trainer(model: nnx.Module, optimizer: optax.GradientTransformation, *,
                      checkpoint_dir: str, tensorboard_dir: str, max_steps: int,
                      save_interval_steps: int, max_to_keep: int,
                      metric_backends: Sequence[Callable[[], Any]], loss_fn: Callable):
    """Tunix's ``PeftTrainer`` for the SFT warm-up (``jaxpost.sft``).

    It restores the newest checkpoint under ``checkpoint_dir`` (LoRA weights and
    optimizer state) when built, skips the batches already trained, saves every
    ``save_interval_steps`` and at the end, and logs ``sft/train/<metric>``. Batches are
    dicts passed to ``loss_fn(model, **batch)`` as keyword arguments. As in GRPO, the
    step updates only the LoRA weights
    (:func:`jaxpost.tunix_ext.train_step.keep_frozen_weights_in_place`).
    """
    training = peft_trainer.TrainingConfig(**_training_options(
        "sft", max_steps, checkpoint_dir, tensorboard_dir, save_interval_steps, max_to_keep,
        metric_backends))
    trainer = peft_trainer.PeftTrainer(model, optimizer, training)
    trainer.with_loss_fn(loss_fn)
    keep_frozen_weights_in_place(trainer)
    return trainer


class _DPOTrainer(dpo_trainer.DPOTrainer):
    """Tunix's DPO trainer whose loss and reference pass use chunked log-probs on Gemma 3.

    On a model with trimmed-logit support
    (:class:`jaxpost.tunix_ext.gemma3.Gemma3TrimmedLogits`) the reference's sequence
    log-probs come from :func:`jaxpost.tunix_ext.logps.chunked_logps_fn` and the loss is
    :func:`jaxpost.tunix_ext.losses.dpo_loss_chunked`; other models keep Tunix's
    full-logits passes, and ``chunked`` says which applies.
    """

    def __init__(self, model, ref_model, optimizer, training_config, *, pad_id: int):
        super().__init__(model, ref_model, optimizer, training_config)

        self.chunked = isinstance(model, Gemma3TrimmedLogits)
        self._pad_id = pad_id
        if not self.chunked:
            return
        self._ref_graphdef, self._ref_state = nnx.split(ref_model)
        self._ref_logps = chunked_logps_fn(self._ref_graphdef)

        # Tunix passes the inputs as keyword arguments, and nnx.value_and_grad needs them
        # to bind to positional parameters (a partial's keyword-only pad_id does not).
        def loss(model, train_example, algorithm, beta, label_smoothing):
            return dpo_loss_chunked(model, train_example, algorithm, beta, label_smoothing,
                                    pad_id=pad_id)

        self.with_loss_fn(loss, has_aux=True)

    def _prepare_inputs(self, training_input):
        if not self.chunked or not isinstance(training_input, dict):
            return super()._prepare_inputs(training_input)


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
    updates only the LoRA weights
    (:func:`jaxpost.tunix_ext.train_step.keep_frozen_weights_in_place`). Its ``chunked``
    attribute says whether the log-probs are jaxpost's chunked ones.
    """
    training = dpo_trainer.DPOTrainingConfig(algorithm="dpo", beta=beta, **_training_options(
        "dpo", max_steps, checkpoint_dir, tensorboard_dir, save_interval_steps, max_to_keep,
        metric_backends))
    trainer = _DPOTrainer(model, reference, optimizer, training, pad_id=pad_id)
    keep_frozen_weights_in_place(trainer)
    return trainer


def frozen_copy(model: nnx.Module) -> nnx.Module:
    """``model`` as it is now, for a reference policy: a copy of its LoRA weights, and the
    very arrays of its frozen base weights (which no LoRA update writes)."""
    graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, lora), frozen)
