"""A pure-JAX twin of Bullet-Safety-Gym's RaceCar agent (the MIT racecar), fitted to PyBullet.

The real agent (Gronauer 2022, Bullet-Safety-Gym 1.4.0, ``agents.RaceCar``): the MIT racecar URDF at
``global_scaling = 3``, spawned with body yaw ``pi`` (the URDF's nose points along -x of the world), a
4-wheel drive through two differentials whose rings are velocity-controlled at
``40 rad/s x action[0]`` with a force limit of 20, and two front steering hinges position-controlled
at ``0.5 rad x action[1]``. A *negative* wheel-velocity command drives the car toward its body -x,
that is with the unsteered (URDF rear) axle leading and the steered axle trailing.

The twin is a planar single-track (bicycle) model whose constants were fitted by least squares to
recorded PyBullet trajectories (``benchmarks/car_system_identification.py``):

  * driving direction ``h = -(cos psi, sin psi)`` with ``psi`` the body yaw; ``n = (-h_y, h_x)`` its left;
  * steering angle ``delta`` follows its target ``0.5 a_1`` with a first-order lag (time constant
    ``steering_time_constant``);
  * speed ``s`` along ``h`` follows ``gain * (-a_0)`` (``speed_gain_forward`` or ``..._reverse`` by the
    sign of the command) with time constant ``speed_time_constant``, less a scrub loss of the steered
    wheels ``tan(delta)^2 (scrub_constant tanh(s / 0.05) + scrub_linear s)`` (``tanh``: a smooth sign);
  * yaw rate ``omega`` follows the understeering bicycle rate
    ``-s tan(delta) / (wheelbase + understeer s^2)`` with time constant ``yaw_time_constant``;
  * the leading axle's lateral velocity ``l`` follows ``-slip_gain s omega`` (the tyres slide outward in
    proportion to the lateral acceleration) with the same time constant;
  * the reported position is the chassis centre of mass (PyBullet's base frame), ``COM_OFFSET`` behind
    the leading axle, so its velocity is ``s h + (l - COM_OFFSET omega) n``.

Each environment step integrates ``substeps`` sub-steps of the simulator's own time step (exact
exponential decay for the lags, mid-point rule for yaw and position). Everything is unbatched (vmap it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from constrained_rl.envs.bullet_twins.agent import TwinAgent
from constrained_rl.envs.bullet_twins.tasks import Kinematics, TwinTask, Walls

POSITION_SCALE = 0.1  # RaceCar.agent_specific_observation: 0.1 * xy, unscaled velocity, 0.1 * yaw rate
YAW_RATE_SCALE = 0.1
STEERING_COMMAND = 0.5  # rad per unit action (RaceCar.steering_multiplier)
INITIAL_STEERING_RANGE = 0.1  # RaceCar.specific_reset: every motor joint uniform in [-0.1, 0.1] rad
INITIAL_YAW = float(np.pi)  # RaceCar init_orientation (0, 0, pi): the body faces -x when driving +x
COM_OFFSET = 0.6  # m, centre of mass behind the leading axle: the chassis inertial origin x = 0.2 m, x 3
VELOCITY_CONSTRAINT = 1.5  # RaceCar velocity_constraint, m/s (Run's speed limit)
# The racecar's footprint in the body frame, relative to the centre of mass (m): PyBullet's axis-aligned
# bounding box of all links at yaw 0, x in [-0.76, 0.62] (body -x is the leading end; the camera mast
# trails) and y in [-0.44, 0.44]: a rectangle centred at x = -0.07 with half-extents 0.69 x 0.44.
FOOTPRINT_CENTRE = -0.07
FOOTPRINT_HALF_LENGTH = 0.69
FOOTPRINT_HALF_WIDTH = 0.44


@dataclasses.dataclass(frozen=True)
class CarDynamics:
    """The constants of the racecar twin (see the module docstring for the equations).

    The defaults are placeholders of the right size; the fitted values per task are ``FITTED``.
    """

    steering_time_constant: float = 0.16  # s, lag of the steering hinges behind 0.5 rad x action[1]
    speed_gain_forward: float = 2.90  # m/s of steady speed per unit of forward command (-action[0])
    speed_gain_reverse: float = 2.90  # m/s per unit of reverse command (+action[0])
    speed_time_constant: float = 1.25  # s, lag of the speed behind its target
    scrub_constant: float = 0.0  # m/s lost per tan(delta)^2 (any speed)
    scrub_linear: float = 0.0  # 1/1 lost speed per m/s per tan(delta)^2
    wheelbase: float = 0.975  # m, 3 x 0.325 m (URDF hinge offset at global_scaling 3)
    understeer: float = 0.0  # s^2/m, grows the effective wheelbase with s^2
    yaw_time_constant: float = 0.1  # s, lag of yaw rate and slip behind their steady values
    slip_gain: float = 0.0  # s, leading-axle lateral velocity per unit lateral acceleration s * omega

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


@struct.dataclass
class CarState:
    """Planar state of the racecar: centre-of-mass position, body yaw and the lagged quantities."""

    position: jax.Array  # [2] m, centre of mass
    yaw: jax.Array  # [] rad, body yaw (driving direction is yaw + pi)
    speed: jax.Array  # [] m/s along the driving direction
    slip: jax.Array  # [] m/s, lateral (leftward) velocity of the leading axle
    yaw_rate: jax.Array  # [] rad/s
    steering: jax.Array  # [] rad, steering hinge angle


def at_rest(position: jax.Array, yaw: jax.Array, steering: jax.Array | float = 0.0) -> CarState:
    """A car standing still at ``position`` with body yaw ``yaw``."""
    zero = jnp.zeros((), jnp.float32)
    return CarState(position=jnp.asarray(position, jnp.float32), yaw=jnp.asarray(yaw, jnp.float32),
                    speed=zero, slip=zero, yaw_rate=zero, steering=jnp.asarray(steering, jnp.float32))


def driving_frame(yaw: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``h = -(cos yaw, sin yaw)`` (forward under a negative command) and its left normal ``n``."""
    heading = -jnp.stack([jnp.cos(yaw), jnp.sin(yaw)])
    return heading, jnp.stack([-heading[1], heading[0]])


