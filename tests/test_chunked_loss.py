"""jaxpost's chunked GRPO loss equals Tunix's own GRPO loss, in value and in gradient."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tunix.rl import algo_core, common
from tunix.rl.grpo.grpo_learner import GRPOConfig

from jaxpost import fast_logits
from jaxpost.config import RL_ALGORITHMS, ColabTrainingConfig
from jaxpost.fast_logits import completion_logps, prompt_group_size
from jaxpost.models.lora import apply_lora
from jaxpost.models.loading import load_model
from jaxpost.tunix_ext.logps import _packing_group
from jaxpost.tunix_adapter import (grpo_loss_chunked, ppo_algorithm_config, ppo_loss_chunked,
                                   rl_algorithm_config)


@pytest.fixture(scope="module")
def policy():
    loaded = load_model("random:gemma3-tiny", seed=0)
    model = apply_lora(loaded.model, loaded.mesh, rank=4, alpha=8.0, seed=1)
    # Give B non-zero values so the adapters take part in the comparison.
    state = nnx.state(model, nnx.LoRAParam)
    noisy = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape),
                         state)
    nnx.update(model, noisy)
    return loaded, model


def _example(loaded, batch=4, prompt_len=6, comp_len=5, with_ref=True):
    rng = np.random.default_rng(0)
    vocab = loaded.model_config.num_embed
    prompt = rng.integers(10, vocab, (batch, prompt_len)).astype(np.int32)
    prompt[0, :2] = 0  # left padding
    comp = rng.integers(10, vocab, (batch, comp_len)).astype(np.int32)
    comp[1, 3:] = 0  # right padding after an early end
    mask = (comp != 0).astype(np.int32)
    ref = rng.normal(-12.0, 0.5, (batch, comp_len)).astype(np.float32)
    old = rng.normal(-12.0, 0.5, (batch, comp_len)).astype(np.float32)
    return common.TrainExample(
        prompt_ids=jnp.asarray(prompt), prompt_mask=jnp.asarray(prompt != 0),
        completion_ids=jnp.asarray(comp), completion_mask=jnp.asarray(mask),
        advantages=jnp.asarray(rng.normal(0, 1, batch).astype(np.float32)),
        ref_per_token_logps=jnp.asarray(ref) if with_ref else None,
        old_per_token_logps=jnp.asarray(old))


def _loss_grad_fn(fn, model, example, config):
    """``lora -> (loss, grads)`` for the loss ``fn``, and the model's LoRA state."""
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lora_state):
        return fn(nnx.merge(graphdef, lora_state, rest), example, config, 0, 1)[0]

    return jax.value_and_grad(loss), lora


def _loss_and_grad(fn, model, example, config):
    loss_and_grad, lora = _loss_grad_fn(fn, model, example, config)
    value, grads = loss_and_grad(lora)
    return float(value), jax.tree.leaves(grads)


@pytest.mark.parametrize("beta,temperature", [(0.04, 0.9), (0.0, 1.0)])
def test_chunked_loss_matches_tunix(policy, beta, temperature):
    loaded, model = policy
    config = GRPOConfig(num_generations=2, beta=beta, epsilon=0.2)
    config.temperature = temperature  # Tunix's learner sets it from the rollout config
    example = _example(loaded)
    ours, our_grads = _loss_and_grad(grpo_loss_chunked, model, example, config)
    tunix, tunix_grads = _loss_and_grad(algo_core.grpo_loss_fn, model, example, config)
    assert ours == pytest.approx(tunix, rel=1e-4, abs=1e-6)
    assert abs(tunix) > 1e-3  # a real, non-trivial loss is being compared
    for a, b in zip(our_grads, tunix_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-6)


