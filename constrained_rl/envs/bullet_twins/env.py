"""A Bullet-Safety-Gym task with a planar agent as one pure-JAX :class:`~constrained_rl.envs.base.Env`.

``step``: clip the action to [-1, 1] (``Agent.apply_action``), advance the agent one environment step
(``task.timing`` sub-steps), then score the state reached as ``EnvironmentBuilder.step`` does:
reward ``task.reward(before, after, agent.specific_reward)``, cost ``task.cost(after)``, terminated
when the agent is no longer alive; observation ``agent.observe`` followed by ``task.observation``.
The layout is the real task's (:func:`constrained_rl.envs.layout.layout_of` of ``real_id``), so a
policy trained on the twin runs on the real simulator and on nothing else.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from constrained_rl.config import require
from constrained_rl.envs.base import Env, EnvState, initial_state
from constrained_rl.envs.bullet_twins.agent import TwinAgent
from constrained_rl.envs.bullet_twins.tasks import TwinTask
from constrained_rl.envs.layout import Layout, layout_of


class TwinEnv(Env):
    """``agent`` on ``task``, the twin of the Bullet-Safety-Gym id ``real_id``; unbatched, no time limit."""

    def __init__(self, agent: TwinAgent, task: TwinTask, real_id: str, episode_length: int):
        self.agent = agent
        self.task = task
        self.real_id = real_id
        self._episode_length = int(episode_length)
        declared = layout_of(real_id)
        require(declared.observation_size == self.observation_size and declared.action_size == self.action_size,
                real_id, f"the twin observes {self.observation_size} and acts on {self.action_size} dimensions; "
                f"the real task declares {declared.observation_size} and {declared.action_size}")

    @property
    def observation_size(self) -> int:
        return self.agent.observation_size + self.task.observation_size

    @property
    def action_size(self) -> int:
        return self.agent.action_size

    @property
    def episode_length(self) -> int:
        return self._episode_length

    @property
    def dt(self) -> float:
        """Seconds per environment step."""
        return self.task.timing.dt

    @property
    def layout(self) -> Layout:
        return layout_of(self.real_id)

    def observe(self, physics: Any) -> jax.Array:
        """The full observation of an agent state."""
        return jnp.concatenate([self.agent.observe(physics), self.task.observation(self.agent.kinematics(physics))])

    def state_from_physics(self, physics: Any) -> EnvState:
        """An episode start at a given agent state (e.g. one read back from the real simulator)."""
        return initial_state(self.observe(physics), physics)

    def reset(self, key: jax.Array) -> EnvState:
        position, yaw = self.task.start(key, self.agent.init_yaw)
        return self.state_from_physics(self.agent.initial_state(position, yaw, self.task))

    def step(self, state: EnvState, action: jax.Array) -> EnvState:
        chex.assert_shape(action, (self.action_size,))
        action = jnp.clip(action, -1.0, 1.0)
        physics = self.agent.step(state.physics, action, self.task)
        before, after = self.agent.kinematics(state.physics), self.agent.kinematics(physics)
        reward = self.task.reward(before, after, self.agent.specific_reward(physics, action))
        cost = self.task.cost(after, self.agent.velocity_constraint)
        done = 1.0 - self.agent.alive(physics).astype(jnp.float32)
        obs = self.observe(physics)
        return state.replace(obs=obs, next_obs=obs, reward=reward, cost=cost, physics=physics, done=done,
                             truncation=jnp.zeros((), jnp.float32))
