"""Hooks that make a Tunix ``Sampler`` faster, installed by :func:`speed_up_sampler`.

:func:`speed_up_sampler` installs jaxpost's decoding loop
(:func:`jaxpost.tunix_ext.decoding.lay_out_decode_weights`) and a prefill that runs each
repeated prompt once (:func:`share_prompt_prefill`), and makes the sampler merge its
model once per set of weights (:func:`merge_transformer_once`). :func:`keep_layer_inputs`
makes such a sampler keep every layer's input from each rollout, so that the update
after it need not run the layers forward again (:func:`rollout_layer_inputs`).
:func:`build_sampler` builds a sampler with them, and :func:`tokenizer_adapter` wraps a
tokenizer as Tunix's sampler and trainers take it.

These replace the sampler's ``_compiled_prefill_fn`` and its ``transformer`` property and
call its private ``_prefill_fn`` (google-tunix 0.1.7; docs/tunix_patches.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.generate import sampler as sampler_lib
from tunix.generate.tokenizer_adapter import TokenizerAdapter

from jaxpost.runtime.memory import release_free_memory
from jaxpost.tunix_ext.decoding import lay_out_decode_weights
from jaxpost.tunix_ext.gemma3 import _LAYER_INPUTS, _PREFILL_GROUP, Gemma3TrimmedLogits
from jaxpost.tunix_ext.logps import prompt_group_size
from jaxpost.tunix_ext.versions import check_versions


def tokenizer_adapter(tokenizer) -> TokenizerAdapter:
    """Tunix's ``TokenizerAdapter`` around ``tokenizer``: a SentencePiece processor or a
    Hugging Face tokenizer."""
    return TokenizerAdapter(tokenizer)


def build_sampler(model: nnx.Module, tokenizer, *, cache_size: int, num_layers: int,
                  num_kv_heads: int, head_dim: int):
    """A Tunix ``Sampler`` for ``model``, with the hooks of :func:`speed_up_sampler`.

    Args:
      tokenizer: a Tunix ``TokenizerAdapter`` (:func:`tokenizer_adapter`).
      cache_size: KV-cache length in tokens; must hold the prompt plus new tokens.
      num_layers, num_kv_heads, head_dim: the model's, which size its KV cache.
    """
    cache = sampler_lib.CacheConfig(cache_size=cache_size, num_layers=num_layers,
                                    num_kv_heads=num_kv_heads, head_dim=head_dim)
    sampler = sampler_lib.Sampler(transformer=model, tokenizer=tokenizer, cache_config=cache)
    speed_up_sampler(sampler)
    return sampler


def speed_up_sampler(sampler) -> None:
    """Installs jaxpost's faster decoding loop (:func:`lay_out_decode_weights`) and
    prefill (:func:`share_prompt_prefill`) on a Tunix ``Sampler``, and makes it merge its
    model once per set of weights (:func:`merge_transformer_once`); each leaves the
    sampler as it is where it does not apply.

    Raises:
      RuntimeError: the installed Tunix is not the version these hooks were written for
        (:func:`jaxpost.tunix_ext.versions.check_versions`).
    """
    check_versions()
    lay_out_decode_weights(sampler)
    share_prompt_prefill(sampler)
    merge_transformer_once(sampler)


def merge_transformer_once(sampler) -> bool:
    """Makes a Tunix ``Sampler``'s ``transformer`` merge the model once per set of weights.

    Tunix 0.1.7's ``Sampler.transformer`` is a property that runs ``nnx.merge`` over the
    whole model each time it is read, and a rollout reads it four times before it starts
    (the dtype, the cache, the vocabulary size, the attention mask): about 35 ms each for
    Gemma 3 270M, on the host, before any computation is dispatched. Here the merged
    module is kept while the sampler's flattened state holds the same arrays, and merged
    anew when they change (Tunix's ``transformer_state`` setter, a weight sync).

    Returns:
      Whether the sampler's ``transformer`` now merges once (False for a sampler without
      Tunix 0.1.7's property and flattened state).
    """
    cls = type(sampler)
    if getattr(cls, "_jaxpost_merges_once", False):
        return True
    tunix_property = getattr(cls, "transformer", None)
    if not isinstance(tunix_property, property) or not hasattr(
            sampler, "_flattened_transformer_state"):
        return False

    def transformer(self):
        leaves = tuple(self._flattened_transformer_state)
        kept = self.__dict__.get("_jaxpost_merged")
        if kept is None or len(kept[0]) != len(leaves) or any(
                a is not b for a, b in zip(kept[0], leaves)):
            kept = (leaves, tunix_property.fget(self))
            self._jaxpost_merged = kept
        return kept[1]

    sampler.__class__ = type(cls.__name__, (cls,), {
        "transformer": property(transformer, doc=tunix_property.__doc__),
        "_jaxpost_merges_once": True, "__module__": cls.__module__})
    return True


def share_prompt_prefill(sampler) -> bool:
    """Makes a Tunix ``Sampler``'s prefill compute each repeated prompt once (CPU).

    A GRPO rollout samples G completions of each prompt, so the sampler's batch holds
    every prompt G times in a row, and Tunix's prefill runs the model over all of those
    copies (8 rows of 64 tokens for 2 prompts x 4 completions). Before each prefill the
    grouping is read from the token buffer on the host
    (:func:`jaxpost.tunix_ext.logps.prompt_group_size`); a prefill compiled for that
    grouping runs each prompt once and repeats its logits and KV-cache entries for its
    rows (:class:`Gemma3TrimmedLogits`). Sampling, from the first new token on, stays
    per row. Batches without repeats run as before.

    Returns:
      Whether the sampler's prefill was replaced (False off CPU, for a model other than
      :class:`Gemma3TrimmedLogits`, or for a sampler without Tunix 0.1.7's internals).
    """
    needed = ("_prefill_fn", "_compiled_prefill_fn", "_flattened_transformer_state")
    if (jax.default_backend() != "cpu" or not all(hasattr(sampler, a) for a in needed)
            or not isinstance(sampler.transformer, Gemma3TrimmedLogits)):
        return False
    compiled = {}

    def for_group(group, keep):
        if (group, keep) not in compiled:
            def prefill(params, sampling_state, images=None, echo=True):
                recorded = [] if keep else None
                token = _PREFILL_GROUP.set(group)
                recording = _LAYER_INPUTS.set(recorded)
                try:
                    state = sampler._prefill_fn(params, sampling_state, images, echo)
                finally:
                    _LAYER_INPUTS.reset(recording)
                    _PREFILL_GROUP.reset(token)
                return state, (jax.numpy.stack(recorded) if keep else None)

            compiled[group, keep] = jax.jit(prefill, donate_argnums=(1,),
                                            static_argnames=("echo",))
        return compiled[group, keep]

    def prefill_fn(params, sampling_state, images=None, echo=True):
        release_free_memory()  # the rollout starts from memory in use, as other phases do
        # Tunix stores the prompt length, a static field, as a JAX scalar; the compiled
        # functions' cache then compares it through a fresh jit(equal) compilation at
        # every rollout (about 0.1 s). A Python int compares directly.
        sampling_state = sampling_state.replace(
            num_input_tokens=int(sampling_state.num_input_tokens))
        group = 1
        if images is None and sampling_state.sampling_mode != "beam_search":
            group = prompt_group_size(np.asarray(sampling_state.token_buffer))
        kept = getattr(sampler, "_jaxpost_layer_inputs", None)
        keep = (kept is not None and images is None
                and sampling_state.sampling_mode != "beam_search")
        if kept is not None:
            kept.clear()  # a new rollout: what the last one kept no longer applies
        state, prompt = for_group(group, keep)(params, sampling_state, images, echo=echo)
        if keep:
            kept.update(prompt=prompt, prompt_group=group)
        return state

    sampler._compiled_prefill_fn = prefill_fn
    return True


def _leaves_by_path(state, lora: bool) -> dict:
    """``{path: array}`` of a model state's LoRA leaves, or of its other leaves."""
    named = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {jax.tree_util.keystr(path): getattr(v, "value", v) for path, v in named
            if isinstance(v, nnx.LoRAParam) == lora}


def _same_arrays(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k] is b[k] or (a[k].shape == b[k].shape and np.array_equal(a[k], b[k])) for k in a)


