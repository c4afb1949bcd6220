"""CDT on a real task: its history-conditioned policy plays on the host simulator, told each cost limit."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from algorithms.control import offline
from algorithms.control import offline_benchmark as bench
from constrained_rl import envs
from constrained_rl.config import ConfigError
from constrained_rl.data import dsrl
from experiments import run

pytest.importorskip("bullet_safety_gym")

TASK = "SafetyBallCircle-v0"
EPISODE_LENGTH = 200  # the registered time limit of BallCircle


def file_of_the_real_tasks_layout(path) -> str:
    """Five 12-step episodes of random rows with the real BallCircle's sizes (8 observations, 2 actions),
    recorded (so says the file) on that task: its layout is the real task's."""
    rng = np.random.default_rng(0)
    rows = 60
    flags = np.zeros(rows, bool)
    flags[11::12] = True
    observations = rng.normal(size=(rows, 8)).astype(np.float32)
    arrays = {"observations": observations, "next_observations": observations,
              "actions": rng.uniform(-1, 1, (rows, 2)).astype(np.float32),
              "rewards": rng.uniform(0, 1, rows).astype(np.float32),
              "costs": (rng.uniform(size=rows) < 0.3).astype(np.float32),
              "terminals": np.zeros(rows, bool), "timeouts": flags}
    dsrl.save_dsrl(path, arrays, dsrl.DatasetMetadata(task=TASK, reward_min=0.0, reward_max=100.0))
    return str(path)


def test_cdt_trained_tiny_evaluates_on_the_real_task(tmp_path):
    path = file_of_the_real_tasks_layout(tmp_path / "data.hdf5")
    run_dir = tmp_path / "run"
    # The benchmark's quick sizes, one update, no dropout: what costs here is compiling, not training.
    quick = {k: v for k, v in bench.QUICK_SIZES.items() if k in ("embedding_dim", "num_layers", "batch_size")}
    no_dropout = [arg for name in ("attention", "residual", "embedding") for arg in (f"--{name}_dropout", "0")]
    assert run.main(["cdt", "--task", TASK, "--dataset", path, "--cost_limits", "0,40", "--num_seeds", "1",
                     "--embedding_dim", str(quick["embedding_dim"]), "--num_layers", str(quick["num_layers"]),
                     "--num_heads", "2", "--context_length", "4", "--batch_size", str(quick["batch_size"]),
                     *no_dropout, "--num_updates", "1", "--updates_per_chunk", "1", "--eval_every", "0",
                     "--eval_episodes", "1", "--run-dir", str(run_dir)]) == 0
    scores = json.loads((run_dir / "summary.json").read_text())["scores"]
    for limit in ("limit_0", "limit_40"):
        assert scores[limit]["num_episodes"] == 1 and scores[limit]["num_seeds"] == 1
    # The one trained policy, asked for cost 0 or 40, plays the same episode (seed, keys) otherwise.
    assert scores["limit_0"]["normalized_reward_mean"] != scores["limit_40"]["normalized_reward_mean"]
    assert json.loads((run_dir / "policy" / "policy.json").read_text())["layout"]["source"].startswith("Bullet")


def test_the_benchmark_takes_cdt_on_a_real_task_and_the_layout_is_still_checked(tmp_path):
    assert "cdt" in bench.Config(task=TASK, methods=("cdt", "bc_all")).methods
    from algorithms.control import cdt

    config = cdt.Config(task=TASK, cost_limits=(10.0,), num_seeds=1, embedding_dim=16, num_layers=1, num_heads=2,
                        context_length=4, batch_size=8, num_updates=1, updates_per_chunk=1)
    dataset = dsrl.load_dsrl(file_of_the_real_tasks_layout(tmp_path / "data.hdf5"))
    session = offline.make_session(config, dataset, cdt.builder(config, dataset))
    assert isinstance(session.env, envs.HostTaskEnv) and session.algorithm.evaluate is not None
    # A policy trained on the project's own BallCircle (another layout) is refused before any episode, before
    # its parameters are even read.
    foreign = session._replace(policy_layout=envs.task_layout("BallCircle"))
    with pytest.raises(ConfigError, match=f"not trained for {TASK}"):
        offline.play_episodes(foreign, None, jax.random.PRNGKey(0), 1)
