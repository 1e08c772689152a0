"""Computing only the logits GRPO uses.

Gemma 3's vocabulary has 262,144 entries, so the unembedding dominates the cost of a
small model: for the 270M model, logits for every position of a [8, 128] batch take
1 GB in float32 and more FLOPs than all transformer layers together. GRPO needs them
only where it scores completion tokens, and the sampler's prefill only at the last
prompt position. :class:`Gemma3TrimmedLogits` is Tunix's Gemma 3 with two switches:

* ``logits_keep`` (an int, or None for all positions): without a KV cache, logits are
  computed for the last ``logits_keep`` positions only. Tunix reads
  ``logits[:, -C - 1:-1]`` for C completion tokens, so ``logits_keep = C + 1`` returns
  exactly the values it reads.
* ``decode_only_last_token``: Tunix's sampler passes it to models that accept it, to get
  prefill logits for the last position only.
* ``hidden_keep``: return final hidden states instead of logits, for
  :func:`completion_logps`, which unembeds them a chunk at a time.
* ``remat_layers``: in that ``hidden_keep`` pass, recompute each layer's activations in
  the backward pass instead of storing them (:func:`recomputed_layer`).

:func:`completion_logps` also computes each distinct prompt once when rows repeat it
(GRPO's G completions per prompt; :func:`prompt_group_size` finds the grouping).

Each sampling step's logits (one position per sequence) go through
:func:`unembed_last_position`, which on CPU splits the vocabulary in two so that both
cores share the 671 MB read of the embedding table. :func:`lay_out_decode_weights` hands
a sampler's decoding loop the attention and MLP weights already in the layouts a
decoding step reads fastest (on CPU, in their own buffers for the loop's duration), so
that they are rearranged once per rollout instead of at every new token; in those steps
:class:`DecodingFeedForward` puts the MLP kernels first in its products,
:class:`DecodingAttention` does so for its query and output projections and writes each
cache in place, and top-k sampling takes its top k in blocks (:func:`blocked_top_k`).
:func:`share_prompt_prefill` makes a sampler's prefill run each repeated prompt once;
:func:`speed_up_sampler` installs both, and makes the sampler merge its model once per
set of weights. :func:`keep_layer_inputs` makes such a sampler keep
every layer's input from each rollout, so that the update after it need not run the
layers forward again (:func:`rollout_layer_inputs`).

The parameters, their paths and every other computation are Tunix's own, so LoRA
targets, checkpoints and exports are unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator

import jax
from flax import nnx
from tunix.generate import sampler as sampler_lib
from tunix.models.gemma3 import model as gemma3

from jaxpost.tunix_ext.versions import check_versions


class Gemma3TrimmedLogits(gemma3.Gemma3):
    """Tunix ``Gemma3`` computing logits only at the positions that are used."""

    logits_keep: int | None = None
    remat_layers: bool = False

    def __call__(self, last_tokens, positions=None, cache=None, attention_mask=None,
                 output_hidden_states: bool = False, *, images=None,
                 decode_only_last_token: bool = False, hidden_keep: int | None = None,
                 layer_outputs=None):
        if hidden_keep is not None:
            # Final-norm hidden states of the last positions instead of logits. Goes
            # through __call__ so that qwix's LoRA interception (installed around
            # __call__) applies.
            return self._hidden(last_tokens, positions, None, attention_mask, hidden_keep,
                                remat=self.remat_layers, layer_outputs=layer_outputs)
        if images is not None:
            return super().__call__(last_tokens, positions, cache, attention_mask,
                                    output_hidden_states, images=images)
        keep = 1 if decode_only_last_token else (self.logits_keep if cache is None else None)
        group = _PREFILL_GROUP.get()
        if (group > 1 and cache is not None and not output_hidden_states
                and last_tokens.shape[1] > 1 and last_tokens.shape[0] % group == 0):
            return self._prefill_once_per_prompt(last_tokens, positions, cache,
                                                 attention_mask, keep, group)
        x, new_cache = self._hidden(last_tokens, positions, cache, attention_mask, keep)
        if output_hidden_states:
            self.sow(nnx.Intermediate, "all_hidden_states", x)
        return self.unembed(x), new_cache  # [batch, kept, vocab]

    def _hidden(self, tokens, positions, cache, attention_mask, keep, remat=False,
                layer_outputs=None):
        """Final-norm hidden states (the last ``keep`` positions) and the new cache.

        ``layer_outputs`` (training, no cache): each layer's output as a rollout
        computed it (:func:`rollout_layer_inputs`); the layers are then not run forward,
        only recomputed in the backward pass (:func:`recomputed_layer`).
        """
        new_cache = None if cache is None else {}
        recorded = _LAYER_INPUTS.get()
        x = self._encode_and_get_inputs(tokens=tokens, images=None)  # [batch, seq, embed]
        for i, layer in enumerate(self.layers):
            name = f"layer_{i}"
            if recorded is not None:
                recorded.append(x)
            with jax.named_scope(name):
                if cache is None and (remat or layer_outputs is not None):
                    output = None if layer_outputs is None else layer_outputs[i]
                    layer_cache, x = None, recomputed_layer(layer, x, positions, attention_mask,
                                                            output=output)
                else:
                    layer_cache, x = layer(x, positions, cache[name] if cache else None,
                                           attention_mask)
            if cache is not None:
                new_cache[name] = layer_cache
        if recorded is not None:
            recorded.append(x)
        if keep is not None and keep < x.shape[1]:
            x = x[:, -keep:]
        return self.final_norm(x), new_cache

    def _prefill_once_per_prompt(self, tokens, positions, cache, attention_mask, keep, group):
        """A prefill whose rows repeat each prompt ``group`` times in a row: each prompt
        runs once, and its logits and cache entries are repeated for its rows. The
        rows' inputs are identical, so their results would be too."""
        import jax.numpy as jnp

        def first(a):
            return a[::group]

        def every(a):
            return jnp.repeat(a, group, axis=0)

        x, new_cache = self._hidden(first(tokens), first(positions),
                                    jax.tree.map(first, cache), first(attention_mask), keep)
        return every(self.unembed(x)), jax.tree.map(every, new_cache)

    def unembed(self, hidden):
        """Logits of hidden states: ``[batch, positions, embed] -> [..., vocab]`` (tied
        embeddings). One position per sequence (a sampling step, the prefill's last
        position) goes through :func:`unembed_last_position`."""
        if hidden.ndim == 3 and hidden.shape[1] == 1:
            return unembed_last_position(self.embedder.input_embedding.value, hidden)
        return self.embedder.decode(hidden)