def _assert_same_loss_and_grads(ours_fn, tunix_fn, model, example, config):
    """jaxpost's loss equals Tunix's in value and gradient, and neither is trivially zero."""
    ours, our_grads = _loss_and_grad(ours_fn, model, example, config)
    tunix, tunix_grads = _loss_and_grad(tunix_fn, model, example, config)
    assert ours == pytest.approx(tunix, rel=1e-4, abs=1e-6)
    assert abs(tunix) > 1e-3
    assert any(np.abs(np.asarray(g)).max() > 0 for g in tunix_grads)
    for a, b in zip(our_grads, tunix_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("algorithm", [a for a in RL_ALGORITHMS if a != "ppo"])
def test_chunked_loss_matches_tunix_for_each_algorithm(policy, algorithm):
    """Each algorithm's Tunix config (aggregation, upper clip, GSPO's sequence ratio),
    with old log-probs near the policy's so that some ratios fall inside the clip range
    and some outside."""
    loaded, model = policy
    run = ColabTrainingConfig(model="random:gemma3-tiny", algorithm=algorithm,
                              num_generations=2)
    config = rl_algorithm_config(run)
    config.temperature = 0.9
    example = _example(loaded)
    current, _ = completion_logps(model, example.prompt_ids, example.completion_ids, 0,
                                  temperature=0.9)
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 2 * run.clip_high, current.shape).astype(np.float32)
    example = dataclasses.replace(example, old_per_token_logps=current + noise)
    _assert_same_loss_and_grads(grpo_loss_chunked, algo_core.grpo_loss_fn, model, example,
                                config)


@pytest.mark.parametrize("epsilon_c", [None, 3.0])
def test_chunked_ppo_loss_matches_tunix(policy, epsilon_c):
    """PPO's clipped surrogate with per-token advantages (GAE's), and its dual clip, at
    temperature 1 (Tunix's PPO loss does not temper its logits; see ppo_loss_chunked)."""
    loaded, model = policy
    run = ColabTrainingConfig(model="random:gemma3-tiny", algorithm="ppo", num_generations=2)
    config = dataclasses.replace(ppo_algorithm_config(run), epsilon_c=epsilon_c)
    example = _example(loaded)
    current, _ = completion_logps(model, example.prompt_ids, example.completion_ids, 0)
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 2 * run.clip_high, current.shape).astype(np.float32)
    advantages = rng.normal(0, 1, current.shape).astype(np.float32)
    example = dataclasses.replace(example, old_per_token_logps=current + noise,
                                  advantages=jnp.asarray(advantages))
    _assert_same_loss_and_grads(ppo_loss_chunked, algo_core.ppo_policy_loss_fn, model, example,
                                config)


def test_chunked_logps_match_full_logits(policy):
    loaded, model = policy
    example = _example(loaded, batch=3, comp_len=7)
    graphdef, state = nnx.split(model)
    full = common.compute_per_token_logps(graphdef, state, example.prompt_ids,
                                          example.completion_ids, 0, 1)
    chunked, entropy = completion_logps(model, example.prompt_ids, example.completion_ids, 0,
                                        chunk_rows=4)  # 21 rows: uneven last chunk
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), rtol=1e-5, atol=1e-5)
    vocab = loaded.model_config.num_embed
    assert np.all(np.asarray(entropy) > 0) and np.all(np.asarray(entropy) <= np.log(vocab) + 1e-3)


def _chunks_scanned(model, example) -> list[int]:
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, p, c: completion_logps(nnx.merge(graphdef, s), p, c, 0))(
        state, example.prompt_ids, example.completion_ids)
    return [e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]


@pytest.mark.parametrize("rows,chunks", [(5, 5), (7, 3), (64, 1)])
def test_default_chunk_is_the_backends(policy, monkeypatch, rows, chunks):
    """Without chunk_rows, the chunk size is LOGPS_CHUNK_ROWS' for JAX's backend."""
    loaded, model = policy
    example = _example(loaded, batch=3, comp_len=7)  # 21 rows
    monkeypatch.setitem(fast_logits.LOGPS_CHUNK_ROWS, jax.default_backend(), rows)
    assert fast_logits.logps_chunk_rows() == rows
    assert _chunks_scanned(model, example) == [chunks]


