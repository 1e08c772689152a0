"""GRPO really optimises the reward: a tiny model learns a simple preference in a few steps."""

from __future__ import annotations

import dataclasses

import pytest

from jaxpost.colab_pipeline import prepare_colab_session, train_grpo
from jaxpost.config import RL_ALGORITHMS, get_preset
from jaxpost.rewards.registry import REWARDS, register_reward


def starts_with_space(prompts, completions, **kwargs):
    """1.0 when the completion's text starts with a space, else 0.0. Range {0, 1}.

    About a third of Gemma's vocabulary starts with a space, so a random model earns
    some reward from the start and GRPO's group advantages have a signal to follow.
    """
    return [1.0 if c.startswith(" ") else 0.0 for c in completions]


@pytest.fixture
def space_reward():
    register_reward("starts_with_space", starts_with_space)
    yield "starts_with_space"
    del REWARDS["starts_with_space"]  # the registry is global: leave it as found


def test_mean_reward_rises(tmp_path, space_reward):
    config = dataclasses.replace(
        get_preset("smoke"), output_dir=str(tmp_path), reward_functions=(space_reward,),
        max_steps=60, batch_size=4, num_generations=8, max_new_tokens=2, beta=0.0,
        learning_rate=5e-2, warmup_ratio=0.0, max_grad_norm=1.0, save_interval_steps=100,
        max_examples=64, seed=3)
    state = train_grpo(config, prepare_colab_session(config))
    rewards = [h["reward"] for h in state.history]
    assert len(rewards) == 60
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    print("rewards by step:", [round(r, 3) for r in rewards])
    assert last > first + 0.15, rewards  # measured: 0.58 -> 0.98


@pytest.mark.parametrize("algorithm", [a for a in RL_ALGORITHMS if a != "grpo"])
def test_each_algorithm_raises_the_reward(tmp_path, space_reward, algorithm):
    """GRPO's relatives on the same task, with two updates per rollout (mu=2), so that the
    second update's ratios move away from 1 and each algorithm's clipping (DAPO's higher
    one, GSPO's tight sequence-level one) takes part; the group baselines differ for
    Dr. GRPO and RLOO; PPO's advantages come from its critic. Measured, mean reward of
    the first 4 rollouts -> last 4: dapo 0.42 -> 0.73, dr_grpo 0.46 -> 0.77, gspo 0.55 ->
    0.86, rloo 0.49 -> 0.67, ppo 0.38 -> 0.77."""
    config = dataclasses.replace(
        get_preset("smoke"), output_dir=str(tmp_path), reward_functions=(space_reward,),
        algorithm=algorithm, max_steps=30, num_iterations=2, batch_size=4,
        num_generations=8, max_new_tokens=2, learning_rate=5e-2, warmup_ratio=0.0,
        max_grad_norm=1.0, save_interval_steps=100, max_examples=64, seed=3,
        critic_learning_rate=5e-3 if algorithm == "ppo" else None)
    state = train_grpo(config, prepare_colab_session(config))
    rewards = [h["reward"] for h in state.history if "reward" in h]  # one per rollout
    print(algorithm, "rewards by rollout:", [round(r, 3) for r in rewards])
    assert len(rewards) == 15
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.15, rewards
    if algorithm == "ppo":
        # The critic learns the returns: its value loss falls (measured: mean of the
        # first 10 steps 0.138, of the last 10 0.083), though the rewards' variance,
        # which the first value of a completion cannot predict, barely changes.
        losses = [h["critic_loss"] for h in state.history if "critic_loss" in h]
        print("critic loss by step:", [round(x, 4) for x in losses])
        assert len(losses) >= 25
        assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, losses


def test_sft_warm_up_teaches_the_format(tmp_path, embedded):
    """A few warm-up steps on the embedded Gemma 3 270M take its format rate on 8 held-out
    prompts from 0 (it repeats the prompt) to at least 0.75 (measured: 1.0 on 32 after
    these 20 steps; 12 steps left the end of the turn unlearned)."""
    from jaxpost.colab_pipeline import held_out_comparison, train_sft
    from jaxpost.session import prepare_session

    config = dataclasses.replace(
        get_preset("default"), output_dir=str(tmp_path), sft_steps=20,
        sft_learning_rate=2e-3, max_steps=0, save_interval_steps=100)
    session = prepare_session(config, loaded=embedded)
    state = train_sft(config, session)
    assert state.losses[-1] < state.losses[0] / 4, state.losses
    result = held_out_comparison(config, session, num_examples=8)
    assert result.a.metrics["format_rate"] == 0.0
    completions = [e["completions"][0] for e in result.b.examples]
    assert result.b.metrics["format_rate"] >= 0.75, (result.table(), completions)
