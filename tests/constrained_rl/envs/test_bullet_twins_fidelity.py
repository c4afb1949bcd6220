"""The Ball twins beside PyBullet itself (Bullet-Safety-Gym 1.4.0): the same start, the same actions.

Tolerances sit just above the agreement measured (benchmarks/twin_fidelity.py and docs/environments.md):
on Run the twin follows PyBullet to about 1e-5 m; on Circle, to about 7 mm over the first second (PyBullet's
persistent contact manifold adds a little rolling resistance early on) and through a wall impact, whose
bounce comes from PyBullet's overlap push-out and is reproduced by the twin.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from constrained_rl.envs.bullet_twins import controllers as C
from constrained_rl.envs.bullet_twins import make_twin
from constrained_rl.envs.bullet_twins import reference as R

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pybullet") is None or importlib.util.find_spec("bullet_safety_gym") is None,
    reason="the real simulator (pybullet, bullet-safety-gym) is not installed")


def real_env(real_id, capsys):
    # Bullet-Safety-Gym redirects the C-level stdout/stderr while it loads PyBullet: it needs the real streams.
    with capsys.disabled():
        return R.real_env(real_id)


def compare(env, twin, actions):
    start = R.twin_start(twin, env)
    real = R.real_rollout(env, len(actions), actions)
    sim = R.twin_rollout(twin, start, len(actions), actions)
    return real, sim


def errors(real, sim):
    return (np.linalg.norm(sim.position - real.position, axis=1).max(),
            np.linalg.norm(sim.velocity - real.velocity, axis=1).max())


def test_ball_run_follows_pybullet(capsys):
    env, twin = real_env("SafetyBallRun-v0", capsys), make_twin("BallRunTwin")
    try:
        for seed, sequence in enumerate(C.OPEN_LOOP):  # 1 s of each
            R.real_reset(env, seed)
            real, sim = compare(env, twin, C.open_loop(sequence, 30, twin.dt, seed=seed))
            position_error, velocity_error = errors(real, sim)
            # measured: at most 1.0e-5 m and 1.3e-5 m/s, observations 2.5e-6, rewards 2.1e-5
            assert position_error < 3e-5 and velocity_error < 3e-5, (sequence, position_error, velocity_error)
            np.testing.assert_allclose(sim.observation, real.observation, atol=1e-5)
            np.testing.assert_allclose(sim.reward, real.reward, atol=1e-4)
            np.testing.assert_array_equal(sim.cost, real.cost)
    finally:
        env.close()


def test_ball_circle_follows_pybullet_and_its_walls(capsys):
    env, twin = real_env("SafetyBallCircle-v0", capsys), make_twin("BallCircleTwin")
    steps = 12  # 1.2 s; one length, so the twin's rollout compiles once
    try:
        for seed, sequence in enumerate(("constant", "sinusoid")):
            R.real_reset(env, seed)
            real, sim = compare(env, twin, C.open_loop(sequence, steps, twin.dt, seed=seed))
            position_error, velocity_error = errors(real, sim)
            # measured: at most 6.8 mm and 8.5 mm/s, rewards 5e-4
            assert position_error < 0.01 and velocity_error < 0.01, (sequence, position_error, velocity_error)
            np.testing.assert_allclose(sim.reward, real.reward, atol=1e-3)
            np.testing.assert_array_equal(sim.cost, real.cost)
        # Head-on into the wall at x = 11.9 at 4 m/s: the ball hops and bounces back at 2 m/s in both.
        R.real_reset(env, 0)
        env.agent.set_position([10.0, 0.0, 0.49999])
        env.agent.set_velocity([4.0, 0.0, 0.0], [0.0, 8.0, 0.0])
        real, sim = compare(env, twin, np.zeros((steps, 2), np.float32))
        assert real.velocity[4, 0] < -1.5 and real.position[:, 0].max() < 11.45  # what is being matched
        position_error, velocity_error = errors(real, sim)
        assert position_error < 0.002 and velocity_error < 0.025, (position_error, velocity_error)  # measured 1.0 mm, 18 mm/s
    finally:
        env.close()