def velocity(state: CarState) -> jax.Array:
    """World-frame velocity of the centre of mass: ``s h + (l - COM_OFFSET omega) n``."""
    heading, left = driving_frame(state.yaw)
    return state.speed * heading + (state.slip - COM_OFFSET * state.yaw_rate) * left


def _lag(value: jax.Array, target: jax.Array, time_step: float, time_constant: float) -> jax.Array:
    """Exact step of ``dx/dt = (target - x) / tau`` over ``time_step`` with ``target`` held."""
    decay = jnp.exp(-time_step / time_constant)
    return target + (value - target) * decay


def substep(state: CarState, action: jax.Array, params: CarDynamics, time_step: float) -> CarState:
    """One simulator sub-step of ``time_step`` seconds; ``action`` already clipped to [-1, 1]^2."""
    command = -action[0]  # forward positive
    steering = _lag(state.steering, STEERING_COMMAND * action[1], time_step, params.steering_time_constant)
    tan_steer = jnp.tan(steering)
    gain = jnp.where(command >= 0.0, params.speed_gain_forward, params.speed_gain_reverse)
    scrub = tan_steer**2 * (params.scrub_constant * jnp.tanh(state.speed / 0.05) + params.scrub_linear * state.speed)
    speed = _lag(state.speed, gain * command - scrub, time_step, params.speed_time_constant)
    mean_speed = 0.5 * (state.speed + speed)
    target_yaw_rate = -mean_speed * tan_steer / (params.wheelbase + params.understeer * mean_speed**2)
    yaw_rate = _lag(state.yaw_rate, target_yaw_rate, time_step, params.yaw_time_constant)
    slip = _lag(state.slip, -params.slip_gain * mean_speed * yaw_rate, time_step, params.yaw_time_constant)
    yaw = state.yaw + 0.5 * time_step * (state.yaw_rate + yaw_rate)
    moved = state.replace(yaw=0.5 * (state.yaw + yaw), speed=mean_speed, slip=0.5 * (state.slip + slip),
                          yaw_rate=0.5 * (state.yaw_rate + yaw_rate))
    position = state.position + time_step * velocity(moved)
    return CarState(position=position, yaw=yaw, speed=speed, slip=slip, yaw_rate=yaw_rate, steering=steering)


