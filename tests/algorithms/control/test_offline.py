from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.control import bc, offline
from constrained_rl import envs, evaluation, rollouts
from constrained_rl.config import ConfigError
from constrained_rl.data import dsrl
from experiments.context import RunContext
from tests.constrained_rl.data import tiny_dataset


@pytest.fixture(scope="module")
def tiny() -> dsrl.OfflineDataset:
    return dsrl.offline_dataset_from_arrays(tiny_dataset.make_arrays())


def test_run_layout_orders_limits_then_seeds():
    layout = offline.run_layout((10.0, 20.0), num_seeds=3)
    np.testing.assert_array_equal(layout.cost_limits, [10, 10, 10, 20, 20, 20])
    np.testing.assert_array_equal(layout.seed_indices, [0, 1, 2, 0, 1, 2])
    keys = offline.seed_keys(7, layout.seed_indices)
    np.testing.assert_array_equal(keys[0], keys[3])  # a seed starts alike under every limit
    np.testing.assert_array_equal(keys[1], jax.random.fold_in(jax.random.PRNGKey(7), 1))


def test_safe_rows_by_hand(tiny):
    # Episode cost returns are 1, 6 and 0 (rows [0, 3), [3, 7), [7, 9)); row 9 is an unfinished tail.
    layout = offline.run_layout((1.0, 6.0), num_seeds=1)
    rows = offline.row_sets(tiny, "safe", layout)
    np.testing.assert_array_equal(rows.count, [5, 9])
    np.testing.assert_array_equal(rows.indices[0, :5], [0, 1, 2, 7, 8])
    np.testing.assert_array_equal(rows.indices[1, :9], np.arange(9))
    every = offline.row_sets(tiny, "all", layout)
    np.testing.assert_array_equal(every.count, [10, 10])
    costlier = tiny.replace(costs=tiny.costs + 1.0)  # episode cost returns 4, 10 and 2
    with pytest.raises(ConfigError, match="cost_limits: no episode has cost return <= 1.5; the lowest is 2"):
        offline.row_sets(costlier, "safe", offline.run_layout((1.5,), 1))


def test_safe_fraction_keeps_the_episodes_within_a_share_of_the_limit(tiny):
    # Cost returns 1, 6 and 0: half of kappa = 2 keeps the rows kappa = 1 keeps.
    layout = offline.run_layout((2.0,), num_seeds=1)
    halved = offline.row_sets(tiny, "safe", layout, safe_fraction=0.5)
    chex.assert_trees_all_equal(halved, offline.row_sets(tiny, "safe", offline.run_layout((1.0,), 1)))
    assert int(offline.row_sets(tiny, "safe", layout).count[0]) == 5
    with pytest.raises(ConfigError, match=r"no episode has cost return <= 0.5 \(0.25 x 2\); the lowest is 2"):
        offline.row_sets(tiny.replace(costs=tiny.costs + 1.0), "safe", layout, safe_fraction=0.25)


def test_training_samples_a_phase_s_share_of_the_safe_episodes(tiny, tmp_path):
    # train reads each phase's safe_fraction. Cost returns 1, 6 and 0: BC-Safe with half of kappa = 6
    # keeps the episodes kappa = 1 keeps, and all of them at the full 6; a tenth of 6 keeps only the last.
    config = bc.SafeConfig(task="BallCircle", num_seeds=1, hidden_sizes=(8,), batch_size=4, num_updates=20,
                           updates_per_chunk=20, eval_every=0)
    algorithm = bc.make_algorithm(config, offline.Problem(3, 2, 10))

    def trained(limit: float, fraction: float):
        phases = tuple(p._replace(safe_fraction=fraction) for p in algorithm.phases)
        layout = offline.run_layout((limit,), num_seeds=1)
        session = offline.Session(tiny, layout, (limit,), algorithm._replace(phases=phases), None, None)
        ctx = RunContext(tmp_path / f"{limit}-{fraction}", progress=False)
        return offline.train(config, ctx, session).learner

    halved, everything = trained(6.0, 0.5), trained(6.0, 1.0)
    chex.assert_trees_all_equal(halved, trained(1.0, 1.0))
    assert params_differ(halved, everything)
    last_only = trained(6.0, 0.1)
    chex.assert_trees_all_equal(last_only, trained(0.5, 1.0))
    assert params_differ(last_only, everything) and params_differ(last_only, halved)


def params_differ(learner, other) -> bool:
    """Whether two learners' actor parameters differ anywhere (whatever the actor's parameter tree)."""
    return not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(learner.actor.params),
                                                     jax.tree.leaves(other.actor.params)))


def test_sampling_stays_in_the_run_rows(tiny):
    rows = offline.row_sets(tiny, "safe", offline.run_layout((1.0,), 1))
    one = jax.tree.map(lambda x: x[0], rows)
    drawn = jax.jit(offline.sample_rows, static_argnums=2)(one, jax.random.PRNGKey(0), 2000)
    assert set(np.asarray(drawn).tolist()) == {0, 1, 2, 7, 8}


