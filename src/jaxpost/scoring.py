"""Teacher-forced scoring: per-token log-likelihood of texts under a model."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpost.runtime.mesh import use_mesh
from jaxpost.models.loading import LoadedModel
from jaxpost.tunix_ext.logps import positions_and_attention


def token_logprobs(loaded: LoadedModel, texts: Sequence[str], *,
                   model: nnx.Module | None = None) -> list[np.ndarray]:
    """Log-probability of each token of each text given the tokens before it.

    Args:
      loaded: the loaded model (tokenizer and mesh).
      texts: texts to score; each is encoded with BOS, which is not itself scored.
      model: the module to run (default ``loaded.model``).

    Returns:
      One float32 array per text, of length ``len(tokens) - 1``.
    """
    model = loaded.model if model is None else model
    ids = [loaded.tokenizer.encode(t) for t in texts]
    pad = loaded.tokenizer.pad_id()
    length = max(len(x) for x in ids)
    tokens = np.full((len(ids), length), pad, dtype=np.int32)  # [batch, seq]
    for i, x in enumerate(ids):
        tokens[i, : len(x)] = x
    mask = jnp.asarray(tokens != pad)
    with use_mesh(loaded.mesh):
        positions, attn = positions_and_attention(mask)
        logits, _ = model(jnp.asarray(tokens), positions, None, attn)  # [batch, seq, vocab]
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], axis=-1)[..., 0]
    picked = np.asarray(picked)
    return [picked[i, : len(x) - 1] for i, x in enumerate(ids)]


def mean_token_loss(loaded: LoadedModel, texts: Sequence[str], *,
                    model: nnx.Module | None = None) -> float:
    """Mean negative log-likelihood per token (nats) over all tokens of ``texts``."""
    lps = token_logprobs(loaded, texts, model=model)
    return float(-np.concatenate(lps).mean())
