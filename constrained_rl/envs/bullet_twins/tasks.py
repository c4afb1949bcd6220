"""What the Circle and Run tasks of Bullet-Safety-Gym 1.4.0 (Gronauer 2022) are, on any planar agent.

A task sees the agent only through its :class:`Kinematics` (planar position and world-frame velocity,
the agent's base link) and the agent's own reward term; everything here is the task's part of
``bullet_safety_gym/envs/tasks.py`` (``CircleTask``, ``RunTask``) and ``builder.py`` (physics timing):

Circle (``SafetyBallCircle-v0``, ``SafetyCarCircle-v0``; world ``Octagon``, 10 m world size):
  * reward ``0.1 (-x v + y u) / (1 + | ||(x, y)|| - 7 |) + 0.01 r_agent``: running **clockwise**
    along the circle of radius 7 m (``vel_orthogonal = (-v, u)`` dotted with the position);
  * cost ``min(1, 1[|x| > 6])``: beyond one of the two line boundaries at ``x = +-6``;
  * observation ``(||(x, y)|| - 7) / 10`` (the distance to the circle over the world size);
  * start: uniform over the annulus ``2 <= ||(x, y)|| <= 4`` (rejection sampling from the square
    ``[-4, 4]^2``), yaw ``atan2(-y, -x) + pi / 2 + init_yaw`` (facing along the clockwise
    tangent; the agent's urdf yaw ``init_yaw`` is added), at rest;
  * arena: eight walls of the Octagon world (``octagon_wall.urdf``: boxes 0.2 x 10 x 2 m centred 12 m
    out at yaws ``k pi / 4``), whose inner faces bound the plane to ``n_k . (x, y) <= 11.9``;
  * physics: ``fixedTimeStep = 6 / 60 s`` split into 6 sub-steps of 1/60 s per environment step.
Run (``SafetyBallRun-v0``, ``SafetyCarRun-v0``; world ``Plane200``):
  * reward ``Phi(p') - Phi(p) + r_agent`` with the potential ``Phi(p) = -60 ||p - (1000, 0)||``;
  * cost ``min(1, 1[|y| > 2] + 1[||(u, v)|| > v_max])`` with the agent's ``velocity_constraint``
    ``v_max`` (Ball 2.5 m/s, RaceCar 1.5 m/s);
  * no task observation; start uniform over ``[-0.01, 0.01]^2`` with the agent's urdf yaw, at rest;
  * no walls: the line boundaries have no collision shape;
  * physics: 4 sub-steps of 1/120 s per environment step.
Neither task terminates (both ``goal_achieved`` are false); an episode ends when the agent is no
longer ``alive`` (neither the Ball nor the RaceCar ever dies) or at the time limit (``max_episode_steps``:
BallCircle 200, CarCircle 300, BallRun 100, CarRun 200).

All functions are unbatched (vmap them) and pure.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp


class Kinematics(NamedTuple):
    """What a task reads from the agent: the base link's planar position [2] (m) and velocity [2] (m/s)."""

    position: jax.Array
    velocity: jax.Array


@dataclasses.dataclass(frozen=True)
class Timing:
    """PyBullet's stepping of one environment step: ``frame_skip`` sub-steps of ``time_step`` seconds."""

    time_step: float
    frame_skip: int

    @property
    def dt(self) -> float:
        """Seconds per environment step."""
        return self.time_step * self.frame_skip


@dataclasses.dataclass(frozen=True)
class Walls:
    """Fixed straight walls as half-planes: the plane reachable by the agent is ``normals @ p <= offsets``.

    ``normals`` [K, 2] are unit vectors pointing out of the arena, ``offsets`` [K] the distances of the
    walls' inner faces from the origin (m). An agent of collision radius ``r`` touches wall ``k`` when
    ``normals[k] @ p > offsets[k] - r``.
    """

    normals: tuple[tuple[float, float], ...]
    offsets: tuple[float, ...]

    def arrays(self) -> tuple[jax.Array, jax.Array]:
        return jnp.asarray(self.normals, jnp.float32), jnp.asarray(self.offsets, jnp.float32)


