"""A LoRA trainer's step that takes the frozen base weights read-only.

:func:`keep_frozen_weights_in_place` replaces a Tunix trainer's ``jit_train_and_eval_step``
(and ``clear_jit_cache``) with :class:`_LoraTrainStep`, whose compiled step returns only
the LoRA weights and the optimizer state (google-tunix 0.1.7's ``PeftTrainer``;
docs/tunix_patches.md).
"""

from __future__ import annotations

import functools
import types

import jax
from flax import nnx

from jaxpost.runtime.memory import compiled_ahead, release_free_memory
from jaxpost.tunix_ext.logps import prompt_group_size
from jaxpost.tunix_ext.losses import _ROLLOUT_LAYER_INPUTS
from jaxpost.tunix_ext.sampler import rollout_layer_inputs
from jaxpost.tunix_ext.versions import check_versions


class _LoraTrainStep:
    """A jitted train step whose inputs and outputs hold only the trainable state.

    Tunix jits its train step over the whole model, so the step returns every variable,
    and XLA writes a fresh copy of the frozen base weights (1.07 GB for Gemma 3 270M in
    float32) each step. The reference model still holds the old buffers, so from the first
    update on, two copies live and a third exists while a step runs. Here the base weights
    go in as a read-only argument and only ``nnx.LoRAParam`` and the optimizer state come
    back (donated, so they are updated in place).

    Each batch's prompt ids are checked for GRPO's grouping (each prompt repeated G
    times in a row, :func:`jaxpost.tunix_ext.logps.prompt_group_size`); the step is
    compiled per grouping, and the loss runs the layers over each distinct prompt once.
    When the rollout kept its layer inputs for this batch and these weights
    (:func:`jaxpost.tunix_ext.sampler.rollout_layer_inputs`), the loss takes them
    instead of running the layers forward.
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
        # The update is a step's memory peak: start it from what is in use.
        release_free_memory()
        model, optimizer = self._trainer.model, self._trainer.optimizer
        _, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
        _, opt_state = nnx.split(optimizer)
        layer_inputs = None
        sampler = getattr(self._trainer, "_jaxpost_rollout_sampler", None)
        if sampler is not None and hasattr(inputs, "completion_mask"):
            layer_inputs = rollout_layer_inputs(
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
