"""The Ball of Bullet-Safety-Gym 1.4.0 (``agents.Ball``, ``robots/ball/ball.urdf``) in pure JAX.

The real agent is a PyBullet multibody sphere (mass 0.3 kg, radius 0.5 m; PyBullet computes the
inertia from the collision sphere, ``I = 2/5 m r^2 = 0.03 kg m^2``, since the urdf is loaded without
``URDF_USE_INERTIA_FROM_FILE``) pushed through its centre by a world-frame force ``3.5 a`` N. It rolls
on the plane without slipping, so the force drives the effective mass ``m + I / r^2 = 1.4 m`` and the
ball spins at ``omega = (-v_y, v_x, 0) / r``.

The twin integrates what PyBullet integrates, sub-step by sub-step (``task.timing``: 6 x 1/60 s on
Circle, 4 x 1/120 s on Run) with semi-implicit Euler:

1. forces: ``v += h (F / m - c_lin (1 + |v|) v)`` and ``omega -= h c_ang (1 + |omega|) omega``, the
   multibody damping of Bullet (``btMultiBody``: ``m v (k1 + k2 |v|)``, ``k1 = k2 = linearDamping``,
   the same for the angular part; PyBullet's default damping is 0.04);
2. contacts, solved by projected Gauss-Seidel over accumulated impulses as Bullet's sequential-impulse
   solver does (``solver_iterations`` passes):
   * each wall ``k`` (Circle's octagon): a one-sided normal constraint that stops the ball at the
     wall's inner face (restitution ``0.7 x 0 = 0``; an overlap is pushed out at rate ``contact_erp``),
     Coulomb friction at the contact point (``mu = 1.1 x 0.5``), rolling and spinning friction
     (``0.03 x 0.5``) bounded by the normal impulse;
   * the ground: rolling friction, an angular impulse against the rolling spin bounded by
     ``mu_r m g h`` (Bullet's combined rolling friction ``0.03 x 0.8 + 1.1 x 0 = 0.024``), spinning
     friction about the vertical, and Coulomb friction ``mu = 1.1 x 0.8`` at the contact point, which
     enforces rolling without slipping (it never saturates for this ball);
3. positions: ``p += h v``.

For a ball rolling freely this is ``(m + I / r^2) dv/dt = F - m c_lin (1 + |v|) v
- (I / r^2) c_ang (1 + |v| / r) v - (mu_r m g / r) v / |v|``, and a force below ``mu_r m g / r = 0.14 N``
does not move a ball at rest. The parameters below are PyBullet's; fitting them to recorded PyBullet
trajectories (``benchmarks/twin_fidelity.py --fit``) returns the same values (docs/environments.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from constrained_rl.envs.bullet_twins.agent import TwinAgent
from constrained_rl.envs.bullet_twins.tasks import Kinematics, TwinTask, Walls

POSITION_SCALE = 0.1  # Ball.agent_specific_observation: 0.1 xyz, 0.2 xyz_dot, 0.1 rpy_dot
VELOCITY_SCALE = 0.2
ANGULAR_VELOCITY_SCALE = 0.1
ACTION_PENALTY = 0.5  # Ball.specific_reward = -0.5 ||a||


@struct.dataclass
class BallState:
    """The ball's base link: planar position [2] (m), planar velocity [2] (m/s), angular velocity [3] (rad/s, world frame)."""

    position: jax.Array
    velocity: jax.Array
    angular_velocity: jax.Array


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
    wall_friction: float = 0.55  # ball x octagon wall: 1.1 x 0.5
    wall_rolling_friction: float = 0.015  # 0.03 x 0.5
    wall_spinning_friction: float = 0.015
    contact_erp: float = 0.9  # builder.py setDefaultContactERP: fraction of an overlap removed per sub-step
    solver_iterations: int = 5  # builder.py numSolverIterations

    @property
    def inertia(self) -> float:
        return self.inertia_factor * self.mass * self.radius**2


