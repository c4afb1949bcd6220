from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from constrained_rl.config import ConfigError
from constrained_rl.envs.gym_adapter import GymAdapter, evaluate_host_episodes


class Box:
    def __init__(self, low, high):
        self.low, self.high = np.asarray(low, np.float32), np.asarray(high, np.float32)
        self.shape = self.low.shape


class WalkToWall:
    """Gymnasium-API toy: x += action; reward = action; cost 1 past x > 2; terminates at x >= 3,
    truncates after 10 steps. Records the actions it received."""

    def __init__(self, low=-2.0, high=2.0):
        self.action_space = Box([low], [high])
        self.observation_space = Box([-np.inf, -np.inf], [np.inf, np.inf])
        self.received = []

    def reset(self, seed=None, options=None):
        self.x, self.t = 0.0, 0
        return np.array([self.x, float(seed or 0)]), {}

    def step(self, action):
        self.received.append(float(action[0]))
        self.x += float(action[0])
        self.t += 1
        info = {"cost": float(self.x > 2.0)}
        return np.array([self.x, 0.0]), float(action[0]), self.x >= 3.0, self.t >= 10, info


def policy(params, obs, key):
    return jnp.full((1,), params), {}


def test_actions_rescaled_to_box():
    env = WalkToWall(low=-2.0, high=2.0)
    adapter = GymAdapter(env)
    adapter.reset(seed=0)
    for unit in (-1.0, 0.0, 0.5, 3.0):
        adapter.step(np.array([unit]))
    np.testing.assert_allclose(env.received, [-2.0, 0.0, 1.0, 2.0])


def test_episode_returns_by_hand():
    # Unit action 0.5 -> x += 1 per step: x = 1, 2, 3 -> terminates after 3 steps; cost only at x = 3.
    adapter = GymAdapter(WalkToWall())
    stats = evaluate_host_episodes(adapter, policy, jnp.array(0.5), jax.random.PRNGKey(0), num_episodes=2)
    np.testing.assert_allclose(stats.reward_return, [3.0, 3.0])
    np.testing.assert_allclose(stats.cost_return, [1.0, 1.0])
    np.testing.assert_allclose(stats.length, [3, 3])
    # Standing still: truncated by the environment's own limit after 10 steps, no cost.
    stats = evaluate_host_episodes(adapter, policy, jnp.array(0.0), jax.random.PRNGKey(0), num_episodes=1)
    np.testing.assert_allclose([stats.reward_return[0], stats.cost_return[0], stats.length[0]], [0.0, 0.0, 10])
    stats = evaluate_host_episodes(adapter, policy, jnp.array(0.0), jax.random.PRNGKey(0), 1, max_steps=4)
    assert stats.length[0] == 4


def test_missing_cost_and_unbounded_space():
    env = WalkToWall()
    adapter = GymAdapter(env, cost_key="violation")
    adapter.reset()
    with pytest.raises(KeyError, match="violation"):
        adapter.step(np.zeros(1))
    with pytest.raises(ConfigError, match="action_space"):
        GymAdapter(WalkToWall(low=-np.inf, high=np.inf))


def test_bullet_safety_gym(capsys):
    gym = pytest.importorskip("gymnasium")
    # Bullet-Safety-Gym binds sys.stdout at import to silence PyBullet; it needs the real stream.
    with capsys.disabled():
        pytest.importorskip("bullet_safety_gym")
        adapter = GymAdapter(gym.make("SafetyBallCircle-v0"))
    assert adapter.observation_size == 8 and adapter.action_size == 2
    stats = evaluate_host_episodes(adapter, policy, jnp.array(1.0), jax.random.PRNGKey(0), num_episodes=1)
    assert stats.length[0] == 200  # the registered time limit
    assert 0.0 <= stats.cost_return[0] <= 200.0 and np.isfinite(stats.reward_return[0])


def test_seeded_bullet_episodes_are_reproducible(capsys):
    gym = pytest.importorskip("gymnasium")
    with capsys.disabled():
        pytest.importorskip("bullet_safety_gym")
        adapter = GymAdapter(gym.make("SafetyBallRun-v0"))
    # Bullet-Safety-Gym ignores reset(seed=...): the adapter seeds the global generators it draws from.
    starts = [adapter.reset(seed=seed)[:2] for seed in (5, 6, 5)]
    np.testing.assert_array_equal(starts[0], starts[2])
    assert not np.array_equal(starts[0], starts[1])
