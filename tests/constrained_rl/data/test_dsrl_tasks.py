"""DSRL's task names, file names and published references, and how loading applies them."""

from __future__ import annotations

import h5py
import numpy as np
from constrained_rl.data import dsrl_tasks
from constrained_rl.data.dsrl import DatasetMetadata, load_dsrl, save_dsrl
from constrained_rl.envs import layout
from tests.constrained_rl.data.tiny_dataset import make_arrays


def test_names_resolve_to_the_simulator_ids():
    assert dsrl_tasks.dsrl_task("OfflineBallCircle-v0").env_id == "SafetyBallCircle-v0"
    assert dsrl_tasks.dsrl_task("OfflinePointButton1Gymnasium-v0").env_id == "SafetyPointButton1-v0"
    assert dsrl_tasks.dsrl_task("SafetyPointPush2Gymnasium-v0").env_id == "SafetyPointPush2-v0"
    assert dsrl_tasks.dsrl_task("BallCircle") is None  # the project's own task, not DSRL's
    assert dsrl_tasks.task_from_file_name("data/SafetyBallCircle-v0-80-886.hdf5") == "SafetyBallCircle-v0"
    assert dsrl_tasks.task_from_file_name("SafetyPointButton1Gymnasium-v0-200-2268.hdf5") == "SafetyPointButton1-v0"
    assert dsrl_tasks.task_from_file_name("SafetyAntRun-v0-150-1816.hdf5") is None  # a DSRL task not run here
    assert dsrl_tasks.task_from_file_name("ballcircle.hdf5") is None
    # Every DSRL task here is a real task with a declared layout and DSRL's time limit.
    for task in dsrl_tasks.DSRL_TASKS.values():
        assert task.env_id in layout.LAYOUTS and task.reward_max > task.reward_min >= 0


def test_published_figures_as_in_dsrl_infos():
    ball = dsrl_tasks.DSRL_TASKS["SafetyBallCircle-v0"]
    assert (ball.reward_min, ball.reward_max, ball.cost_max, ball.episode_length) == (
        0.38312244415283203, 881.46337890625, 80.0, 200)
    push = dsrl_tasks.DSRL_TASKS["SafetyPointPush1-v0"]
    assert (push.reward_max, push.cost_max, push.episode_length) == (16.518654299293367, 150.0, 1000)


def _write_dsrl_style(path):
    """A file as DSRL ships them: the seven datasets, no attributes."""
    with h5py.File(path, "w") as file:
        for key, value in make_arrays().items():
            file.create_dataset(key, data=value)
    return path


def test_loading_applies_dsrl_references_then_the_override(tmp_path):
    dsrl_file = load_dsrl(_write_dsrl_style(tmp_path / "SafetyCarRun-v0-40-651.hdf5"))
    assert dsrl_file.metadata == DatasetMetadata(task="SafetyCarRun-v0", episode_length=200,
                                                 reward_min=204.28726196289062, reward_max=574.6533203125,
                                                 max_episode_cost=40.0)
    # A file of our own on a DSRL task: DSRL's figures replace the file's; an override wins over both.
    own = tmp_path / "collected.hdf5"
    save_dsrl(own, make_arrays(), DatasetMetadata(task="OfflineBallRun-v0", reward_min=1.0, reward_max=2.0,
                                                  collection="ours"))
    loaded = load_dsrl(own)
    assert (loaded.metadata.task, loaded.metadata.reward_min, loaded.metadata.reward_max) == (
        "SafetyBallRun-v0", 26.339754104614258, 1327.445556640625)
    assert loaded.metadata.collection == "ours"
    overridden = load_dsrl(own, DatasetMetadata(reward_max=2000.0))
    assert (overridden.metadata.reward_min, overridden.metadata.reward_max) == (26.339754104614258, 2000.0)
    # The project's own task keeps the file's figures.
    mine = tmp_path / "mine.hdf5"
    save_dsrl(mine, make_arrays(), DatasetMetadata(task="BallRun", reward_min=1.0, reward_max=2.0))
    assert (load_dsrl(mine).metadata.reward_min, load_dsrl(mine).metadata.reward_max) == (1.0, 2.0)
    plain = load_dsrl(_write_dsrl_style(tmp_path / "renamed.hdf5"))
    assert plain.metadata.task is None and plain.metadata.reward_min is None
    np.testing.assert_array_equal(np.asarray(plain.rewards), np.asarray(dsrl_file.rewards))


def test_a_name_that_is_not_dsrls_is_left_alone(tmp_path):
    path = _write_dsrl_style(tmp_path / "SafetyBallCircle-v0-80.hdf5")  # not DSRL's <id>-<cost>-<episodes>
    assert load_dsrl(path).metadata.task is None
    assert "OfflineBallCircle-v0" not in dsrl_tasks.DSRL_TASKS  # keyed by the simulator's id only