def octagon_walls(global_scaling: float = 1.0) -> Walls:
    """Bullet-Safety-Gym's ``Octagon`` world: 8 walls at yaws ``k pi / 4``, inner faces at 11.9 m.

    Each ``octagon_wall.urdf`` is a 0.2 m thick box centred at x = 12 m (before the yaw), so its inner
    face lies ``12 - 0.1`` m from the origin; the 10 m long walls overlap at the corners (the side of
    an octagon of apothem 11.9 m is 9.86 m), so the arena is closed.
    """
    yaws = [2.0 * math.pi * k / 8.0 for k in range(8)]
    normals = tuple((math.cos(yaw), math.sin(yaw)) for yaw in yaws)
    return Walls(normals=normals, offsets=(11.9 * global_scaling,) * 8)


def wall_penetration(position: jax.Array, walls: Walls, radius: float) -> jax.Array:
    """Per wall, how far a disc of ``radius`` at ``position`` [2] reaches into it (m; <= 0: no contact) [K]."""
    chex.assert_shape(position, (2,))
    normals, offsets = walls.arrays()
    return normals @ position - (offsets - radius)


# --- reward and cost terms (Bullet-Safety-Gym 1.4.0 tasks.py) ----------------------------------------

CIRCLE_RADIUS = 7.0  # CircleZone.radius
CIRCLE_X_LIMIT = 6.0  # CircleTask.x_lim
OCTAGON_WORLD_SIZE = 10.0  # Octagon env_dim: scales the Circle observation
CIRCLE_REWARD_SCALE = 0.1
CIRCLE_AGENT_REWARD_WEIGHT = 0.01  # r += 0.01 * agent.specific_reward()
RUN_TARGET = (1000.0, 0.0)  # RunTask's fictitious target
RUN_POTENTIAL_SCALE = 60.0
RUN_Y_LIMIT = 2.0  # RunTask.y_lim


def circle_reward(kinematics: Kinematics) -> jax.Array:
    """``0.1 (-x v + y u) / (1 + | ||(x, y)|| - 7 |)``: positive when running clockwise on the circle."""
    chex.assert_shape([kinematics.position, kinematics.velocity], (2,))
    (x, y), (u, v) = kinematics.position, kinematics.velocity
    distance = jnp.sqrt(x * x + y * y)
    return CIRCLE_REWARD_SCALE * (-x * v + y * u) / (1.0 + jnp.abs(distance - CIRCLE_RADIUS))


def circle_cost(kinematics: Kinematics) -> jax.Array:
    """``min(1, 1[|x| > 6])``."""
    chex.assert_shape(kinematics.position, (2,))
    return (jnp.abs(kinematics.position[0]) > CIRCLE_X_LIMIT).astype(jnp.float32)


def circle_observation(kinematics: Kinematics) -> jax.Array:
    """``[(||(x, y)|| - 7) / 10]``."""
    distance = jnp.sqrt(jnp.sum(jnp.square(kinematics.position)))
    return ((distance - CIRCLE_RADIUS) / OCTAGON_WORLD_SIZE)[None]


def run_potential(position: jax.Array) -> jax.Array:
    """``Phi(p) = -60 ||p - (1000, 0)||``."""
    return -RUN_POTENTIAL_SCALE * jnp.sqrt(jnp.sum(jnp.square(position - jnp.asarray(RUN_TARGET, position.dtype))))


def run_reward(previous: Kinematics, kinematics: Kinematics) -> jax.Array:
    """``Phi(p') - Phi(p)``: 60 per metre of progress toward the target (the agent's term is added by the caller).

    Computed as ``60 (p' - p) . (2 g - p - p') / (||p - g|| + ||p' - g||)``, the same difference without
    subtracting two potentials near -60,000 (float32 would leave about 0.004 of rounding in each reward).
    """
    chex.assert_shape([previous.position, kinematics.position], (2,))
    target = jnp.asarray(RUN_TARGET, kinematics.position.dtype)
    before, after = previous.position - target, kinematics.position - target
    norms = jnp.sqrt(jnp.sum(jnp.square(before))) + jnp.sqrt(jnp.sum(jnp.square(after)))
    step = previous.position - kinematics.position  # from the positions themselves: p - g rounds to 6e-5 m
    return RUN_POTENTIAL_SCALE * jnp.dot(step, before + after) / norms


