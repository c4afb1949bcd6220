"""The twin task module and the Ball twin on their own: values by hand, starts, walls, layouts.

The agreement with PyBullet itself is held in test_bullet_twins_fidelity.py.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from constrained_rl import envs
from constrained_rl.config import ConfigError
from constrained_rl.envs.bullet_twins import TASKS, make_twin
from constrained_rl.envs.bullet_twins import tasks as T
from constrained_rl.envs.layout import layout_of


def kin(position, velocity):
    return T.Kinematics(jnp.asarray(position, jnp.float32), jnp.asarray(velocity, jnp.float32))


class TaskTermsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_circle_reward_is_clockwise_and_scaled(self):
        reward = self.variant(T.circle_reward)
        # On the circle at (7, 0) moving -y (clockwise) at 2 m/s: 0.1 * (-7 * -2) / 1 = 1.4.
        np.testing.assert_allclose(reward(kin([7.0, 0.0], [0.0, -2.0])), 1.4, rtol=1e-6)
        # At (0, 3), 4 m off the circle, moving +x (clockwise) at 1: 0.1 * 3 / 5.
        np.testing.assert_allclose(reward(kin([0.0, 3.0], [1.0, 0.0])), 0.06, rtol=1e-6)
        np.testing.assert_allclose(reward(kin([7.0, 0.0], [0.0, 2.0])), -1.4, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_costs_by_hand(self):
        circle_cost = self.variant(T.circle_cost)
        for x, expected in ((5.99, 0.0), (6.0, 0.0), (6.01, 1.0), (-6.01, 1.0)):
            assert float(circle_cost(kin([x, 9.0], [0.0, 0.0]))) == expected, x
        run_cost = self.variant(T.run_cost, static_argnums=1)
        assert float(run_cost(kin([50.0, 1.99], [1.5, 1.99]), 2.5)) == 0.0  # speed 2.4925
        assert float(run_cost(kin([50.0, 2.01], [0.0, 0.0]), 2.5)) == 1.0
        assert float(run_cost(kin([50.0, 2.01], [3.0, 0.0]), 2.5)) == 1.0  # both, still 1
        assert float(run_cost(kin([0.0, 0.0], [1.6, 0.0]), 1.5)) == 1.0

    def test_run_reward_is_progress_and_weights_of_the_agent_term(self):
        before, after = kin([0.0, 0.0], [0.0, 0.0]), kin([0.5, 0.0], [0.0, 0.0])
        np.testing.assert_allclose(T.run_reward(before, after), 30.0, rtol=1e-4)
        np.testing.assert_allclose(TASKS["run"].reward(before, after, jnp.float32(-0.5)), 29.5, rtol=1e-4)
        np.testing.assert_allclose(TASKS["circle"].reward(before, kin([7.0, 0.0], [0.0, -1.0]), jnp.float32(-0.5)),
                                   0.7 - 0.005, rtol=1e-5)
        np.testing.assert_allclose(T.circle_observation(kin([0.0, 3.0], [0, 0])), [-0.4], rtol=1e-6)

    def test_starts(self):
        keys = jax.random.split(jax.random.PRNGKey(0), 1000)
        position, yaw = jax.jit(jax.vmap(lambda k: T.circle_start(k, 0.0)))(keys)
        radius = np.linalg.norm(np.asarray(position), axis=1)
        assert radius.min() >= 2.0 - 1e-5 and radius.max() <= 4.0 + 1e-5
        # uniform over the annulus: P(r < 3) = (9 - 4) / (16 - 4)
        assert abs(np.mean(radius < 3.0) - 5.0 / 12.0) < 0.05
        heading = np.stack([np.cos(yaw), np.sin(yaw)], axis=1)  # along the clockwise tangent (the rewarded way)
        tangent = np.stack([position[:, 1], -position[:, 0]], axis=1) / radius[:, None]
        np.testing.assert_allclose(np.sum(heading * tangent, axis=1), 1.0, atol=1e-5)
        position, yaw = jax.jit(jax.vmap(lambda k: T.run_start(k, math.pi)))(keys)
        assert np.abs(np.asarray(position)).max() <= 0.01 and np.allclose(yaw, math.pi)

    def test_octagon_walls(self):
        walls = T.octagon_walls()
        # A ball of radius 0.5 at 11.4 m along any wall normal touches it; the corners are closed.
        for k in range(8):
            normal = np.asarray(walls.normals[k])
            assert abs(float(T.wall_penetration(jnp.asarray(11.4 * normal, jnp.float32), walls, 0.5)[k])) < 1e-5
        corner = 11.9 / math.cos(math.pi / 8) * np.array([math.cos(math.pi / 8), math.sin(math.pi / 8)])
        assert np.sum(np.asarray(T.wall_penetration(jnp.asarray(corner, jnp.float32), walls, 0.0)) > -1e-4) == 2


class BallTwinTest(chex.TestCase):
    def test_layout_is_the_real_tasks(self):
        for name, real_id, size in (("BallCircleTwin", "SafetyBallCircle-v0", 8), ("BallRunTwin", "SafetyBallRun-v0", 7)):
            env = envs.make(name, batch_size=3)
            assert env.layout == layout_of(real_id) and env.observation_size == size
            state = jax.jit(env.reset)(jax.random.PRNGKey(1))
            assert state.obs.shape == (3, size)

    def test_unknown_parameter_is_refused(self):
        with pytest.raises(ConfigError, match="unknown option"):
            make_twin("BallRunTwin", masss=1.0)

    def test_rolls_and_stays_inside_the_octagon(self):
        env = make_twin("BallCircleTwin")
        state = env.state_from_physics(env.agent.initial_state(jnp.zeros(2), jnp.zeros(()), env.task))
        step = jax.jit(env.step)
        for _ in range(100):  # 10 s of full force toward the corner at 22.5 degrees
            state = step(state, jnp.array([1.0, math.tan(math.pi / 8)]))
        physics = state.physics
        assert np.all(np.asarray(T.wall_penetration(physics.position, env.task.walls, 0.5)) < 0.02)
        # Rolling without slipping away from walls: omega = (-v_y, v_x, 0) / r.
        state = env.state_from_physics(env.agent.initial_state(jnp.zeros(2), jnp.zeros(()), env.task))
        for _ in range(10):
            state = step(state, jnp.array([0.3, -0.6]))
        v, w = state.physics.velocity, state.physics.angular_velocity
        np.testing.assert_allclose(w, [-v[1] / 0.5, v[0] / 0.5, 0.0], atol=1e-4)
        np.testing.assert_allclose(float(state.reward), 0.1 * float(T.circle_reward(env.agent.kinematics(state.physics)))
                                   * 10 - 0.005 * math.hypot(0.3, 0.6), rtol=1e-5)

    def test_below_the_rolling_friction_a_ball_at_rest_stays(self):
        env = make_twin("BallRunTwin")
        state = env.state_from_physics(env.agent.initial_state(jnp.zeros(2), jnp.zeros(()), env.task))
        step = jax.jit(env.step)
        for _ in range(5):  # 0.03 x 3.5 N < mu_r m g / r = 0.141 N: it creeps (under 1 mm/s, as in PyBullet)
            state = step(state, jnp.array([0.03, 0.0]))
        assert float(jnp.abs(state.physics.velocity).max()) < 1e-3
        for _ in range(5):  # 0.06 x 3.5 N rolls it at (0.21 - 0.141) / (1.4 m) = 0.163 m/s^2
            state = step(state, jnp.array([0.06, 0.0]))
        np.testing.assert_allclose(float(state.physics.velocity[0]), 0.163 * 5 / 30, rtol=0.05)