def test_recomputed_layers_give_the_same_loss_and_gradients(policy):
    loaded, model = policy
    config = GRPOConfig(num_generations=2, beta=0.04, epsilon=0.2)
    config.temperature = 0.9
    example = _example(loaded)
    stored, stored_grads = _loss_and_grad(grpo_loss_chunked, model, example, config)
    model.remat_layers = True
    try:
        recomputed, recomputed_grads = _loss_and_grad(grpo_loss_chunked, model, example, config)
    finally:
        model.remat_layers = False
    assert recomputed == pytest.approx(stored, rel=1e-5, abs=1e-7)
    for a, b in zip(recomputed_grads, stored_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_recomputed_layers_keep_less_memory():
    # A small vocabulary, so that the layers' activations, not the logits, dominate.
    import dataclasses

    from tunix.models.gemma3 import model as gemma3

    from jaxpost.fast_logits import enable
    from jaxpost.runtime.mesh import make_mesh
    from jaxpost.models.loading import tiny_gemma3_config

    cfg = dataclasses.replace(tiny_gemma3_config(512, jnp.float32), num_layers=4, hidden_dim=512)
    base = gemma3.Gemma3(cfg, rngs=nnx.Rngs(0))
    assert enable(base)
    model = apply_lora(base, make_mesh(), rank=4, alpha=8.0, seed=1)
    config = GRPOConfig(num_generations=2, beta=0.04, epsilon=0.2)
    config.temperature = 0.9
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(10, 512, (8, 64)).astype(np.int32))
    comp = jnp.asarray(rng.integers(10, 512, (8, 64)).astype(np.int32))
    example = common.TrainExample(
        prompt_ids=prompt, prompt_mask=prompt != 0, completion_ids=comp,
        completion_mask=jnp.ones_like(comp), advantages=jnp.asarray(rng.normal(0, 1, 8)),
        ref_per_token_logps=jnp.full(comp.shape, -6.0), old_per_token_logps=None)

    def temp_bytes():
        fn, lora = _loss_grad_fn(grpo_loss_chunked, model, example, config)
        return jax.jit(fn).lower(lora).compile().memory_analysis().temp_size_in_bytes

    stored = temp_bytes()
    model.remat_layers = True
    try:
        recomputed = temp_bytes()
    finally:
        model.remat_layers = False
    assert recomputed < 0.6 * stored, (recomputed, stored)


def _grouped_example(loaded, prompts=2, group=3, prompt_len=6, comp_len=5):
    """An example whose rows repeat each prompt ``group`` times in a row, as GRPO's do."""
    rng = np.random.default_rng(3)
    vocab = loaded.model_config.num_embed
    distinct = rng.integers(10, vocab, (prompts, prompt_len)).astype(np.int32)
    distinct[0, :2] = 0  # left padding
    prompt = np.repeat(distinct, group, axis=0)
    batch = prompts * group
    comp = rng.integers(10, vocab, (batch, comp_len)).astype(np.int32)
    comp[1, 3:] = 0  # right padding after an early end
    comp[-1, 1:] = 0
    return common.TrainExample(
        prompt_ids=jnp.asarray(prompt), prompt_mask=jnp.asarray(prompt != 0),
        completion_ids=jnp.asarray(comp), completion_mask=jnp.asarray((comp != 0).astype(np.int32)),
        advantages=jnp.asarray(rng.normal(0, 1, batch).astype(np.float32)),
        ref_per_token_logps=jnp.asarray(rng.normal(-12.0, 0.5, comp.shape).astype(np.float32)),
        old_per_token_logps=None)


def test_prompt_group_size():
    a, b, c = [1, 2, 3], [4, 5, 6], [7, 8, 9]
    assert prompt_group_size(np.array([a, a, a, b, b, b])) == 3
    assert prompt_group_size(np.array([a, a, a, a])) == 4
    assert prompt_group_size(np.array([a, a, a, a, b, b, c, c])) == 2  # a drawn twice
    assert prompt_group_size(np.array([a, b, a, b])) == 1
    assert prompt_group_size(np.array([a, a, b])) == 1
    assert prompt_group_size(np.array([a])) == 1


def _assert_trees_close(got, want, rel=1e-4):
    """Leaf by leaf, to ``rel`` of the leaf's largest magnitude (float32 sums in another
    order differ by rounding)."""
    for a, b in zip(got, want):
        a, b = np.asarray(a), np.asarray(b)
        scale = max(float(np.abs(b).max()), 1e-6)
        np.testing.assert_allclose(a, b, rtol=0, atol=rel * scale)


