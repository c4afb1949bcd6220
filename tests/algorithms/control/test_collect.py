"""DSRL-recipe collection: limit schedule, snapshot layout, and an end-to-end file the reader loads."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.control import collect
from algorithms.control.ppo_lag import train as ppo_lag
from constrained_rl.config import ConfigError
from constrained_rl.data import dsrl
from experiments.context import RunContext


def test_limit_schedule_sweeps_the_range_both_ways():
    config = collect.Config(num_policies=3, cost_limit_min=10.0, cost_limit_max=30.0)
    starts, ends = collect.limit_schedule(config)
    np.testing.assert_allclose(starts, [10.0, 20.0, 30.0])
    np.testing.assert_allclose(ends, [30.0, 20.0, 10.0])
    np.testing.assert_allclose(collect.limits_at(jnp.asarray(starts), jnp.asarray(ends), 0.25), [15.0, 20.0, 25.0])
    np.testing.assert_allclose(collect.limits_at(jnp.asarray(starts), jnp.asarray(ends), 2.0), ends)


def test_flatten_snapshot_keeps_episodes_contiguous_and_drops_masked_steps():
    runs, steps, episodes = 2, 3, 2
    index = np.arange(runs * steps * episodes, dtype=np.float32).reshape(runs, steps, episodes)
    arrays = {key: index for key in ("rewards", "costs", "terminals", "timeouts")}
    arrays.update({key: index[..., None] for key in ("observations", "next_observations", "actions")})
    mask = np.ones((runs, steps, episodes), bool)
    mask[1, 2, 0] = False  # run 1, episode 0 ended after its second step
    flat = collect.flatten_snapshot({**arrays, "mask": mask})
    # Row order: run, then episode, then time. Element (r, t, e) has value r*6 + t*2 + e.
    np.testing.assert_array_equal(flat["rewards"], [0, 2, 4, 1, 3, 5, 6, 8, 7, 9, 11])
    assert flat["observations"].shape == (11, 1)


def test_config_refuses_an_inverted_limit_range():
    with pytest.raises(ConfigError, match="cost_limit_max"):
        collect.Config(cost_limit_min=50.0, cost_limit_max=10.0)


def test_collect_writes_a_dsrl_file_the_reader_loads(tmp_path):
    behaviour = ppo_lag.Config(num_envs=4, unroll_length=50, num_epochs=1, num_minibatches=2,
                               actor_hidden_sizes=(16,), critic_hidden_sizes=(16,), total_env_steps=4 * 50 * 4)
    config = collect.Config(task="BallCircle", num_policies=2, snapshot_every=2, episodes_per_snapshot=3,
                            cost_bins=5, reward_bins=5, max_per_cell=1, behaviour=behaviour)
    ctx = RunContext(tmp_path, progress=False)
    summary = collect.run(config, ctx)
    ctx.close()

    dataset = dsrl.load_dsrl(summary["dataset"])
    episodes = dsrl.split_episodes(dataset)
    # 2 chunks x 2 policies x 3 episodes collected; the 5 x 5 grid keeps at most one per occupied cell.
    assert summary["episodes_collected"] == 12
    assert 1 <= episodes.num_episodes == summary["episodes_kept"] <= 12
    np.testing.assert_array_equal(episodes.lengths, 200)  # BallCircle never terminates early
    assert float(np.asarray(dataset.timeouts).sum()) == episodes.num_episodes
    meta = dataset.metadata
    assert (meta.task, meta.episode_length) == ("BallCircle", 200)
    np.testing.assert_allclose([meta.reward_min, meta.reward_max],
                               [episodes.reward_returns.min(), episodes.reward_returns.max()], rtol=1e-5)
    np.testing.assert_allclose(meta.max_episode_cost, episodes.cost_returns.max(), rtol=1e-5)
    assert json.loads(meta.collection)["num_policies"] == 2
    assert (tmp_path / "plots" / "dataset_scatter.png").is_file()
    # Consecutive rows of an episode chain: s' of one row is s of the next.
    np.testing.assert_allclose(dataset.next_observations[:199], dataset.observations[1:200], rtol=1e-6)


def test_on_a_real_task_the_behaviour_trains_on_its_twin_and_plays_the_simulator():
    pytest.importorskip("bullet_safety_gym")
    behaviour = ppo_lag.Config(num_envs=4, unroll_length=25, num_epochs=1, num_minibatches=2,
                               actor_hidden_sizes=(8,), critic_hidden_sizes=(8,), total_env_steps=4 * 25)
    config = collect.Config(task="SafetyBallRun-v0", num_policies=2, snapshot_every=1, behaviour=behaviour)
    assert config.behaviour_config().train_task == "BallRunTwin"
    learner = ppo_lag.make_learner(config.behaviour_config())
    state = ppo_lag.init_runs(learner, jnp.asarray(collect.limit_schedule(config)[0]))
    snapshot = collect.snapshot_fn(config.task, learner, 1)
    rows = snapshot(state.actor.params, jax.random.split(jax.random.PRNGKey(0), 2))
    dataset = dsrl.offline_dataset_from_arrays(rows, dsrl.DatasetMetadata(task=config.task))
    assert dataset.observations.shape == (200, 7)  # two episodes of the real BallRun, its 7 dimensions
    np.testing.assert_array_equal(dsrl.split_episodes(dataset).lengths, [100, 100])
    np.testing.assert_array_equal(dataset.next_observations[:99], dataset.observations[1:100])
    # A real task without a twin trains its behaviour policies on the host (tests/algorithms/control/test_ppo_lag_host.py).
    assert collect.Config(task="SafetyPointPush1-v0").behaviour_config().trains_on_host
    assert not config.behaviour_config().trains_on_host
