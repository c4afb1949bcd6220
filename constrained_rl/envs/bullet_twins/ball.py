"""The Ball of Bullet-Safety-Gym 1.4.0 (``agents.Ball``, ``robots/ball/ball.urdf``) in pure JAX.

The real agent is a PyBullet multibody sphere (mass 0.3 kg, radius 0.5 m; PyBullet computes the
inertia from the collision sphere, ``I = 2/5 m r^2 = 0.03 kg m^2``, since the urdf is loaded without
``URDF_USE_INERTIA_FROM_FILE``) pushed through its centre by a world-frame force ``3.5 a`` N. It rolls
on the plane without slipping, so the force drives the effective mass ``m + I / r^2 = 1.4 m`` and the
ball spins at ``omega = (-v_y, v_x, 0) / r``.

The twin integrates what PyBullet integrates, sub-step by sub-step (``task.timing``: 6 x 1/60 s on
Circle, 4 x 1/120 s on Run) with semi-implicit Euler, in three dimensions (the ball hops when a wall
kicks it):

1. forces: gravity, ``v += h (F / m - c_lin (1 + |v|) v)`` and ``omega -= h c_ang (1 + |omega|) omega``,
   the multibody damping of Bullet (``btMultiBody``: ``m v (k1 + k2 |v|)``, ``k1 = k2 = linearDamping``,
   the same for the angular part; PyBullet's default damping is 0.04);
2. contacts found at the start of the sub-step (the plane, and the two nearest of Circle's octagon
   walls), solved by projected Gauss-Seidel over accumulated impulses as Bullet's sequential-impulse
   solver does (``solver_iterations`` passes; in each, every normal constraint, then every rolling and
   spinning friction, then every lateral friction, each bounded by its contact's normal impulse):
   * a contact exists only within a threshold (the plane 1 mm, a wall 1 cm): a fast ball sinks into a
     wall before it is stopped, and the overlap is pushed out at ``erp overlap / h`` (Baumgarte; Bullet
     has no split impulse for multibodies), which is what makes a ball bounce off a wall although the
     combined restitution ``0.7 x 0`` is zero; impacts on the plane faster than 0.2 m/s bounce with
     ``0.7 x 0.5``; a gap may close within the sub-step;
   * Coulomb friction at the contact point (plane ``1.1 x 0.8``, wall ``1.1 x 0.5``); on the plane it
     enforces rolling without slipping (it never saturates while the ball rolls); at a wall it drags
     the spinning surface, which kicks the ball up into a hop;
   * rolling friction, an angular impulse against the spin perpendicular to the normal, and spinning
     friction about the normal, each at most ``mu_r`` times the normal impulse (Bullet's combined
     ``0.03 x 0.8 + 1.1 x 0 = 0.024`` on the plane, ``0.03 x 0.5`` on a wall);
3. positions: ``p += h v``.

For a ball rolling freely this is ``(m + I / r^2) dv/dt = F - m c_lin (1 + |v|) v
- (I / r^2) c_ang (1 + |v| / r) v - (mu_r m g / r) v / |v|``, and a force below ``mu_r m g / r = 0.14 N``
does not move a ball at rest. The parameters below are PyBullet's: fitting the force scale, damping and
rolling friction by least squares to recorded PyBullet trajectories (``benchmarks/twin_fidelity.py
--fit``) returns them to six digits (docs/environments.md).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from constrained_rl.envs.bullet_twins.agent import TwinAgent
from constrained_rl.envs.bullet_twins.tasks import Kinematics, TwinTask, Walls

POSITION_SCALE = 0.1  # Ball.agent_specific_observation: 0.1 xyz, 0.2 xyz_dot, 0.1 rpy_dot
VELOCITY_SCALE = 0.2
ANGULAR_VELOCITY_SCALE = 0.1
ACTION_PENALTY = 0.5  # Ball.specific_reward = -0.5 ||a||
MAX_WALL_CONTACTS = 2  # walls solved in a step: the nearest ones
RESTING_OVERLAP = 1e-5  # m: PyBullet's resting ball sinks this far into the plane (its height reads 0.49999)


@struct.dataclass
class BallState:
    """The ball's base link (world frame): planar position [2] (m) and velocity [2] (m/s), angular velocity
    [3] (rad/s), and the height of its centre [] (m) and vertical velocity [] (m/s), which leave the
    resting values ``r`` and 0 only when a wall kicks the ball into a hop."""

    position: jax.Array
    velocity: jax.Array
    angular_velocity: jax.Array
    height: jax.Array
    vertical_velocity: jax.Array


@dataclasses.dataclass(frozen=True)
class BallParameters:
    """Physical constants of the ball and its contacts (PyBullet's, see the module docstring)."""

    mass: float = 0.3  # kg, ball.urdf
    radius: float = 0.5  # m, collision sphere
    inertia_factor: float = 0.4  # I = inertia_factor m r^2 (solid sphere)
    max_force: float = 3.5  # N per unit action (Ball max_force)
    gravity: float = 9.81  # m/s^2 (builder.py setGravity)
    linear_damping: float = 0.04  # 1/s and s/m: btMultiBody damping k1 = k2
    angular_damping: float = 0.04
    ground_friction: float = 0.88  # combined lateral friction ball x plane: 1.1 x 0.8
    ground_rolling_friction: float = 0.024  # combined rolling friction: 0.03 x 0.8 + 1.1 x 0
    ground_spinning_friction: float = 0.024  # combined spinning friction: 0.03 x 0.8 + 1.1 x 0
    ground_restitution: float = 0.35  # combined restitution: 0.7 x 0.5
    wall_friction: float = 0.55  # ball x octagon wall: 1.1 x 0.5
    wall_rolling_friction: float = 0.015  # 0.03 x 0.5
    wall_spinning_friction: float = 0.015
    wall_restitution: float = 0.0  # 0.7 x 0
    restitution_threshold: float = 0.2  # m/s: slower impacts do not bounce (btContactSolverInfo)
    contact_erp: float = 0.9  # builder.py setDefaultContactERP: fraction of an overlap removed per sub-step
    wall_contact_threshold: float = 0.01  # m: a wall closer than this is in contact (Bullet's breaking threshold)
    ground_contact_threshold: float = 0.001  # m: the plane's (its collision margin): a hopping ball lands by overlapping
    solver_iterations: int = 5  # builder.py numSolverIterations

    @property
    def inertia(self) -> float:
        return self.inertia_factor * self.mass * self.radius**2


# Vectors are tuples of three scalars (arrays of the batch shape under vmap): every operation of the
# solver is then elementwise and XLA fuses a whole sub-step into one loop, where [3]-vectors would
# cost a gather or concatenation per cross product.
Vec = tuple


def _add(a: Vec, b: Vec, scale=1.0) -> Vec:
    return tuple(x + scale * y for x, y in zip(a, b))


def _dot(a: Vec, b: Vec):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _cross(a: Vec, b: Vec) -> Vec:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _times(a: Vec, scale) -> Vec:
    return tuple(scale * x for x in a)


def _clamp_norm(vector: Vec, limit) -> Vec:
    """``vector`` shortened to norm ``limit`` if longer (a friction cone)."""
    norm = jnp.sqrt(_dot(vector, vector) + 1e-30)
    return _times(vector, jnp.minimum(1.0, limit / norm))


class _Contact(NamedTuple):
    """One contact of a sub-step: ``normal`` pushes the ball away from the surface; the contact point is
    ``-r normal`` from the centre; ``target`` is the least separating speed the solver enforces, and
    ``active`` whether the contact exists at all."""

    normal: Vec
    target: jax.Array
    active: jax.Array
    friction: float
    rolling_friction: float
    spinning_friction: float


def _contact(normal: Vec, gap, approach, restitution, threshold, p: BallParameters, h: float, friction, rolling,
             spinning) -> _Contact:
    """Bullet's contact rule: within the threshold, a gap may close this sub-step (``-gap / h``), an overlap
    is pushed out at ``erp overlap / h`` (Baumgarte: no split impulse for multibodies, so it adds speed);
    impacts faster than the threshold bounce with ``restitution``."""
    bounce = jnp.where(approach > p.restitution_threshold, restitution * approach, 0.0)
    position_term = jnp.where(gap >= 0.0, -gap, -p.contact_erp * gap) / h
    return _Contact(normal, bounce + position_term, gap < threshold, friction, rolling, spinning)


def nearest_walls(position: jax.Array, walls: Walls | None, radius: float) -> list[tuple]:
    """The walls that can touch the ball during the next step: the ``MAX_WALL_CONTACTS`` nearest, as
    ``(normal_x, normal_y, offset)`` (two at a corner of the octagon; the ball moves at most about
    1.2 m in a step, far less than a wall's length)."""
    if walls is None:
        return []
    normals, offsets = walls.arrays()
    gaps = offsets - radius - normals @ position
    _, nearest = jax.lax.top_k(-gaps, min(MAX_WALL_CONTACTS, len(walls.offsets)))
    return [(normals[k, 0], normals[k, 1], offsets[k]) for k in nearest]


def ball_substep(state: BallState, force: jax.Array, params: BallParameters, h: float,
                 near_walls: list[tuple]) -> BallState:
    """One PyBullet sub-step of ``h`` seconds under the world-frame ``force`` [2] (N), against the walls
    ``near_walls`` (:func:`nearest_walls`); see the module docstring."""
    p = params
    inertia = p.inertia
    tangent_mass = 1.0 / (1.0 / p.mass + p.radius**2 / inertia)  # a contact-point impulse tangent to the sphere
    v = (state.velocity[0], state.velocity[1], state.vertical_velocity)
    w = (state.angular_velocity[0], state.angular_velocity[1], state.angular_velocity[2])
    speed, spin = jnp.sqrt(_dot(v, v)), jnp.sqrt(_dot(w, w))
    acceleration = (force[0] / p.mass, force[1] / p.mass, -p.gravity)
    v = tuple(vi + h * (ai - p.linear_damping * (1.0 + speed) * vi) for vi, ai in zip(v, acceleration))
    w = _times(w, 1.0 - h * p.angular_damping * (1.0 + spin))

    # Contacts found at the start of the sub-step (discrete collision detection): the ground, then the
    # nearest walls.
    zero = jnp.zeros_like(v[0])
    up = (zero, zero, zero + 1.0)
    contacts = [_contact(up, state.height - p.radius, -v[2], p.ground_restitution, p.ground_contact_threshold, p, h,
                         p.ground_friction, p.ground_rolling_friction, p.ground_spinning_friction)]
    for normal_x, normal_y, offset in near_walls:
        inward = (-normal_x, -normal_y, zero)
        gap = offset - p.radius - (normal_x * state.position[0] + normal_y * state.position[1])
        contacts.append(_contact(inward, gap, -_dot(v, inward), p.wall_restitution, p.wall_contact_threshold, p, h,
                                 p.wall_friction, p.wall_rolling_friction, p.wall_spinning_friction))

    # Projected Gauss-Seidel over accumulated impulses, in Bullet's order within an iteration: every
    # normal constraint, then every torsional (rolling and spinning) friction, then every lateral
    # friction, each bounded by its contact's normal impulse.
    def iteration(_, carry):
        v, w, normal_impulses, rolling_impulses, spinning_impulses, friction_impulses = carry
        normal_impulses, rolling_impulses = list(normal_impulses), list(rolling_impulses)
        spinning_impulses, friction_impulses = list(spinning_impulses), list(friction_impulses)
        for i, c in enumerate(contacts):
            total = normal_impulses[i]
            new = jnp.where(c.active, jnp.maximum(0.0, total + p.mass * (c.target - _dot(v, c.normal))), 0.0)
            v = _add(v, c.normal, (new - total) / p.mass)
            normal_impulses[i] = new
        for i, c in enumerate(contacts):
            limit = normal_impulses[i]
            spin_along = _times(c.normal, _dot(w, c.normal))
            rolling = _clamp_norm(_add(rolling_impulses[i], _add(w, spin_along, -1.0), -inertia),
                                  c.rolling_friction * limit)
            w = _add(w, _add(rolling, rolling_impulses[i], -1.0), 1.0 / inertia)
            spin_along = _times(c.normal, _dot(w, c.normal))
            spinning = _clamp_norm(_add(spinning_impulses[i], spin_along, -inertia), c.spinning_friction * limit)
            w = _add(w, _add(spinning, spinning_impulses[i], -1.0), 1.0 / inertia)
            rolling_impulses[i], spinning_impulses[i] = rolling, spinning
        for i, c in enumerate(contacts):
            lever = _times(c.normal, -p.radius)
            slip = _add(v, _cross(w, lever))
            slip = _add(slip, c.normal, -_dot(slip, c.normal))
            new = _clamp_norm(_add(friction_impulses[i], slip, -tangent_mass), c.friction * normal_impulses[i])
            change = _add(new, friction_impulses[i], -1.0)
            v = _add(v, change, 1.0 / p.mass)
            w = _add(w, _cross(lever, change), 1.0 / inertia)
            friction_impulses[i] = new
        return (v, w, tuple(normal_impulses), tuple(rolling_impulses), tuple(spinning_impulses),
                tuple(friction_impulses))

    n = len(contacts)
    zero3 = (zero, zero, zero)
    carry = (v, w, (zero,) * n, (zero3,) * n, (zero3,) * n, (zero3,) * n)
    v, w, *_ = jax.lax.fori_loop(0, p.solver_iterations, iteration, carry)
    velocity = jnp.stack(v[:2])
    return BallState(position=state.position + h * velocity, velocity=velocity, angular_velocity=jnp.stack(w),
                     height=state.height + h * v[2], vertical_velocity=v[2])


class BallAgent(TwinAgent):
    """Bullet-Safety-Gym's Ball: observation ``[0.1 x, 0.1 y, 0.2 u, 0.2 v, 0.1 w_x, 0.1 w_y, 0.1 w_z]``,
    action a world-frame force ``3.5 (a_x, a_y)`` N, own reward ``-0.5 ||a||``."""

    name = "ball"
    init_yaw = 0.0
    velocity_constraint = 2.5  # Ball velocity_constraint, m/s
    observation_size = 7
    action_size = 2

    def __init__(self, params: BallParameters | None = None):
        self.params = params or BallParameters()

    def initial_state(self, position: jax.Array, yaw: jax.Array, task: TwinTask) -> BallState:
        del yaw, task  # a sphere's yaw changes nothing
        return BallState(position=jnp.asarray(position, jnp.float32), velocity=jnp.zeros(2, jnp.float32),
                         angular_velocity=jnp.zeros(3, jnp.float32),
                         height=jnp.asarray(self.params.radius - RESTING_OVERLAP, jnp.float32),
                         vertical_velocity=jnp.zeros((), jnp.float32))

    def step(self, state: BallState, action: jax.Array, task: TwinTask) -> BallState:
        force = self.params.max_force * action
        h = task.timing.time_step

        near_walls = nearest_walls(state.position, task.walls, self.params.radius)  # one selection per step

        def substep(_, s):
            return ball_substep(s, force, self.params, h, near_walls)

        return jax.lax.fori_loop(0, task.timing.frame_skip, substep, state)

    def kinematics(self, state: BallState) -> Kinematics:
        return Kinematics(position=state.position, velocity=state.velocity)

    def observe(self, state: BallState) -> jax.Array:
        return jnp.concatenate([POSITION_SCALE * state.position, VELOCITY_SCALE * state.velocity,
                                ANGULAR_VELOCITY_SCALE * state.angular_velocity])

    def specific_reward(self, state: BallState, action: jax.Array) -> jax.Array:
        del state
        return -ACTION_PENALTY * jnp.sqrt(jnp.sum(jnp.square(action)))