@pytest.mark.parametrize("remat", [False, True])
def test_packed_prompts_give_the_same_logps_and_gradients(policy, remat):
    loaded, model = policy
    example = _grouped_example(loaded)
    assert prompt_group_size(example.prompt_ids) == 3
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    weights = jnp.asarray(np.random.default_rng(5).normal(size=example.completion_ids.shape),
                          jnp.float32)

    def weighted_logps(lora_state, group):
        m = nnx.merge(graphdef, lora_state, rest)
        m.remat_layers = remat
        logps, _ = completion_logps(m, example.prompt_ids, example.completion_ids, 0,
                                    temperature=0.9, prompt_group=group)
        return jnp.sum(logps * weights), logps

    grad_fn = jax.jit(jax.grad(weighted_logps, has_aux=True), static_argnums=1)
    full_grads, full = grad_fn(lora, 1)
    packed_grads, packed = grad_fn(lora, 3)
    np.testing.assert_allclose(np.asarray(packed), np.asarray(full), rtol=1e-5, atol=1e-5)
    _assert_trees_close(jax.tree.leaves(packed_grads), jax.tree.leaves(full_grads))
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(full_grads)) > 1e-2


def test_packing_splits_a_group_that_overflows_the_sliding_window(policy):
    loaded, model = policy
    window = loaded.model_config.sliding_window_size
    comp_len = window // 3  # a prompt and 3 completions overflow the window; 2 fit
    example = _grouped_example(loaded, prompts=1, group=4, prompt_len=4, comp_len=comp_len)
    assert _packing_group(model, 4, comp_len, 4) == 2
    full, _ = completion_logps(model, example.prompt_ids, example.completion_ids, 0)
    packed, _ = completion_logps(model, example.prompt_ids, example.completion_ids, 0,
                                 prompt_group=4)
    np.testing.assert_allclose(np.asarray(packed), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_grpo_loss_computes_each_prompt_once_when_the_step_says_so(policy):
    loaded, model = policy
    config = GRPOConfig(num_generations=3, beta=0.04, epsilon=0.2)
    config.temperature = 0.9
    example = _grouped_example(loaded)
    tunix, tunix_grads = _loss_and_grad(algo_core.grpo_loss_fn, model, example, config)
    model.prompt_group = 3  # what jaxpost's train step sets from the batch's prompt ids
    try:
        ours, our_grads = _loss_and_grad(grpo_loss_chunked, model, example, config)
    finally:
        del model.prompt_group
    assert ours == pytest.approx(tunix, rel=1e-4, abs=1e-6)
    _assert_trees_close(our_grads, tunix_grads, rel=2e-3)


def _rollout_with_layer_inputs(loaded, model, prompts, steps=6, prompt_len=10):
    """A rollout of ``prompts`` by jaxpost's sampler, keeping its layer inputs; returns
    the sampler and the rollout's prompt and completion ids."""
    from jaxpost.fast_logits import keep_layer_inputs
    from jaxpost.sampling import make_sampler

    sampler = make_sampler(model, loaded, cache_size=prompt_len + steps)
    assert keep_layer_inputs(sampler, model)
    sampler(prompts, max_generation_steps=steps, max_prompt_length=prompt_len,
            temperature=0.9, top_k=20, top_p=1.0, seed=3, eos_tokens=[-1])
    tokens = np.array(sampler._jaxpost_layer_inputs["tokens"])
    return sampler, tokens[:, :prompt_len], tokens[:, prompt_len:]


@pytest.mark.parametrize("group", [1, 2])
def test_rollout_layer_inputs_give_the_forward_pass_logps_and_gradients(policy, group):
    """Log-probs and LoRA gradients from the layer inputs a rollout kept equal those of
    the update's own forward pass, with prompts computed once or per row, and a
    completion that ended early (Tunix pads it)."""
    from jaxpost.fast_logits import rollout_layer_inputs

    loaded, model = policy
    sampler, prompt_ids, completion_ids = _rollout_with_layer_inputs(
        loaded, model, ["The capital of France is"] * 2 + ["2 + 3 ="] * 2)
    mask = np.ones_like(completion_ids)
    completion_ids[1, 4:], mask[1, 4:] = 0, 0  # as Tunix pads after an end of sequence
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    layer_inputs = rollout_layer_inputs(sampler, prompt_ids, completion_ids, mask, lora)
    layers = len(model.layers)
    assert layer_inputs.shape == (layers + 1, 4, 16, loaded.model_config.embed_dim)
    # The completions' last position is never run (no token follows it).
    assert not np.any(np.asarray(layer_inputs[:, :, -1]))
    weights = jnp.asarray(np.random.default_rng(5).normal(size=mask.shape) * mask, jnp.float32)

    def weighted_logps(lora_state, inputs):
        m = nnx.merge(graphdef, lora_state, rest)
        logps, _ = completion_logps(m, prompt_ids, completion_ids, 0, temperature=0.9,
                                    prompt_group=group, layer_inputs=inputs)
        return jnp.sum(logps * weights), logps

    grad_fn = jax.jit(jax.grad(weighted_logps, has_aux=True))
    want_grads, want = grad_fn(lora, None)
    got_grads, got = grad_fn(lora, layer_inputs)
    np.testing.assert_allclose(np.asarray(got) * mask, np.asarray(want) * mask,
                               rtol=1e-5, atol=1e-5)
    _assert_trees_close(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads))
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads)) > 1e-2
    # Taken from the kept inputs, the layers do not run forward: the loss's own products
    # are the unembedding's, and its gradient computes no more of them than with
    # recomputation (remat), which runs each layer forward twice.
    def products(fn, *args):
        return str(jax.make_jaxpr(fn)(*args)).count("dot_general")

    def remat_logps(lora_state):
        m = nnx.merge(graphdef, lora_state, rest)
        m.remat_layers = True
        logps, _ = completion_logps(m, prompt_ids, completion_ids, 0, prompt_group=group)
        return jnp.sum(logps * weights), logps

    assert (products(lambda x: weighted_logps(lora, x)[0], layer_inputs)
            < products(lambda x: weighted_logps(lora, x)[0], None))
    assert (products(jax.grad(weighted_logps, has_aux=True), lora, layer_inputs)
            < products(jax.grad(remat_logps, has_aux=True), lora))


