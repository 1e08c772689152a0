"""Sampling-step logits: jaxpost's unembedding equals Tunix's product."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tunix.generate import sampler as sampler_lib
from tunix.generate import utils as sampler_utils
from tunix.models.gemma3 import model as gemma3

from jaxpost.fast_logits import Gemma3TrimmedLogits, unembed_last_position
from jaxpost.models import load_model


@pytest.mark.parametrize("vocab", [1000, 999])
def test_unembed_last_position_equals_plain_product(vocab):
    k = jax.random.split(jax.random.key(0), 2)
    embedding = jax.random.normal(k[0], (vocab, 16))
    hidden = jax.random.normal(k[1], (3, 1, 16))

    logits = unembed_last_position(embedding, hidden)

    assert logits.shape == (3, 1, vocab)
    np.testing.assert_allclose(logits, hidden @ embedding.T, rtol=1e-5, atol=1e-5)


def test_decode_step_logits_equal_tunix():
    loaded = load_model("random:gemma3-tiny", seed=0)
    model, cfg = loaded.model, loaded.model_config
    assert isinstance(model, Gemma3TrimmedLogits) and cfg.num_embed % 2 == 0
    batch, cache_size, step = 2, 8, 3
    tokens = jnp.asarray([[5], [17]], jnp.int32)
    positions = jnp.full((batch, 1), step)
    mask = sampler_utils.compute_attention_masks(step, cache_size,
                                                 jnp.zeros((batch, cache_size), bool))

    def decode_step():
        cache = sampler_lib._init_cache(cfg.num_layers, cache_size, batch, cfg.num_kv_heads,
                                        cfg.head_dim, jnp.float32)
        return model(tokens, positions=positions, cache=cache, attention_mask=mask)[0]

    ours = decode_step()
    model.__class__ = gemma3.Gemma3
    try:
        tunix = decode_step()
    finally:
        model.__class__ = Gemma3TrimmedLogits

    assert ours.shape == tunix.shape == (batch, 1, cfg.num_embed)
    np.testing.assert_allclose(ours, tunix, rtol=1e-5, atol=1e-5)
