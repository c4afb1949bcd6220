"""CDT: relabelling, segments, the loss by hand, the network's masking, and cost-conditioned cloning."""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.control import cdt, offline
from algorithms.control import offline_benchmark as bench
from constrained_rl.config import ConfigError
from constrained_rl.data import dsrl
from constrained_rl.models.decision_transformer import DecisionTransformer, DecisionTransformerOutput
from experiments import registry
from experiments.context import RunContext, StopRequested
from tests.algorithms.control.test_bc import SAFE_ACTION, UNSAFE_ACTION, two_behaviour_dataset



def two_episode_dataset() -> dsrl.OfflineDataset:
    """Episode 0: rows 0-2, rewards 1, 2, 3, costs 0, 1, 0. Episode 1: rows 3-4, rewards 10, 20,
    costs 5, 5. Observation i is (i, i, i, i, i)."""
    rows = np.arange(5, dtype=np.float32)
    return dsrl.offline_dataset_from_arrays({
        "observations": np.repeat(rows[:, None], 5, 1), "next_observations": np.repeat(rows[:, None] + 1, 5, 1),
        "actions": np.stack([rows / 10, -rows / 10], 1), "rewards": np.array([1, 2, 3, 10, 20], np.float32),
        "costs": np.array([0, 1, 0, 5, 5], np.float32), "terminals": np.zeros(5, bool),
        "timeouts": np.array([0, 0, 1, 0, 1], bool)})


def no_relabelling(episodes: dsrl.Episodes) -> cdt.Trajectories:
    empty = np.zeros(0)
    return cdt.Trajectories(episodes, cdt.Relabelled(np.zeros(0, np.int64), empty, empty))


# --------------------------------------------------------------------------------------------------
# Return relabelling


def test_pareto_frontier_by_hand():
    rewards = np.array([1.0, 5.0, 3.0, 5.0, 8.0])
    costs = np.array([0.0, 2.0, 2.0, 3.0, 10.0])
    # (2, 3) is dominated by (2, 5); (3, 5) earns no more than the cheaper (2, 5).
    np.testing.assert_array_equal(cdt.pareto_frontier(rewards, costs), [0, 1, 4])


def test_relabelled_targets_lie_above_the_frontier_and_are_answered_within_their_cost():
    rng = np.random.default_rng(0)
    costs = rng.uniform(0, 50, 60)
    rewards = 10 * np.sqrt(costs) + rng.normal(0, 5, 60)
    relabelled = cdt.relabel_targets(rewards, costs, np.random.default_rng(1), fraction=0.2, degree=2)
    assert relabelled.source.shape == (12,)
    np.testing.assert_allclose(relabelled.target_cost, np.linspace(costs.min(), costs.max(), 12))
    frontier = cdt.pareto_frontier(rewards, costs)
    fit = np.poly1d(np.polyfit(costs[frontier], rewards[frontier], 2))
    assert np.all(relabelled.target_reward >= fit(relabelled.target_cost) + 1.0 - 1e-9)
    # Every target is answered by an episode that costs no more than it asked for.
    assert np.all(costs[relabelled.source] <= relabelled.target_cost + 1e-9)
    again = cdt.relabel_targets(rewards, costs, np.random.default_rng(1), fraction=0.2, degree=2)
    chex.assert_trees_all_equal(tuple(again), tuple(relabelled))
    assert cdt.relabel_targets(rewards, costs, rng, fraction=0.0).source.size == 0


# --------------------------------------------------------------------------------------------------
# Segments


def test_prepared_returns_to_go_and_relabelled_shifts_by_hand():
    dataset = two_episode_dataset()
    episodes = dsrl.split_episodes(dataset)
    relabelled = cdt.Relabelled(np.array([0]), np.array([100.0]), np.array([4.0]))
    data = cdt.prepare(cdt.Config(), cdt.Trajectories(episodes, relabelled), dataset)
    np.testing.assert_allclose(data.reward_to_go, [6, 5, 3, 30, 20])
    np.testing.assert_allclose(data.cost_to_go, [1, 1, 0, 10, 5])
    np.testing.assert_array_equal(data.starts, [0, 3, 0])
    np.testing.assert_array_equal(data.lengths, [3, 2, 3])
    np.testing.assert_allclose(data.reward_shift, [0, 0, 94])  # episode 0 asked for 100 instead of 6
    np.testing.assert_allclose(data.cost_shift, [0, 0, 3])  # and for cost 4 instead of 1
    weights = np.array([50 - 1, 50 - 10, 50 - 4], np.float64)
    np.testing.assert_allclose(np.exp(data.log_weights), weights / weights.sum(), rtol=1e-6)


