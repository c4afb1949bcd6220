from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from brax import envs as brax_envs

from constrained_rl.config import ConfigError
from constrained_rl.envs.velocity import VelocityEnv, frame_speeds, velocity_cost

NUM_STEPS = 3


def test_frame_speeds_and_cost_by_hand():
    positions = jnp.array([[0.0, 0.0, 0.5], [0.1, 0.0, 0.5], [0.4, 0.4, 0.5], [0.4, 0.4, 0.5]])
    np.testing.assert_allclose(frame_speeds(positions, 0.1, planar=False), [1.0, 3.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(frame_speeds(positions, 0.1, planar=True), [1.0, 5.0, 0.0], atol=1e-5)
    assert float(velocity_cost(jnp.array([1.0, 3.0, 0.0]), 0.9)) == 2.0
    assert float(velocity_cost(jnp.array([1.0, 3.0, 0.0]), 3.0)) == 0.0  # strictly above


@pytest.fixture(scope="module")
def trajectory():
    """Our env, and Brax's own with an action repeat of 1 stepped frame by frame (compiled once each)."""
    env = VelocityEnv("HalfCheetahVelocity", threshold=0.3)
    key = jax.random.PRNGKey(0)
    actions = jax.random.uniform(key, (NUM_STEPS, env.action_size), minval=-1, maxval=1)
    ours = [env.reset(key)]
    step = jax.jit(env.step)
    for action in actions:
        ours.append(step(ours[-1], action))
    single = brax_envs.get_environment("halfcheetah", backend="spring", n_frames=1)
    frame_step = jax.jit(single.step)
    state = single.reset(key)
    frame_speeds_per_step = []
    for action in actions:
        speeds = []
        for _ in range(env.n_frames):
            state = frame_step(state, action)
            speeds.append(float(state.metrics["x_velocity"]))
        frame_speeds_per_step.append(speeds)
    return env, actions, ours, frame_speeds_per_step


def test_reward_is_brax_halfcheetah_reward(trajectory):
    env, actions, ours, frames = trajectory
    assert env.n_frames == 16 and env.backend == "spring"
    for action, state, speeds in zip(actions, ours[1:], frames):
        # The mean of the per-frame speeds is the step's velocity (total displacement / dt), and
        # Brax's HalfCheetah reward is that velocity minus 0.1 ||a||^2.
        np.testing.assert_allclose(state.metrics["mean_frame_speed"], np.mean(speeds), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(state.reward, np.mean(speeds) - 0.1 * float(jnp.sum(action**2)), rtol=1e-3, atol=1e-4)
        assert float(state.done) == 0.0


def test_cost_counts_frames_over_threshold(trajectory):
    env, _, ours, frames = trajectory
    counts = [sum(s > env.threshold for s in speeds) for speeds in frames]
    np.testing.assert_allclose([float(s.cost) for s in ours[1:]], counts)
    assert any(0 < c < env.n_frames for c in counts), counts  # the threshold splits some step's frames


def test_bad_arguments():
    with pytest.raises(ConfigError, match="backend"):
        VelocityEnv("HalfCheetahVelocity", backend="bullet")
    with pytest.raises(ConfigError, match="threshold"):
        VelocityEnv("HalfCheetahVelocity", threshold=-1.0)
    with pytest.raises(ConfigError, match="known"):
        VelocityEnv("Centipede")


@pytest.mark.parametrize("name", ["HopperVelocity", "AntVelocity"])
def test_step_keeps_the_state_type(name):
    """Brax returns some weakly typed values from step; a type change would recompile a jitted loop."""
    env = VelocityEnv(name)
    state = jax.eval_shape(env.reset, jax.random.PRNGKey(0))
    stepped = jax.eval_shape(env.step, state, jax.ShapeDtypeStruct((env.action_size,), jnp.float32))
    assert jax.tree.structure(stepped) == jax.tree.structure(state)
    for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(stepped)):
        assert (before.shape, before.dtype, before.weak_type) == (after.shape, after.dtype, after.weak_type)
