"""Pure-JAX navigation tasks after Bullet-Safety-Gym (Gronauer 2022), as used by DSRL and SATAC.

Two agents on the (x, y)-plane:
  * Ball: a point mass pushed by a world-frame force ``max_force * action`` with linear damping;
    the force is constant over a step, so the step is integrated exactly.
  * Car: a differential drive. ``action = (left, right)`` wheel commands set a target forward speed
    ``max_speed * (left + right) / 2`` and a target yaw rate ``max_yaw_rate * (right - left) / 2``,
    which the car approaches with a first-order lag of time constant ``response_time``.

Two tasks:
  * Circle (after CPO, Achiam et al. 2017): reward ``(-u*y + v*x) / (1 + | ||(x, y)|| - radius |)``
    for running counter-clockwise along the circle; cost ``1[|x| > x_limit]`` (walls at +-x_limit).
  * Run: reward for progress toward a far target on the x-axis (Bullet-Safety-Gym's potential
    ``-60 * ||(x, y) - (1000, 0)||``); cost ``1`` when ``|y| > y_limit`` (corridor) or the planar
    speed exceeds ``speed_limit``, at most 1 per step.

Everything is a few arithmetic operations per step; the functions are unbatched (vmap them).
Constants and their sources are tabulated in docs/environments.md.
"""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
from flax import struct

from constrained_rl.config import require
from constrained_rl.envs.base import Env, EnvState, initial_state
from constrained_rl.envs.layout import Layout, project_navigation_layout

RUN_TARGET_X = 1000.0  # Bullet-Safety-Gym's fictitious target of the Run task
RUN_POTENTIAL_SCALE = 60.0
POSITION_SCALE = 0.1  # observation scalings as in Bullet-Safety-Gym's agents
VELOCITY_SCALE = 0.2
YAW_RATE_SCALE = 0.1
CIRCLE_DISTANCE_SCALE = 0.1


@struct.dataclass
class Physics:
    """Planar rigid-body state: position, world-frame velocity, heading and yaw rate."""

    position: jax.Array  # [2]
    velocity: jax.Array  # [2]
    heading: jax.Array  # [] radians, 0 along +x (the Ball does not use it)
    yaw_rate: jax.Array  # []


@dataclasses.dataclass(frozen=True)
class NavigationConfig:
    agent: str = "ball"  # "ball" (force-driven point mass) or "car" (differential drive)
    task: str = "circle"  # "circle" or "run"
    episode_length: int = 200  # steps per episode (time limit)
    dt: float = 0.1  # seconds per step: 1/60 s x 6 substeps (Circle), 1/120 s x 4 (Run)
    mass: float = 0.3  # Ball mass in kg (Bullet-Safety-Gym ball.urdf)
    max_force: float = 3.5  # Ball force in N per unit action (Bullet-Safety-Gym)
    damping: float = 2.0  # Ball linear damping in 1/s: terminal speed max_force / (mass * damping)
    max_speed: float = 3.0  # Car forward speed in m/s at full throttle on both wheels
    max_yaw_rate: float = 2.0  # Car yaw rate in rad/s at opposite full wheel commands
    response_time: float = 0.2  # Car time constant in s of speed and yaw-rate response
    radius: float = 7.0  # Circle radius in m (Bullet-Safety-Gym CircleZone)
    x_limit: float = 6.0  # Circle walls at |x| = x_limit
    y_limit: float = 2.0  # Run corridor half-width
    speed_limit: float = 2.5  # Run planar speed limit in m/s (Ball 2.5, Car 1.5 in Bullet-Safety-Gym)
    action_penalty: float = 0.0  # Run reward term -action_penalty * ||action|| (Ball 0.5)

    def __post_init__(self) -> None:
        require(self.agent in ("ball", "car"), "agent", f"must be 'ball' or 'car', got {self.agent!r}")
        require(self.task in ("circle", "run"), "task", f"must be 'circle' or 'run', got {self.task!r}")
        require(self.episode_length > 0, "episode_length", f"must be positive, got {self.episode_length}")
        for name in ("dt", "mass", "max_force", "damping", "max_speed", "max_yaw_rate", "response_time",
                     "radius", "x_limit", "y_limit", "speed_limit"):
            require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        require(self.action_penalty >= 0, "action_penalty", f"must be >= 0, got {self.action_penalty}")


