"""Offline learners on a real task: a file in DSRL's own layout and naming trains and evaluates on the host."""

from __future__ import annotations

import json

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.control import bc
from constrained_rl.config import ConfigError
from constrained_rl.data import dsrl
from constrained_rl.envs import host
from experiments import run
from experiments.context import RunContext

pytest.importorskip("bullet_safety_gym")

TASK = "SafetyBallCircle-v0"


def random_episodes_on_the_real_task(num_episodes: int) -> dict[str, np.ndarray]:
    """Uniformly random behaviour recorded on the real simulator, rows episode after episode."""

    def uniform(params, obs, key):
        return jax.random.uniform(key, (2,), minval=-1.0, maxval=1.0), {}

    pool = host.shared_pool(TASK, 2)
    *_, recorded = host.play(pool, uniform, jnp.zeros(1), host.plan_episodes(jax.random.PRNGKey(0)[None], num_episodes),
                             record=True)
    return {key: np.concatenate([episode[key] for episode in recorded]) for key in recorded[0]}


def write_as_dsrl_does(directory, arrays) -> str:
    """DSRL's file: ``<env id>-<max cost>-<episodes>.hdf5``, the seven datasets, no attributes."""
    path = directory / f"{TASK}-80-{int(arrays['terminals'].sum() + arrays['timeouts'].sum())}.hdf5"
    with h5py.File(path, "w") as file:
        for key, value in arrays.items():
            file.create_dataset(key, data=value.astype(bool) if key in ("terminals", "timeouts") else value)
    return str(path)


def test_a_dsrl_file_trains_and_evaluates_on_its_real_task(tmp_path):
    path = write_as_dsrl_does(tmp_path, random_episodes_on_the_real_task(2))
    run_dir = tmp_path / "run"
    assert run.main(["bc_all", "--task", TASK, "--dataset", path, "--cost_limits", "20", "--num_seeds", "1",
                     "--hidden_sizes", "8", "--batch_size", "16", "--num_updates", "10", "--updates_per_chunk", "10",
                     "--eval_every", "0", "--eval_episodes", "2", "--run-dir", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["scores"]["limit_20"]["num_episodes"] == 2
    # Normalized by DSRL's published BallCircle references (infos.py): R in [0.383, 881.5].
    exported = json.loads((run_dir / "policy" / "policy.json").read_text())
    assert exported["reference_returns"] == {"reward_min": 0.38312244415283203, "reward_max": 881.46337890625}
    assert exported["layout"]["source"].startswith("Bullet-Safety-Gym")
    # The evaluate experiment re-scores them there, and refuses a real task of the same sizes but another layout.
    from experiments import evaluate

    rescored = evaluate.run(evaluate.Config(run_dir=str(run_dir), episodes=2), None)
    assert rescored["scores"] == summary["scores"]
    with pytest.raises(ConfigError, match="not trained for SafetyCarCircle-v0: observation dimension 2 is velocity_x"):
        evaluate.Config(run_dir=str(run_dir), task="SafetyCarCircle-v0")


def _synthetic_file(path, task):
    """Two 5-step episodes with the real CarCircle's sizes (8 observations, 2 actions)."""
    rows = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
    flags = np.zeros(10, bool)
    flags[[4, 9]] = True
    arrays = {"observations": rows, "next_observations": rows, "actions": rows[:, :2], "rewards": rows[:, 0],
              "costs": np.zeros(10, np.float32), "terminals": np.zeros(10, bool), "timeouts": flags}
    dsrl.save_dsrl(path, arrays, dsrl.DatasetMetadata(task=task, reward_min=0.0, reward_max=1.0))
    return str(path)


@pytest.mark.parametrize("data_task, message", [
    ("CarCircle", "not trained for SafetyCarCircle-v0: observation dimension 2 is velocity_x \\[m/s\\] x 0.2"),
    (None, "names no known task it was recorded on"),
])
def test_data_of_another_layout_is_refused_before_training(tmp_path, data_task, message):
    # The project's CarCircle has the real CarCircle's sizes (8, 2) but other contents.
    config = bc.Config(task="SafetyCarCircle-v0", dataset=_synthetic_file(tmp_path / "x.hdf5", data_task),
                       num_updates=10, updates_per_chunk=10)
    with pytest.raises(ConfigError, match=message):
        bc.run(config, RunContext(tmp_path / "run", progress=False))
