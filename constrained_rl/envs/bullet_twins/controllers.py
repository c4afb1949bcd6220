"""Fixed action sequences and reference controllers for the Ball tasks, shared by the fidelity report and test.

Open-loop sequences (``open_loop(name, steps, dt)``, actions [T, 2] in [-1, 1]):
  * ``constant``: ``(0.6, -0.3)`` throughout;
  * ``steps``: a new constant action every second, drawn once from a fixed generator;
  * ``sinusoid``: ``0.5 (cos(2 pi t / 4 s), sin(2 pi t / 3 s))``;
  * ``random``: i.i.d. uniform on [-1, 1]^2 each step (fixed generator).
Policies on the Ball's observation ``[0.1 x, 0.1 y, 0.2 u, 0.2 v, 0.1 w, ...]`` (pure ``jnp``; they run on
the twin inside ``lax.scan`` and on the real task through NumPy arrays alike):
  * ``circle_follower``: clockwise along the circle of radius 7 m at 3 m/s, a velocity servo
    ``a = k_v (v* - v)`` toward ``v* = 3 t + k_r (7 - ||p||) p / ||p||`` (``t`` the clockwise tangent);
  * ``speed_limited_runner``: straight along +x at 2 m/s (under Run's 2.5 m/s limit), ``a_x = k_v (2 - u)``,
    ``a_y = -k_y y - k_v v``.
Policies on the RaceCar's observation ``[0.1 x, 0.1 y, u, v, sin yaw, cos yaw, 0.1 w, ...]`` (driving direction
``h = -(cos yaw, sin yaw)``; a negative wheel command drives forward, a positive steering angle turns clockwise):
  * ``car_circle_driver``: clockwise along the circle of radius 7 m at 2 m/s;
  * ``car_straight_runner``: straight along +x at 1.2 m/s (under Run's 1.5 m/s limit for the car);
  * the constant policy of the car is ``CAR_CONSTANT_ACTION``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

OPEN_LOOP = ("constant", "steps", "sinusoid", "random")


def open_loop(name: str, steps: int, dt: float, seed: int = 0) -> np.ndarray:
    """The named open-loop action sequence, ``steps`` steps of ``dt`` seconds: [steps, 2]."""
    t = dt * np.arange(steps)
    rng = np.random.default_rng(seed)
    if name == "constant":
        actions = np.tile([0.6, -0.3], (steps, 1))
    elif name == "steps":
        levels = rng.uniform(-1.0, 1.0, (int(math.ceil(steps * dt)) + 1, 2))
        actions = levels[np.floor(t + 1e-9).astype(int)]
    elif name == "sinusoid":
        actions = 0.5 * np.stack([np.cos(2 * np.pi * t / 4.0), np.sin(2 * np.pi * t / 3.0)], axis=1)
    elif name == "random":
        actions = rng.uniform(-1.0, 1.0, (steps, 2))
    else:
        raise ValueError(f"unknown open-loop sequence {name!r}; known: {OPEN_LOOP}")
    return actions.astype(np.float32)


def _ball_position_velocity(obs: jax.Array) -> tuple[jax.Array, jax.Array]:
    return obs[..., 0:2] / 0.1, obs[..., 2:4] / 0.2


def circle_follower(obs: jax.Array, speed: float = 3.0, radius: float = 7.0, gain: float = 0.8,
                    radial_gain: float = 1.0) -> jax.Array:
    """Clockwise along the circle: ``clip(k_v (v* - v))``, ``v* = speed t + k_r (radius - d) p / d``."""
    position, velocity = _ball_position_velocity(jnp.asarray(obs))
    distance = jnp.sqrt(jnp.sum(jnp.square(position)) + 1e-9)
    outward = position / distance
    clockwise = jnp.stack([outward[1], -outward[0]])
    target = speed * clockwise + radial_gain * (radius - distance) * outward
    return jnp.clip(gain * (target - velocity), -1.0, 1.0)


def speed_limited_runner(obs: jax.Array, speed: float = 2.0, gain: float = 1.0, lateral_gain: float = 0.5) -> jax.Array:
    """Along +x at ``speed``: ``a = clip((k_v (speed - u), -k_y y - k_v v))``."""
    position, velocity = _ball_position_velocity(jnp.asarray(obs))
    return jnp.clip(jnp.stack([gain * (speed - velocity[0]), -lateral_gain * position[1] - gain * velocity[1]]),
                    -1.0, 1.0)


def constant_policy(action=(0.6, -0.3)):
    """A policy that ignores the observation."""
    fixed = jnp.asarray(action, jnp.float32)
    return lambda obs: fixed


# --- the RaceCar: observation [0.1 x, 0.1 y, u, v, sin yaw, cos yaw, 0.1 w, ...], action (wheel command, steering)

CAR_WHEELBASE = 1.0  # m, the twins' fitted effective wheelbase (1.00 Circle, 1.04 Run)
CAR_SPEED_GAIN = 3.0  # m/s of steady speed per unit forward command (3.0 Circle, 3.7 Run)


def _car_pose(obs: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Position, velocity, driving direction ``h = -(cos yaw, sin yaw)`` and speed along it from a RaceCar observation."""
    obs = jnp.asarray(obs)
    position, velocity = obs[..., 0:2] / 0.1, obs[..., 2:4]
    heading = -jnp.stack([obs[..., 5], obs[..., 4]], axis=-1)
    return position, velocity, heading, jnp.sum(velocity * heading, axis=-1)


