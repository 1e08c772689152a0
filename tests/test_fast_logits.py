"""Sampling-step logits: jaxpost's unembedding equals Tunix's product."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tunix.generate import sampler as sampler_lib
from tunix.generate import utils as sampler_utils
from tunix.models.gemma3 import model as gemma3

from jaxpost.fast_logits import Gemma3TrimmedLogits, expected_embedding, unembed_last_position
from jaxpost.models.loading import load_model


@pytest.mark.parametrize("vocab", [1000, 999])
def test_unembed_last_position_equals_plain_product(vocab):
    k = jax.random.split(jax.random.key(0), 2)
    embedding = jax.random.normal(k[0], (vocab, 16))
    hidden = jax.random.normal(k[1], (3, 1, 16))

    logits = unembed_last_position(embedding, hidden)

    assert logits.shape == (3, 1, vocab)
    np.testing.assert_allclose(logits, hidden @ embedding.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab", [1000, 999])
def test_expected_embedding_equals_plain_product(vocab):
    k = jax.random.split(jax.random.key(0), 2)
    embedding = jax.random.normal(k[0], (vocab, 16))
    probs = jax.nn.softmax(jax.random.normal(k[1], (vocab, 5)), axis=0)  # [vocab, chunk]

    expected = expected_embedding(probs, embedding)

    assert expected.shape == (5, 16)
    np.testing.assert_allclose(expected, probs.T @ embedding, rtol=1e-5, atol=1e-6)


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


def _tunix_and_jaxpost_samplers():
    """Tunix's own sampler and jaxpost's (:func:`jaxpost.sampling.make_sampler`) for one
    tiny Gemma 3 with non-zero LoRA adapters."""
    from flax import nnx

    from jaxpost.models.lora import apply_lora
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
    return tunix, make_sampler(model, loaded, cache_size=24)


def test_decoding_with_laid_out_weights_equals_tunix():
    """Same tokens and per-step logits as Tunix's own decoding loop, LoRA included."""
    tunix, ours = _tunix_and_jaxpost_samplers()
    # make_sampler replaced the loop (Tunix's is a jitted method of the sampler).
    assert ours._compiled_decode_fn.__name__ == "decode_fn"
    prompts = ["The capital of France is", "2 + 3 ="]

    def run(sampler):
        return sampler(prompts, max_generation_steps=8, max_prompt_length=12,
                       return_logits=True, eos_tokens=[-1])

    steps = _record_last_steps(tunix=tunix, ours=ours)
    a, b = run(ours), run(tunix)

    assert [list(t) for t in a.tokens] == [list(t) for t in b.tokens]
    for x, y in zip(a.logits, b.logits):
        assert np.asarray(x).shape[0] == 8
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-4)
    # 12 prompt + 8 new tokens: Tunix's loop also runs the step whose token would go
    # to position 20, past its buffer; ours stops before it.
    assert steps == {"tunix": 20, "ours": 19}



def test_decoding_loop_lays_out_the_shared_weights_in_place_and_restores_them(monkeypatch):
    """The loop reads the policy's own weight buffers rewritten in its layouts, and
    leaves them bitwise as they were; the loop given laid-out copies instead computes
    the same tokens and logits."""
    from flax import nnx

    import jaxpost.tunix_ext.decoding as fast_logits

    tunix, ours = _tunix_and_jaxpost_samplers()
    weights = jax.tree.leaves(nnx.state(tunix.transformer))
    before = [np.array(w) for w in weights]
    assert fast_logits._in_place_layout_possible(jax.tree.leaves(ours._flattened_transformer_state))

    def run():
        return ours(["The capital of France is", "2 + 3 ="], max_generation_steps=8,
                    max_prompt_length=12, return_logits=True, eos_tokens=[-1])

    in_place = run()
    assert all(np.array_equal(w, b) for w, b in zip(weights, before))
    monkeypatch.setattr(fast_logits, "_in_place_layout_possible", lambda arrays: False)
    copies = run()

    assert [list(t) for t in in_place.tokens] == [list(t) for t in copies.tokens]
    for x, y in zip(in_place.logits, copies.logits):
        np.testing.assert_array_equal(x, y)


