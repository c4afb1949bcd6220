"""Host adapter for Gymnasium-API environments that report their cost in ``info['cost']``.

Safety-Gymnasium (Ji et al. 2023) and Bullet-Safety-Gym (Gronauer 2022) step on the host, one
environment at a time. :class:`GymAdapter` presents such an environment with the project's
conventions (actions in [-1, 1], a scalar cost, separate termination and truncation), and
:func:`evaluate_host_episodes` plays episodes with a jitted policy and returns the same
:class:`~constrained_rl.rollouts.EpisodeStats` as the on-device ``evaluate_episodes``.

The adapter relies on the Gymnasium API only by duck typing (``reset(seed=...) -> (obs, info)``,
``step(action) -> (obs, reward, terminated, truncated, info)``, ``action_space.low/high``), so
Gymnasium itself is not a dependency of the library. It steps one environment in this process; the
real tasks are evaluated in parallel worker processes by :mod:`constrained_rl.envs.host`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from constrained_rl.config import require
from constrained_rl.envs import host_worker
from constrained_rl.rollouts import EpisodeStats, PolicyFn


class HostStep(NamedTuple):
    """One host step; ``obs`` is the observation reached (the episode's final one when it ended)."""

    obs: np.ndarray
    reward: float
    cost: float
    terminated: bool
    truncated: bool
    info: dict[str, Any]


class GymAdapter:
    """Wraps a Gymnasium environment: rescales actions from [-1, 1] to its Box and reads the cost.

    Args:
      env: a Gymnasium-API environment with a bounded continuous (Box) action space.
      cost_key: the ``info`` entry that holds the step's cost (``'cost'`` in Safety-Gymnasium and
        Bullet-Safety-Gym). A step whose info lacks it raises a ``KeyError`` naming the key, rather
        than silently counting zero cost.
    """

    def __init__(self, env: Any, cost_key: str = "cost"):
        space = env.action_space
        low = np.asarray(getattr(space, "low", np.nan), np.float64)
        high = np.asarray(getattr(space, "high", np.nan), np.float64)
        require(low.ndim == 1 and np.all(np.isfinite(low)) and np.all(np.isfinite(high)),
                "env.action_space", "must be a bounded one-dimensional Box")
        self.env = env
        self.cost_key = cost_key
        self._low, self._high = low, high
        self.action_size = int(low.shape[0])
        self.observation_size = int(np.prod(env.observation_space.shape))

    def scale_action(self, action: np.ndarray) -> np.ndarray:
        """Maps [-1, 1] affinely onto [low, high] (after clipping)."""
        unit = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        return self._low + 0.5 * (unit + 1.0) * (self._high - self._low)

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Starts an episode; a ``seed`` also seeds Python's and NumPy's global generators first, which
        Bullet-Safety-Gym draws its start states from (it ignores ``reset(seed=...)``)."""
        if seed is None:
            obs, _ = self.env.reset()
            return np.asarray(obs, np.float32).reshape(-1)
        return host_worker.seed_everything(self.env, seed)

    def step(self, action: np.ndarray) -> HostStep:
        obs, reward, terminated, truncated, info = self.env.step(self.scale_action(action))
        if self.cost_key not in info:
            raise KeyError(f"info[{self.cost_key!r}] missing: the environment does not report a cost under that key")
        return HostStep(np.asarray(obs, np.float32).reshape(-1), float(reward), float(info[self.cost_key]),
                        bool(terminated), bool(truncated), info)


def evaluate_host_episodes(adapter: GymAdapter, policy_fn: PolicyFn, policy_params: Any, key: jax.Array,
                           num_episodes: int, max_steps: int | None = None) -> EpisodeStats:
    """Plays ``num_episodes`` episodes on the host with a jitted ``policy_fn`` (unbatched obs in, action out).

    Episode ``i`` is reset with seed ``i`` so runs are reproducible; an episode ends when the
    environment terminates or truncates, or after ``max_steps`` steps if given.
    """
    require(num_episodes > 0, "num_episodes", f"must be positive, got {num_episodes}")
    act = jax.jit(lambda params, obs, key: policy_fn(params, obs, key)[0])
    returns, costs, lengths = np.zeros(num_episodes), np.zeros(num_episodes), np.zeros(num_episodes)
    for episode in range(num_episodes):
        obs = adapter.reset(seed=episode)
        key, episode_key = jax.random.split(key)
        done = False
        while not done:
            episode_key, step_key = jax.random.split(episode_key)
            step = adapter.step(np.asarray(act(policy_params, obs, step_key)))
            returns[episode] += step.reward
            costs[episode] += step.cost
            lengths[episode] += 1
            obs = step.obs
            done = step.terminated or step.truncated or (max_steps is not None and lengths[episode] >= max_steps)
    return EpisodeStats(reward_return=returns, cost_return=costs, length=lengths)