def test_scores_per_limit_and_for_limit_free_learners():
    stats = rollouts.EpisodeStats(reward_return=jnp.array([[10.0, 20.0], [30.0, 30.0]]),
                                  cost_return=jnp.array([[5.0, 15.0], [20.0, 40.0]]),
                                  length=jnp.full((2, 2), 200.0))
    reference = evaluation.ReferenceReturns(0.0, 40.0)
    per_limit = offline.score_runs(stats, offline.run_layout((10.0, 20.0), 1), (10.0, 20.0), reference)
    assert per_limit[10.0].normalized_cost_mean == pytest.approx(1.0)  # run 0: costs 5, 15 under 10
    assert per_limit[20.0].normalized_cost_mean == pytest.approx(1.5)  # run 1: costs 20, 40 under 20
    assert per_limit[20.0].normalized_reward_mean == pytest.approx(0.75)
    # A learner that ignores the limit: both runs are seeds scored under every limit.
    shared = offline.score_runs(stats, offline.run_layout((-1.0,), 2), (10.0, 20.0), reference)
    assert shared[10.0].num_seeds == 2 and shared[10.0].normalized_cost_mean == pytest.approx(2.0)
    assert shared[20.0].normalized_cost_mean == pytest.approx(1.0)


def test_config_refuses_bad_values():
    for bad, field in (({"cost_limits": ()}, "cost_limits"), ({"cost_limits": (10.0, 10.0)}, "cost_limits"),
                       ({"num_updates": 1500, "updates_per_chunk": 1000}, "num_updates"),
                       ({"discount": 1.0}, "discount"), ({"task": "Nowhere"}, "task"),
                       ({"reward_min": 2.0, "reward_max": 1.0}, "reward_max")):
        with pytest.raises(ConfigError, match=field):
            offline.OfflineConfig(**bad)


def test_dataset_that_does_not_fit_the_task_is_refused(tiny):
    with pytest.raises(ConfigError, match="needs \\(5, 2\\)"):
        offline.make_session(offline.OfflineConfig(), tiny, bc.make_algorithm)


def test_vmapped_runs_equal_runs_one_by_one(tiny):
    # Two seeds under two limits (BC-Safe samples different rows per limit) in one call, against
    # each run alone: the chunk is the same function of each run's state and rows.
    config = bc.SafeConfig(task="BallCircle", hidden_sizes=(8,), batch_size=4, num_updates=20,
                           updates_per_chunk=20)
    algorithm = bc.make_algorithm(config, offline.Problem(3, 2, 10))
    layout = offline.run_layout((1.0, 6.0), num_seeds=2)
    rows = offline.row_sets(tiny, "safe", layout)
    states = offline.init_runs(algorithm, offline.seed_keys(3, layout.seed_indices), layout.cost_limits)
    chunk = offline.make_chunk(algorithm.phases[0].update, config.batch_size, config.num_updates)
    together, metrics = chunk(states, rows, tiny)
    take = lambda tree, i: jax.tree.map(lambda x: x[i:i + 1], tree)
    for run in range(4):
        alone, alone_metrics = chunk(take(states, run), take(rows, run), tiny)
        chex.assert_trees_all_close(take(together, run), alone, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(take(metrics, run), alone_metrics, rtol=1e-5, atol=1e-6)
    # The limits' runs saw different data, so they differ; a seed's runs started alike.
    chex.assert_trees_all_equal(take(states, 0).learner, take(states, 2).learner)
    assert params_differ(take(together, 0).learner, take(together, 2).learner)


def random_ballcircle_file(path) -> str:
    """A small DSRL file of uniformly random BallCircle behaviour (4 episodes of 200 steps)."""
    env = envs.make("BallCircle", batch_size=4)

    def policy(params, obs, key):
        return jax.random.uniform(key, (obs.shape[0], 2), minval=-1.0, maxval=1.0), {}

    _, steps = rollouts.rollout(env, policy, None, jax.random.PRNGKey(1), env.reset(jax.random.PRNGKey(0)), 200)
    episode_major = lambda x: np.asarray(jnp.swapaxes(x, 0, 1)).reshape((-1,) + x.shape[2:])
    arrays = {"observations": steps.obs, "next_observations": steps.next_obs, "actions": steps.action,
              "rewards": steps.reward, "costs": steps.cost, "terminals": steps.termination,
              "timeouts": steps.truncation}
    arrays = {k: episode_major(v) for k, v in arrays.items()}
    returns = arrays["rewards"].reshape(4, 200).sum(1)
    metadata = dsrl.DatasetMetadata(task="BallCircle", episode_length=200, reward_min=float(returns.min()),
                                    reward_max=float(returns.max()))
    dsrl.save_dsrl(path, arrays, metadata)
    return str(path)


def test_run_end_to_end_with_dsrl_scores(tmp_path):
    config = bc.Config(dataset=random_ballcircle_file(tmp_path / "data.hdf5"), cost_limits=(10.0, 40.0),
                       num_seeds=2, hidden_sizes=(8,), batch_size=16, num_updates=20, updates_per_chunk=10,
                       eval_every=1, eval_episodes_during=3, eval_episodes=3)
    ctx = RunContext(tmp_path / "run", progress=False)
    summary = bc.run(config, ctx)
    assert summary["cost_limits"] == [10.0, 40.0] and summary["gradient_updates"] == 20
    assert set(summary["scores"]) == {"limit_10", "limit_40"}
    assert summary["scores"]["limit_10"]["num_seeds"] == 2 and summary["scores"]["limit_10"]["num_episodes"] == 6
    # The same policies under a 4x looser limit have a 4x smaller normalized cost.
    cost_10, cost_40 = summary["normalized_cost"]
    assert cost_10 == pytest.approx(4 * cost_40)
    assert summary["safe"] == [cost_10 <= 1.0, cost_40 <= 1.0]
    rows = ctx.read_metrics()
    assert [r["step"] for r in rows] == [10, 20]
    assert {"mse", "eval/normalized_reward", "eval/normalized_cost/limit_10"} <= set(rows[0])