def unembed_last_position(embedding, hidden):
    """Logits of one position per sequence: ``hidden [batch, 1, embed]`` -> ``[batch, 1, vocab]``.

    The same numbers as ``hidden @ embedding.T``. Sampling computes this once per new
    token, and it reads the whole embedding table (671 MB for Gemma 3 in float32) to
    produce a few rows. On CPU, XLA runs that product on one core. Written as two
    halves of the vocabulary (a batch dimension of a reshaped table, which copies
    nothing), with the table as the left operand, both cores take part: 68 -> 36 ms on
    the 2-core reference machine. Other backends get the plain product.
    """
    vocab, dim = embedding.shape
    if jax.default_backend() != "cpu" or vocab % 2:
        return hidden @ embedding.T
    batch = hidden.shape[0]
    halves = embedding.reshape(2, vocab // 2, dim)
    rows = jax.numpy.broadcast_to(hidden.reshape(1, batch, dim), (2, batch, dim))
    logits = jax.lax.dot_general(halves, rows, (((2,), (2,)), ((0,), (0,))))  # [2, V/2, B]
    return logits.reshape(vocab, batch).T.reshape(batch, 1, vocab)


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
    import numpy as np

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
    import numpy as np

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
    import ctypes

    import numpy as np

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
    (:class:`DecodingFeedForward`) and the attention writes its cache in place
    (:class:`DecodingAttention`). The model computes the same numbers; Tunix's sampling
    step runs inside the loop, with its top-k taken in blocks (:func:`sample_top_p`),
    and the loop stops before the final step whose token Tunix discards (except in beam
    search).

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
        import jax.numpy as jnp

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
        from jaxpost.memory import release_free_memory

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
    import jax.numpy as jnp

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
    import jax.numpy as jnp

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


def _values_transposed(cache, into_loop: bool):
    """A KV cache with each layer's values ``[batch, cache, kv, head]`` (Tunix's layout)
    as ``[batch, kv, head, cache]`` (the decoding loop's, see :class:`DecodingAttention`),
    or back."""
    perm = (0, 2, 3, 1) if into_loop else (0, 3, 1, 2)
    return {name: {**layer, "v": jax.numpy.transpose(layer["v"], perm)}
            for name, layer in cache.items()}


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


# The prompt grouping of the rows a prefill is being traced for (see share_prompt_prefill).
_PREFILL_GROUP = contextvars.ContextVar("jaxpost_prefill_group", default=1)


def share_prompt_prefill(sampler) -> bool:
    """Makes a Tunix ``Sampler``'s prefill compute each repeated prompt once (CPU).

    A GRPO rollout samples G completions of each prompt, so the sampler's batch holds
    every prompt G times in a row, and Tunix's prefill runs the model over all of those
    copies (8 rows of 64 tokens for 2 prompts x 4 completions). Before each prefill the
    grouping is read from the token buffer on the host (:func:`prompt_group_size`); a
    prefill compiled for that grouping runs each prompt once and repeats its logits and
    KV-cache entries for its rows (:class:`Gemma3TrimmedLogits`). Sampling, from the
    first new token on, stays per row. Batches without repeats run as before.

    Returns:
      Whether the sampler's prefill was replaced (False off CPU, for a model other than
      :class:`Gemma3TrimmedLogits`, or for a sampler without Tunix 0.1.7's internals).
    """
    import numpy as np

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
        from jaxpost.memory import release_free_memory

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
    import numpy as np

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
    layer from its kept input (:func:`recomputed_layer`), as it would with ``remat``.

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
    import numpy as np

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
    import jax.numpy as jnp

    return jnp.concatenate([jnp.repeat(prompt, group, axis=1), completion], axis=2)


def recomputed_layer(layer: nnx.Module, x, positions, attention_mask, output=None):
    """``layer(x)`` whose activations are recomputed in the backward pass, not stored.

    With ``output`` (the layer's output for ``x``, as a rollout computed it), the forward
    pass returns it instead of computing the layer: the backward pass is the same.

    ``jax.checkpoint`` marks recomputation with optimization barriers, which XLA's CPU
    compiler removes before common-subexpression elimination merges the recomputation
    back into the forward pass: every layer's activations stay alive until the backward
    pass (2.4 GB for an [8, 128] batch of Gemma 3 270M). Here the backward pass recomputes
    the layer from an input that depends on the incoming gradient, so the recomputation
    can neither be merged with the forward pass nor scheduled before it is needed, and
    only the layer's input is kept.

    The layer is traced once into a pure function of its LoRA weights, its frozen
    weights and its inputs, while qwix's LoRA interception is active (the backward pass
    is traced after the model call has returned). Gradients flow to the LoRA weights and
    to ``x``; frozen weights, positions and the mask get none.
    """
    import jax.extend
    import jax.numpy as jnp

    graphdef, lora, frozen = nnx.split(layer, nnx.LoRAParam, ...)

    def run(lora, frozen, x, positions, attention_mask):
        _, y = nnx.merge(graphdef, lora, frozen)(x, positions, None, attention_mask)
        return y

    closed = jax.make_jaxpr(run, return_shape=True)
    jaxpr, out_shape = closed(lora, frozen, x, positions, attention_mask)
    out_tree = jax.tree_util.tree_structure(out_shape)

    def pure(*args):
        flat = jax.tree_util.tree_leaves(args)
        return jax.tree_util.tree_unflatten(out_tree, jax.extend.core.jaxpr_as_fun(jaxpr)(*flat))

    @jax.custom_vjp
    def layer_fn(lora, frozen, x, positions, attention_mask, output):
        return pure(lora, frozen, x, positions, attention_mask) if output is None else output

    def layer_fwd(*args):
        *inputs, output = args
        # Only the layer's inputs are kept for the backward pass.
        return (pure(*inputs) if output is None else output), tuple(inputs)

    def layer_bwd(saved, g):
        lora, frozen, x, positions, attention_mask = saved
        # v + 0 * g[0] is v (XLA keeps float products with zero, which are not always
        # zero), but it exists only once g does: the recomputation below can neither be
        # merged with the forward pass nor run before its result is needed. The weights
        # go through it too: whatever is computed from them alone (XLA's transposed
        # copies, LoRA products) would otherwise be shared with the forward pass and
        # kept alive in between.
        zero = g.reshape(-1)[0] * 0

        def after_g(v):
            return v + zero.astype(v.dtype) if jnp.issubdtype(v.dtype, jnp.inexact) else v

        lora, frozen, x = jax.tree.map(after_g, (lora, frozen, x))
        _, pull_back = jax.vjp(lambda l, h: pure(l, frozen, h, positions, attention_mask),
                               lora, x)
        g_lora, g_x = pull_back(g)
        return g_lora, None, g_x, None, None, None

    layer_fn.defvjp(layer_fwd, layer_bwd)
    return layer_fn(lora, frozen, x, positions, attention_mask, output)


# A list while tracing a rollout's model call whose layer inputs are kept: the model
# appends each layer's input and the last layer's output (see keep_layer_inputs).
_LAYER_INPUTS = contextvars.ContextVar("jaxpost_layer_inputs", default=None)

# Set while tracing a step of lay_out_decode_weights' decoding loop: the MLP kernels
# arrive [out, in] there, and the attention's cache update is kept whole.
_DECODING_LOOP = contextvars.ContextVar("jaxpost_decoding_loop", default=False)


class DecodingAttention(gemma3.Attention):
    """Tunix's Gemma 3 attention, whose decoding step writes its cache in place.

    In a step of one new position, Tunix writes the new key and value into the layer's
    cache and reads the updated cache back. XLA's CPU compiler then fuses that update
    into each of its readers (the attention products and the loop's carry), each fused
    copy with a buffer of its own, and transposes the values for their product: every
    new token copied each of the 36 caches of the 270M model two to four times (8-17 ms
    a token for 8 sequences, by profile).

    Here, inside :func:`lay_out_decode_weights`' decoding loop, the attention reads the
    cache as it was, with the new entry's score and value put in at its slot: the same
    softmax over the same scores, the value product split into the old entries and the
    new one. The new key and value are written afterwards, in place (the write takes a
    zero computed from the attention's output, so that XLA orders it after the reads).
    The loop holds each layer's values as ``[batch, kv heads, head, cache]``, the
    layout their product reads (:func:`_values_transposed`). The query and output
    projections put their weights first in their products (:func:`_einsum_kernel_first`).
    Outside the loop (training, prefill, other loops) the module is Tunix's own.
    """

    def block(self, x, segment_pos, cache, attn_mask):
        import jax.numpy as jnp
        from tunix.utils import sharding_utils

        if not _DECODING_LOOP.get() or cache is None or x.shape[1] != 1:
            return super().block(x, segment_pos, cache, attn_mask)
        if self.use_qkv_einsum:
            query, key, value = self.qkv_einsum(x)
        else:
            query = _einsum_kernel_first(self.q_einsum, x)
            key, value = self.kv_einsum(x)
        query = sharding_utils.shard(query, self.shd_config.act_btnh)
        key = sharding_utils.shard(key, self.shd_config.act_btnh)
        value = sharding_utils.shard(value, self.shd_config.act_btnh)
        rope = functools.partial(gemma3.apply_rope, positions=segment_pos,
                                 head_dim=self.head_dim,
                                 base_frequency=self.rope_base_frequency,
                                 scale_factor=self.rope_scale_factor)
        query = rope(self._query_norm(query)) * self.query_pre_attn_scalar
        key = rope(self._key_norm(key))

        # Attend over the cache as it was, with the new entry's score and value put in
        # at its slot; the cache is written only once the attention has read it.
        cache_k, cache_v = cache["k"], cache["v"]  # the values [batch, kv, head, cache]
        slot = cache["end_index"][0] % cache_v.shape[-1]
        at_slot = jnp.arange(cache_v.shape[-1]) == slot  # [cache]

        # Query heads in groups sharing a key head: Tunix's two einsums in one form (a
        # single key head for all query heads, as in Gemma 3 270M, is one group).
        batch, steps, heads, head_dim = query.shape
        groups = heads // key.shape[2]
        grouped = query.reshape(batch, steps, key.shape[2], groups, head_dim)
        logits = jnp.einsum("BTKGH,BSKH->BTKGS", grouped, cache_k)
        new_logit = jnp.einsum("BTKGH,BTKH->BTKG", grouped, key)
        logits = jnp.where(at_slot, new_logit[..., None], logits)
        logits = logits.reshape(batch, steps, heads, -1)
        if self.attn_type == gemma3.AttentionType.LOCAL_SLIDING:
            attn_mask = gemma3.create_sliding_window_mask(
                attn_mask, sliding_window_size=self.sliding_window_size) * attn_mask
        logits = jnp.where(jnp.expand_dims(attn_mask, -2), logits, gemma3.K_MASK)
        probs = jax.nn.softmax(logits, axis=-1).astype(key.dtype)
        probs = probs.reshape(batch, steps, key.shape[2], groups, -1)
        new_prob = jnp.sum(jnp.where(at_slot, probs, 0), axis=-1)  # [B, T, K, G]
        encoded = jnp.einsum("BTKGS,BKHS->BTKGH", jnp.where(at_slot, 0, probs), cache_v)
        encoded = encoded + new_prob[..., None] * value[:, :, :, None, :]
        output = _einsum_kernel_first(self.attn_vec_einsum,
                                      encoded.reshape(batch, steps, heads, head_dim))
        output = sharding_utils.shard(output, self.shd_config.act_btd)

        # Writing the cache in place needs its reads to come first; XLA orders the two
        # by data dependence only, so the write takes a zero that exists once the
        # attention's output does (a float times 0 is kept by XLA; an overflowed
        # output would make it NaN, hence the isfinite).
        first = output.reshape(-1)[0]
        zero = jnp.where(jnp.isfinite(first), first, 0) * 0
        zero = zero.astype(key.dtype)
        key = jax.lax.dynamic_update_slice(cache_k, key + zero, (0, slot, 0, 0))
        value = jax.lax.dynamic_update_slice(
            cache_v, jnp.transpose(value, (0, 2, 3, 1)) + zero, (0, 0, 0, slot))
        return {"v": value, "k": key, "end_index": cache["end_index"] + steps}, output


class DecodingFeedForward(gemma3.FeedForward):
    """Tunix's Gemma 3 MLP, whose products put the kernel first in a decoding step.

    Inside :func:`lay_out_decode_weights`' decoding loop, the MLP kernels arrive laid
    out ``[out, in]`` (:data:`DECODE_WEIGHT_LAYOUTS`), and a step has one position per
    sequence. There, each projection is computed as ``kernel^T @ x^T``: XLA's CPU
    product reads a kernel stored that way 2.3 times as fast as it computes
    ``x @ kernel`` for a few rows (6.5 against 15.6 ms for the 270M model's 18 gate
    projections, batch 8). LoRA adapters add ``(x @ A) @ B * alpha / r``, as qwix does.
    Everywhere else (training, prefill, other loops, a batch of one sequence) the
    module is Tunix's own.
    """

    def block(self, x):
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        rows = x.size // x.shape[-1]
        # One sequence alone is the exception: XLA's product for a single row reads the
        # [out, in] kernel as fast as it is written (11.8 against 15.1 ms, in a loop).
        if (not _DECODING_LOOP.get() or x.shape[-2] != 1 or rows < 2
                or not all(_plain_or_scaled(p) for p in projections)):
            return super().block(x)
        gate = _kernel_first(self.gate_proj, x)
        hidden = nnx.gelu(gate) * _kernel_first(self.up_proj, x)
        return _kernel_first(self.down_proj, hidden)


def _plain_or_scaled(module, param: str = "kernel") -> bool:
    """Whether ``module``'s weight ``param`` has no LoRA adapter, or one whose scale
    jaxpost recorded (and, for an einsum, whose delta einsum qwix recorded)."""
    if getattr(module, f"{param}_lora_a", None) is None:
        return True
    return getattr(module, "lora_scale", None) is not None and (
        param == "kernel" or getattr(module, f"{param}_lora_einsum_str", None) is not None)


def _kernel_first(linear, x):
    """``linear(x)`` (an ``nnx.Linear`` without bias, maybe with qwix's LoRA adapter) as
    ``(kernel^T @ x^T)^T``."""
    import jax.numpy as jnp

    kernel = linear.kernel.value  # [in, out]
    y = jax.lax.dot_general(kernel, x, (((0,), (x.ndim - 1,)), ((), ())))  # [out, ...]
    y = jnp.moveaxis(y, 0, -1)
    lora_a = getattr(linear, "kernel_lora_a", None)
    if lora_a is not None:
        delta = jnp.matmul(jnp.matmul(x, lora_a.value), linear.kernel_lora_b.value)
        y = y + delta * linear.lora_scale
    return y


# The einsums of Tunix's Gemma 3 attention that a decoding step computes weight first:
# the query projection and the output projection, each as (weight dimensions contracted,
# input dimensions contracted, output permutation).
_KERNEL_FIRST_EINSUMS = {"BTD,NDH->BTNH": ((1,), (2,), (2, 3, 0, 1)),  # [N, H, B, T]
                         "BTNH,NHD->BTD": ((0, 1), (2, 3), (1, 2, 0))}  # [D, B, T]


def _einsum_kernel_first(module, x):
    """``module(x)`` for a Tunix ``Einsum`` (maybe with qwix's LoRA adapter), with the
    weight as the first operand of its product when the einsum is one of
    :data:`_KERNEL_FIRST_EINSUMS`.

    In the decoding loop these weights arrive laid out with their output dimensions
    first (:data:`DECODE_WEIGHT_LAYOUTS`); for a few rows, XLA's CPU product reads a
    weight stored that way faster in this form (the 270M model's 18 query projections
    for 8 rows: 11.1 against 7.5 ms). The LoRA adapter adds qwix's own delta,
    ``einsum(x, A, B) * alpha / r``. Other einsums, and adapters whose scale jaxpost did
    not record, go through the module itself.
    """
    import jax.numpy as jnp

    form = _KERNEL_FIRST_EINSUMS.get(getattr(module, "einsum_str", None))
    if form is None or not _plain_or_scaled(module, "w"):
        return module(x)
    lora_a = getattr(module, "w_lora_a", None)
    w_dims, x_dims, order = form
    y = jnp.transpose(jax.lax.dot_general(module.w.value, x, ((w_dims, x_dims), ((), ()))),
                      order)
    if lora_a is not None:
        delta = jnp.einsum(module.w_lora_einsum_str, x, lora_a.value, module.w_lora_b.value)
        y = y + delta * module.lora_scale
    return y


def enable(model: nnx.Module) -> bool:
    """Switches a Tunix Gemma 3 model (or a LoRA copy of one) to trimmed logits in place.

    Returns:
      Whether the model is now a :class:`Gemma3TrimmedLogits` (other families are left
      as they are).

    Raises:
      RuntimeError: the installed Tunix or qwix is not the version jaxpost's patches
        were written for (:func:`jaxpost.tunix_ext.versions.check_versions`).
    """
    check_versions()  # the subclasses override and call Tunix 0.1.7's private methods
    if type(model) is gemma3.Gemma3:
        model.__class__ = Gemma3TrimmedLogits
        for layer in model.layers:
            if type(layer.mlp) is gemma3.FeedForward:
                layer.mlp.__class__ = DecodingFeedForward
            if type(layer.attn) is gemma3.Attention:
                layer.attn.__class__ = DecodingAttention
    return isinstance(model, Gemma3TrimmedLogits)


def _chunk_forward(embedding, hidden, targets, temperature):
    """Log-probabilities of ``targets`` under one chunk of logits, vocabulary first.

    Logits are computed as ``embedding @ hidden.T`` (``[vocab, chunk]``) rather than
    ``hidden @ embedding.T``: both are the same numbers, but XLA's CPU backend copies the
    whole transposed embedding (671 MB for Gemma 3 270M) for the second form, and the
    first is a plain row-major matrix product.

    Returns:
      ``(logps [chunk], entropy [chunk], probs [vocab, chunk])``, float32.
    """
    import jax.numpy as jnp

    if temperature not in (0.0, 1.0):
        # The [chunk, embed] states rather than the [vocab, chunk] logits: the same
        # logits up to rounding, for 640 divisions per position instead of 262,144.
        hidden = hidden / temperature
    logits = jnp.dot(embedding, hidden.T).astype(jnp.float32)  # [vocab, chunk]
    lse = jax.nn.logsumexp(logits, axis=0)  # [chunk]
    target = jnp.take_along_axis(logits, targets[None, :], axis=0)[0]
    probs = jnp.exp(logits - lse[None, :])
    entropy = lse - jnp.sum(probs * logits, axis=0)
    return target - lse, entropy, probs


def expected_embedding(probs, embedding):
    """``probs.T @ embedding``: each position's expected embedding under its probabilities.

    ``probs [vocab, chunk]``, ``embedding [vocab, embed]`` -> ``[chunk, embed]``, float32.
    The product contracts over the vocabulary into a small output, and XLA's CPU backend
    runs it as one Eigen contraction (about 80 GFLOP/s on the 2-core reference machine,
    against about 110 for the logits product). On CPU the vocabulary is cut into two
    halves that form a batch dimension of the product, and the two results are added:
    XLA folds the transposition into the product and runs a batched contraction over the
    halves, 266-312 -> 208-226 ms for 64 positions of Gemma 3's 262,144-entry
    vocabulary, the exponential that produces the probabilities included. Other
    backends get the plain product.
    """
    import jax.numpy as jnp

    vocab, dim = embedding.shape
    if jax.default_backend() != "cpu" or vocab % 2:
        return jnp.einsum("vc,vd->cd", probs, embedding, preferred_element_type=jnp.float32)
    chunk = probs.shape[1]
    halves = probs.reshape(2, vocab // 2, chunk).transpose(0, 2, 1)  # [2, chunk, V/2]
    parts = jax.lax.dot_general(halves, embedding.reshape(2, vocab // 2, dim),
                                (((2,), (1,)), ((0,), (0,))),
                                preferred_element_type=jnp.float32)  # [2, chunk, embed]
    return parts[0] + parts[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunk_logps(embedding, hidden, targets, temperature):
    logps, entropy, _ = _chunk_forward(embedding, hidden, targets, temperature)
    return logps, entropy


def _chunk_logps_fwd(embedding, hidden, targets, temperature):
    # d logp_i / d h_i = (E[t_i] - sum_v p_iv E_v) / T: computed here, while the
    # probabilities are at hand, so the backward pass needs neither the logits again
    # (jax.checkpoint would recompute them: a third [vocab, chunk] matrix product) nor
    # memory for them.
    import jax.numpy as jnp

    logps, entropy, probs = _chunk_forward(embedding, hidden, targets, temperature)
    expected = expected_embedding(probs.astype(embedding.dtype), embedding)  # [chunk, embed]
    grad_hidden = (embedding[targets].astype(jnp.float32) - expected)
    if temperature not in (0.0, 1.0):
        grad_hidden = grad_hidden / temperature
    # Kept in the hidden states' dtype: their cotangent must have it (bfloat16 models).
    return (logps, entropy), grad_hidden.astype(hidden.dtype)


def _chunk_logps_bwd(temperature, grad_hidden, cotangents):
    g_logps, _ = cotangents  # entropy is reported without a gradient
    # The embedding is frozen under LoRA (``completion_logps`` checks it), so it gets no
    # cotangent; targets are integers. The cotangent of the hidden states has their dtype.
    return None, (g_logps[:, None] * grad_hidden).astype(grad_hidden.dtype), None


_chunk_logps.defvjp(_chunk_logps_fwd, _chunk_logps_bwd)


# Completion positions per chunk of completion_logps, by JAX backend. A chunk's logits
# product reads the whole embedding table (2 bytes per element in bfloat16) and does
# 2 x chunk FLOPs per element: chunk FLOPs per byte read. A TPU v5e does about 240
# bfloat16 FLOPs per byte of memory bandwidth (197 TFLOP/s over 819 GB/s), an A100 about
# 150 and an H100 about 300, so chunks of 64 leave them waiting on memory, and 256 rows
# (a multiple of the TPU's 128-wide tiles) do not. (A T4 has no bfloat16 tensor cores;
# there the size changes nothing but memory.) 256 rows cost 2 x 256 MiB of float32
# logits and probabilities for a 262,144-entry vocabulary, which jaxpost.plan counts.
# Chosen from these ratios, not timed on a TPU or GPU. On a CPU, chunks of 128 or 256
# were no faster than 64 (docs/performance.md).
LOGPS_CHUNK_ROWS = {"cpu": 64, "gpu": 256, "tpu": 256}


def logps_chunk_rows(backend: str | None = None) -> int:
    """Rows per chunk of :func:`completion_logps` on ``backend`` (default JAX's):
    :data:`LOGPS_CHUNK_ROWS`, 64 for a backend it does not name."""
    return LOGPS_CHUNK_ROWS.get(backend or jax.default_backend(), 64)


def completion_logps(model: Gemma3TrimmedLogits, prompt_ids, completion_ids, pad_id: int,
                     temperature: float = 1.0, chunk_rows: int | None = None,
                     prompt_group: int = 1, layer_inputs=None):
    """Per-token log-probabilities of the completion, never holding all logits at once.

    The unembedding and log-softmax run over ``chunk_rows`` completion positions at a
    time (default :func:`logps_chunk_rows` for the backend), so at most one
    ``[vocab, chunk_rows]`` block of logits exists. The gradient
    with respect to the hidden states is formed in the same pass (a custom VJP), so
    training does two vocabulary-sized matrix products per chunk instead of three, and
    the backward pass stores only ``[chunk_rows, embed]`` per chunk. The tied
    embedding receives no gradient: it must be frozen, as it is under LoRA.

    Args:
      prompt_ids: ``[batch, prompt_len]`` (left-padded with ``pad_id``).
      completion_ids: ``[batch, completion_len]`` (right-padded with ``pad_id``).
      temperature: the sampling temperature the logits are divided by (as Tunix does).
      prompt_group: rows come in runs of this many with the same prompt (a static
        value; :func:`prompt_group_size` finds it from the prompt ids). Each prompt's
        positions are then computed once (see :func:`_packed_hidden`): the same numbers,
        up to float rounding, for fewer positions.
      layer_inputs: every layer's input for these rows as the rollout computed it
        (:func:`rollout_layer_inputs`), or None. Given, the layers are not run forward,
        only recomputed in the backward pass: the same values and gradients, up to float
        rounding, for one pass through the layers fewer.

    Returns:
      ``(logps, entropy)``, both ``[batch, completion_len]`` float32; entropy is the
      policy's per-position entropy, with no gradient.

    Raises:
      ValueError: when the embedding carries LoRA adapters (its gradient is not formed).
    """
    import jax.numpy as jnp
    from tunix.sft import utils as sft_utils

    embedder_lora = nnx.state(model.embedder, nnx.LoRAParam)
    if jax.tree_util.tree_leaves(embedder_lora):
        raise ValueError("completion_logps assumes a frozen embedding, but the embedder "
                         "has LoRA adapters; leave 'embedder' out of lora_target_modules")
    ids = jnp.concatenate([prompt_ids, completion_ids], axis=1)  # [batch, seq]
    mask = ids != pad_id
    positions = sft_utils.build_positions_from_mask(mask)
    batch, comp = completion_ids.shape
    group = _packing_group(model, prompt_ids.shape[1], comp, prompt_group)
    if group > 1:
        hidden = _packed_hidden(model, ids, mask, positions, comp, group, layer_inputs)
    else:
        attn = sft_utils.make_causal_attn_mask(mask)
        outputs = None if layer_inputs is None else layer_inputs[1:]
        hidden, _ = model(ids, positions, None, attn, hidden_keep=comp + 1,
                          layer_outputs=outputs)
        hidden = hidden[:, :-1]  # [batch, comp, embed]: the states that predict each token
    rows = batch * comp
    chunk_rows = chunk_rows or logps_chunk_rows()
    n_chunks = -(-rows // chunk_rows)
    pad_rows = n_chunks * chunk_rows - rows
    flat_h = jnp.pad(hidden.reshape(rows, -1), ((0, pad_rows), (0, 0)))
    flat_t = jnp.pad(completion_ids.reshape(rows), (0, pad_rows))
    embedding = model.embedder.input_embedding.value  # [vocab, embed]

    logps, entropy = jax.lax.map(
        lambda args: _chunk_logps(embedding, args[0], args[1], float(temperature)),
        (flat_h.reshape(n_chunks, chunk_rows, -1), flat_t.reshape(n_chunks, -1)))
    logps = logps.reshape(-1)[:rows].reshape(batch, comp)
    entropy = jax.lax.stop_gradient(entropy.reshape(-1)[:rows].reshape(batch, comp))
    return logps, entropy


def prompt_group_size(prompt_ids) -> int:
    """How many consecutive rows of ``prompt_ids`` hold each prompt; 1 if they do not repeat.

    GRPO batches repeat every prompt G times in a row. The answer is the largest ``g``
    dividing the batch such that each block of ``g`` consecutive rows is one prompt, so
    a prompt drawn twice in a batch does not hide the grouping of the others.

    Args:
      prompt_ids: ``[batch, prompt_len]`` token ids (a NumPy or JAX array, not a tracer).
    """
    import numpy as np

    ids = np.asarray(prompt_ids)
    batch = ids.shape[0]
    for group in range(batch, 1, -1):
        if batch % group == 0:
            blocks = ids.reshape(batch // group, group, -1)
            if np.all(blocks == blocks[:, :1]):
                return group
    return 1


def _packing_group(model, prompt_len: int, completion_len: int, group: int) -> int:
    """How many completions :func:`_packed_hidden` puts in a row with their prompt.

    Tunix's attention bands its sliding window by the distance between indices in the
    row, which equals the distance between positions only in an ordinary row. A packed
    row is used only while it fits in the window, where the band excludes nothing; a
    large group is split into the largest divisor of it that fits.
    """
    window = model.config.sliding_window_size
    for size in range(group, 1, -1):
        if group % size == 0 and (window is None or prompt_len + size * completion_len <= window):
            return size
    return 1


def _packed_hidden(model, ids, mask, positions, completion_len: int, group: int,
                   layer_inputs=None):
    """Final hidden states that predict each completion token, computing each prompt once.

    Rows ``[prompt | completion]`` that repeat each prompt ``group`` times in a row are
    packed as ``[prompt | completion 1 | ... | completion group]``; each completion
    attends to the prompt's positions and to its own earlier positions, and keeps its
    RoPE positions. Under that mask a prompt's activations are the same for all of its
    completions, and for 2 prompts x 4 completions x (64 + 64) tokens the layers process
    640 positions instead of 1024.

    Returns:
      ``[batch, completion_len, embed]``: the last prompt position's state, then the
      completion's own, for all but its last token.
    """
    import jax.numpy as jnp

    batch, seq_len = ids.shape
    prompt = seq_len - completion_len
    rows = batch // group

    def pack(a):  # [batch, seq, ...] -> [rows, prompt + group * completion, ...]
        completions = a[:, prompt:].reshape(rows, group * completion_len, *a.shape[2:])
        return jnp.concatenate([a[::group, :prompt], completions], axis=1)

    # Segment 0 is the prompt, segment j the j-th completion.
    segment = jnp.concatenate([jnp.zeros(prompt, jnp.int32),
                               jnp.repeat(jnp.arange(1, group + 1), completion_len)])
    index = jnp.arange(segment.shape[0])
    visible = (index[None, :] <= index[:, None]) & (
        (segment[None, :] == 0) | (segment[None, :] == segment[:, None]))
    attn = pack(mask)[:, None, :] & visible[None]
    outputs = None if layer_inputs is None else jax.vmap(pack)(layer_inputs[1:])
    hidden, _ = model(pack(ids), pack(positions), None, attn, hidden_keep=index.shape[0],
                      layer_outputs=outputs)
    last_prompt = jnp.repeat(hidden[:, prompt - 1:prompt], group, axis=0)
    completions = hidden[:, prompt:].reshape(batch, completion_len, -1)
    return jnp.concatenate([last_prompt, completions[:, :-1]], axis=1)


@contextlib.contextmanager
def completion_logits_only(models: list[nnx.Module], completion_length: int,
                           remat: bool = False) -> Iterator[None]:
    """Within the block, full-sequence forward passes return the last C + 1 logits only.

    With ``remat``, :func:`completion_logps` also recomputes each layer's activations in
    the backward pass (see :func:`recomputed_layer`) instead of keeping them.
    """
    trimmed = [m for m in models if isinstance(m, Gemma3TrimmedLogits)]
    for m in trimmed:
        m.logits_keep = completion_length + 1
        m.remat_layers = remat
    try:
        yield
    finally:
        for m in trimmed:
            m.logits_keep = None
            m.remat_layers = False
