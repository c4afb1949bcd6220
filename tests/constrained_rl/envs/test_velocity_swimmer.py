"""SwimmerVelocity: Brax's swimmer (generalized backend) through the fluid-drag compatibility fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from brax import envs as brax_envs

from constrained_rl.envs import brax_compat
from constrained_rl.envs.velocity import VelocityEnv

NUM_STEPS = 4


def test_compat_fix_is_scoped_to_brax_fluid():
    from brax import fluid

    brax_compat.install()
    assert brax_compat.install() is False  # idempotent
    x = jnp.array([-1.0, 0.5, 2.0])
    np.testing.assert_allclose(fluid.jp.clip(x, a_min=0.0), [0.0, 0.5, 2.0])
    np.testing.assert_allclose(fluid.jp.clip(x, a_min=0.0, a_max=1.0), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(fluid.jp.clip(x, max=1.0), [-1.0, 0.5, 1.0])
    assert fluid.jp.sqrt is jnp.sqrt  # everything else is jax.numpy's own
    if brax_compat.clip_needs_shim():
        with pytest.raises(TypeError):  # jax.numpy itself is untouched
            jnp.clip(x, a_min=0.0)


@pytest.fixture(scope="module")
def trajectory():
    """Brax's swimmer with an action repeat of 1 stepped frame by frame, and ours over the same actions.

    The threshold is the median of the frame speeds, so it splits the frames of some steps.
    """
    brax_compat.install()
    key = jax.random.PRNGKey(0)
    single = brax_envs.get_environment("swimmer", backend="generalized", n_frames=1)
    n_frames = 4  # Brax's swimmer default
    actions = jax.random.uniform(key, (NUM_STEPS, single.action_size), minval=-1, maxval=1)
    frame_step = jax.jit(single.step)
    state = single.reset(key)
    frames = []
    for action in actions:
        speeds = []
        for _ in range(n_frames):
            state = frame_step(state, action)
            speeds.append(float(state.metrics["x_velocity"]))
        frames.append(speeds)
    env = VelocityEnv("SwimmerVelocity", threshold=float(np.median(frames)))
    ours = [env.reset(key)]
    step = jax.jit(env.step)
    for action in actions:
        ours.append(step(ours[-1], action))
    return env, actions, ours, frames


def test_swimmer_resets_and_steps(trajectory):
    env, actions, ours, frames = trajectory
    assert env.backend == "generalized" and env.n_frames == 4
    assert env.observation_size == 8 and env.action_size == 2
    for action, state, speeds in zip(actions, ours[1:], frames):
        assert np.all(np.isfinite(state.obs)) and float(state.done) == 0.0
        np.testing.assert_allclose(state.metrics["mean_frame_speed"], np.mean(speeds), rtol=1e-3, atol=1e-5)
        # Brax's swimmer reward: forward velocity minus 1e-4 ||a||^2.
        np.testing.assert_allclose(state.reward, np.mean(speeds) - 1e-4 * float(jnp.sum(action**2)),
                                   rtol=1e-3, atol=1e-5)


def test_swimmer_cost_counts_frames_over_threshold(trajectory):
    env, _, ours, frames = trajectory
    counts = [sum(s > env.threshold for s in speeds) for speeds in frames]
    np.testing.assert_allclose([float(s.cost) for s in ours[1:]], counts)
    assert any(0 < c < env.n_frames for c in counts), counts  # the threshold splits some step's frames
