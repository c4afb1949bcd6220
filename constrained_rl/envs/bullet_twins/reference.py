"""The real Bullet-Safety-Gym task beside its twin: the same start, the same actions or policy, both recorded.

Host-side (NumPy, PyBullet); imported only where the real simulator is wanted (the fidelity benchmark
and test). Bullet-Safety-Gym draws its starts from NumPy's global generator and ignores
``reset(seed=...)``, so :func:`real_reset` seeds that generator; the twin then starts from the state
read back from PyBullet (:func:`twin_start`), never from a start of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from constrained_rl.envs.bullet_twins.ball import BallState
from constrained_rl.envs.bullet_twins.car import read_car
from constrained_rl.envs.bullet_twins.env import TwinEnv


@dataclasses.dataclass
class Trajectory:
    """One rollout: ``T`` steps after a start; states include the start (``T + 1`` rows)."""

    observation: np.ndarray  # [T + 1, n]
    position: np.ndarray  # [T + 1, 2]
    velocity: np.ndarray  # [T + 1, 2]
    reward: np.ndarray  # [T]
    cost: np.ndarray  # [T]
    action: np.ndarray  # [T, 2] the actions taken (clipped as the simulators clip them)


def real_env(real_id: str) -> Any:
    """The registered Bullet-Safety-Gym environment without its time limit (``EnvironmentBuilder``)."""
    import bullet_safety_gym  # noqa: F401  (registers the ids)
    import gymnasium

    return gymnasium.make(real_id).unwrapped


def real_reset(env: Any, seed: int) -> np.ndarray:
    """A reproducible reset: Bullet-Safety-Gym samples its start from ``np.random``."""
    np.random.seed(seed)
    observation, _ = env.reset()
    return observation


def read_ball(env: Any) -> BallState:
    """The real ball's state (position, velocity, angular velocity) as a twin state."""
    state = env.agent.get_state()  # xyz, xyz_dot, rpy, rpy_dot of the base
    as32 = lambda x: jnp.asarray(x, jnp.float32)
    return BallState(position=as32(state[:2]), velocity=as32(state[3:5]), angular_velocity=as32(state[9:12]),
                     height=as32(state[2]), vertical_velocity=as32(state[5]))


# agent name -> reads the real agent's state as that agent's twin state
READERS: dict[str, Callable[[Any], Any]] = {"ball": read_ball, "car": read_car}


def twin_start(twin: TwinEnv, env: Any):
    """The twin's episode start at the real simulator's current state."""
    return twin.state_from_physics(READERS[twin.agent.name](env))


def real_rollout(env: Any, steps: int, actions: np.ndarray | None = None,
                 policy: Callable[[np.ndarray], np.ndarray] | None = None) -> Trajectory:
    """``steps`` steps of the real task from its current state, under open-loop ``actions`` [T, 2] or a ``policy``."""
    observation = env.get_observation()
    observations, positions, velocities, rewards, costs, taken = [observation], [], [], [], [], []

    def record_state():
        kinematics = env.agent.get_position()[:2], env.agent.get_linear_velocity()[:2]
        positions.append(np.array(kinematics[0])), velocities.append(np.array(kinematics[1]))

    record_state()
    for t in range(steps):
        action = np.asarray(actions[t] if actions is not None else policy(observation), np.float64)
        observation, reward, _, _, info = env.step(action)
        observations.append(observation), rewards.append(reward), costs.append(info.get("cost", 0.0))
        taken.append(np.clip(action, -1.0, 1.0))
        record_state()
    return Trajectory(np.array(observations), np.array(positions), np.array(velocities), np.array(rewards),
                      np.array(costs, np.float64), np.array(taken))


_TWIN_SCANS: dict[tuple, Callable] = {}


def _twin_scan(twin: TwinEnv, policy: Callable | None) -> Callable:
    """``jit(scan(step))`` for this twin and policy, compiled once."""
    key = (id(twin), policy)
    if key not in _TWIN_SCANS:
        def step(state, action_t):
            action = action_t if policy is None else policy(state.obs)
            next_state = twin.step(state, action)
            kinematics = twin.agent.kinematics(next_state.physics)
            return next_state, (next_state.obs, kinematics.position, kinematics.velocity, next_state.reward,
                                next_state.cost, jnp.clip(action, -1.0, 1.0))

        _TWIN_SCANS[key] = (twin, jax.jit(lambda s, a: jax.lax.scan(step, s, a)[1]))  # keeps twin alive: id stays unique
    return _TWIN_SCANS[key][1]


def twin_rollout(twin: TwinEnv, start, steps: int, actions: np.ndarray | None = None,
                 policy: Callable[[jax.Array], jax.Array] | None = None) -> Trajectory:
    """The same on the twin from the ``EnvState`` ``start``: one jitted ``lax.scan`` (compiled once per twin and policy)."""
    xs = jnp.asarray(actions, jnp.float32) if actions is not None else jnp.zeros((steps, twin.action_size))
    obs, position, velocity, reward, cost, taken = _twin_scan(twin, policy)(start, xs)
    kinematics = twin.agent.kinematics(start.physics)
    stack = lambda first, rest: np.concatenate([np.asarray(first)[None], np.asarray(rest)])
    return Trajectory(stack(start.obs, obs), stack(kinematics.position, position), stack(kinematics.velocity, velocity),
                      np.asarray(reward), np.asarray(cost), np.asarray(taken))
