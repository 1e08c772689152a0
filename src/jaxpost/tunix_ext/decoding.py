"""A Tunix sampler's decoding loop with its weights laid out in advance (CPU).

:func:`lay_out_decode_weights` hands a sampler's decoding loop the attention and MLP
weights already in the layouts a decoding step reads fastest (on CPU, in their own
buffers for the loop's duration), so that they are rearranged once per rollout instead
of at every new token; in those steps the decoding layers
(:mod:`jaxpost.tunix_ext.decoding_layers`) put the kernels first in their products and
write each cache in place, and top-k sampling takes its top k in blocks
(:func:`blocked_top_k`, through :func:`sample_top_p`). The model computes the same
numbers as Tunix's loop.

This replaces the sampler's ``_compiled_decode_fn``, calls its private ``_sample_step``,
and stands in for ``tunix.generate.sampler.sample_top_p`` while a step is traced
(google-tunix 0.1.7; docs/tunix_patches.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.generate import sampler as sampler_lib

from jaxpost.runtime.memory import release_free_memory
from jaxpost.tunix_ext.decoding_layers import _DECODING_LOOP, _values_transposed
from jaxpost.tunix_ext.gemma3 import _LAYER_INPUTS


# How a decoding step wants each weight laid out, by (module, parameter) name. For the
# key-value weights of Tunix's Gemma 3 it is the permutation XLA's CPU backend applies
# before their products (read from the optimized HLO of the decode loop, jaxlib 0.10.2):
# XLA does not move a lone transpose out of a loop, so each new token rearranged the
# 118 MB of the 270M model's attention weights (23 ms of a 150 ms step). The query and
# output projections ([heads, embed, head] and [heads, head, embed]) and the MLP kernels
# ([in, out]) go in with their output dimensions first, for the kernel-first products
# of DecodingAttention and DecodingFeedForward.
DECODE_WEIGHT_LAYOUTS = {("q_einsum", "w"): (0, 2, 1), ("kv_einsum", "w"): (0, 1, 3, 2),
                         ("attn_vec_einsum", "w"): (2, 0, 1),
                         ("gate_proj", "kernel"): (1, 0), ("up_proj", "kernel"): (1, 0),
                         ("down_proj", "kernel"): (1, 0)}


def _decode_layout(path, variable) -> tuple[int, ...] | None:
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    perm = DECODE_WEIGHT_LAYOUTS.get(tuple(keys[-2:])) if len(keys) >= 2 else None
    if perm is not None and getattr(variable, "ndim", None) == len(perm):
        return perm
    return None


def _in_place_layout_possible(arrays) -> bool:
    """Whether each array's buffer is its own row-major host memory, shared by NumPy.

    That holds for a CPU array on one device in JAX's default layout: its NumPy view
    is then the buffer itself, which :func:`_rewrite_in_place` writes.
    """
    for a in arrays:
        if not isinstance(a, jax.Array) or a.is_deleted() or len(a.addressable_shards) != 1:
            return False
        if a.addressable_shards[0].device.platform != "cpu":
            return False
        view = np.asarray(a)
        if not view.flags.c_contiguous or view.ctypes.data != a.unsafe_buffer_pointer():
            return False
    return True


def _laid_out(a, perm):
    """The laid-out weight held in ``a`` (of the model's shape; see
    :func:`_in_decode_layout`), as an array of the laid-out shape: a reshape, no copy."""
    return a.reshape(tuple(a.shape[i] for i in perm))


def _inverse(perm) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


@functools.partial(jax.jit, static_argnums=1)
def _in_decode_layout(arrays, perms):
    """Each array's values in its layout from ``perms``, as an array of its own shape.

    Its bytes are the laid-out weight's (:func:`_laid_out` reads it back), so the same
    buffer can hold either layout.
    """
    return [jax.numpy.transpose(a, p).reshape(a.shape) for a, p in zip(arrays, perms)]


@functools.partial(jax.jit, static_argnums=1)
def _from_decode_layout(arrays, perms):
    """Inverse of :func:`_in_decode_layout`."""
    return [jax.numpy.transpose(_laid_out(a, p), _inverse(p)) for a, p in zip(arrays, perms)]


def _overwrite(array, values) -> None:
    """Copies ``values`` (an array of ``array``'s shape and dtype) over ``array``'s buffer."""
    raw = (ctypes.c_ubyte * array.nbytes).from_address(array.unsafe_buffer_pointer())
    np.copyto(np.frombuffer(raw, dtype=array.dtype), np.asarray(values).reshape(-1))


# How much of the weights _rewrite_in_place lays out per compiled call: about one layer
# of the 270M model (21 MB), few calls, and little memory beside the weights.
_LAYOUT_GROUP_BYTES = 32 << 20


def _rewrite_in_place(arrays, perms, transform, done: list):
    """Writes ``transform``'s results over the arrays' own buffers, appending each to ``done``.

    The new values are formed a group of arrays at a time (at most
    :data:`_LAYOUT_GROUP_BYTES`), in buffers of their own, while the previous
    group's are copied over its arrays: at most two groups' worth of extra memory.
    Every holder of an array (the policy, the reference model, the sampler) then reads
    the new values.
    """
    groups, size = [[]], 0
    for a, p in zip(arrays, perms):
        if groups[-1] and size + a.nbytes > _LAYOUT_GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((a, p))
        size += a.nbytes
    pending = None
    for group in groups + [None]:
        # Dispatched first, so that XLA forms this group while the last one is copied.
        formed = None if group is None else (
            group, transform([a for a, _ in group], tuple(p for _, p in group)))
        if pending is not None:
            for (a, p), values in zip(*pending):
                _overwrite(a, values)
                done.append((a, p))
        pending = formed


@contextlib.contextmanager
def _weights_in_decode_layout(arrays, perms) -> Iterator[None]:
    """Holds ``arrays`` in their decoding layouts (``perms``) for the block's duration.

    Each array's buffer is rewritten in place, and written back afterwards, whatever
    the block raises. The caller makes sure nothing else reads them meanwhile. An
    interrupt (Ctrl-C in a notebook) that comes during the write-back is held until
    every array is back, then raised: the model is never left half laid out.
    """
    done = []
    try:
        _rewrite_in_place(arrays, perms, _in_decode_layout, done)
        yield
    finally:
        interrupted = False
        while done:
            restored = []
            try:
                _rewrite_in_place([a for a, _ in done], [p for _, p in done],
                                  _from_decode_layout, restored)
            except KeyboardInterrupt:
                interrupted = True
            back = {id(a) for a, _ in restored}
            done = [(a, p) for a, p in done if id(a) not in back]
        if interrupted:
            raise KeyboardInterrupt


def lay_out_decode_weights(sampler) -> bool:
    """Gives a Tunix ``Sampler``'s decoding loop its weights pre-arranged (CPU).

    For the length of each decoding loop, the attention and MLP weights are held in the
    layouts a decoding step reads fastest (:data:`DECODE_WEIGHT_LAYOUTS`; 400 MB for the
    270M model). On one CPU device their own buffers are rewritten in those layouts a
    layer at a time, and written back when the loop ends (or raises), so the rollout
    needs no second copy of them; elsewhere a separate compiled call writes laid-out
    copies, freed when the rollout ends. Nothing else runs while the loop does: the
    prefill before it has ended, and the policy, the reference model and the sampler,
    which share these buffers, read them again only after the write-back. The loop
    receives the laid-out weights as arguments (either way, arrays of the model's shapes
    holding the laid-out bytes, :func:`_in_decode_layout`), so XLA cannot fold the
    arrangement back into it; each step transposes them back to the model's own shapes,
    which XLA folds into the products; the MLP computes its products kernel first
    (:class:`~jaxpost.tunix_ext.decoding_layers.DecodingFeedForward`) and the
    attention writes its cache in place
    (:class:`~jaxpost.tunix_ext.decoding_layers.DecodingAttention`). The model computes
    the same numbers; Tunix's sampling step runs inside the loop, with its top-k taken
    in blocks (:func:`sample_top_p`), and the loop stops before the final step whose
    token Tunix discards (except in beam search).

    Returns:
      Whether the sampler's decoding loop was replaced (False off CPU, when the model
      has no such weights, or for a sampler without Tunix 0.1.7's decoding internals).
    """
    needed = ("_transformer_state", "_flattened_transformer_state", "_sample_step",
              "_compiled_decode_fn")
    if jax.default_backend() != "cpu" or not all(hasattr(sampler, a) for a in needed):
        return False  # another backend, or a Tunix sampler of another shape
    named = jax.tree_util.tree_leaves_with_path(sampler._transformer_state,
                                                is_leaf=lambda x: isinstance(x, nnx.Variable))
    perms = [_decode_layout(path, variable) for path, variable in named]
    arrays, treedef = jax.tree.flatten(sampler._flattened_transformer_state)
    if not any(perms) or len(arrays) != len(perms):
        return False
    inverse = [None if p is None else _inverse(p) for p in perms]
    lora_leaves = [(jax.tree_util.keystr(path), i) for i, (path, variable) in enumerate(named)
                   if isinstance(variable, nnx.LoRAParam)]
    arranged_leaves = [i for i, p in enumerate(perms) if p is not None]

    def decode(arrays, sampling_state, prompt_len, keep):
        # The weights with a layout arrive holding it (_in_decode_layout).
        arranged = [None if p is None else _laid_out(a, p) for a, p in zip(arrays, perms)]

        def params(arranged):
            return treedef.unflatten([a if m is None else jnp.transpose(m, inv)
                                      for a, m, inv in zip(arrays, arranged, inverse)])

        def step(carry):
            arranged, state, kept = carry
            recorded = [] if keep else None
            token = _DECODING_LOOP.set(True)
            recording = _LAYER_INPUTS.set(recorded)
            tunix_sample_top_p = sampler_lib.sample_top_p
            sampler_lib.sample_top_p = sample_top_p  # while this step is traced
            try:
                new_state = sampler._sample_step(params(arranged), state)
            finally:
                sampler_lib.sample_top_p = tunix_sample_top_p
                _LAYER_INPUTS.reset(recording)
                _DECODING_LOOP.reset(token)
            if keep:  # this step's position, in every layer: [layers + 1, batch, 1, embed]
                at = (0, 0, state.decoding_step - prompt_len, 0)
                kept = jax.lax.dynamic_update_slice(
                    kept, jnp.stack(recorded).astype(kept.dtype), at)
            return arranged, new_state, kept

        kept = None
        if keep:
            model = sampler.transformer
            batch, total = sampling_state.token_buffer.shape
            kept = jnp.zeros((len(model.layers) + 1, batch, total - prompt_len,
                              model.config.embed_dim),
                             model.embedder.input_embedding.value.dtype)

        # Tunix's loop runs while decoding_step < total_sampling_steps, and a step
        # writes its token at decoding_step + 1: the last step's token falls outside the
        # token buffer and is dropped. Sampling stops before that step (one decoding
        # step of the model saved per rollout). Beam search runs it: that step still
        # rescores the beams and chooses which ones are kept.
        last = sampling_state.total_sampling_steps - (
            0 if sampling_state.sampling_mode == "beam_search" else 1)

        def running(carry):
            state = carry[1]
            return (state.decoding_step < last) & jax.numpy.any(
                jax.numpy.logical_not(state.done))

        state = sampling_state.replace(cache=_values_transposed(sampling_state.cache, True))
        _, state, kept = jax.lax.while_loop(running, step, (arranged, state, kept))
        return state.replace(cache=_values_transposed(state.cache, False)), kept

    compiled = jax.jit(decode, donate_argnums=(1,), static_argnums=(2, 3))

    def decode_fn(flat_state, sampling_state):
        # The loop's buffers (and laid-out copies, off the in-place path) come on top of
        # what is in use (the reference pass hands them back when it starts, as the
        # update does for what precedes it).
        release_free_memory()
        arrays = jax.tree.leaves(flat_state)
        kept = getattr(sampler, "_jaxpost_layer_inputs", None)
        keep = bool(kept and "prompt" in kept and sampling_state.sampling_mode != "beam_search")
        prompt_len = int(sampling_state.num_input_tokens) if keep else 0
        moved = [arrays[i] for i in arranged_leaves]
        moved_perms = [perms[i] for i in arranged_leaves]
        if len({id(a) for a in moved}) == len(moved) and _in_place_layout_possible(moved):
            # The prefill, the last reader of the weights before this loop, has ended.
            jax.block_until_ready(sampling_state)
            with _weights_in_decode_layout(moved, moved_perms):
                state, completion = jax.block_until_ready(
                    compiled(arrays, sampling_state, prompt_len, keep))
        else:  # laid-out copies, freed when the loop ends
            laid_out = list(arrays)
            for i, a in zip(arranged_leaves, _in_decode_layout(moved, tuple(moved_perms))):
                laid_out[i] = a
            state, completion = compiled(laid_out, sampling_state, prompt_len, keep)
        if keep:
            kept.update(completion=completion, tokens=state.token_buffer, prompt_len=prompt_len,
                        lora={path: arrays[i] for path, i in lora_leaves})
        return state

    sampler._compiled_decode_fn = decode_fn
    return True


# Tunix's own, for what sample_top_p leaves to it (it stands in for it while traced).
_TUNIX_SAMPLE_TOP_P = sampler_lib.sample_top_p


def blocked_top_k(x, k: int, block: int = 512):
    """``jax.lax.top_k(x, k)`` over a vocabulary-sized last axis, in two short passes.

    The same values and indices in the same order, ties included. XLA's CPU top-k over
    262,144 logits for 8 rows takes about 3.5 ms, once per new token. Here the axis is
    cut into blocks of ``block``; the k largest elements lie in the k blocks with the
    largest maxima (any other block's elements come after those k maxima), so top-k
    runs over the block maxima, then over those blocks' elements: about 0.9 ms. A
    tie between equal values goes to the lower index, as in ``jax.lax.top_k``: the
    chosen blocks are kept in their vocabulary order. Axes too short or not divisible
    by ``block`` use ``jax.lax.top_k``.
    """
    *lead, size = x.shape
    if size % block or size // block < 4 * k:
        return jax.lax.top_k(x, k)
    rows = x.reshape(-1, size // block, block)
    blocks = jnp.sort(jax.lax.top_k(rows.max(axis=-1), k)[1], axis=-1)  # [rows, k]
    candidates = jnp.take_along_axis(rows, blocks[:, :, None], axis=1).reshape(rows.shape[0], -1)
    values, at = jax.lax.top_k(candidates, k)
    indices = jnp.take_along_axis(blocks, at // block, axis=1) * block + at % block
    return values.reshape(*lead, k), indices.reshape(*lead, k)


def sample_top_p(logits, key, temperature: float, top_p: float, top_k: int | None,
                 return_logprobs: bool = False):
    """Tunix 0.1.7's ``sampler.sample_top_p`` step for step, with :func:`blocked_top_k`.

    The decoding loop of :func:`lay_out_decode_weights` samples through it: the same
    filtered logits, the same random draw, so the same tokens as Tunix's.
    """
    if top_k is None or top_k <= 0:  # no top-k to speed up
        return _TUNIX_SAMPLE_TOP_P(logits, key, temperature, top_p, top_k, return_logprobs)
    next_token_logits = logits[:, -1].astype(jnp.float32) / temperature
    logits_sorted, indices = blocked_top_k(next_token_logits, top_k)
    probs_sorted = jax.nn.softmax(logits_sorted, axis=-1)
    cumsum_probs = jnp.cumsum(probs_sorted, axis=-1)
    logits_sorted = jnp.where(cumsum_probs - probs_sorted > top_p, -jnp.inf, logits_sorted)
    next_token_idx = jax.random.categorical(key, logits=logits_sorted)
    next_token = jnp.take_along_axis(indices, next_token_idx[..., None], axis=-1)[..., 0]
    logp_sampled = None
    if return_logprobs:
        logp = jax.nn.log_softmax(next_token_logits, axis=-1)
        logp_sampled = jnp.take_along_axis(logp, next_token[..., None], axis=-1)[..., 0]
    return next_token, logp_sampled
