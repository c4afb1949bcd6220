"""The one learning-rate schedule: linear warmup, then cosine decay to 0 or a constant step size."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from constrained_rl import schedules
from constrained_rl.schedules import learning_rate_schedule


def test_warmup_then_cosine_by_hand() -> None:
    # peak 2, 10 updates, 20% warmup: 0, 1 on the ramp, then 1 + cos(pi * (t - 2) / 8) down to 0 at t = 10.
    schedule = learning_rate_schedule(2.0, 10, 0.2)
    expected = [0.0, 1.0] + [1.0 + math.cos(math.pi * (t - 2) / 8) for t in range(2, 11)] + [0.0, 0.0]
    np.testing.assert_allclose([float(schedule(t)) for t in range(13)], expected, rtol=1e-6, atol=1e-7)


def test_warmup_then_constant_by_hand() -> None:
    schedule = learning_rate_schedule(2.0, 10, 0.2, "constant")
    np.testing.assert_array_equal([float(schedule(t)) for t in (0, 1, 2, 5, 10, 1000)], [0, 1, 2, 2, 2, 2])
    no_warmup = learning_rate_schedule(2.0, 10, 0.0, "constant")
    np.testing.assert_array_equal([float(no_warmup(t)) for t in (0, 1, 10)], [2, 2, 2])
    with pytest.raises(ValueError, match="decay"):
        learning_rate_schedule(2.0, 10, 0.2, "linear")


def _former_llm_schedule(peak, total_steps, warmup_ratio):  # algorithms/llm/common.py before the merge
    warmup = int(warmup_ratio * total_steps)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), 0.0)


def _former_ppo_schedule(peak, kind, total_updates, warmup_ratio):  # algorithms/llm/rlhf_ppo.py before the merge
    warmup = int(warmup_ratio * total_updates)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 0), max(total_updates, warmup + 1))
    return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
                                [max(warmup, 1)]) if warmup > 0 else optax.constant_schedule(peak)


@pytest.mark.parametrize("peak", [1.0, 2e-5])
@pytest.mark.parametrize("total", [1, 7, 100])
@pytest.mark.parametrize("ratio", [0.0, 0.03, 0.5])
def test_bit_identical_to_the_two_schedules_it_replaces(peak, total, ratio) -> None:
    steps = jnp.arange(total + 3)
    merged_cosine = np.asarray(learning_rate_schedule(peak, total, ratio)(steps))
    np.testing.assert_array_equal(merged_cosine, np.asarray(_former_llm_schedule(peak, total, ratio)(steps)))
    np.testing.assert_array_equal(merged_cosine, np.asarray(_former_ppo_schedule(peak, "cosine", total, ratio)(steps)))
    np.testing.assert_array_equal(np.asarray(learning_rate_schedule(peak, total, ratio, "constant")(steps)),
                                  np.asarray(_former_ppo_schedule(peak, "constant", total, ratio)(steps)))


def test_both_llm_optimisers_use_it(monkeypatch) -> None:
    from algorithms.llm import common, rlhf_ppo

    assert common.learning_rate_schedule is schedules.learning_rate_schedule
    calls = []

    def recording(*args):
        calls.append(args)
        return learning_rate_schedule(*args)

    monkeypatch.setattr(rlhf_ppo, "learning_rate_schedule", recording)
    config = rlhf_ppo.PPOConfig(actor_learning_rate=1e-5, critic_learning_rate=5e-6, warmup_ratio=0.1,
                                actor_lr_schedule="cosine", ppo_epochs=2, num_minibatches=3)
    rlhf_ppo.make_optimizers(config, num_steps=5)
    assert calls == [(1e-5, 30, 0.1, "cosine"), (5e-6, 30, 0.1, "constant")]