def test_weights_in_decode_layout_holds_the_layout_and_restores_on_error():
    from jaxpost.tunix_ext.decoding import _weights_in_decode_layout

    a = jnp.arange(24.0).reshape(2, 3, 4)
    b = jnp.arange(6.0).reshape(2, 3)
    want = np.array(a), np.array(b)
    perms = (2, 0, 1), (1, 0)

    with pytest.raises(RuntimeError, match="inside"):
        with _weights_in_decode_layout([a, b], perms):
            np.testing.assert_array_equal(
                np.array(a), want[0].transpose(2, 0, 1).reshape(2, 3, 4))
            np.testing.assert_array_equal(np.array(b), want[1].T.reshape(2, 3))
            # Computations read the rewritten buffers.
            np.testing.assert_array_equal(jax.jit(lambda x: x.reshape(3, 2).T)(b), want[1])
            raise RuntimeError("inside")

    np.testing.assert_array_equal(np.array(a), want[0])
    np.testing.assert_array_equal(np.array(b), want[1])


def test_weights_in_decode_layout_finishes_its_write_back_when_interrupted(monkeypatch):
    """A Ctrl-C during the write-back waits until every weight is back, then is raised."""
    import jaxpost.tunix_ext.decoding as fast_logits

    weights = [jnp.full((64, 32), float(i)) + jnp.arange(32.0) for i in range(4)]
    want = [np.array(w) for w in weights]
    calls = []
    original = fast_logits._from_decode_layout

    def interrupted_once(arrays, perms):
        calls.append(len(arrays))
        if len(calls) == 2:  # the write-back's second group
            raise KeyboardInterrupt
        return original(arrays, perms)

    monkeypatch.setattr(fast_logits, "_from_decode_layout", interrupted_once)
    monkeypatch.setattr(fast_logits, "_LAYOUT_GROUP_BYTES", 8 << 10)  # one array (8 KB) each
    with pytest.raises(KeyboardInterrupt):
        with fast_logits._weights_in_decode_layout(weights, [(1, 0)] * 4):
            pass

    assert len(calls) > 4  # the write-back went on after the interrupt
    for w, v in zip(weights, want):
        np.testing.assert_array_equal(np.array(w), v)

def test_top_k_sampling_through_decoding_loop_equals_tunix():
    """Top-k sampling (jaxpost's blocked top-k in the loop) draws Tunix's tokens."""
    tunix, ours = _tunix_and_jaxpost_samplers()
    prompts = ["The capital of France is", "2 + 3 ="]

    def run(sampler, seed):
        return sampler(prompts, max_generation_steps=8, max_prompt_length=12, eos_tokens=[-1],
                       temperature=0.9, top_k=50, top_p=0.95, seed=seed)

    drawn = {}
    for seed in (0, 1):
        drawn[seed] = [list(t) for t in run(ours, seed).tokens]
        assert drawn[seed] == [list(t) for t in run(tunix, seed).tokens]
    assert drawn[0] != drawn[1]


@pytest.mark.parametrize("kind", ["normal", "ties", "short"])
def test_blocked_top_k_equals_lax_top_k(kind):
    """The same values and indices as jax.lax.top_k, in order, with ties going to the
    lower index (integer logits, thousands of equal values) and for an axis too short
    to cut into blocks."""
    from jaxpost.fast_logits import blocked_top_k

    key = jax.random.key(7)
    if kind == "normal":
        x = 3 * jax.random.normal(key, (3, 262144))
    elif kind == "ties":
        x = jax.random.randint(key, (2, 1, 262144), 0, 60).astype(jnp.float32)
    else:
        x = jax.random.normal(key, (2, 5000))
    values, indices = blocked_top_k(x, 50)
    expected_values, expected_indices = jax.lax.top_k(x, 50)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(indices, expected_indices)
    if kind == "ties":
        assert len(np.unique(np.asarray(values))) == 1  # 50 equal values, lowest indices


def _record_last_steps(**samplers) -> dict:
    """Makes each sampler's decoding loop record the step it ended at, by name."""
    steps = {}
    for name, sampler in samplers.items():
        def decode(*args, loop=sampler._compiled_decode_fn, name=name):
            state = loop(*args)
            steps[name] = int(state.decoding_step)
            return state

        sampler._compiled_decode_fn = decode
    return steps


