"""The agent half of a Bullet-Safety-Gym twin: what a planar agent must give a task.

An agent is the simulator-specific half (``bullet_safety_gym/envs/agents.py``): its dynamics under the
task's physics timing and walls, its own observation and its own reward term. A task
(:mod:`~constrained_rl.envs.bullet_twins.tasks`) reads only the agent's :class:`Kinematics`, so any
agent that implements :class:`TwinAgent` runs on Circle and Run (:class:`~constrained_rl.envs.bullet_twins.env.TwinEnv`).

To plug an agent in: subclass :class:`TwinAgent`, implement its six methods over a pytree state of
your own, and add it to ``AGENTS`` and its tasks to ``TWINS`` in ``bullet_twins/__init__.py``.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp

from constrained_rl.envs.bullet_twins.tasks import Kinematics, TwinTask


class TwinAgent(abc.ABC):
    """A planar agent of Bullet-Safety-Gym in pure JAX (unbatched, pure methods over a pytree state).

    Class attributes a subclass sets:
      name: the agent's key in ``AGENTS`` ("ball", "car").
      init_yaw: the yaw the agent's urdf is spawned with (Ball 0, RaceCar pi); tasks add it to their start yaw.
      velocity_constraint: ``Agent.velocity_constraint`` in m/s (Run's speed limit: Ball 2.5, RaceCar 1.5).
      observation_size: length of ``agent_specific_observation``.
      action_size: length of the action (the Box [-1, 1]^action_size).
    """

    name: str
    init_yaw: float = 0.0
    velocity_constraint: float
    observation_size: int
    action_size: int = 2

    @abc.abstractmethod
    def initial_state(self, position: jax.Array, yaw: jax.Array, task: TwinTask) -> Any:
        """The agent at rest at ``position`` [2] with ``yaw`` [] (after the task's reset)."""

    @abc.abstractmethod
    def step(self, state: Any, action: jax.Array, task: TwinTask) -> Any:
        """One environment step under the clipped ``action``: ``task.timing`` sub-steps, colliding with ``task.walls``."""

    @abc.abstractmethod
    def kinematics(self, state: Any) -> Kinematics:
        """Planar position and world-frame velocity of the base link, as the task reads them."""

    @abc.abstractmethod
    def observe(self, state: Any) -> jax.Array:
        """``agent_specific_observation``, dimension by dimension as Bullet-Safety-Gym's."""

    def specific_reward(self, state: Any, action: jax.Array) -> jax.Array:
        """The agent's own reward term (``specific_reward``) for the clipped ``action``; 0 by default."""
        del state, action
        return jnp.zeros((), jnp.float32)

    def alive(self, state: Any) -> jax.Array:
        """``Agent.alive``: False ends the episode (terminated). The Ball and RaceCar never die."""
        del state
        return jnp.ones((), jnp.bool_)
