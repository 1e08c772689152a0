"""The learning-rate schedules and the optimizer, built from plain numbers."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from jaxpost.sft import make_sft_schedule
from jaxpost.train import make_optimizer, make_schedule


def test_schedule_warms_up_to_the_peak_then_decays_to_zero():
    schedule = make_schedule(peak=1e-3, warmup_steps=10, total_steps=100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert 0.0 < float(schedule(55)) < 1e-3
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)


def test_sft_schedule_warms_up_over_a_share_of_its_steps():
    schedule = make_sft_schedule(peak=2e-4, steps=40, warmup_ratio=0.25)
    assert float(schedule(10)) == pytest.approx(2e-4)
    assert float(schedule(5)) == pytest.approx(1e-4)
    assert float(schedule(40)) == pytest.approx(0.0, abs=1e-12)


def _updates(optimizer, grads, steps):
    """The first parameter's update at each of ``steps`` steps with constant ``grads``."""
    state = optimizer.init({"w": jnp.zeros_like(grads)})
    out = []
    for _ in range(steps):
        updates, state = optimizer.update({"w": grads}, state, {"w": jnp.zeros_like(grads)})
        out.append(float(updates["w"][0]))
    return out


def test_optimizer_steps_follow_the_schedule():
    # b1 = b2 = 0 and no weight decay: AdamW's step is -lr(t) * g / (|g| + eps), so a
    # gradient of 1 moves the parameter by -lr(t).
    optimizer = make_optimizer(make_schedule(peak=0.5, warmup_steps=4, total_steps=8),
                               b1=0.0, b2=0.0, weight_decay=0.0, max_grad_norm=None)
    updates = _updates(optimizer, jnp.ones(2), 9)
    assert updates[0] == 0.0
    assert updates[4] == pytest.approx(-0.5)  # warmup's end: the peak
    assert updates[8] == pytest.approx(0.0, abs=1e-7)  # the final step


def test_optimizer_clips_the_global_norm_first():
    clipped = make_optimizer(1.0, b1=0.9, b2=0.99, weight_decay=0.0, max_grad_norm=1.0)
    plain = make_optimizer(1.0, b1=0.9, b2=0.99, weight_decay=0.0, max_grad_norm=None)
    # Adam's first step is the gradient's sign either way; its second differs when the
    # first gradient was clipped (the moments then mix gradients of another scale).
    grads = [jnp.array([30.0, 40.0]), jnp.array([0.3, 0.4])]
    results = []
    for optimizer in (clipped, plain):
        state = optimizer.init({"w": jnp.zeros(2)})
        for g in grads:
            updates, state = optimizer.update({"w": g}, state, {"w": jnp.zeros(2)})
        results.append(float(updates["w"][0]))
    assert results[0] != pytest.approx(results[1])