def _car_command(heading: jax.Array, desired: jax.Array, speed: jax.Array, target_speed: float, steering_feedforward: float,
                 steering_gain: float, speed_gain: float) -> jax.Array:
    """Steer toward ``desired`` (positive steering turns clockwise), hold ``target_speed`` (negative command is forward)."""
    error = jnp.arctan2(heading[0] * desired[1] - heading[1] * desired[0], jnp.dot(heading, desired))
    steer = steering_feedforward - steering_gain * error / 0.5
    throttle = -(target_speed / CAR_SPEED_GAIN + speed_gain * (target_speed - speed))
    return jnp.clip(jnp.stack([throttle, steer]), -1.0, 1.0)


def car_circle_driver(obs: jax.Array, speed: float = 2.0, radius: float = 7.0, radial_gain: float = 0.5,
                      steering_gain: float = 1.5, speed_gain: float = 0.5) -> jax.Array:
    """Clockwise along the circle at ``speed``: steer toward ``t + k_r (radius - d) p / d`` (``t`` the clockwise
    tangent) with the bicycle feedforward ``atan(L / radius)``, hold the speed with a throttle servo."""
    position, _, heading, current = _car_pose(obs)
    distance = jnp.sqrt(jnp.sum(jnp.square(position)) + 1e-9)
    outward = position / distance
    clockwise = jnp.stack([outward[1], -outward[0]])
    desired = clockwise + radial_gain * (radius - distance) * outward
    feedforward = math.atan(CAR_WHEELBASE / radius) / 0.5
    return _car_command(heading, desired, current, speed, feedforward, steering_gain, speed_gain)


def car_straight_runner(obs: jax.Array, speed: float = 1.2, lateral_gain: float = 0.5, steering_gain: float = 1.5,
                        speed_gain: float = 0.5) -> jax.Array:
    """Along +x at ``speed`` (under Run's 1.5 m/s limit for the RaceCar): steer toward ``(1, -k_y y)``."""
    position, _, heading, current = _car_pose(obs)
    desired = jnp.stack([jnp.ones_like(position[1]), -lateral_gain * position[1]])
    return _car_command(heading, desired, current, speed, 0.0, steering_gain, speed_gain)


CAR_CONSTANT_ACTION = (-0.6, 0.3)  # forward at 0.6 with 0.15 rad of steering: a clockwise circle of about 6.6 m
