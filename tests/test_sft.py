"""The SFT warm-up: its loss falls, it resumes exactly, and GRPO starts from it."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from jaxpost.colab_pipeline import (
    held_out_spec,
    prepare_colab_session,
    run_full_pipeline,
    train_sft,
)
from jaxpost.config import ColabTrainingConfig, get_preset
from jaxpost.data.demonstrations import Demonstration
from jaxpost.export import ADAPTER_FILE, checkpoint_lora_arrays
from jaxpost.sft import sft_batches, tokenize_demonstrations
from jaxpost.train import read_metrics
from jaxpost.tunix_ext import checkpointing, train_step


def _lora(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))]


def _config(out, **changes) -> ColabTrainingConfig:
    settings = dict(output_dir=str(out), sft_steps=4, sft_batch_size=4, max_steps=0,
                    sft_learning_rate=1e-2, save_interval_steps=1, max_to_keep=10,
                    max_new_tokens=32, final_eval_examples=0)
    settings.update(changes)
    return dataclasses.replace(get_preset("smoke"), **settings)


class _Interrupted(Exception):
    pass


def _stop_after(calls: int):
    """Wraps the LoRA train step so that its call number ``calls + 1`` raises, as a
    process killed between two steps would stop."""
    original = train_step._LoraTrainStep.__call__
    count = {"n": 0}

    def step(self, inputs):
        if count["n"] == calls:
            raise _Interrupted
        count["n"] += 1
        return original(self, inputs)

    return step


def test_sft_loss_falls_on_the_tiny_model(tmp_path):
    config = _config(tmp_path, sft_steps=8, save_interval_steps=100)
    session = prepare_colab_session(config)
    before = _lora(session.lora_model)
    state = train_sft(config, session)
    assert state.step == 8 and state.resumed_from is None and len(state.losses) == 8
    assert np.mean(state.losses[-2:]) < np.mean(state.losses[:2]) - 0.1, state.losses
    assert any(not np.array_equal(a, b) for a, b in zip(before, _lora(session.lora_model)))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "sft/loss" in r] == list(range(1, 9))
    assert all("sft/learning_rate" in r and "sft/grad_norm" in r for r in rows)
    assert not any("loss" in r for r in rows)  # GRPO's own loss name stays GRPO's


def test_sft_interrupted_resumes_to_the_same_weights(tmp_path, monkeypatch):
    whole = _config(tmp_path / "whole")
    session = prepare_colab_session(whole)
    train_sft(whole, session)
    expected = _lora(session.lora_model)

    cut = _config(tmp_path / "cut")
    with monkeypatch.context() as patch:
        patch.setattr(train_step._LoraTrainStep, "__call__", _stop_after(2))
        with pytest.raises(_Interrupted):
            train_sft(cut, prepare_colab_session(cut))
    ckpt = checkpointing.sft_checkpoint_dir(cut.checkpoint_dir)
    session = prepare_colab_session(cut)  # a new process: fresh LoRA weights
    state = train_sft(cut, session)
    # Orbax finishes a save in the background: the stop may come before step 2's is done.
    assert state.resumed_from in (1, 2) and state.step == 4
    assert len(state.losses) == 4 - state.resumed_from  # only the steps after it
    for a, b in zip(expected, _lora(session.lora_model)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # What export and eval read: the warm-up's checkpoint, since there are no GRPO steps.
    assert checkpointing.final_checkpoint_dir(cut.checkpoint_dir) == ckpt
    step, arrays = checkpoint_lora_arrays(ckpt)
    assert step == 4 and arrays


def test_finished_warm_up_is_restored_not_retrained(tmp_path, monkeypatch):
    config = _config(tmp_path, sft_steps=2)
    session = prepare_colab_session(config)
    train_sft(config, session)
    trained = _lora(session.lora_model)

    with monkeypatch.context() as patch:
        patch.setattr(train_step._LoraTrainStep, "__call__", _stop_after(0))
        session = prepare_colab_session(config)
        state = train_sft(config, session)  # would raise if it ran a step
    assert state.resumed_from == 2 and state.losses == []
    for a, b in zip(trained, _lora(session.lora_model)):
        np.testing.assert_array_equal(a, b)


def test_pipeline_runs_sft_then_grpo_from_the_warm_up(tmp_path):
    config = _config(tmp_path, sft_steps=2, max_steps=1, final_eval_examples=2)
    session, state, export = run_full_pipeline(config)
    rows = read_metrics(tmp_path)
    assert any("sft/loss" in r for r in rows) and any("loss" in r for r in rows)
    assert state.step == 1 and (export / ADAPTER_FILE).is_file()
    ckpt = checkpointing.final_checkpoint_dir(config.checkpoint_dir)
    assert ckpt == checkpointing.actor_checkpoint_dir(config.checkpoint_dir)


def test_demonstrations_tokenized_as_grpo_rollouts():
    class Tokenizer:
        def encode(self, text):
            return [1] + [ord(c) for c in text]

        def bos_id(self):
            return 1

    demos = [Demonstration("q", "ab", "b"), Demonstration("qq", "abc", "c"),
             Demonstration("long" * 20, "a", "a")]
    data = tokenize_demonstrations(demos, Tokenizer(), lambda q: f"<{q}>", end_id=9,
                                   pad_id=0, max_prompt_length=16, max_completion_length=16)
    assert data.skipped == 1  # the long prompt
    assert data.prompt_ids.shape == (2, 8) and data.completion_ids.shape == (2, 8)
    assert data.prompt_ids[0].tolist() == [0, 0, 0, 0, 1, ord("<"), ord("q"), ord(">")]
    assert data.completion_ids[1, :4].tolist() == [ord("a"), ord("b"), ord("c"), 9]
    assert data.completion_mask.sum(axis=1).tolist() == [3, 4]
    first = sft_batches(data, batch_size=3, steps=3, seed=0)
    again = sft_batches(data, batch_size=3, steps=3, seed=0)
    assert len(first) == 3 and first[0]["prompt_ids"].shape == (3, 8)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, again) for k in a)
    with pytest.raises(ValueError, match="none of the 1 demonstrations fits"):
        tokenize_demonstrations(demos[2:], Tokenizer(), lambda q: q, end_id=9, pad_id=0,
                                max_prompt_length=8, max_completion_length=8)


def test_stage_settings_are_validated():
    with pytest.raises(ValueError, match="max_steps=0 is invalid with sft_steps=0"):
        ColabTrainingConfig(max_steps=0)
    with pytest.raises(ValueError, match="sft_steps=-1 is invalid"):
        ColabTrainingConfig(sft_steps=-1)
    with pytest.raises(ValueError, match="sft_learning_rate"):
        ColabTrainingConfig(sft_learning_rate=0.0)
    with pytest.raises(ValueError, match="sft_data"):
        ColabTrainingConfig(sft_data="nonsense:thing")
    assert ColabTrainingConfig(max_steps=0, sft_steps=3).total_steps == 0
    assert get_preset("default").sft_steps > 0 and get_preset("smoke").sft_steps == 0


def test_held_out_data_is_another_split_or_seed():
    assert held_out_spec("gsm8k") == "gsm8k:test"
    assert held_out_spec("gsm8k:train") == "gsm8k:test"
    assert held_out_spec("reasoning-gym:basic_arithmetic") == "reasoning-gym:basic_arithmetic"
