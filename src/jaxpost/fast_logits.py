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

The parameters, their paths and every other computation are Tunix's own, so LoRA
targets, checkpoints and exports are unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax
from flax import nnx
from tunix.models.gemma3 import model as gemma3


class Gemma3TrimmedLogits(gemma3.Gemma3):
    """Tunix ``Gemma3`` computing logits only at the positions that are used."""

    logits_keep: int | None = None

    def __call__(self, last_tokens, positions=None, cache=None, attention_mask=None,
                 output_hidden_states: bool = False, *, images=None,
                 decode_only_last_token: bool = False, hidden_keep: int | None = None):
        if hidden_keep is not None:
            # Final-norm hidden states of the last positions instead of logits. Goes
            # through __call__ so that qwix's LoRA interception (installed around
            # __call__) applies.
            return self._hidden(last_tokens, positions, None, attention_mask, hidden_keep)
        if images is not None:
            return super().__call__(last_tokens, positions, cache, attention_mask,
                                    output_hidden_states, images=images)
        keep = 1 if decode_only_last_token else (self.logits_keep if cache is None else None)
        x, new_cache = self._hidden(last_tokens, positions, cache, attention_mask, keep)
        if output_hidden_states:
            self.sow(nnx.Intermediate, "all_hidden_states", x)
        return self.embedder.decode(x), new_cache  # [batch, kept, vocab]

    def _hidden(self, tokens, positions, cache, attention_mask, keep):
        new_cache = None if cache is None else {}
        x = self._encode_and_get_inputs(tokens=tokens, images=None)  # [batch, seq, embed]
        for i, layer in enumerate(self.layers):
            name = f"layer_{i}"
            with jax.named_scope(name):
                layer_cache, x = layer(x, positions, cache[name] if cache else None,
                                       attention_mask)
            if cache is not None:
                new_cache[name] = layer_cache
        if keep is not None and keep < x.shape[1]:
            x = x[:, -keep:]
        return self.final_norm(x), new_cache

    def unembed(self, hidden):
        """Logits of hidden states: ``[..., embed] -> [..., vocab]`` (tied embeddings)."""
        return self.embedder.decode(hidden)


def enable(model: nnx.Module) -> bool:
    """Switches a Tunix Gemma 3 model (or a LoRA copy of one) to trimmed logits in place.

    Returns:
      Whether the model is now a :class:`Gemma3TrimmedLogits` (other families are left
      as they are).
    """
    if type(model) is gemma3.Gemma3:
        model.__class__ = Gemma3TrimmedLogits
    return isinstance(model, Gemma3TrimmedLogits)


def completion_logps(model: Gemma3TrimmedLogits, prompt_ids, completion_ids, pad_id: int,
                     temperature: float = 1.0, chunk_rows: int = 64):
    """Per-token log-probabilities of the completion, never holding all logits at once.

    The unembedding and log-softmax run over ``chunk_rows`` completion positions at a
    time under ``jax.checkpoint``, so both the forward and the backward pass keep one
    ``[chunk_rows, vocab]`` block of logits instead of ``[batch, completion, vocab]``.

    Args:
      prompt_ids: ``[batch, prompt_len]`` (left-padded with ``pad_id``).
      completion_ids: ``[batch, completion_len]`` (right-padded with ``pad_id``).
      temperature: the sampling temperature the logits are divided by (as Tunix does).

    Returns:
      ``(logps, entropy)``, both ``[batch, completion_len]`` float32; entropy is the
      policy's per-position entropy, with no gradient.
    """
    import jax.numpy as jnp
    from tunix.sft import utils as sft_utils

    ids = jnp.concatenate([prompt_ids, completion_ids], axis=1)  # [batch, seq]
    mask = ids != pad_id
    positions = sft_utils.build_positions_from_mask(mask)
    attn = sft_utils.make_causal_attn_mask(mask)
    batch, comp = completion_ids.shape
    hidden, _ = model(ids, positions, None, attn, hidden_keep=comp + 1)
    hidden = hidden[:, :-1]  # [batch, comp, embed]: the states that predict each token
    rows = batch * comp
    n_chunks = -(-rows // chunk_rows)
    pad_rows = n_chunks * chunk_rows - rows
    flat_h = jnp.pad(hidden.reshape(rows, -1), ((0, pad_rows), (0, 0)))
    flat_t = jnp.pad(completion_ids.reshape(rows), (0, pad_rows))

    @jax.checkpoint
    def one_chunk(args):
        h, t = args  # [chunk, embed], [chunk]
        logits = model.unembed(h).astype(jnp.float32)
        if temperature not in (0.0, 1.0):
            logits = logits / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        probs = jax.lax.stop_gradient(jnp.exp(logits - lse[:, None]))
        entropy = jax.lax.stop_gradient(lse - jnp.sum(probs * logits, axis=-1))
        return target - lse, entropy

    logps, entropy = jax.lax.map(
        one_chunk, (flat_h.reshape(n_chunks, chunk_rows, -1), flat_t.reshape(n_chunks, -1)))
    logps = logps.reshape(-1)[:rows].reshape(batch, comp)
    entropy = entropy.reshape(-1)[:rows].reshape(batch, comp)
    return logps, entropy


@contextlib.contextmanager
def completion_logits_only(models: list[nnx.Module], completion_length: int) -> Iterator[None]:
    """Within the block, full-sequence forward passes return the last C + 1 logits only."""
    trimmed = [m for m in models if isinstance(m, Gemma3TrimmedLogits)]
    for m in trimmed:
        m.logits_keep = completion_length + 1
    try:
        yield
    finally:
        for m in trimmed:
            m.logits_keep = None