def test_beam_search_with_laid_out_weights_equals_tunix():
    """Beam search through jaxpost's decoding loop keeps Tunix's last step (it scores
    the beams) and returns Tunix's tokens."""
    tunix, ours = _tunix_and_jaxpost_samplers()
    prompts = ["The capital of France is", "2 + 3 ="]

    def run(sampler):
        return sampler(prompts, max_generation_steps=6, max_prompt_length=12,
                       beam_size=3, eos_tokens=[-1])

    steps = _record_last_steps(tunix=tunix, ours=ours)
    a, b = run(ours), run(tunix)
    assert [list(t) for t in a.tokens] == [list(t) for t in b.tokens]
    assert all(len(t) == 6 for t in a.tokens)
    assert steps == {"tunix": 18, "ours": 18}


def _run_in_decoding_loop(module, args, in_loop):
    """``module(*args)`` traced with the decoding loop's flag on or off; returns its
    outputs and its jaxpr."""
    from flax import nnx

    from jaxpost.tunix_ext.decoding_layers import _DECODING_LOOP

    graphdef, params = nnx.split(module)

    def run(params, *args):  # a new function each time: JAX caches traces by it
        return nnx.merge(graphdef, params)(*args)

    token = _DECODING_LOOP.set(in_loop)
    try:
        jaxpr = jax.make_jaxpr(run)(params, *args).jaxpr
        return run(params, *args), jaxpr
    finally:
        _DECODING_LOOP.reset(token)


