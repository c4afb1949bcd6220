"""Exported policies: field selection, what each learner's evaluation reads, and the files of a run."""

from __future__ import annotations

import dataclasses
import json
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from algorithms.control import bc, bcq_lag, cloning, offline, offline_benchmark, policy_export
from algorithms.control.ppo_lag import networks as ppo_networks
from algorithms.control.ppo_lag import train as ppo_train
from constrained_rl import checkpoint
from constrained_rl.data import dsrl
from experiments import evaluate, registry
from experiments.context import RunContext
from tests.algorithms.control.test_offline import random_ballcircle_file

pytestmark = pytest.mark.quick_compile  # tiny learners, a few updates: mostly compiling

OFFLINE_LEARNERS = ["bc_all", "bc_safe", "bcq_lag", "bear_lag", "cpq", "coptidice", "cdt", "atac", "satac"]
PROBLEM = offline.Problem(5, 2, 200)  # BallCircle's sizes


class Pair(NamedTuple):
    first: jax.Array
    second: dict


@struct.dataclass
class Holder:
    inner: Pair
    other: jax.Array


def test_select_and_insert_follow_dotted_paths_through_dicts_tuples_and_dataclasses():
    state = Holder(Pair(jnp.ones(2), {"w": jnp.zeros(3), "b": jnp.ones(1)}), jnp.arange(4))
    params = policy_export.select(state, ("inner.second.w", "other"))
    assert set(params) == {"inner", "other"} and set(params["inner"]["second"]) == {"w"}
    fresh = jax.tree.map(lambda x: x + 7, state)
    rebuilt = policy_export.insert(fresh, ("inner.second.w", "other"), params)
    chex.assert_trees_all_equal(rebuilt.inner.second["w"], state.inner.second["w"])
    chex.assert_trees_all_equal(rebuilt.other, state.other)
    chex.assert_trees_all_equal(rebuilt.inner.first, fresh.inner.first)  # not selected: kept
    chex.assert_trees_all_equal(rebuilt.inner.second["b"], fresh.inner.second["b"])


def tiny_config(name: str) -> offline.OfflineConfig:
    config_cls = registry.load(name).config_cls
    fields = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in offline_benchmark.QUICK_SIZES.items() if k in fields})


def perturbed(tree):
    """Every leaf moved: a field the evaluation read but did not declare would change its actions."""
    def move(x):
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.floating):
            return x + 0.5
        if jnp.issubdtype(x.dtype, jnp.integer):
            return x + 3
        return x
    return jax.tree.map(move, tree)


@pytest.mark.parametrize("name", OFFLINE_LEARNERS)
def test_the_declared_fields_are_all_the_evaluation_reads(name):
    # A state of the evaluation-only learner (built without data, as `evaluate` builds it) holding a
    # trained learner's declared fields, with every other leaf different, acts as the trained state.
    config = tiny_config(name)
    data = dsrl.load_dsrl(random_ballcircle_file_cached())
    module = registry.load(name).module
    built = module.builder(config, data) if hasattr(module, "builder") else module.make_algorithm
    trained = built(config, PROBLEM)
    for_evaluation = evaluate.make_algorithm(config, tuple(PROBLEM))
    assert trained.policy_fields is not None and trained.policy_fields == for_evaluation.policy_fields
    limit = jnp.float32(10.0)
    source = trained.init(jax.random.PRNGKey(0), limit)
    template = perturbed(for_evaluation.init(jax.random.PRNGKey(1), limit))
    rebuilt = offline.with_policy_params(for_evaluation, template, offline.policy_params(trained, source))
    key = jax.random.PRNGKey(2)
    if trained.evaluate is None:
        observations = jax.random.normal(jax.random.PRNGKey(3), (6, PROBLEM.observation_size))
        expected, _ = trained.policy(source, observations, key)
        actions, _ = for_evaluation.policy(rebuilt, observations, key)
        chex.assert_trees_all_equal(actions, expected)
        moved, _ = for_evaluation.policy(template, observations, key)
        assert not np.allclose(moved, expected)  # the template alone acts otherwise
    else:  # CDT plays its own episodes, conditioned on the limit
        env = offline.evaluation_env("BallCircle")
        expected = jax.jit(lambda s: trained.evaluate(env, s, limit, key, 1))(source)
        actual = jax.jit(lambda s: for_evaluation.evaluate(env, s, limit, key, 1))(rebuilt)
        chex.assert_trees_all_equal(actual, expected)