def wall_contact(state: CarState, walls: Walls) -> CarState:
    """Keeps the car's footprint inside the walls: an inelastic, frictionless contact per wall.

    For each wall ``k`` (outward normal ``n_k``, inner face at ``offset_k``) that a footprint corner
    ``c`` crosses, the centre of mass moves back by the deepest ``n_k . c - offset_k`` (for the rectangle
    ``n_k . (p + x_c e_1) + a |n_k . e_1| + b |n_k . e_2| - offset_k``, ``e_1, e_2`` the body axes) and loses its
    velocity into the wall, ``v -= n_k max(0, n_k . v)``; speed and slip are then read from the new
    velocity. (PyBullet's chassis also turns about the contact; the twin does not.)
    """
    cos_yaw, sin_yaw = jnp.cos(state.yaw), jnp.sin(state.yaw)
    moving = velocity(state)
    push_x = push_y = brake_x = brake_y = jnp.zeros((), jnp.float32)
    # The walls are a handful of Python constants: one scalar expression each (arrays of 8 under vmap
    # are slow on CPU). The velocity into each touched wall is taken from the same pre-contact velocity,
    # which differs from removing them in turn only in a corner (at most two walls, 45 degrees apart).
    for (normal_x, normal_y), offset in zip(walls.normals, walls.offsets):
        along = normal_x * cos_yaw + normal_y * sin_yaw  # n . (body x axis)
        across = normal_y * cos_yaw - normal_x * sin_yaw  # n . (body y axis)
        # The deepest corner of the rectangle: its centre's reach plus the half-extents times |n . axis|.
        depth = (normal_x * state.position[0] + normal_y * state.position[1] + FOOTPRINT_CENTRE * along
                 + FOOTPRINT_HALF_LENGTH * jnp.abs(along) + FOOTPRINT_HALF_WIDTH * jnp.abs(across) - offset)
        overlap = jnp.maximum(depth, 0.0)
        into = jnp.where(depth > 0.0, jnp.maximum(normal_x * moving[0] + normal_y * moving[1], 0.0), 0.0)
        push_x, push_y = push_x + overlap * normal_x, push_y + overlap * normal_y
        brake_x, brake_y = brake_x + into * normal_x, brake_y + into * normal_y
    position = state.position - jnp.stack([push_x, push_y])
    moving = moving - jnp.stack([brake_x, brake_y])
    heading, left = driving_frame(state.yaw)
    return state.replace(position=position, speed=jnp.dot(moving, heading),
                         slip=jnp.dot(moving, left) + COM_OFFSET * state.yaw_rate)


def step(state: CarState, action: jax.Array, params: CarDynamics, time_step: float, substeps: int,
         walls: Walls | None = None) -> CarState:
    """One environment step: ``substeps`` sub-steps of ``time_step`` under the held ``action``."""
    action = jnp.clip(action, -1.0, 1.0)

    def one(_, current):
        moved = substep(current, action, params, time_step)
        return moved if walls is None else wall_contact(moved, walls)

    return jax.lax.fori_loop(0, substeps, one, state)


def observe(state: CarState) -> jax.Array:
    """``RaceCar.agent_specific_observation``: ``[0.1 x, 0.1 y, u, v, sin yaw, cos yaw, 0.1 yaw_rate]``."""
    return jnp.concatenate([
        POSITION_SCALE * state.position,
        velocity(state),
        jnp.stack([jnp.sin(state.yaw), jnp.cos(state.yaw), YAW_RATE_SCALE * state.yaw_rate]),
    ])


