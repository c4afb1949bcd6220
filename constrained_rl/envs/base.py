"""The one functional environment interface: ``reset(key) -> state``, ``step(state, action) -> state``.

A constrained MDP (Altman 1999) adds a cost signal to the usual reward. Every environment of the
project, pure JAX or Brax, exposes the same two pure functions over an :class:`EnvState`, in the
functional style of Brax's ``Env`` (Freeman et al. 2021): no hidden state, so they jit, vmap and scan.

Conventions shared by all environments:
  * actions are continuous in [-1, 1]^action_size (environments clip);
  * ``done`` = terminated or truncated; ``truncation`` = 1 only when the episode ended by the time
    limit alone (then the value of ``next_obs`` must be bootstrapped, Pardo et al. 2018);
  * ``next_obs`` is the observation reached by the step, before any automatic reset: it equals
    ``obs`` except on steps where an episode ended under :class:`~constrained_rl.envs.wrappers.AutoReset`,
    where ``obs`` is already the first observation of the next episode.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from constrained_rl.envs.layout import Layout, unnamed_layout


@struct.dataclass
class EnvState:
    """State of one environment (or a batch, with a leading batch axis on every leaf).

    Attributes:
      obs: observation the agent acts on next, shape [observation_size].
      reward: reward of the step that produced this state (0 after reset).
      cost: constraint cost of that step (0 after reset).
      done: 1.0 if the episode ended at this step (terminated or truncated).
      truncation: 1.0 if it ended by the time limit only (not a terminal state).
      next_obs: true observation reached by the step, kept when ``obs`` is replaced by a reset.
      metrics: per-episode accumulators and task diagnostics, all float arrays.
      info: bookkeeping of wrappers (step counter, reset key).
      physics: environment-specific simulator state (a pytree).
    """

    obs: jax.Array
    reward: jax.Array
    cost: jax.Array
    done: jax.Array
    truncation: jax.Array
    next_obs: jax.Array
    metrics: dict[str, jax.Array] = struct.field(default_factory=dict)
    info: dict[str, Any] = struct.field(default_factory=dict)
    physics: Any = None


def initial_state(obs: jax.Array, physics: Any, metrics: dict[str, jax.Array] | None = None) -> EnvState:
    """An :class:`EnvState` right after a reset: zero reward, cost and flags."""
    zero = jnp.zeros((), jnp.float32)
    return EnvState(
        obs=obs,
        reward=zero,
        cost=zero,
        done=zero,
        truncation=zero,
        next_obs=obs,
        metrics=dict(metrics or {}),
        info={},
        physics=physics,
    )


class Env(abc.ABC):
    """A constrained environment as a pair of pure functions (unbatched unless wrapped)."""

    @abc.abstractmethod
    def reset(self, key: jax.Array) -> EnvState:
        """Samples an initial state."""

    @abc.abstractmethod
    def step(self, state: EnvState, action: jax.Array) -> EnvState:
        """Advances one step; ``action`` in [-1, 1]^action_size."""

    @property
    @abc.abstractmethod
    def observation_size(self) -> int:
        """Length of the observation vector."""

    @property
    @abc.abstractmethod
    def action_size(self) -> int:
        """Length of the action vector."""

    @property
    @abc.abstractmethod
    def episode_length(self) -> int:
        """Time limit of an episode, in steps."""

    @property
    def batch_size(self) -> int | None:
        """Number of environments stepped together; ``None`` for an unbatched environment."""
        return None

    @property
    def layout(self) -> Layout:
        """What each observation and action dimension means (:mod:`constrained_rl.envs.layout`).

        The default names no dimension; a task overrides it (a JAX twin declares the real task's).
        """
        return unnamed_layout(type(self).__name__, self.observation_size, self.action_size)

    @property
    def unwrapped(self) -> Env:
        return self


class Wrapper(Env):
    """Delegates everything to ``env``; subclasses override what they change."""

    def __init__(self, env: Env):
        self.env = env

    def reset(self, key: jax.Array) -> EnvState:
        return self.env.reset(key)

    def step(self, state: EnvState, action: jax.Array) -> EnvState:
        return self.env.step(state, action)

    @property
    def observation_size(self) -> int:
        return self.env.observation_size

    @property
    def action_size(self) -> int:
        return self.env.action_size

    @property
    def episode_length(self) -> int:
        return self.env.episode_length

    @property
    def batch_size(self) -> int | None:
        return self.env.batch_size

    @property
    def layout(self) -> Layout:
        return self.env.layout

    @property
    def unwrapped(self) -> Env:
        return self.env.unwrapped

    def __getattr__(self, name: str) -> Any:
        # Task constants (limits, radii) of the wrapped environment stay reachable.
        if name == "env":
            raise AttributeError(name)
        return getattr(self.env, name)
