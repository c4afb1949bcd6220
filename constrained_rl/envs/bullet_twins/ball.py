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
MAX_WALL_CONTACTS = 2  # walls solved per sub-step: the nearest ones
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


def _clamp_norm(vector: jax.Array, limit: jax.Array) -> jax.Array:
    """``vector`` shortened to norm ``limit`` if longer (a friction cone)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(vector)) + 1e-30)
    return vector * jnp.minimum(1.0, limit / norm)


class _Contact(NamedTuple):
    """One contact of a sub-step: ``normal`` [3] pushes the ball away from the surface; the contact point
    is ``-r normal`` from the centre; ``target`` is the least separating speed the solver enforces
    (``-inf`` when out of contact)."""

    normal: jax.Array
    target: jax.Array
    friction: float
    rolling_friction: float
    spinning_friction: float


def _contact(normal, gap, approach, restitution, threshold, p: BallParameters, h: float, friction, rolling,
             spinning) -> _Contact:
    """Bullet's contact rule: within the threshold, a gap may close this sub-step (``-gap / h``), an overlap
    is pushed out at ``erp overlap / h`` (Baumgarte: no split impulse for multibodies, so it adds speed);
    impacts faster than the threshold bounce with ``restitution``."""
    bounce = jnp.where(approach > p.restitution_threshold, restitution * approach, 0.0)
    position_term = jnp.where(gap >= 0.0, -gap, -p.contact_erp * gap) / h
    target = jnp.where(gap < threshold, bounce + position_term, -jnp.inf)
    return _Contact(normal, target, friction, rolling, spinning)


def ball_substep(state: BallState, force: jax.Array, params: BallParameters, h: float,
                 walls: Walls | None) -> BallState:
    """One PyBullet sub-step of ``h`` seconds under the world-frame ``force`` [2] (N); see the module docstring."""
    p = params
    inertia = p.inertia
    tangent_mass = 1.0 / (1.0 / p.mass + p.radius**2 / inertia)  # a contact-point impulse tangent to the sphere
    v = jnp.concatenate([state.velocity, state.vertical_velocity[None]])
    w = state.angular_velocity
    speed, spin = jnp.sqrt(jnp.sum(jnp.square(v))), jnp.sqrt(jnp.sum(jnp.square(w)))
    force3 = jnp.concatenate([force, jnp.full((1,), -p.mass * p.gravity, force.dtype)])
    v = v + h * (force3 / p.mass - p.linear_damping * (1.0 + speed) * v)
    w = w - h * p.angular_damping * (1.0 + spin) * w

    # Contacts found at the start of the sub-step (discrete collision detection): the ground, then the
    # nearest walls (only those can touch: two at a corner of the octagon).
    up = jnp.array([0.0, 0.0, 1.0], v.dtype)
    contacts = [_contact(up, state.height - p.radius, -v[2], p.ground_restitution, p.ground_contact_threshold, p, h,
                         p.ground_friction, p.ground_rolling_friction, p.ground_spinning_friction)]
    if walls is not None:
        normals2, offsets = walls.arrays()
        gaps = offsets - p.radius - normals2 @ state.position
        negative_gaps, nearest = jax.lax.top_k(-gaps, min(MAX_WALL_CONTACTS, len(walls.offsets)))
        near_normals = normals2[nearest]
        for j in range(nearest.shape[0]):
            inward = -jnp.concatenate([near_normals[j], jnp.zeros(1, v.dtype)])
            contacts.append(_contact(inward, -negative_gaps[j], -jnp.dot(v, inward), p.wall_restitution,
                                     p.wall_contact_threshold, p, h,
                                     p.wall_friction, p.wall_rolling_friction, p.wall_spinning_friction))

    def iteration(_, carry):
        # Bullet's order within an iteration: every normal constraint, then every torsional (rolling and
        # spinning) friction, then every lateral friction, each bounded by its contact's normal impulse.
        v, w, normal_impulses, rolling_impulses, spinning_impulses, friction_impulses = carry
        normal_out, rolling_out, spinning_out, friction_out = [], [], [], []
        for c, total in zip(contacts, normal_impulses):
            new = jnp.maximum(0.0, total + p.mass * (c.target - jnp.dot(v, c.normal)))
            new = jnp.where(jnp.isfinite(c.target), new, 0.0)
            v = v + (new - total) / p.mass * c.normal
            normal_out.append(new)
        for c, n_imp, rolling, spinning in zip(contacts, normal_out, rolling_impulses, spinning_impulses):
            spin_along = jnp.dot(w, c.normal) * c.normal
            new_rolling = _clamp_norm(rolling - inertia * (w - spin_along), c.rolling_friction * n_imp)
            w = w + (new_rolling - rolling) / inertia
            spin_along = jnp.dot(w, c.normal) * c.normal
            new_spinning = _clamp_norm(spinning - inertia * spin_along, c.spinning_friction * n_imp)
            w = w + (new_spinning - spinning) / inertia
            rolling_out.append(new_rolling), spinning_out.append(new_spinning)
        for c, n_imp, friction in zip(contacts, normal_out, friction_impulses):
            lever = -p.radius * c.normal
            slip = v + jnp.cross(w, lever)
            slip = slip - jnp.dot(slip, c.normal) * c.normal
            new = _clamp_norm(friction - tangent_mass * slip, c.friction * n_imp)
            v = v + (new - friction) / p.mass
            w = w + jnp.cross(lever, new - friction) / inertia
            friction_out.append(new)
        return v, w, normal_out, rolling_out, spinning_out, friction_out

    zero, zero3 = jnp.zeros((), v.dtype), jnp.zeros(3, v.dtype)
    n = len(contacts)
    carry = (v, w, [zero] * n, [zero3] * n, [zero3] * n, [zero3] * n)
    v, w, *_ = jax.lax.fori_loop(0, p.solver_iterations, iteration, carry)
    return BallState(position=state.position + h * v[:2], velocity=v[:2], angular_velocity=w,
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

        def substep(_, s):
            return ball_substep(s, force, self.params, h, task.walls)

        return jax.lax.fori_loop(0, task.timing.frame_skip, substep, state)

    def kinematics(self, state: BallState) -> Kinematics:
        return Kinematics(position=state.position, velocity=state.velocity)

    def observe(self, state: BallState) -> jax.Array:
        return jnp.concatenate([POSITION_SCALE * state.position, VELOCITY_SCALE * state.velocity,
                                ANGULAR_VELOCITY_SCALE * state.angular_velocity])

    def specific_reward(self, state: BallState, action: jax.Array) -> jax.Array:
        del state
        return -ACTION_PENALTY * jnp.sqrt(jnp.sum(jnp.square(action)))