def _clamp_norm(vector: jax.Array, limit: jax.Array) -> jax.Array:
    """``vector`` shortened to norm ``limit`` if longer (a friction cone)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(vector)) + 1e-30)
    return vector * jnp.minimum(1.0, limit / norm)


class _Contacts:
    """Velocity-level contact constraints of one sub-step; each method applies one block of Gauss-Seidel.

    Every block adds to its accumulated impulse, clamps the sum to its bounds and applies the change
    (Catto 2005, "Iterative Dynamics with Temporal Coherence"; Bullet's sequential-impulse solver).
    """

    def __init__(self, params: BallParameters, h: float):
        self.p = params
        self.h = h
        # Inverse effective mass of a contact-point impulse tangent to the sphere: 1/m + r^2/I.
        self.tangent_mass = 1.0 / (1.0 / params.mass + params.radius**2 / params.inertia)

    def point_friction(self, v, w, accumulated, lever, normal, limit):
        """Coulomb friction at the contact point ``lever`` (from the centre): slip tangent to ``normal`` driven to 0."""
        slip = v + jnp.cross(w, lever)
        slip = slip - jnp.dot(slip, normal) * normal
        total = _clamp_norm(accumulated - self.tangent_mass * slip, limit)
        change = total - accumulated
        return v + change / self.p.mass, w + jnp.cross(lever, change) / self.p.inertia, total

    def twist_friction(self, w, accumulated, normal, rolling_limit, spinning_limit):
        """Rolling friction (spin perpendicular to ``normal``) and spinning friction (about it), driven to 0."""
        inertia = self.p.inertia
        spin_along = jnp.dot(w, normal) * normal
        rolling = _clamp_norm(accumulated[0] - inertia * (w - spin_along), rolling_limit)
        w = w + (rolling - accumulated[0]) / inertia
        spin_along = jnp.dot(w, normal) * normal
        spinning = _clamp_norm(accumulated[1] - inertia * spin_along, spinning_limit)
        w = w + (spinning - accumulated[1]) / inertia
        return w, (rolling, spinning)


def ball_substep(state: BallState, force: jax.Array, params: BallParameters, h: float,
                 walls: Walls | None) -> BallState:
    """One PyBullet sub-step of ``h`` seconds under the world-frame ``force`` [2] (N); see the module docstring."""
    p = params
    v = jnp.concatenate([state.velocity, jnp.zeros(1, state.velocity.dtype)])
    w = state.angular_velocity
    speed, spin = jnp.sqrt(jnp.sum(jnp.square(state.velocity))), jnp.sqrt(jnp.sum(jnp.square(w)))
    force3 = jnp.concatenate([force, jnp.zeros(1, force.dtype)])
    v = v + h * (force3 / p.mass - p.linear_damping * (1.0 + speed) * v)
    w = w - h * p.angular_damping * (1.0 + spin) * w

    contacts = _Contacts(p, h)
    up = jnp.array([0.0, 0.0, 1.0], v.dtype)
    ground_lever = -p.radius * up
    ground_normal_impulse = p.mass * p.gravity * h
    zero3 = jnp.zeros(3, v.dtype)
    if walls is not None:
        normals2, offsets = walls.arrays()
        normals = jnp.concatenate([normals2, jnp.zeros((normals2.shape[0], 1), normals2.dtype)], axis=1)
        gaps = offsets - p.radius - normals2 @ state.position  # >= 0: not touching
        # Approach speed allowed this sub-step: close the gap exactly, or push an overlap out at rate erp.
        allowed = jnp.where(gaps >= 0.0, gaps, p.contact_erp * gaps) / h
        n_walls = normals.shape[0]
    else:
        n_walls = 0

    def iteration(_, carry):
        v, w, wall_normal, wall_friction, wall_twist, ground_friction, ground_twist = carry
        new_normal, new_friction, new_twist = [], [], []
        for k in range(n_walls):
            normal = normals[k]
            total = jnp.maximum(0.0, wall_normal[k] + p.mass * (jnp.dot(v, normal) - allowed[k]))
            v = v - (total - wall_normal[k]) / p.mass * normal
            v, w, friction = contacts.point_friction(v, w, wall_friction[k], p.radius * normal, normal,
                                                     p.wall_friction * total)
            w, twist = contacts.twist_friction(w, (wall_twist[0][k], wall_twist[1][k]), normal,
                                               p.wall_rolling_friction * total,
                                               p.wall_spinning_friction * total)
            new_normal.append(total), new_friction.append(friction), new_twist.append(twist)
        w, ground_twist = contacts.twist_friction(w, ground_twist, up, p.ground_rolling_friction * ground_normal_impulse,
                                                  p.ground_spinning_friction * ground_normal_impulse)
        v, w, ground_friction = contacts.point_friction(v, w, ground_friction, ground_lever, up,
                                                        p.ground_friction * ground_normal_impulse)
        if n_walls:
            wall_normal = jnp.stack(new_normal)
            wall_friction = jnp.stack(new_friction)
            wall_twist = (jnp.stack([t[0] for t in new_twist]), jnp.stack([t[1] for t in new_twist]))
        return v, w, wall_normal, wall_friction, wall_twist, ground_friction, ground_twist

    wall_init = (jnp.zeros(max(n_walls, 1), v.dtype), jnp.zeros((max(n_walls, 1), 3), v.dtype),
                 (jnp.zeros((max(n_walls, 1), 3), v.dtype), jnp.zeros((max(n_walls, 1), 3), v.dtype)))
    carry = (v, w, *wall_init, zero3, (zero3, zero3))
    v, w, *_ = jax.lax.fori_loop(0, p.solver_iterations, iteration, carry)
    # The ground's normal impulse cancels any vertical velocity: the ball stays on the plane.
    velocity = v[:2]
    return BallState(position=state.position + h * velocity, velocity=velocity, angular_velocity=w)


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
                         angular_velocity=jnp.zeros(3, jnp.float32))

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