def test_rollout_layer_inputs_apply_only_to_the_rollouts_rows_and_weights(policy):
    from jaxpost.fast_logits import rollout_layer_inputs

    loaded, model = policy
    sampler, prompt_ids, completion_ids = _rollout_with_layer_inputs(
        loaded, model, ["The capital of France is", "2 + 3 ="])
    mask = np.ones_like(completion_ids)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    assert rollout_layer_inputs(sampler, prompt_ids, completion_ids, mask, lora) is not None
    # Padding after an end of sequence is not a difference; another token is.
    padded, short = completion_ids.copy(), mask.copy()
    padded[0, 3:], short[0, 3:] = 0, 0
    assert rollout_layer_inputs(sampler, prompt_ids, padded, short, lora) is not None
    other = completion_ids.copy()
    other[0, 2] += 1
    assert rollout_layer_inputs(sampler, prompt_ids, other, mask, lora) is None
    assert rollout_layer_inputs(sampler, prompt_ids[:1], completion_ids[:1], mask[:1],
                                lora) is None
    # Weights updated since the rollout: its activations are not the policy's any more.
    updated = jax.tree.map(lambda x: x * 1.01, lora)
    assert rollout_layer_inputs(sampler, prompt_ids, completion_ids, mask, updated) is None


def test_layer_inputs_are_kept_only_for_the_policys_frozen_weights(policy):
    """A sampler over other base weights (another model with the same LoRA) keeps none."""
    from jaxpost.fast_logits import keep_layer_inputs
    from jaxpost.sampling import make_sampler

    loaded, model = policy
    other = load_model("random:gemma3-tiny", seed=7)
    other_policy = apply_lora(other.model, other.mesh, rank=4, alpha=8.0, seed=1)
    nnx.update(other_policy, nnx.state(model, nnx.LoRAParam))
    assert not keep_layer_inputs(make_sampler(other_policy, other, cache_size=16), model)
    assert keep_layer_inputs(make_sampler(model, loaded, cache_size=16), model)


def test_chunked_logps_gradient_in_bfloat16():
    """bfloat16 hidden states get a bfloat16 cotangent, close to the float32 one."""
    from jaxpost.tunix_ext.logps import _chunk_logps

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    embedding = jax.random.normal(k1, (64, 16), jnp.float32)
    hidden = jax.random.normal(k2, (8, 16), jnp.float32)
    targets = jax.random.randint(k3, (8,), 0, 64)
    weights = jnp.linspace(0.5, 1.5, 8)

    def loss(h, e):
        logps, _ = _chunk_logps(e, h, targets, 0.7)
        return jnp.sum(weights * logps)

    exact = jax.grad(loss)(hidden, embedding)
    low = jax.grad(loss)(hidden.astype(jnp.bfloat16), embedding.astype(jnp.bfloat16))
    assert low.dtype == jnp.bfloat16 and exact.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(low, np.float32), exact, rtol=0.05, atol=0.05)