def _product_operands(jaxpr):
    """The shapes of the two operands of every matrix product in ``jaxpr``, nested ones
    included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield tuple(v.aval.shape for v in eqn.invars[:2])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _product_operands(sub)


def test_kernel_first_mlp_equals_tunix_mlp_with_lora():
    """A one-position forward pass gives the same logits with the decoding loop's
    kernel-first MLP products as with Tunix's and qwix's own."""
    from flax import nnx

    from jaxpost.fast_logits import DecodingFeedForward
    from jaxpost.models.lora import apply_lora

    loaded = load_model("random:gemma3-tiny", seed=0)
    model = apply_lora(loaded.model, loaded.mesh, rank=4, alpha=8.0, seed=1)
    state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), state))
    assert all(type(layer.mlp) is DecodingFeedForward for layer in model.layers)
    assert model.layers[0].mlp.up_proj.lora_scale == 2.0
    tokens = jnp.array([[5], [17], [301]])
    positions = jnp.array([[0], [3], [7]])
    mask = jnp.ones((3, 1, 1), bool)

    cfg = loaded.model_config

    def logits(weight_first):
        (out, _), jaxpr = _run_in_decoding_loop(model, (tokens, positions, None, mask),
                                                weight_first)
        return out, set(_product_operands(jaxpr))

    ours, our_operands = logits(True)
    tunix, tunix_operands = logits(False)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(tunix), rtol=1e-5, atol=1e-5)
    # The gate kernel ([embed, hidden]) times the activations ([batch, 1, embed]): a
    # product only our path has.
    kernel_first = (model.layers[0].mlp.gate_proj.kernel.value.shape, (3, 1, cfg.embed_dim))
    assert kernel_first in our_operands
    assert kernel_first not in tunix_operands


@pytest.mark.parametrize("batch", [1, 3])
def test_kernel_first_attention_projections_equal_tunix_with_lora(batch):
    """One decoding step of the whole LoRA model with a cache gives Tunix's and qwix's
    logits and cache when the query and output projections put their weights first."""
    from flax import nnx

    from jaxpost.tunix_ext.decoding_layers import _values_transposed
    from jaxpost.models.lora import apply_lora

    loaded = load_model("random:gemma3-tiny", seed=0)
    model = apply_lora(loaded.model, loaded.mesh, rank=4, alpha=8.0, seed=1)
    state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), state))
    attn = model.layers[0].attn
    assert attn.q_einsum.lora_scale == 2.0 and attn.attn_vec_einsum.lora_scale == 2.0
    cfg = loaded.model_config
    cache_size, end = 12, 7
    k = jax.random.split(jax.random.key(5), 2 * cfg.num_layers)
    shape = (batch, cache_size, cfg.num_kv_heads, cfg.head_dim)
    cache = {f"layer_{i}": {"k": jax.random.normal(k[2 * i], shape),
                            "v": jax.random.normal(k[2 * i + 1], shape),
                            "end_index": jnp.full((batch,), end, jnp.int32)}
             for i in range(cfg.num_layers)}
    tokens = jnp.array([[5], [17], [301]])[:batch]
    positions = jnp.full((batch, 1), end)
    mask = jnp.ones((batch, 1, cache_size), bool).at[:, :, end + 1:].set(False)

    (ours, our_cache), our_jaxpr = _run_in_decoding_loop(
        model, (tokens, positions, _values_transposed(cache, True), mask), True)
    (tunix, tunix_cache), tunix_jaxpr = _run_in_decoding_loop(
        model, (tokens, positions, cache, mask), False)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(tunix), rtol=1e-5, atol=1e-5)
    our_cache = _values_transposed(our_cache, False)
    for name in cache:
        for kv in ("k", "v"):
            np.testing.assert_allclose(our_cache[name][kv], tunix_cache[name][kv],
                                       rtol=1e-5, atol=1e-5)
    # The query weight ([heads, embed, head]) and the output weight ([heads, head,
    # embed]) as first operands, times the step's activations: products only ours has.
    query_first = (attn.q_einsum.w.value.shape, (batch, 1, cfg.embed_dim))
    output_first = (attn.attn_vec_einsum.w.value.shape,
                    (batch, 1, cfg.num_heads, cfg.head_dim))
    assert {query_first, output_first} <= set(_product_operands(our_jaxpr))
    assert not {query_first, output_first} & set(_product_operands(tunix_jaxpr))


@pytest.mark.parametrize("heads,kv_heads", [(2, 1), (4, 2), (4, 4)])
@pytest.mark.parametrize("kind", ["LOCAL_SLIDING", "GLOBAL"])
def test_decoding_attention_step_equals_tunix(heads, kv_heads, kind):
    """In the decoding loop, one step of DecodingAttention (reading the cache before it
    writes it, values transposed) gives Tunix's output and new cache, for one key head, grouped heads and one key
    head per query head, with a sliding window that cuts into the cache, and a cache
    that wraps around."""
    from flax import nnx

    from jaxpost.fast_logits import DecodingAttention
    from jaxpost.tunix_ext.decoding_layers import _values_transposed

    batch, cache_size, head_dim, embed, end = 3, 16, 8, 24, 21
    attn = gemma3.Attention(
        num_heads=heads, num_kv_heads=kv_heads, features=embed, head_dim=head_dim,
        attn_type=gemma3.AttentionType[kind], rngs=nnx.Rngs(0), sliding_window_size=5,
        rope_base_frequency=10_000, rope_scale_factor=1.0,
        query_pre_attn_norm=gemma3.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM,
        shd_config=gemma3.ShardingConfig.get_default_sharding(),
        remat_config=gemma3.RematConfig.NONE, param_dtype=jnp.float32)
    attn.__class__ = DecodingAttention
    k = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(k[0], (batch, 1, embed))
    positions = jnp.array([[end], [end - 2], [9]])
    cache = {"k": jax.random.normal(k[1], (batch, cache_size, kv_heads, head_dim)),
             "v": jax.random.normal(k[2], (batch, cache_size, kv_heads, head_dim)),
             "end_index": jnp.full((batch,), end, jnp.int32)}
    # Row 2 attends to part of its cache only (a shorter, left-padded sequence).
    mask = jnp.ones((batch, 1, cache_size), bool).at[2, 0, :10].set(False)

    loop_cache = _values_transposed({"layer": cache}, True)["layer"]
    (ours_cache, ours), our_jaxpr = _run_in_decoding_loop(
        attn, (x, positions, loop_cache, mask), True)
    ours_cache = _values_transposed({"layer": ours_cache}, False)["layer"]
    (tunix_cache, tunix), _ = _run_in_decoding_loop(
        attn, (x, positions, cache, mask), False)

    def cache_products(jaxpr):
        """For each product with a cache operand: whether it reads the cache as passed in."""
        cache_shapes = {cache["k"].shape, loop_cache["v"].shape}
        return [all(v in jaxpr.invars for v in e.invars if v.aval.shape in cache_shapes)
                for e in jaxpr.eqns if e.primitive.name == "dot_general"
                and any(v.aval.shape in cache_shapes for v in e.invars)]

    # Both products read the cache as it was (not an updated copy of it), so that XLA
    # can write it in place afterwards.
    assert cache_products(our_jaxpr) == [True, True]
    np.testing.assert_allclose(ours, tunix, rtol=1e-5, atol=1e-5)
    for name in ("k", "v"):
        np.testing.assert_allclose(ours_cache[name], tunix_cache[name], rtol=1e-6, atol=1e-6)
        # The new entry went where Tunix puts it (end_index modulo the cache size).
        assert not np.allclose(ours_cache[name][:, end % cache_size], cache[name][:, end % cache_size])
    np.testing.assert_array_equal(ours_cache["end_index"], tunix_cache["end_index"])
    assert int(ours_cache["end_index"][0]) == end + 1


def test_prefill_once_per_prompt_equals_tunix(monkeypatch):
    """A batch that repeats its prompts (GRPO's G completions each) samples the same
    tokens with the same logits as Tunix's sampler, while its prefill runs each prompt
    once; a batch without repeats takes the ordinary prefill."""
    from jaxpost.fast_logits import Gemma3TrimmedLogits

    tunix, ours = _tunix_and_jaxpost_samplers()
    assert ours._compiled_prefill_fn.__name__ == "prefill_fn"
    prefill_batches = []  # rows of the model's prefill passes (traced once per shape)
    original = Gemma3TrimmedLogits._hidden

    def spy(self, tokens, *args, **kwargs):
        if args[1] is not None and tokens.shape[1] > 1:
            prefill_batches.append(tokens.shape[0])
        return original(self, tokens, *args, **kwargs)

    monkeypatch.setattr(Gemma3TrimmedLogits, "_hidden", spy)

    def run(sampler, prompts):
        return sampler(prompts, max_generation_steps=6, max_prompt_length=12, temperature=0.9,
                       top_k=20, top_p=1.0, seed=3, return_logits=True, eos_tokens=[-1])

    for prompts in (["The capital of France is"] * 3 + ["2 + 3 ="] * 3,
                    ["2 + 3 =", "The capital of France is"]):
        prefill_batches.clear()
        a = run(ours, prompts)
        assert prefill_batches == [2]  # the distinct prompts
        b = run(tunix, prompts)
        assert [list(t) for t in a.tokens] == [list(t) for t in b.tokens]
        # The rows of a group sampled different continuations from the same prompt.
        assert len({tuple(t) for t in a.tokens}) == len(prompts)
        for x, y in zip(a.logits, b.logits):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-4)


def test_second_rollout_compiles_nothing():
    """A sampler called again with prompts of the same shapes reuses every compiled
    function (Tunix's JAX-scalar prompt length used to cost a compilation per call)."""
    import jax.monitoring

    from jaxpost.sampling import make_sampler

    loaded = load_model("random:gemma3-tiny", seed=0)
    sampler = make_sampler(loaded.model, loaded, cache_size=24)
    compiles = []

    def listener(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    def run(prompts, seed):
        return sampler(prompts, max_generation_steps=4, max_prompt_length=12, temperature=0.9,
                       top_k=20, top_p=1.0, seed=seed, eos_tokens=[-1])

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        run(["2 + 3 =", "2 + 3 =", "The capital of France is", "The capital of France is"], 0)
        assert compiles  # the listener sees compilations
        compiles.clear()
        out = run(["1 + 1 =", "1 + 1 =", "Paris is in", "Paris is in"], 1)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(out.tokens) == 4
    assert compiles == []


def test_sampler_merges_its_model_once_per_set_of_weights():
    from flax import nnx

    from jaxpost.sampling import make_sampler

    loaded = load_model("random:gemma3-tiny", seed=0)
    sampler = make_sampler(loaded.model, loaded, cache_size=24)
    first = sampler.transformer
    assert sampler.transformer is first  # no second merge while the weights are the same

    doubled = jax.tree.map(lambda x: x * 2, sampler.transformer_state)
    sampler.transformer_state = doubled  # Tunix's setter, as a weight sync uses it
    merged = sampler.transformer
    assert merged is not first
    np.testing.assert_array_equal(
        nnx.state(merged)["embedder"]["input_embedding"].value,
        2 * nnx.state(first)["embedder"]["input_embedding"].value)
    assert sampler.transformer is merged