def ball_dynamics(physics: Physics, action: jax.Array, config: NavigationConfig) -> Physics:
    """Exact step of ``m dv/dt = F - m c v``, ``dx/dt = v`` under constant force ``F = max_force * a``.

    With ``v_inf = F / (m c)`` and ``e = exp(-c dt)``:
    ``v' = v_inf + (v - v_inf) e``, ``x' = x + v_inf dt + (v - v_inf)(1 - e) / c``.
    """
    terminal = config.max_force * action / (config.mass * config.damping)
    decay = math.exp(-config.damping * config.dt)
    excess = physics.velocity - terminal
    velocity = terminal + excess * decay
    position = physics.position + terminal * config.dt + excess * ((1.0 - decay) / config.damping)
    return physics.replace(position=position, velocity=velocity)


def car_dynamics(physics: Physics, action: jax.Array, config: NavigationConfig) -> Physics:
    """Differential drive with first-order lag (time constant ``tau``) on speed and yaw rate.

    Targets ``s* = max_speed (l + r) / 2`` and ``w* = max_yaw_rate (r - l) / 2``; with
    ``e = exp(-dt / tau)``: ``s' = s* + (s - s*) e``, ``w' = w* + (w - w*) e``, the heading integrates
    ``w`` exactly, and the position moves by ``dt (s + s') / 2`` along the mid-step heading.
    """
    left, right = action[0], action[1]
    target_speed = config.max_speed * 0.5 * (left + right)
    target_yaw_rate = config.max_yaw_rate * 0.5 * (right - left)
    decay = math.exp(-config.dt / config.response_time)
    speed = jnp.cos(physics.heading) * physics.velocity[0] + jnp.sin(physics.heading) * physics.velocity[1]
    new_speed = target_speed + (speed - target_speed) * decay
    yaw_excess = physics.yaw_rate - target_yaw_rate
    new_yaw_rate = target_yaw_rate + yaw_excess * decay
    new_heading = physics.heading + target_yaw_rate * config.dt + yaw_excess * (1.0 - decay) * config.response_time
    mid_heading = 0.5 * (physics.heading + new_heading)
    mid_direction = jnp.stack([jnp.cos(mid_heading), jnp.sin(mid_heading)])
    new_direction = jnp.stack([jnp.cos(new_heading), jnp.sin(new_heading)])
    position = physics.position + config.dt * 0.5 * (speed + new_speed) * mid_direction
    return Physics(position=position, velocity=new_speed * new_direction, heading=new_heading, yaw_rate=new_yaw_rate)


def circle_reward(position: jax.Array, velocity: jax.Array, radius: float) -> jax.Array:
    """CPO's circle reward ``(-u*y + v*x) / (1 + | ||(x, y)|| - radius |)`` (Achiam et al. 2017).

    Positive when moving counter-clockwise, largest on the circle. Unbatched: position, velocity [2].
    """
    chex.assert_shape([position, velocity], (2,))
    x, y = position[0], position[1]
    u, v = velocity[0], velocity[1]
    return (-u * y + v * x) / (1.0 + jnp.abs(jnp.sqrt(x * x + y * y) - radius))


def circle_cost(position: jax.Array, x_limit: float) -> jax.Array:
    """``1[|x| > x_limit]``: the agent is beyond one of the two walls (Bullet-Safety-Gym Circle)."""
    chex.assert_shape(position, (2,))
    return (jnp.abs(position[0]) > x_limit).astype(jnp.float32)


def run_reward(previous_position: jax.Array, position: jax.Array) -> jax.Array:
    """Progress toward the target ``(1000, 0)``: ``60 (||p_prev - g|| - ||p - g||)`` (Bullet-Safety-Gym Run)."""
    chex.assert_shape([previous_position, position], (2,))
    target = jnp.array([RUN_TARGET_X, 0.0], jnp.float32)
    distance = lambda p: jnp.sqrt(jnp.sum(jnp.square(p - target)))
    return RUN_POTENTIAL_SCALE * (distance(previous_position) - distance(position))


def run_cost(position: jax.Array, velocity: jax.Array, y_limit: float, speed_limit: float) -> jax.Array:
    """``min(1, 1[|y| > y_limit] + 1[||(u, v)|| > speed_limit])`` (Bullet-Safety-Gym Run)."""
    chex.assert_shape([position, velocity], (2,))
    outside = jnp.abs(position[1]) > y_limit
    too_fast = jnp.sum(jnp.square(velocity)) > speed_limit * speed_limit
    return jnp.logical_or(outside, too_fast).astype(jnp.float32)


