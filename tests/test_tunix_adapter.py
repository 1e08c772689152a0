"""The RL cluster jaxpost builds: shared frozen weights, and old log-probabilities as the loss sees them."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tunix.rl import common

from jaxpost import tunix_adapter
from jaxpost.config import get_preset
from jaxpost.fast_logits import completion_logits_only, completion_logps
from jaxpost.models.lora import apply_lora
from jaxpost.models.loading import load_model
from jaxpost.train import make_optimizer, make_schedule


def _optimizer(config):
    """The run's optimizer, as train_grpo builds it."""
    schedule = make_schedule(peak=config.learning_rate, warmup_steps=config.warmup_steps,
                             total_steps=config.total_steps)
    return make_optimizer(schedule, b1=config.b1, b2=config.b2,
                          weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    config = dataclasses.replace(get_preset("smoke"), temperature=0.7,
                                 output_dir=str(tmp_path_factory.mktemp("cluster")))
    loaded = load_model(config.model, seed=0)
    actor = apply_lora(loaded.model, loaded.mesh, rank=4, alpha=8.0, seed=1)
    state = nnx.state(actor, nnx.LoRAParam)
    nnx.update(actor, jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), state))
    with completion_logits_only([actor, loaded.model], config.max_new_tokens):
        built = tunix_adapter.build_cluster(
            actor=actor, reference=loaded.model, tokenizer=loaded.tokenizer, mesh=loaded.mesh,
            optimizer=_optimizer(config), config=config, eos_ids=loaded.eos_ids,
            metric_backends=[])
        yield built, loaded
        built.close()


def _pointers(state):
    return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]


def _split(model):
    _, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    return lora, frozen


def test_anchor_shares_frozen_weights_and_copies_lora(cluster):
    built, _ = cluster
    model = built.actor_trainer.model
    for _ in range(2):  # at start-up, then after a sync
        lora, frozen = _split(model)
        anchor_lora, anchor_frozen = _split(nnx.merge(nnx.graphdef(model),
                                                      built._anchor_policy_state))
        assert _pointers(anchor_frozen) == _pointers(frozen)
        assert not set(_pointers(anchor_lora)) & set(_pointers(lora))
        for a, b in zip(jax.tree.leaves(anchor_lora), jax.tree.leaves(lora)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        steps = built.global_steps
        built.sync_weights()
        assert built.global_steps == steps + 1


def test_building_the_cluster_copies_no_weights_to_host(tmp_path, monkeypatch):
    # Tunix snapshots the whole actor into host memory while it builds the cluster; for
    # a LoRA actor that copy is replaced at once (the test above), so it is never made.
    from tunix.rl import utils as rl_utils

    transfers = []
    original = rl_utils.put_params_on_memory_kind

    def spy(params, memory_kind):
        transfers.append(memory_kind)
        return original(params, memory_kind)

    monkeypatch.setattr(rl_utils, "put_params_on_memory_kind", spy)
    config = dataclasses.replace(get_preset("smoke"), output_dir=str(tmp_path))
    loaded = load_model(config.model, seed=0)
    actor = apply_lora(loaded.model, loaded.mesh, rank=4, alpha=8.0, seed=1)
    built = tunix_adapter.build_cluster(
        actor=actor, reference=loaded.model, tokenizer=loaded.tokenizer, mesh=loaded.mesh,
        optimizer=_optimizer(config), config=config, eos_ids=loaded.eos_ids,
        metric_backends=[])
    try:
        assert "pinned_host" not in transfers
        assert rl_utils.put_params_on_memory_kind is spy  # restored after the build
        assert built._anchor_policy_state is not None
    finally:
        built.close()


def test_old_logps_use_the_sampling_temperature(cluster):
    built, loaded = cluster
    rng = np.random.default_rng(0)
    vocab = loaded.model_config.num_embed
    prompt = rng.integers(10, vocab, (4, 6)).astype(np.int32)
    prompt[0, :2] = 0
    completion = rng.integers(10, vocab, (4, 5)).astype(np.int32)
    completion[1, 3:] = 0
    prompt, completion = jnp.asarray(prompt), jnp.asarray(completion)

    old = built.get_old_per_token_logps(prompt, completion, micro_batch_size=2)
    model = built.actor_trainer.model
    graphdef, state = nnx.split(model)
    tunix_tempered = common.compute_per_token_logps(graphdef, state, prompt, completion, 0, 1,
                                                    temperature=0.7)
    np.testing.assert_allclose(np.asarray(old), np.asarray(tunix_tempered), rtol=1e-5, atol=1e-5)
    untempered, _ = completion_logps(model, prompt, completion, 0, temperature=1.0)
    assert np.abs(np.asarray(old) - np.asarray(untempered)).max() > 1e-3