_DATA: dict[str, str] = {}


def random_ballcircle_file_cached() -> str:
    if "path" not in _DATA:
        import tempfile

        _DATA["path"] = random_ballcircle_file(f"{tempfile.mkdtemp()}/data.hdf5")
    return _DATA["path"]


def take(tree, run: int):
    return jax.tree.map(lambda x: x[run], tree)


def train_and_export(config, make_algorithm, run_dir):
    dataset = dsrl.load_dsrl(config.dataset)
    session = offline.make_session(config, dataset, make_algorithm)
    ctx = RunContext(run_dir, progress=False)
    state = offline.train(config, ctx, session)
    offline.export_policy(config, ctx, session, state)
    return session, state


def test_bc_export_rebuilds_the_actor_from_the_json_alone(tmp_path):
    config = bc.SafeConfig(dataset=random_ballcircle_file_cached(), cost_limits=(10.0, 40.0), num_seeds=2,
                           hidden_sizes=(8,), batch_size=16, num_updates=20, updates_per_chunk=10, eval_every=0)
    session, state = train_and_export(config, bc.make_algorithm, tmp_path)
    record = json.loads((tmp_path / "policy" / "policy.json").read_text())
    assert record["format"] == 1 and record["config_class"] == "algorithms.control.bc:SafeConfig"
    assert record["experiment"] is None  # no runner, no config.json
    assert (record["task"], record["observation_size"], record["action_size"]) == ("BallCircle", 5, 2)
    assert record["fields"] == ["actor.params"] and record["step"] == 20 and record["num_runs"] == 4
    assert [(r["cost_limit"], r["seed_index"]) for r in record["runs"]] == [(10.0, 0), (10.0, 1), (40.0, 0), (40.0, 1)]
    assert record["cost_limits"] == [10.0, 40.0] and set(record["reference_returns"]) == {"reward_min", "reward_max"}
    assert record["config"]["hidden_sizes"] == [8]

    params = checkpoint.restore(tmp_path / "policy" / "params")  # as saved: nested dicts, run axis first
    assert record["config"]["loss"] == "mse"  # OSRL's BC: a deterministic actor mu(s) = tanh(f(s))
    actor = cloning.deterministic_actor(record["action_size"], tuple(record["config"]["hidden_sizes"]))
    observations = jax.random.normal(jax.random.PRNGKey(0), (7, 5))
    for run in range(record["num_runs"]):
        action = cloning.deterministic_action(actor, take(params["actor"]["params"], run), observations)
        expected, _ = session.algorithm.policy(take(state.learner, run), observations, jax.random.PRNGKey(1))
        np.testing.assert_array_equal(action, expected)


def test_bcq_lag_export_holds_the_vae_and_the_perturbation_actor(tmp_path):
    config = bcq_lag.Config(dataset=random_ballcircle_file_cached(), cost_limits=(10.0,), num_seeds=2,
                            actor_hidden_sizes=(8,), critic_hidden_sizes=(8,), vae_hidden_sizes=(8,),
                            batch_size=16, num_updates=10, num_sampled_actions=2, eval_every=0)
    session, state = train_and_export(config, bcq_lag.make_algorithm, tmp_path)
    record = policy_export.read(tmp_path)
    assert record["fields"] == ["actor.params", "vae.params"]
    params = policy_export.load_params(tmp_path)
    problem = offline.Problem(record["observation_size"], record["action_size"], record["episode_length"])
    networks = bcq_lag.make_networks(evaluate.learner_config(record), problem)
    observations = jax.random.normal(jax.random.PRNGKey(0), (7, 5))
    key = jax.random.PRNGKey(1)
    for run in range(2):
        exported = take(params, run)
        candidates = bcq_lag.decode_candidates(networks, exported["vae"]["params"], observations, key)
        actions = networks.actor.apply({"params": exported["actor"]["params"]}, observations, candidates)
        expected, _ = session.algorithm.policy(take(state.learner, run), observations, key)
        np.testing.assert_array_equal(actions, expected)


