"""PPO: its settings, its critic, fractional rewards, and resuming policy and critic together."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpost.colab_pipeline import prepare_colab_session, train_grpo
from jaxpost.config import PPO_DEFAULTS, ColabTrainingConfig, get_preset
from jaxpost.rewards.registry import REWARDS, register_reward
from jaxpost.rundir import RunDir


def a_quarter(prompts, completions, **kwargs):
    """0.25 for every completion. Range {0.25}."""
    return [0.25] * len(completions)


@pytest.fixture
def quarter_reward():
    register_reward("a_quarter", a_quarter)
    yield "a_quarter"
    del REWARDS["a_quarter"]  # the registry is global: leave it as found


def test_ppo_settings_default_and_are_refused_elsewhere():
    config = ColabTrainingConfig(algorithm="ppo", learning_rate=1e-4)
    assert config.ppo_settings() == {"critic_learning_rate": 1e-4, "gamma": 1.0,
                                     "gae_lambda": 0.95, "value_clip": 0.2}
    set_ = ColabTrainingConfig(algorithm="ppo", critic_learning_rate=1e-3, gae_lambda=1.0)
    assert set_.ppo_settings()["critic_learning_rate"] == 1e-3
    assert set_.ppo_settings()["gae_lambda"] == 1.0
    for algorithm in ("grpo", "dapo", "dpo"):
        for name in PPO_DEFAULTS:
            with pytest.raises(ValueError, match=f"{name}=.*does not apply to algorithm="
                                                 f"'{algorithm}'.*algorithm='ppo'"):
                ColabTrainingConfig(algorithm=algorithm, **{name: 0.5})
    with pytest.raises(ValueError, match="gae_lambda"):
        ColabTrainingConfig(algorithm="ppo", gae_lambda=1.5)
    with pytest.raises(ValueError, match="gamma"):
        ColabTrainingConfig(algorithm="ppo", gamma=0.0)
    with pytest.raises(ValueError, match="critic_learning_rate"):
        ColabTrainingConfig(algorithm="ppo", critic_learning_rate=-1.0)


def test_value_model_shares_the_base_weights_and_starts_at_zero():
    from jaxpost.models.critic import build_value_model
    from jaxpost.models.loading import load_model

    loaded = load_model("random:gemma3-tiny", seed=0)
    critic = build_value_model(loaded.model, loaded.mesh, rank=4, alpha=8.0,
                               target_modules=".*(q_einsum|up_proj)", seed=1)
    base = jax.tree.leaves(nnx.state(loaded.model, nnx.Param))
    frozen = jax.tree.leaves(nnx.state(critic, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    assert len(base) == len(frozen)
    assert all(a is b for a, b in zip(base, frozen))  # the same buffers: no copy
    trainable = nnx.state(critic, nnx.LoRAParam)
    assert "value_head" in trainable and len(jax.tree.leaves(trainable)) > 2
    tokens = jnp.asarray(np.arange(1, 13, dtype=np.int32).reshape(2, 6))
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    mask = jnp.tril(jnp.ones((6, 6), bool))[None].repeat(2, 0)
    values = critic(tokens, positions, None, mask)
    assert values.shape == (2, 6, 1) and values.dtype == jnp.float32
    assert float(jnp.abs(values).max()) == 0.0
    nnx.update(critic, jax.tree.map(lambda x: x + 0.1, trainable))
    moved = critic(tokens, positions, None, mask)
    assert float(jnp.abs(moved).max()) > 0  # the head and adapters take part


def test_ppo_keeps_fractional_rewards_and_resumes_with_its_critic(tmp_path, quarter_reward):
    """A constant reward of 0.25 without KL: the per-token rewards sum to 0.25 (Tunix
    0.1.7 alone truncates them to 0). Resuming restores the critic with the policy: its
    first prediction after the resume is no longer the fresh head's 0."""
    config = dataclasses.replace(
        get_preset("smoke"), output_dir=str(tmp_path), algorithm="ppo",
        reward_functions=(quarter_reward,), beta=0.0, max_steps=2, warmup_ratio=0.0,
        learning_rate=1e-2, save_interval_steps=1)
    state = train_grpo(config, prepare_colab_session(config))
    rows = {h["step"]: h for h in state.history}
    assert [rows[s]["rewards/reward/mean"] for s in (1, 2)] == [0.25, 0.25]
    assert rows[1]["value_mean"] == 0.0  # the head starts at zero
    assert all("critic_loss" in rows[s] for s in (1, 2))  # the last step's too

    run = RunDir(tmp_path)
    assert [p.name for p in sorted(run.critic_checkpoint_dir.iterdir())] == ["1", "2"]
    longer = dataclasses.replace(config, max_steps=3)
    resumed = train_grpo(longer, prepare_colab_session(longer))
    assert resumed.resumed_from == 2
    rows = {h["step"]: h for h in resumed.history}
    assert rows[3]["value_mean"] != 0.0  # predicted by the restored critic
    assert "3" in [p.name for p in run.critic_checkpoint_dir.iterdir()]


def test_critic_never_resumes_ahead_of_the_policy_nor_without_one(tmp_path, quarter_reward):
    from jaxpost.train import _align_critic_checkpoints

    config = dataclasses.replace(
        get_preset("smoke"), output_dir=str(tmp_path), algorithm="ppo",
        reward_functions=(quarter_reward,), max_steps=2, save_interval_steps=1)
    train_grpo(config, prepare_colab_session(config))
    run = RunDir(tmp_path)
    shutil.rmtree(run.grpo_checkpoint_dir / "2")  # the policy's last step is gone
    _align_critic_checkpoints(run, 1)
    assert [p.name for p in run.critic_checkpoint_dir.iterdir()] == ["1"]
    assert any(p.name.startswith("critic-2-") for p in run.unreadable_dir.iterdir())

    shutil.rmtree(run.critic_checkpoint_dir)  # as if trained by GRPO
    with pytest.raises(ValueError, match="another algorithm than PPO.*own output_dir"):
        train_grpo(config, prepare_colab_session(config))