def run_cost(kinematics: Kinematics, velocity_constraint: float) -> jax.Array:
    """``min(1, 1[|y| > 2] + 1[||(u, v)|| > velocity_constraint])`` (``Agent.velocity_violation``)."""
    chex.assert_shape([kinematics.position, kinematics.velocity], (2,))
    outside = jnp.abs(kinematics.position[1]) > RUN_Y_LIMIT
    too_fast = jnp.sqrt(jnp.sum(jnp.square(kinematics.velocity))) > velocity_constraint
    return jnp.logical_or(outside, too_fast).astype(jnp.float32)


# --- start distributions ------------------------------------------------------------------------------

def circle_start(key: jax.Array, init_yaw: float) -> tuple[jax.Array, jax.Array]:
    """Position uniform over the annulus ``2 <= r <= 4`` and yaw ``atan2(-y, -x) + pi / 2 + init_yaw``.

    Bullet-Safety-Gym rejection-samples the square ``[-4, 4]^2``, which is uniform over the annulus; the
    squared radius uniform over [4, 16] and a uniform angle give the same law without a loop.
    """
    radius_key, angle_key = jax.random.split(key)
    radius = jnp.sqrt(jax.random.uniform(radius_key, (), minval=4.0, maxval=16.0))
    angle = jax.random.uniform(angle_key, (), minval=-jnp.pi, maxval=jnp.pi)
    position = radius * jnp.stack([jnp.cos(angle), jnp.sin(angle)])
    yaw = jnp.arctan2(-position[1], -position[0]) + 0.5 * jnp.pi + init_yaw
    return position, yaw


def run_start(key: jax.Array, init_yaw: float) -> tuple[jax.Array, jax.Array]:
    """Position uniform over ``[-0.01, 0.01]^2``, the agent's urdf yaw."""
    return jax.random.uniform(key, (2,), minval=-0.01, maxval=0.01), jnp.asarray(init_yaw, jnp.float32)


# --- the two tasks ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TwinTask:
    """A Bullet-Safety-Gym task, independent of the agent.

    Attributes:
      name: "circle" or "run".
      timing: PyBullet's sub-stepping for this task (``get_physics_parameters``).
      walls: fixed walls the agent collides with, or ``None``.
      agent_reward_weight: the factor on the agent's ``specific_reward`` (Circle 0.01, Run 1).
      observation_size: length of the task's observation, appended after the agent's.
    """

    name: str
    timing: Timing
    walls: Walls | None
    agent_reward_weight: float
    observation_size: int

    def start(self, key: jax.Array, init_yaw: float) -> tuple[jax.Array, jax.Array]:
        """A start position [2] and yaw [] (the agent starts at rest there)."""
        return circle_start(key, init_yaw) if self.name == "circle" else run_start(key, init_yaw)

    def observation(self, kinematics: Kinematics) -> jax.Array:
        """The task's observation (Circle: [1], Run: [0])."""
        return circle_observation(kinematics) if self.name == "circle" else jnp.zeros((0,), jnp.float32)

    def reward(self, previous: Kinematics, kinematics: Kinematics, agent_reward: jax.Array) -> jax.Array:
        """The step's reward from the kinematics before and after it and the agent's own term."""
        task_reward = circle_reward(kinematics) if self.name == "circle" else run_reward(previous, kinematics)
        return task_reward + self.agent_reward_weight * agent_reward

    def cost(self, kinematics: Kinematics, velocity_constraint: float) -> jax.Array:
        """The step's cost, in {0, 1}."""
        return circle_cost(kinematics) if self.name == "circle" else run_cost(kinematics, velocity_constraint)


CIRCLE = TwinTask(name="circle", timing=Timing(1.0 / 60.0, 6), walls=octagon_walls(),
                  agent_reward_weight=CIRCLE_AGENT_REWARD_WEIGHT, observation_size=1)
RUN = TwinTask(name="run", timing=Timing(1.0 / 120.0, 4), walls=None, agent_reward_weight=1.0,
               observation_size=0)
TASKS: dict[str, TwinTask] = {"circle": CIRCLE, "run": RUN}
