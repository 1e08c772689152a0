"""Tunix's Gemma 3 computing only the logits that are used.

Gemma 3's vocabulary has 262,144 entries, so the unembedding dominates the cost of a
small model: for the 270M model, logits for every position of a [8, 128] batch take
1 GB in float32 and more FLOPs than all transformer layers together. GRPO needs them
only where it scores completion tokens, and the sampler's prefill only at the last
prompt position. :class:`Gemma3TrimmedLogits` is Tunix's Gemma 3 with these switches:

* ``logits_keep`` (an int, or None for all positions): without a KV cache, logits are
  computed for the last ``logits_keep`` positions only. Tunix reads
  ``logits[:, -C - 1:-1]`` for C completion tokens, so ``logits_keep = C + 1`` returns
  exactly the values it reads (:func:`completion_logits_only` sets it).
* ``decode_only_last_token``: Tunix's sampler passes it to models that accept it, to get
  prefill logits for the last position only.
* ``hidden_keep``: return final hidden states instead of logits, for
  :func:`jaxpost.tunix_ext.logps.completion_logps`, which unembeds them a chunk at a time.
* ``remat_layers``: in that ``hidden_keep`` pass, recompute each layer's activations in
  the backward pass instead of storing them (:func:`recomputed_layer`).

A prefill whose rows repeat each prompt runs each prompt once (the sampler hook
:func:`jaxpost.tunix_ext.sampler.share_prompt_prefill` says when, through
:data:`_PREFILL_GROUP`), and a rollout can keep every layer's input (:data:`_LAYER_INPUTS`).
Each sampling step's logits (one position per sequence) go through
:func:`unembed_last_position`, which on CPU splits the vocabulary in two so that both
cores share the 671 MB read of the embedding table. :func:`enable` switches a loaded
model to this class, and its layers to the decoding layers of
:mod:`jaxpost.tunix_ext.decoding_layers`.

The parameters, their paths and every other computation are Tunix's own, so LoRA
targets, checkpoints and exports are unchanged. This overrides ``Gemma3.__call__`` and
calls its private ``_encode_and_get_inputs`` (google-tunix 0.1.7; docs/tunix_patches.md).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx
from tunix.models.gemma3 import model as gemma3

from jaxpost.tunix_ext.decoding_layers import DecodingAttention, DecodingFeedForward
from jaxpost.tunix_ext.versions import check_versions

# The prompt grouping of the rows a prefill is being traced for (see
# jaxpost.tunix_ext.sampler.share_prompt_prefill).
_PREFILL_GROUP = contextvars.ContextVar("jaxpost_prefill_group", default=1)

# A list while tracing a rollout's model call whose layer inputs are kept: the model
# appends each layer's input and the last layer's output (see
# jaxpost.tunix_ext.sampler.keep_layer_inputs).
_LAYER_INPUTS = contextvars.ContextVar("jaxpost_layer_inputs", default=None)


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
        computed it (:func:`jaxpost.tunix_ext.sampler.rollout_layer_inputs`); the layers
        are then not run forward, only recomputed in the backward pass
        (:func:`recomputed_layer`).
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


@contextlib.contextmanager
def completion_logits_only(models: list[nnx.Module], completion_length: int,
                           remat: bool = False) -> Iterator[None]:
    """Within the block, full-sequence forward passes return the last C + 1 logits only.

    With ``remat``, :func:`jaxpost.tunix_ext.logps.completion_logps` also recomputes
    each layer's activations in the backward pass (see :func:`recomputed_layer`) instead
    of keeping them.
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
