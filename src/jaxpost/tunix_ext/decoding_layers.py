"""Tunix's Gemma 3 attention and MLP, with the products a CPU decoding step reads fastest.

:class:`DecodingAttention` and :class:`DecodingFeedForward` replace the classes of a
Gemma 3 model's layers (:func:`jaxpost.tunix_ext.gemma3.enable`). They depart from
Tunix's ``block`` only inside the decoding loop of
:func:`jaxpost.tunix_ext.decoding.lay_out_decode_weights` (:data:`_DECODING_LOOP`),
where the weights arrive laid out output dimensions first: there the MLP kernels and
the attention's query and output projections come first in their products, and the
attention writes its cache in place. Everywhere else they are Tunix's own. They override
``block`` and call the attention's private ``_query_norm`` and ``_key_norm``
(google-tunix 0.1.7; docs/tunix_patches.md).
"""

from __future__ import annotations

import contextvars
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from tunix.models.gemma3 import model as gemma3
from tunix.utils import sharding_utils

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

    Here, inside :func:`jaxpost.tunix_ext.decoding.lay_out_decode_weights`' decoding
    loop, the attention reads the cache as it was, with the new entry's score and value
    put in at its slot: the same softmax over the same scores, the value product split
    into the old entries and the new one. The new key and value are written afterwards,
    in place (the write takes a zero computed from the attention's output, so that XLA
    orders it after the reads). The loop holds each layer's values as ``[batch, kv
    heads, head, cache]``, the layout their product reads (:func:`_values_transposed`).
    The query and output projections put their weights first in their products
    (:func:`_einsum_kernel_first`). Outside the loop (training, prefill, other loops)
    the module is Tunix's own.
    """

    def block(self, x, segment_pos, cache, attn_mask):
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

    Inside :func:`jaxpost.tunix_ext.decoding.lay_out_decode_weights`' decoding loop, the
    MLP kernels arrive laid out ``[out, in]``
    (:data:`jaxpost.tunix_ext.decoding.DECODE_WEIGHT_LAYOUTS`), and a step has one
    position per sequence. There, each projection is computed as ``kernel^T @ x^T``:
    XLA's CPU product reads a kernel stored that way 2.3 times as fast as it computes
    ``x @ kernel`` for a few rows (6.5 against 15.6 ms for the 270M model's 18 gate
    projections, batch 8). LoRA adapters add ``(x @ A) @ B * alpha / r``, as qwix does.
    Everywhere else (training, prefill, other loops, a batch of one sequence) the module
    is Tunix's own.
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
    first (:data:`jaxpost.tunix_ext.decoding.DECODE_WEIGHT_LAYOUTS`); for a few rows,
    XLA's CPU product reads a weight stored that way faster in this form (the 270M
    model's 18 query projections for 8 rows: 11.1 against 7.5 ms). The LoRA adapter adds
    qwix's own delta, ``einsum(x, A, B) * alpha / r``. Other einsums, and adapters whose
    scale jaxpost did not record, go through the module itself.
    """
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


def _values_transposed(cache, into_loop: bool):
    """A KV cache with each layer's values ``[batch, cache, kv, head]`` (Tunix's layout)
    as ``[batch, kv, head, cache]`` (the decoding loop's, see :class:`DecodingAttention`),
    or back."""
    perm = (0, 2, 3, 1) if into_loop else (0, 3, 1, 2)
    return {name: {**layer, "v": jax.numpy.transpose(layer["v"], perm)}
            for name, layer in cache.items()}
