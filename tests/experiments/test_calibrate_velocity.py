"""The velocity-threshold calibration at a tiny budget, on a stand-in for the Brax task (fast to compile).

The stand-in is a point pushed along a line: its per-frame speed is the action, so the deterministic
policy's speed, the masked average and the threshold are all known by hand. The Brax tasks themselves
are covered by tests/constrained_rl/envs/test_velocity*.py.
"""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from constrained_rl.config import ConfigError
from constrained_rl.envs.base import Env, EnvState, initial_state
from constrained_rl.envs.velocity import VELOCITY_TASKS
from experiments import calibrate_velocity

pytestmark = pytest.mark.quick_compile  # tiny calibration runs: mostly compiling

TINY = ["--num-timesteps", "64", "--num-envs", "4", "--unroll-length", "8", "--num-minibatches", "2",
        "--num-epochs", "1", "--hidden", "8", "--iterations-per-chunk", "1", "--episode-length", "16",
        "--eval-episodes", "2"]


class PushedPoint(Env):
    """Speed = action[0] every frame; observation = [t]; terminates after ``terminate_at`` steps."""

    n_frames = 2
    frame_dt = 0.01

    def __init__(self, name: str, backend=None, threshold: float = 1.0, episode_length: int = 16,
                 terminate_at: int = 1000):
        self.task = VELOCITY_TASKS[name]
        self.backend = backend or self.task.backend
        self.threshold = threshold
        self._episode_length = episode_length
        self.terminate_at = terminate_at

    observation_size = property(lambda self: 1)
    action_size = property(lambda self: 1)
    episode_length = property(lambda self: self._episode_length)

    def reset(self, key: jax.Array) -> EnvState:
        return initial_state(jnp.zeros((1,)), jnp.zeros(()), {"mean_frame_speed": jnp.zeros(())})

    def step(self, state: EnvState, action: jax.Array) -> EnvState:
        t = state.physics + 1.0
        speed = jnp.clip(action[0], -1.0, 1.0)
        return state.replace(obs=t[None], next_obs=t[None], reward=speed, cost=jnp.zeros(()),
                             done=(t >= self.terminate_at).astype(jnp.float32), truncation=jnp.zeros(()),
                             metrics={**state.metrics, "mean_frame_speed": speed}, physics=t)


def test_tiny_calibration_prints_top_speed_and_half_of_it(monkeypatch, capsys):
    monkeypatch.setattr(calibrate_velocity, "VelocityEnv", PushedPoint)
    calibrate_velocity.main(["hopper", *TINY])  # the Brax name resolves to HopperVelocity
    captured = capsys.readouterr()
    record = json.loads(captured.out.strip().splitlines()[-1])
    assert record["task"] == "HopperVelocity" and record["backend"] == "spring"
    assert record["env_steps"] == 64 and record["eval_episodes"] == 2
    speeds = record["episode_speeds"]
    assert len(speeds) == 2 and all(-1.0 <= s <= 1.0 for s in speeds)
    assert record["episode_lengths"] == [16, 16]
    assert record["top_speed"] == pytest.approx(np.mean(speeds), abs=1e-3)
    assert record["threshold"] == pytest.approx(0.5 * record["top_speed"], abs=1e-4)
    # Plain PPO: the multiplier is held at 0, so the cost never reaches the policy.
    assert record["ppo"]["multiplier_kind"] == "fixed" and record["ppo"]["multiplier_init"] == 0.0
    progress = [json.loads(line) for line in captured.err.splitlines() if line.startswith('{"chunk"')]
    assert [row["chunk"] for row in progress] == [1, 2]


def test_speed_is_averaged_over_the_steps_before_termination():
    task = PushedPoint("HopperVelocity", episode_length=10, terminate_at=4)
    # Speed 0.8 on step 1 and 0.2 afterwards: the 4 alive steps average 0.35; steps 5-10 are masked.
    policy = lambda params, obs, key: (jnp.where(obs[0] < 1, params, 0.2)[None], {})  # noqa: E731
    speeds, lengths = calibrate_velocity.evaluate_speed(task, policy, 0.8, jax.random.PRNGKey(0), 3)
    np.testing.assert_allclose(speeds, [0.35] * 3, rtol=1e-6)
    np.testing.assert_array_equal(lengths, [4, 4, 4])


def test_unknown_task_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown velocity task"):
        calibrate_velocity.make_config(calibrate_velocity.parse_args(["Centipede"]))
