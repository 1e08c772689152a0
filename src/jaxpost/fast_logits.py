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
                 decode_only_last_token: bool = False):
        if images is not None:
            return super().__call__(last_tokens, positions, cache, attention_mask,
                                    output_hidden_states, images=images)
        keep = 1 if decode_only_last_token else (self.logits_keep if cache is None else None)
        new_cache = None if cache is None else {}
        x = self._encode_and_get_inputs(tokens=last_tokens, images=None)  # [batch, seq, embed]
        for i, layer in enumerate(self.layers):
            name = f"layer_{i}"
            with jax.named_scope(name):
                layer_cache, x = layer(x, positions, cache[name] if cache else None,
                                       attention_mask)
            if cache is not None:
                new_cache[name] = layer_cache
        if keep is not None and keep < x.shape[1]:
            x = x[:, -keep:]
        x = self.final_norm(x)
        if output_hidden_states:
            self.sow(nnx.Intermediate, "all_hidden_states", x)
        return self.embedder.decode(x), new_cache  # [batch, kept, vocab]


def enable(model: nnx.Module) -> bool:
    """Switches a Tunix Gemma 3 model (or a LoRA copy of one) to trimmed logits in place.

    Returns:
      Whether the model is now a :class:`Gemma3TrimmedLogits` (other families are left
      as they are).
    """
    if type(model) is gemma3.Gemma3:
        model.__class__ = Gemma3TrimmedLogits
    return isinstance(model, Gemma3TrimmedLogits)


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
