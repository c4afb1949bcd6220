"""Declared task layouts: their sizes against the real simulators, and the mismatch check."""

import json

import numpy as np
import pytest

from constrained_rl import envs
from constrained_rl.config import ConfigError
from constrained_rl.envs import layout as layouts

BULLET_IDS = ("SafetyBallCircle-v0", "SafetyCarCircle-v0", "SafetyBallRun-v0", "SafetyCarRun-v0")


@pytest.mark.parametrize("task", BULLET_IDS)
def test_bullet_layout_matches_the_simulator(capsys, task):
    gym = pytest.importorskip("gymnasium")
    with capsys.disabled():  # Bullet-Safety-Gym redirects the real stdout/stderr while PyBullet loads
        pytest.importorskip("bullet_safety_gym")
        env = gym.make(task)
    declared = layouts.LAYOUTS[task]
    assert env.observation_space.shape == (declared.observation_size,)
    np.testing.assert_array_equal(env.action_space.low, [d.low for d in declared.action])
    np.testing.assert_array_equal(env.action_space.high, [d.high for d in declared.action])
    # The declared scales reproduce the observation from the simulator's state (position x 0.1, ...).
    obs, _ = env.reset()
    agent = env.unwrapped.agent
    x, y = agent.get_position()[:2]
    names = [d.name for d in declared.observation]
    scale = {d.name: d.scale for d in declared.observation}
    assert obs[names.index("position_x")] == pytest.approx(scale["position_x"] * x)
    assert obs[names.index("position_y")] == pytest.approx(scale["position_y"] * y)
    if "distance_to_circle" in names:
        distance = np.hypot(x, y) - 7.0
        assert obs[names.index("distance_to_circle")] == pytest.approx(scale["distance_to_circle"] * distance)


def test_project_tasks_declare_their_own_layouts_which_the_real_tasks_refuse():
    for name, real in (("BallCircle", "SafetyBallCircle-v0"), ("CarCircle", "SafetyCarCircle-v0"),
                       ("BallRun", "SafetyBallRun-v0"), ("CarRun", "SafetyCarRun-v0")):
        own = envs.make(name).layout  # through the wrapper stack
        assert own.observation_size == envs.make(name).observation_size
        assert layouts.first_mismatch(own, own) is None
        with pytest.raises(ConfigError, match=f"not trained for {real}: observation dimension"):
            layouts.check_layout(own, layouts.LAYOUTS[real], task=real)


def test_the_message_names_the_first_mismatching_dimension():
    own = envs.make("BallCircle").layout
    with pytest.raises(ConfigError) as error:
        layouts.check_layout(own, layouts.LAYOUTS["SafetyBallCircle-v0"], task="SafetyBallCircle-v0")
    message = str(error.value)
    assert "observation dimension 4 is distance_to_circle [m] x 0.1" in message
    assert "angular_velocity_x [rad/s] x 0.1" in message and "(5 observation dimensions vs 8)" in message
    car = envs.make("CarRun").layout
    assert "observation dimension 2 is velocity_x [m/s] x 0.2" in layouts.first_mismatch(
        car, layouts.LAYOUTS["SafetyCarRun-v0"])


def test_action_mismatch_and_json_round_trip():
    real = layouts.LAYOUTS["SafetyPointPush1-v0"]
    assert real.observation_size == 76 and real.action_size == 2
    again = layouts.Layout.from_json(json.loads(json.dumps(real.to_json())))
    assert again == real
    narrower = layouts.Layout(real.source, real.observation,
                              (real.action[0], layouts.ActionDimension("z_hinge_velocity", real.action[1].unit, -0.5, 0.5)))
    assert layouts.first_mismatch(narrower, real).startswith("action dimension 1 is z_hinge_velocity in [-0.5, 0.5]")
    with pytest.raises(ConfigError, match="malformed"):
        layouts.Layout.from_json({"source": "x"})
    with pytest.raises(ConfigError, match="known: SafetyBallCircle-v0"):
        layouts.layout_of("SafetyBallCircle-v1")
