"""The host runner plays a policy with memory (a HistoryPolicy) in the loop of memoryless policies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from constrained_rl import rollouts
from constrained_rl.envs import host
from constrained_rl.envs import layout as layouts

# The fixture registering the toy host task (tests/constrained_rl/envs/toy_host_env.py) for the module.
from tests.constrained_rl.envs.test_host import toy_task  # noqa: F401

pytest.importorskip("gymnasium")


def as_history_policy(policy_fn) -> rollouts.HistoryPolicy:
    """A memoryless policy as a history policy: its memory is the latest observation."""
    return rollouts.HistoryPolicy(
        start=lambda params, obs: obs,
        act=lambda params, obs, key: (policy_fn(params, obs, key)[0], obs),
        remember=lambda params, obs, transition: transition.next_obs)


def noisy(params, obs, key):
    """Elementwise in the observation (no batch-size-dependent arithmetic), batched or not; its noise
    depends on the key, so both paths agree only if they act with the same keys."""
    return jnp.tanh(params + obs[..., :2] + jax.random.normal(key, obs.shape[:-1] + (2,))), {}


NOISY_HISTORY = as_history_policy(noisy)


def test_a_wrapped_memoryless_policy_plays_the_same_episodes_on_the_real_task():
    pytest.importorskip("bullet_safety_gym")
    task = "SafetyBallRun-v0"  # the real task with the shortest episodes (100 steps)
    keys = jax.random.split(jax.random.PRNGKey(5), 2)
    params = jnp.array([[0.5, -0.5], [-1.0, 1.0]])  # two runs: each slot acts with its own run's parameters
    declared = layouts.LAYOUTS[task]
    memoryless = host.evaluate_runs(task, noisy, params, keys, 2, policy_layout=declared, num_workers=2)
    history = host.evaluate_runs(task, NOISY_HISTORY, params, keys, 2, policy_layout=declared, num_workers=2)
    for field in ("reward_return", "cost_return", "length"):
        np.testing.assert_array_equal(getattr(history, field), getattr(memoryless, field))
    assert len(set(memoryless.reward_return.reshape(-1).tolist())) == 4  # distinct runs, starts and noise


# A policy that acts on what it remembers: +1 (x += 2) until it has been charged its run's tolerated cost
# (its parameter), then -0.5 (x -= 1).
def cautious_start(params, obs):
    return {"cost": jnp.zeros(obs.shape[0]), "steps": jnp.zeros(obs.shape[0]), "done": jnp.zeros(obs.shape[0])}


def cautious_act(params, memory, key):
    action = jnp.where(memory["cost"] >= params, -0.5, 1.0)
    return action[:, None], memory


def cautious_remember(params, memory, transition):
    return {"cost": memory["cost"] + transition.cost, "steps": memory["steps"] + 1.0,
            "done": jnp.maximum(memory["done"], transition.done)}


CAUTIOUS = rollouts.HistoryPolicy(cautious_start, cautious_act, cautious_remember)


def cautious_by_hand(x: float, tolerance: float) -> tuple[float, float, int]:
    """The toy (x += 2a; r = x; c = 1[x > 12]; ends at x >= 15 or after 8 steps) under that policy."""
    reward = cost = 0.0
    for t in range(8):
        x += 2 * (-0.5 if cost >= tolerance else 1.0)
        reward, cost = reward + x, cost + float(x > 12)
        if x >= 15:
            return reward, cost, t + 1
    return reward, cost, 8


def test_memory_is_per_slot_and_remembers_each_steps_cost(toy_task):
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    tolerances = jnp.array([1.0, 2.0])  # run 0 turns back at 13 or 14; run 1 goes on and ends at x >= 15
    episodes = host.plan_episodes(keys, 3)
    rewards, costs, lengths, _ = host.play(host.shared_pool(toy_task, 2), CAUTIOUS, tolerances, episodes,
                                           wave_size=4)  # two waves, the second of two padded slots
    starts = [np.random.RandomState(s).randint(10) for s in episodes.seeds]  # what the worker drew
    expected = np.array([cautious_by_hand(float(x), float(tolerances[r])) for x, r in zip(starts, episodes.runs)])
    np.testing.assert_allclose(rewards, expected[:, 0])
    np.testing.assert_array_equal(costs, expected[:, 1])
    np.testing.assert_array_equal(lengths, expected[:, 2])
    assert 0 < expected[:, 1].min() and (expected[:, 2] < 8).any() and (expected[:, 2] == 8).any()