def test_segments_are_consecutive_steps_padded_past_the_episode_end():
    dataset = two_episode_dataset()
    data = cdt.prepare(cdt.Config(), no_relabelling(dsrl.split_episodes(dataset)), dataset)
    segments = jax.jit(cdt.sample_segments, static_argnums=(2, 3))(data, jax.random.PRNGKey(0), 256, 4)
    chex.assert_shape(segments.observations, (256, 4, 5))
    rows = np.asarray(segments.observations[:, :, 0]).astype(int)
    valid = np.asarray(segments.valid)
    first = rows[:, 0]
    length = np.where(first < 3, 3, 2)
    offset = first - np.where(first < 3, 0, 3)
    np.testing.assert_array_equal(valid.sum(1), length - offset)
    np.testing.assert_array_equal(np.asarray(segments.timesteps), offset[:, None] + np.arange(4))
    for b in range(256):
        n = valid[b].sum()
        np.testing.assert_array_equal(rows[b, :n], first[b] + np.arange(n))
        np.testing.assert_allclose(np.asarray(segments.reward_to_go[b, :n]), np.asarray(data.reward_to_go)[rows[b, :n]])
        assert np.all(np.asarray(segments.observations[b, n:]) == 0) and np.all(np.asarray(segments.costs[b, n:]) == 0)
    # Sampling weights (50 - C) / Z: 49 : 40 for the two episodes.
    assert 0.45 < np.mean(first < 3) < 0.65
    # An episode costing at least the offset is never sampled.
    cheap_only = cdt.prepare(cdt.Config(cost_offset=5.0), no_relabelling(dsrl.split_episodes(dataset)), dataset)
    segments = cdt.sample_segments(cheap_only, jax.random.PRNGKey(1), 64, 4)
    assert np.all(np.asarray(segments.observations[:, 0, 0]) < 3)


def test_a_cost_offset_below_every_episode_is_refused():
    with pytest.raises(ConfigError, match="cost_offset"):
        cdt.trajectories(cdt.Config(cost_offset=0.5, augment_fraction=0.0), two_episode_dataset())


# --------------------------------------------------------------------------------------------------
# The loss and the network


def test_loss_by_hand():
    mean = jnp.array([[[0.1, -0.2], [0.3, 0.0]]])  # [1, 2 steps, 2 dims]
    log_std = jnp.array([[[-1.0, 0.0], [0.5, -0.5]]])
    cost_logits = jnp.log(jnp.array([[[0.8, 0.2], [0.4, 0.6]]]))
    actions = jnp.array([[[0.0, 0.1], [0.9, 0.9]]])
    segments = cdt.Segments(observations=jnp.zeros((1, 2, 3)), actions=actions, costs=jnp.array([[1.0, 0.0]]),
                            reward_to_go=jnp.zeros((1, 2)), cost_to_go=jnp.zeros((1, 2)),
                            timesteps=jnp.zeros((1, 2), jnp.int32), valid=jnp.array([[True, False]]))
    loss, metrics = cdt.cdt_loss(DecisionTransformerOutput(mean, log_std, cost_logits), segments, 0.5, 0.02)
    # Only step 0 counts for the policy: per-dimension means over its two dimensions.
    m, s, a = np.array([0.1, -0.2]), np.array([-1.0, 0.0]), np.array([0.0, 0.1])
    log_prob = np.mean(-0.5 * ((a - m) / np.exp(s)) ** 2 - s - 0.5 * math.log(2 * math.pi))
    entropy = np.mean(s + 0.5 + 0.5 * math.log(2 * math.pi))
    cost_loss = -math.log(0.2) / 2  # step 0 has a cost; the padded step adds 0 but counts in the mean
    np.testing.assert_allclose(metrics["log_likelihood"], log_prob, rtol=1e-5)
    np.testing.assert_allclose(metrics["entropy"], entropy, rtol=1e-5)
    np.testing.assert_allclose(metrics["cost_loss"], cost_loss, rtol=1e-5)
    np.testing.assert_allclose(loss, -(log_prob + 0.5 * entropy) + 0.02 * cost_loss, rtol=1e-5)
    np.testing.assert_allclose(jax.grad(cdt.temperature_loss)(jnp.log(0.5), 1.5, -2.0), 0.5 * 3.5, rtol=1e-6)


