"""DPO: jaxpost's chunked loss equals Tunix's, pairs are tokenized in Tunix's layout, the
preference margin rises from 0 (the reference is the policy the stage starts from), and
`jaxpost train --set algorithm=dpo` runs and resumes."""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from tunix.sft.dpo import dpo_trainer

from jaxpost import tunix_adapter
from jaxpost.lora import apply_lora
from jaxpost.models import load_model


@pytest.fixture(scope="module")
def policy_and_reference():
    """A LoRA policy whose adapters are non-zero, and its reference: the same model
    before that change (a frozen copy sharing the base weights)."""
    loaded = load_model("random:gemma3-tiny", seed=0)
    model = apply_lora(loaded.model, loaded.mesh, rank=4, alpha=8.0, seed=1)
    reference = tunix_adapter.frozen_copy(model)
    state = nnx.state(model, nnx.LoRAParam)
    noisy = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape),
                         state)
    nnx.update(model, noisy)
    return loaded, model, reference


def _batch(loaded, pairs=3, prompt_len=8, comp_len=6):
    """Tunix's tokenized DPO input: prompts left-padded, completions right-padded (pad 0)."""
    rng = np.random.default_rng(0)
    vocab = loaded.model_config.num_embed
    prompt = rng.integers(10, vocab, (pairs, prompt_len)).astype(np.int32)
    prompt[0, :3] = 0
    chosen = rng.integers(10, vocab, (pairs, comp_len)).astype(np.int32)
    chosen[1, 4:] = 0
    rejected = rng.integers(10, vocab, (pairs, comp_len)).astype(np.int32)
    rejected[2, 2:] = 0
    return {"prompt_ids": prompt, "prompt_mask": (prompt != 0).astype(np.int32),
            "chosen_ids": chosen, "chosen_mask": (chosen != 0).astype(np.int32),
            "rejected_ids": rejected, "rejected_mask": (rejected != 0).astype(np.int32)}


@pytest.fixture(scope="module")
def trainer(policy_and_reference, tmp_path_factory):
    loaded, model, reference = policy_and_reference
    out = tmp_path_factory.mktemp("dpo_trainer")
    return tunix_adapter.build_dpo_trainer(
        model, reference, optax.sgd(0.0), beta=0.1, pad_id=0,
        checkpoint_dir=str(out / "ckpt"), tensorboard_dir=str(out / "tb"), max_steps=1,
        save_interval_steps=1, max_to_keep=1, metric_backends=[])


def test_chunked_reference_pass_equals_tunix(policy_and_reference, trainer):
    loaded, _, _ = policy_and_reference
    assert trainer.chunked
    batch = _batch(loaded)
    ours = trainer._prepare_inputs(batch)
    tunix = dpo_trainer.DPOTrainer._prepare_inputs(trainer, batch)
    for name in ("input_ids", "positions", "attention_mask", "completion_mask"):
        np.testing.assert_array_equal(np.asarray(getattr(ours, name)),
                                      np.asarray(getattr(tunix, name)), err_msg=name)
    assert ours.logits_to_keep == tunix.logits_to_keep == 6
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        np.testing.assert_allclose(np.asarray(getattr(ours, name)),
                                   np.asarray(getattr(tunix, name)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("beta,label_smoothing", [(0.1, 0.0), (0.5, 0.2)])
def test_chunked_loss_equals_tunix_in_value_and_gradient(policy_and_reference, trainer,
                                                         beta, label_smoothing):
    loaded, model, _ = policy_and_reference
    example = trainer._prepare_inputs(_batch(loaded))

    def loss_and_grad(fn):
        # As Tunix's trainer differentiates its loss: with respect to the LoRA weights.
        grad_fn = nnx.value_and_grad(fn, argnums=nnx.DiffState(0, nnx.LoRAParam),
                                     has_aux=True)
        return grad_fn(model, example, algorithm="dpo", beta=beta,
                       label_smoothing=label_smoothing)

    def chunked(model, train_example, algorithm, beta, label_smoothing):
        return tunix_adapter.dpo_loss_chunked(model, train_example, algorithm, beta,
                                              label_smoothing, pad_id=0)

    (ours, our_aux), our_grads = loss_and_grad(chunked)
    (tunix, tunix_aux), tunix_grads = loss_and_grad(dpo_trainer.dpo_loss_fn)
    assert float(ours) == pytest.approx(float(tunix), rel=1e-4, abs=1e-6)
    # The policy differs from its reference, so the loss is not DPO's starting log 2.
    assert abs(float(tunix) - math.log(2)) > 1e-3
    assert set(our_aux) == set(tunix_aux)
    for key in tunix_aux:
        assert float(our_aux[key]) == pytest.approx(float(tunix_aux[key]), rel=1e-4,
                                                    abs=1e-5), key
    tunix_leaves = jax.tree.leaves(tunix_grads)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in tunix_leaves)
    for a, b in zip(jax.tree.leaves(our_grads), tunix_leaves):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-6)


def test_frozen_copy_keeps_the_weights_it_was_taken_with(policy_and_reference):
    loaded, model, reference = policy_and_reference
    policy_lora = jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    reference_lora = jax.tree.leaves(nnx.state(reference, nnx.LoRAParam))
    assert any(not np.array_equal(a, b) for a, b in zip(policy_lora, reference_lora))
    # The base weights are the same buffers: no second copy of the model.
    def base(m):
        return jax.tree.leaves(nnx.split(m, nnx.LoRAParam, ...)[2])

    assert len(base(model)) == len(base(reference)) > 0
    assert all(a.unsafe_buffer_pointer() == b.unsafe_buffer_pointer()
               for a, b in zip(base(model), base(reference)))