def keep_layer_inputs(sampler, policy: nnx.Module) -> bool:
    """Makes a sampler keep every layer's input from each rollout, for the update after it.

    A GRPO update runs the policy forward over the rollout's prompts and completions,
    with the weights the rollout sampled with (one update per rollout), so the rollout
    has already computed every layer's input at every position: its prefill for the
    prompts and its decoding loop for the completions. Kept (31 MB for 2 prompts x 4
    completions x 64 tokens of Gemma 3 270M), they let the update skip its forward pass
    through the layers (:func:`rollout_layer_inputs`): the backward pass recomputes each
    layer from its kept input (:func:`jaxpost.tunix_ext.gemma3.recomputed_layer`), as it
    would with ``remat``.

    Applies to a sampler with jaxpost's prefill and decoding loop
    (:func:`speed_up_sampler`) whose frozen weights are those of ``policy``, the model
    the updates train; returns whether it was enabled.
    """
    names = (getattr(getattr(sampler, "_compiled_decode_fn", None), "__name__", None),
             getattr(getattr(sampler, "_compiled_prefill_fn", None), "__name__", None))
    if names != ("decode_fn", "prefill_fn") or not _same_arrays(
            _leaves_by_path(sampler._transformer_state, lora=False),
            _leaves_by_path(nnx.state(policy), lora=False)):
        return False
    sampler._jaxpost_layer_inputs = {}
    return True