@pytest.fixture(scope="module")
def network():
    model = DecisionTransformer(action_size=2, max_timestep=20, embedding_dim=16, num_layers=2, num_heads=2)
    rng = np.random.default_rng(0)
    inputs = (jnp.asarray(rng.normal(size=(1, 5, 3)), jnp.float32), jnp.asarray(rng.normal(size=(1, 5, 2)), jnp.float32),
              jnp.asarray(rng.normal(size=(1, 5)), jnp.float32), jnp.asarray(rng.normal(size=(1, 5)), jnp.float32),
              jnp.arange(3, 8)[None], jnp.ones((1, 5), bool))
    params = model.init(jax.random.PRNGKey(0), *inputs)
    return model, params, inputs


def test_the_network_is_causal(network):
    model, params, (states, actions, rewards, costs, timesteps, valid) = network
    base = model.apply(params, states, actions, rewards, costs, timesteps, valid)
    # a_2 comes after s_2: changing it leaves every action prediction up to step 2 alone...
    changed = model.apply(params, states, actions.at[:, 2].add(1.0), rewards, costs, timesteps, valid)
    np.testing.assert_allclose(changed.action_mean[:, :3], base.action_mean[:, :3], atol=1e-8)
    assert np.abs(changed.action_mean[:, 3:] - base.action_mean[:, 3:]).min() > 1e-6  # (small N(0, 0.02) weights)
    # ...and the cost-to-go of step 3 reaches no earlier step.
    changed = model.apply(params, states, actions, rewards, costs.at[:, 3].add(1.0), timesteps, valid)
    np.testing.assert_allclose(changed.action_mean[:, :3], base.action_mean[:, :3], atol=1e-8)
    assert np.abs(changed.action_mean[:, 3] - base.action_mean[:, 3]).min() > 1e-6


