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


def test_decoding_with_laid_out_weights_equals_tunix():
    """Same tokens and per-step logits as Tunix's own decoding loop, LoRA included."""
    from flax import nnx

    from jaxpost.lora import apply_lora
    from jaxpost.sampling import make_sampler

    loaded = load_model("random:gemma3-tiny", seed=0)
    model = apply_lora(loaded.model, loaded.mesh, rank=4, alpha=8.0, seed=1)
    state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), state))
    cfg = loaded.model_config
    cache = sampler_lib.CacheConfig(cache_size=24, num_layers=cfg.num_layers,
                                    num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    tunix = sampler_lib.Sampler(transformer=model, tokenizer=loaded.tokenizer, cache_config=cache)
    ours = make_sampler(model, loaded, cache_size=24)
    # make_sampler replaced the loop (Tunix's is a jitted method of the sampler).
    assert ours._compiled_decode_fn.__name__ == "decode_fn"
    prompts = ["The capital of France is", "2 + 3 ="]

    def run(sampler):
        return sampler(prompts, max_generation_steps=8, max_prompt_length=12,
                       return_logits=True, eos_tokens=[-1])

    a, b = run(ours), run(tunix)

    assert [list(t) for t in a.tokens] == [list(t) for t in b.tokens]
    for x, y in zip(a.logits, b.logits):
        assert np.asarray(x).shape[0] == 8
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-4)