def rollout_layer_inputs(sampler, prompt_ids, completion_ids, completion_mask, lora):
    """The layer inputs ``sampler``'s last rollout kept (:func:`keep_layer_inputs`), when
    they are those of this batch under these weights; None otherwise.

    They apply when the batch's prompts are the rollout's, its completions are the
    rollout's tokens wherever ``completion_mask`` is set (Tunix pads what follows the
    end of sequence), and ``lora`` (the policy's ``nnx.LoRAParam`` state) holds the
    values the rollout sampled with. Otherwise (a later update on the same rollout, a
    micro-batch of it) the update runs its forward pass as usual.

    Returns:
      ``[layers + 1, batch, prompt_len + completion_len, embed]``: the input of each
      layer, then the last layer's output, at every position. A completion's last
      position, which no token follows, holds zeros (the rollout never ran it).
    """
    kept = getattr(sampler, "_jaxpost_layer_inputs", None)
    if not kept or "completion" not in kept:
        return None
    tokens = np.asarray(kept["tokens"])
    prompt_ids, completion_ids = np.asarray(prompt_ids), np.asarray(completion_ids)
    prompt_len = kept["prompt_len"]
    if (prompt_ids.shape != (tokens.shape[0], prompt_len)
            or completion_ids.shape != (tokens.shape[0], tokens.shape[1] - prompt_len)
            or not np.array_equal(prompt_ids, tokens[:, :prompt_len])):
        return None
    used = np.asarray(completion_mask).astype(bool)
    if not np.array_equal(completion_ids[used], tokens[:, prompt_len:][used]):
        return None
    if not _same_arrays(_leaves_by_path(lora, lora=True), kept["lora"]):
        return None
    return _rows_layer_inputs(kept["prompt"], kept["completion"], kept["prompt_group"])


@functools.partial(jax.jit, static_argnums=2)
def _rows_layer_inputs(prompt, completion, group: int):
    """``[layers + 1, rows, prompt + completion, embed]`` from each distinct prompt's
    inputs and each row's completion inputs: one compiled call (eagerly, the repeat and
    the concatenation were three dispatches and about 55 ms per update)."""
    return jnp.concatenate([jnp.repeat(prompt, group, axis=1), completion], axis=2)