def test_padding_at_the_start_equals_a_shorter_context(network):
    # The evaluation window fills from the right: two padded steps of garbage before three real ones
    # predict what the three steps alone predict.
    model, params, (states, actions, rewards, costs, timesteps, _) = network
    valid = jnp.array([[False, False, True, True, True]])
    padded = model.apply(params, states, actions, rewards, costs, timesteps, valid)
    alone = model.apply(params, states[:, 2:], actions[:, 2:], rewards[:, 2:], costs[:, 2:], timesteps[:, 2:],
                        jnp.ones((1, 3), bool))
    np.testing.assert_allclose(padded.action_mean[:, 2:], alone.action_mean, atol=1e-5)
    np.testing.assert_allclose(padded.cost_logits[:, 2:], alone.cost_logits, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Learning: asked for cost 0 it acts like the cost-free episodes, asked for 10 like the costly ones

# cost_scale 10 puts the two behaviours' first cost tokens at 50 and -50. At OSRL's scale (50 and 40)
# the token layer norm sees mostly the embedding's direction, the same for both, and telling them apart
# takes far longer than this test (2,000 updates were not enough).
LEARNING = cdt.Config(cost_limits=(0.0, 10.0), num_seeds=2, embedding_dim=32, num_layers=1, num_heads=2,
                      context_length=4, batch_size=32, num_updates=400, updates_per_chunk=100,
                      learning_rate=1e-3, learning_rate_warmup=10, cost_scale=10.0, eval_every=0,
                      checkpoint_every=1)


@pytest.fixture(scope="module")
def session():
    dataset = two_behaviour_dataset()
    return offline.make_session(LEARNING, dataset, cdt.builder(LEARNING, dataset))


@pytest.fixture(scope="module")
def trained(session, tmp_path_factory):
    ctx = RunContext(tmp_path_factory.mktemp("cdt"), progress=False)
    return offline.train(LEARNING, ctx, session), ctx


def test_cdt_clones_the_behaviour_of_the_cost_it_is_asked_for(session, trained):
    state, ctx = trained
    assert session.layout.cost_limits.shape == (2,)  # one run per seed, whatever the limit
    model = cdt.make_model(LEARNING, offline.check_dataset(session.dataset, session.env, "data"))
    policy = cdt.context_policy(LEARNING, model)
    observations = session.dataset.observations[:64]
    for limit, behaviour in ((0.0, SAFE_ACTION), (10.0, UNSAFE_ACTION)):
        for run in range(2):
            learner = jax.tree.map(lambda x: x[run], state.learner)
            context = policy.start((learner, jnp.float32(limit)), observations)
            actions, _ = policy.act((learner, jnp.float32(limit)), context, None)
            np.testing.assert_allclose(np.mean(np.asarray(actions), 0), behaviour, atol=0.15)
    rows = ctx.read_metrics()
    assert rows[-1]["log_likelihood"] > rows[0]["log_likelihood"] + 0.5


def test_resume_through_the_loop_is_exact(session, trained, tmp_path):
    uninterrupted, _ = trained
    config = dataclasses.replace(LEARNING, checkpoint_every=2)
    with pytest.raises(StopRequested):
        offline.train(config, RunContext(tmp_path, progress=False, stop_after_chunks=3), session)
    resumed = offline.train(config, RunContext(tmp_path, progress=False), session)
    chex.assert_trees_all_equal(resumed, uninterrupted)


def test_vmapped_seeds_equal_seeds_one_by_one(session):
    algorithm = session.algorithm
    states = offline.init_runs(algorithm, offline.seed_keys(0, session.layout.seed_indices), session.layout.cost_limits)
    rows = offline.row_sets(session.dataset, "all", session.layout)
    chunk = offline.make_chunk(algorithm.phases[0].update, 8, 5, algorithm.sampler)
    together, _ = chunk(states, rows, session.training_data)
    take = lambda tree, i: jax.tree.map(lambda x: x[i:i + 1], tree)
    for run in range(2):
        alone, _ = chunk(take(states, run), take(rows, run), session.training_data)
        chex.assert_trees_all_close(take(together, run), alone, rtol=1e-5, atol=1e-6)


def test_evaluation_asks_for_each_limit(session, trained):
    state, _ = trained
    stats = offline.play_episodes(session, state.learner, jax.random.PRNGKey(0), 2)
    assert set(stats) == {0.0, 10.0}
    chex.assert_shape(stats[0.0].reward_return, (2, 2))
    # The same episodes (keys) asked for different costs are played differently.
    assert not np.allclose(stats[0.0].reward_return, stats[10.0].reward_return)


def test_config_registry_and_benchmark_entry():
    assert registry.load("cdt").config_cls is cdt.Config
    assert bench.METHODS["cdt"].label == "CDT"
    quick = bench.method_config(bench.Config(preset="quick", methods=("cdt",)), "cdt")
    assert quick.embedding_dim == 16 and quick.num_layers == 1 and quick.num_updates == 4
    for bad in ({"num_heads": 3}, {"attention_dropout": 1.0}, {"augment_fraction": 1.5}, {"learning_rate": 0.0},
                {"max_reward_decrease": -1.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            cdt.Config(**bad)


def test_gaussian_head_log_std_is_unbounded(network):
    """OSRL's ``DiagGaussianActor`` takes ``std = exp(log_std)`` of the linear output, its stored
    ``log_std_bounds`` [-5, 2] unused: a head whose bias is 8 or -30 gives exactly those log-stds."""
    model, params, inputs = network
    head = {"kernel": jnp.zeros_like(params["params"]["action_log_std"]["kernel"]), "bias": jnp.array([8.0, -30.0])}
    output = model.apply({"params": {**params["params"], "action_log_std": head}}, *inputs)
    np.testing.assert_allclose(output.action_log_std, jnp.broadcast_to(jnp.array([8.0, -30.0]), (1, 5, 2)))
