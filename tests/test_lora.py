"""LoRA's low-rank product: jaxpost's written-out backward pass equals autodiff's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from qwix._src.providers import lora as qwix_lora

from jaxpost.models.loading import load_model
from jaxpost.models.lora import apply_lora
from jaxpost.tunix_ext.lora import _lora_delta, install_lora_matmul, lora_matmul


def test_lora_matmul_gradients_equal_autodiff():
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (12, 10))
    a = jax.random.normal(k[1], (10, 3))
    b = jax.random.normal(k[2], (3, 7))
    g = jax.random.normal(k[3], (12, 7))

    ours = jax.grad(lambda x, a, b: jnp.sum(lora_matmul(x, a, b) * g), (0, 1, 2))(x, a, b)
    plain = jax.grad(lambda x, a, b: jnp.sum((x @ a) @ b * g), (0, 1, 2))(x, a, b)

    np.testing.assert_allclose(lora_matmul(x, a, b), (x @ a) @ b, rtol=1e-6, atol=1e-5)
    for name, o, p in zip("xab", ours, plain):
        assert o.shape == p.shape, name
        np.testing.assert_allclose(o, p, rtol=1e-5, atol=1e-5, err_msg=f"gradient of {name}")


def test_other_dot_generals_go_to_qwix():
    """A contraction over a non-trailing dimension is left to qwix's own delta."""
    k = jax.random.split(jax.random.key(1), 3)
    lhs = jax.random.normal(k[0], (3, 5, 4))  # contracts dimension 1
    a = jax.random.normal(k[1], (5, 2))
    b = jax.random.normal(k[2], (2, 6))
    original = getattr(qwix_lora._compute_lora_delta, "_jaxpost_original",
                       qwix_lora._compute_lora_delta)

    out = _lora_delta(lhs, a, b, (1,), (), (5,), (), (6,), 2, original=original)

    np.testing.assert_allclose(out, jnp.einsum("xky,kr,rn->xyn", lhs, a, b), rtol=1e-5,
                               atol=1e-5)


def _lora_grads(model, tokens):
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool)),
                            (tokens.shape[0], tokens.shape[1], tokens.shape[1]))
    weights = jax.random.normal(jax.random.key(3), (model.embedder.input_embedding.shape[0],))

    def loss(lora):
        logits, _ = nnx.merge(graphdef, lora, rest)(tokens, positions, None, mask)
        return jnp.sum(jax.nn.log_softmax(logits) * weights)

    return jax.make_jaxpr(loss)(lora), jax.grad(loss)(lora)


def test_model_gradients_equal_qwix_own(monkeypatch):
    assert install_lora_matmul()
    loaded = load_model("random:gemma3-tiny", seed=0)
    model = apply_lora(loaded.model, loaded.mesh, rank=4, alpha=8.0, seed=1)
    state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), state))
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 200, (2, 7)), jnp.int32)

    jaxpr, routed = _lora_grads(model, tokens)
    monkeypatch.setattr(qwix_lora, "_compute_lora_delta",
                        qwix_lora._compute_lora_delta._jaxpost_original)
    qwix_jaxpr, own = _lora_grads(model, tokens)

    # The MLP projections really went through lora_matmul, and only with it installed.
    assert "custom_vjp_call" in str(jaxpr)
    assert "custom_vjp_call" not in str(qwix_jaxpr)
    flat_routed, flat_own = jax.tree.leaves(routed), jax.tree.leaves(own)
    assert len(flat_routed) == len(flat_own) > 0
    assert any(float(jnp.abs(g).max()) > 0 for g in flat_own)
    for r, o in zip(flat_routed, flat_own):
        # float32 sums in another order: agree to 1e-4 of each gradient's scale.
        np.testing.assert_allclose(r, o, rtol=1e-4, atol=1e-4 * float(jnp.abs(o).max()))


@pytest.mark.parametrize("dtype", [jnp.bfloat16])
def test_lora_matmul_keeps_input_dtypes(dtype):
    x = jnp.ones((4, 6), dtype)
    a, b = jnp.ones((6, 2), dtype), jnp.ones((2, 3), dtype)
    grads = jax.grad(lambda x, a, b: jnp.sum(lora_matmul(x, a, b).astype(jnp.float32)),
                     (0, 1, 2))(x, a, b)
    assert [g.dtype for g in grads] == [dtype] * 3