class NavigationEnv(Env):
    """A Ball or Car agent on a Circle or Run task; unbatched, no time limit (see ``wrappers.wrap``).

    Observation (all scaled as in Bullet-Safety-Gym): ``[0.1 x, 0.1 y, 0.2 u, 0.2 v]``; the Car adds
    ``[cos heading, sin heading, 0.1 yaw_rate]``; Circle adds ``0.1 (||(x, y)|| - radius)``.
    """

    def __init__(self, config: NavigationConfig):
        self.config = config
        self._dynamics = ball_dynamics if config.agent == "ball" else car_dynamics

    @property
    def observation_size(self) -> int:
        return 4 + 3 * (self.config.agent == "car") + (self.config.task == "circle")

    @property
    def action_size(self) -> int:
        return 2

    @property
    def episode_length(self) -> int:
        return self.config.episode_length

    @property
    def layout(self) -> Layout:
        return project_navigation_layout(self.config.agent, self.config.task)

    def observe(self, physics: Physics) -> jax.Array:
        parts = [POSITION_SCALE * physics.position, VELOCITY_SCALE * physics.velocity]
        if self.config.agent == "car":
            parts.append(jnp.stack([jnp.cos(physics.heading), jnp.sin(physics.heading), YAW_RATE_SCALE * physics.yaw_rate]))
        if self.config.task == "circle":
            distance = jnp.sqrt(jnp.sum(jnp.square(physics.position)))
            parts.append(CIRCLE_DISTANCE_SCALE * (distance - self.config.radius)[None])
        return jnp.concatenate(parts)

    def initial_physics(self, key: jax.Array) -> Physics:
        """Circle: uniform over the annulus 2 <= ||p|| <= 4, heading along the counter-clockwise tangent.
        Run: uniform over [-0.01, 0.01]^2, heading +x. At rest."""
        zero = jnp.zeros((), jnp.float32)
        if self.config.task == "circle":
            radius_key, angle_key = jax.random.split(key)
            # Uniform over an annulus: the squared radius is uniform between the squared bounds.
            radius = jnp.sqrt(jax.random.uniform(radius_key, (), minval=4.0, maxval=16.0))
            angle = jax.random.uniform(angle_key, (), minval=-jnp.pi, maxval=jnp.pi)
            position = radius * jnp.stack([jnp.cos(angle), jnp.sin(angle)])
            heading = angle + 0.5 * jnp.pi
        else:
            position = jax.random.uniform(key, (2,), minval=-0.01, maxval=0.01)
            heading = zero
        return Physics(position=position, velocity=jnp.zeros(2, jnp.float32), heading=heading, yaw_rate=zero)

    def reset(self, key: jax.Array) -> EnvState:
        physics = self.initial_physics(key)
        return initial_state(self.observe(physics), physics)

    def reward_and_cost(self, previous: Physics, physics: Physics, action: jax.Array) -> tuple[jax.Array, jax.Array]:
        config = self.config
        if config.task == "circle":
            return (circle_reward(physics.position, physics.velocity, config.radius),
                    circle_cost(physics.position, config.x_limit))
        penalty = config.action_penalty * jnp.sqrt(jnp.sum(jnp.square(action)))
        return (run_reward(previous.position, physics.position) - penalty,
                run_cost(physics.position, physics.velocity, config.y_limit, config.speed_limit))

    def step(self, state: EnvState, action: jax.Array) -> EnvState:
        chex.assert_shape(action, (2,))
        action = jnp.clip(action, -1.0, 1.0)
        physics = self._dynamics(state.physics, action, self.config)
        reward, cost = self.reward_and_cost(state.physics, physics, action)
        obs = self.observe(physics)
        return state.replace(obs=obs, next_obs=obs, reward=reward, cost=cost, physics=physics,
                             done=jnp.zeros((), jnp.float32), truncation=jnp.zeros((), jnp.float32))


CIRCLE_DT = 6.0 / 60.0
RUN_DT = 4.0 / 120.0

TASKS: dict[str, NavigationConfig] = {
    "BallCircle": NavigationConfig(agent="ball", task="circle", episode_length=200, dt=CIRCLE_DT),
    "CarCircle": NavigationConfig(agent="car", task="circle", episode_length=300, dt=CIRCLE_DT),
    "BallRun": NavigationConfig(agent="ball", task="run", episode_length=100, dt=RUN_DT,
                                speed_limit=2.5, action_penalty=0.5),
    "CarRun": NavigationConfig(agent="car", task="run", episode_length=200, dt=RUN_DT, speed_limit=1.5),
}


def make_navigation(name: str, **overrides) -> NavigationEnv:
    """The named task with any :class:`NavigationConfig` field overridden."""
    fields = {f.name for f in dataclasses.fields(NavigationConfig)}
    unknown = sorted(set(overrides) - fields)
    require(not unknown, name, f"unknown option(s) {unknown}; known: {sorted(fields)}")
    return NavigationEnv(dataclasses.replace(TASKS[name], **overrides))