def test_training_is_unchanged_by_the_export(tmp_path):
    # The export only reads the final state: the final checkpoint equals the exported fields.
    config = bc.Config(dataset=random_ballcircle_file_cached(), cost_limits=(10.0,), num_seeds=1, hidden_sizes=(8,),
                       batch_size=16, num_updates=10, eval_every=0, eval_episodes=1)
    summary = bc.run(config, RunContext(tmp_path, progress=False))
    assert summary["gradient_updates"] == 10
    algorithm = bc.make_algorithm(config, PROBLEM)
    layout = offline.trained_layout(config, algorithm)
    template = offline.init_runs(algorithm, offline.seed_keys(0, layout.seed_indices), layout.cost_limits)
    final = checkpoint.restore(tmp_path / "checkpoints" / "train", template)
    exported = policy_export.load_params(tmp_path, offline.policy_params(algorithm, template.learner))
    chex.assert_trees_all_equal(exported, offline.policy_params(algorithm, final.learner))


def test_load_policy_acts_as_the_trained_state(tmp_path):
    config = bc.SafeConfig(dataset=random_ballcircle_file_cached(), cost_limits=(10.0, 40.0), num_seeds=1,
                           hidden_sizes=(8,), batch_size=16, num_updates=10, eval_every=0)
    session, state = train_and_export(config, bc.make_algorithm, tmp_path)
    policy = evaluate.load_policy(tmp_path)
    assert policy.config == config
    observations = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
    for run in range(2):
        actions, _ = policy.algorithm.policy(take(policy.learner, run), observations, jax.random.PRNGKey(1))
        expected, _ = session.algorithm.policy(take(state.learner, run), observations, jax.random.PRNGKey(1))
        np.testing.assert_array_equal(actions, expected)


def test_ppo_lag_exports_its_actor(tmp_path):
    config = ppo_train.Config(task="BallCircle", num_envs=4, unroll_length=10, num_epochs=1, num_minibatches=1,
                              actor_hidden_sizes=(8,), critic_hidden_sizes=(8,), total_env_steps=80,
                              iterations_per_chunk=2, num_seeds=2, eval_episodes=1)
    ppo_train.run(config, RunContext(tmp_path, progress=False))
    record = policy_export.read(tmp_path)
    assert record["fields"] == ["actor.params"] and record["step"] == 2
    assert [(r["cost_limit"], r["seed_index"]) for r in record["runs"]] == [(20.0, 0), (20.0, 1)]
    learner = ppo_train.make_learner(config)
    final = checkpoint.restore(tmp_path / "checkpoints" / "train", ppo_train.init_runs(learner))
    params = policy_export.load_params(tmp_path)["actor"]["params"]
    nets = ppo_networks.make_networks(record["action_size"], tuple(record["config"]["actor_hidden_sizes"]),
                                      tuple(record["config"]["critic_hidden_sizes"]), record["config"]["activation"],
                                      record["config"]["init_log_std"])
    policy = ppo_networks.make_policy(nets, deterministic=True)
    observations = jax.random.normal(jax.random.PRNGKey(0), (5, record["observation_size"]))
    for run in range(2):
        actions, _ = policy(take(params, run), observations, jax.random.PRNGKey(1))
        expected, _ = learner.eval_policy(take(final.actor.params, run), observations, jax.random.PRNGKey(1))
        np.testing.assert_array_equal(actions, expected)