# Fitted by benchmarks/car_system_identification.py (least squares on 1 s PyBullet windows); the two
# physics timings of Bullet-Safety-Gym (Circle 6 x 1/60 s, Run 4 x 1/120 s) give different cars.
# Held-out open-loop position error (median over 37 sequences of 10 s): Circle 0.065 / 0.13 / 0.37 m at
# 1 / 3 / 10 s, Run 0.037 / 0.15 / 0.80 m (docs/environments.md).
FITTED: dict[str, CarDynamics] = {
    "circle": CarDynamics(steering_time_constant=0.1525, speed_gain_forward=3.0098, speed_gain_reverse=2.9271,
                          speed_time_constant=1.4651, scrub_constant=0.6361, scrub_linear=0.7833, wheelbase=1.0033,
                          understeer=0.0023, yaw_time_constant=0.0427, slip_gain=0.0386),
    "run": CarDynamics(steering_time_constant=0.0586, speed_gain_forward=3.7401, speed_gain_reverse=3.9438,
                       speed_time_constant=1.0063, scrub_constant=0.0, scrub_linear=1.175, wheelbase=1.0436,
                       understeer=0.001, yaw_time_constant=0.0586, slip_gain=0.0666),
}


@dataclasses.dataclass(frozen=True)
class CarParameters:
    """Overrides of the fitted constants: a field left ``None`` takes the task's value in ``FITTED``."""

    steering_time_constant: float | None = None
    speed_gain_forward: float | None = None
    speed_gain_reverse: float | None = None
    speed_time_constant: float | None = None
    scrub_constant: float | None = None
    scrub_linear: float | None = None
    wheelbase: float | None = None
    understeer: float | None = None
    yaw_time_constant: float | None = None
    slip_gain: float | None = None

    def dynamics(self, task: str) -> CarDynamics:
        """The task's fitted constants with these overrides applied."""
        overrides = {name: value for name, value in dataclasses.asdict(self).items() if value is not None}
        return dataclasses.replace(FITTED[task], **overrides)


class CarAgent(TwinAgent):
    """Bullet-Safety-Gym's RaceCar: observation ``[0.1 x, 0.1 y, u, v, sin yaw, cos yaw, 0.1 yaw_rate]``,
    action (wheel-velocity command, steering angle) in [-1, 1]^2, a negative command driving forward."""

    name = "car"
    init_yaw = INITIAL_YAW
    velocity_constraint = VELOCITY_CONSTRAINT
    observation_size = 7
    action_size = 2

    def __init__(self, params: CarParameters | None = None):
        self.params = params or CarParameters()
        self._dynamics = {task: self.params.dynamics(task) for task in FITTED}

    def dynamics(self, task: TwinTask) -> CarDynamics:
        return self._dynamics[task.name]

    def initial_state(self, position: jax.Array, yaw: jax.Array, task: TwinTask) -> CarState:
        # The real reset draws each steering hinge uniformly in +-INITIAL_STEERING_RANGE; the twin starts at the mean, 0.
        del task
        return at_rest(position, yaw)

    def step(self, state: CarState, action: jax.Array, task: TwinTask) -> CarState:
        return step(state, action, self.dynamics(task), task.timing.time_step, task.timing.frame_skip, task.walls)

    def kinematics(self, state: CarState) -> Kinematics:
        return Kinematics(position=state.position, velocity=velocity(state))

    def observe(self, state: CarState) -> jax.Array:
        return observe(state)


def read_car(env: Any) -> CarState:
    """The real racecar's state (Bullet-Safety-Gym ``EnvironmentBuilder``) as a twin state."""
    bc, body = env.bc, env.agent.body_id
    position, quaternion = bc.getBasePositionAndOrientation(body)
    linear, angular = bc.getBaseVelocity(body)
    yaw = bc.getEulerFromQuaternion(quaternion)[2]
    hinges = [state[0] for state in bc.getJointStates(body, list(env.agent.steering_links))]
    heading, left = (np.asarray(a) for a in driving_frame(jnp.asarray(yaw, jnp.float32)))
    moving = np.asarray(linear[:2])
    return CarState(position=jnp.asarray(position[:2], jnp.float32), yaw=jnp.asarray(yaw, jnp.float32),
                    speed=jnp.asarray(moving @ heading, jnp.float32),
                    slip=jnp.asarray(moving @ left + COM_OFFSET * angular[2], jnp.float32),
                    yaw_rate=jnp.asarray(angular[2], jnp.float32),
                    steering=jnp.asarray(np.mean(hinges), jnp.float32))
