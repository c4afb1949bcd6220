from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.control import offline, satac
from constrained_rl.config import ConfigError
from constrained_rl.data import dsrl
from experiments import registry
from experiments.context import RunContext, StopRequested

# A twin critic (E = 2) on a batch of two transitions; every loss below is worked out by hand.
Q_DATA = jnp.array([[1.0, 2.0], [0.0, 1.0]])
Q_POLICY = jnp.array([[2.0, 2.0], [1.0, 3.0]])  # pessimism gaps: head 0 mean 0.5, head 1 mean 1.5
Q_NEXT = jnp.array([[1.0, 0.0], [2.0, 1.0]])
TD_TARGET = jnp.array([1.5, 1.0])
SIGNALS = jnp.array([1.0, 0.0])
DISCOUNTS = jnp.array([0.5, 0.0])
# Bellman errors, 0.5 TD + 0.5 residual: head 0: 0.5 * 0.625 + 0.5 * 2.125 = 1.375;
# head 1: 0.5 * 1.125 + 0.5 * 2.5 = 1.8125.
BELLMAN = (1.375, 1.8125)
PID_MULTIPLIER = dataclasses.replace(satac.MULTIPLIER, kind="pid")  # lambda moved by the PID rule


class CriticLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_reward_critic_by_hand(self):
        loss = self.variant(lambda: satac.critic_loss(Q_DATA, Q_POLICY, Q_NEXT, TD_TARGET, SIGNALS, DISCOUNTS,
                                                      beta=2.0, pessimism_sign=1.0))()
        # beta > 1: pess / beta + bellman per head.
        np.testing.assert_allclose(loss, (0.5 / 2 + BELLMAN[0]) + (1.5 / 2 + BELLMAN[1]), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_cost_critic_by_hand(self):
        loss = self.variant(lambda: satac.critic_loss(Q_DATA, Q_POLICY, Q_NEXT, TD_TARGET, SIGNALS, DISCOUNTS,
                                                      beta=0.5, pessimism_sign=-3.0))()
        # beta <= 1: -lambda * pess + beta * bellman per head.
        np.testing.assert_allclose(loss, (-3 * 0.5 + 0.5 * BELLMAN[0]) + (-3 * 1.5 + 0.5 * BELLMAN[1]), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_warm_start_is_bellman_only(self):
        loss = self.variant(lambda: satac.critic_loss(Q_DATA, Q_POLICY, Q_NEXT, TD_TARGET, SIGNALS, DISCOUNTS,
                                                      beta=2.0, pessimism_sign=1.0, adversarial=False))()
        np.testing.assert_allclose(loss, sum(BELLMAN), rtol=1e-6)

    def test_pessimism_signs_on_a_linear_critic(self):
        # Q_w(s, a) = w . x; with beta = 0 only the pessimism term acts. One gradient step must push
        # the cost critic's gap Q(s, pi) - Q(s, a) up (the policy looks costlier) and the reward
        # critic's down (the policy looks worse).
        x_data = jnp.array([[1.0, 0.0, 0.5], [0.0, 1.0, -0.5]])
        x_policy = jnp.array([[1.0, 1.0, 1.0], [0.5, 1.0, 0.0]])
        mean_difference = jnp.mean(x_policy - x_data, axis=0)
        zeros = jnp.zeros(2)

        def loss(w, sign):
            q = lambda x: jnp.stack([x @ w, x @ w])  # two identical heads
            return satac.critic_loss(q(x_data), q(x_policy), q(x_data), zeros, zeros, zeros, 0.0, sign)

        w = jnp.array([0.2, -0.1, 0.3])
        gap = lambda w: jnp.mean(x_policy @ w - x_data @ w)
        cost_grad = jax.grad(loss)(w, -2.0)
        np.testing.assert_allclose(cost_grad, 2 * -2.0 * mean_difference, rtol=1e-6)
        assert gap(w - 0.1 * cost_grad) > gap(w)
        assert gap(w - 0.1 * jax.grad(loss)(w, 1.0)) < gap(w)


class ActorLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_by_hand(self):
        q_reward, log_probs = jnp.array([1.0, 2.0]), jnp.array([-1.0, -3.0])
        penalty = satac.critics.aggression_limited_penalty(jnp.array([0.5, 3.0]), jnp.array([1.0, 1.0]))
        np.testing.assert_allclose(penalty, [0.0, 2.0])
        loss = self.variant(satac.actor_loss)
        # objective = 1.5 - 2 * 1 = -0.5; -entropy = -2.
        np.testing.assert_allclose(loss(q_reward, log_probs, 0.5, penalty, 2.0), 0.5 + 0.5 * -2.0, rtol=1e-6)
        np.testing.assert_allclose(loss(q_reward, log_probs, 2.0, penalty, 2.0), 0.5 / 2.0 - 2.0, rtol=1e-6)
        np.testing.assert_allclose(loss(q_reward, log_probs, 0.5), -1.5 + 0.5 * -2.0, rtol=1e-6)

    def test_penalty_only_where_costlier_than_reference(self):
        def loss(q_cost_policy, q_cost_reference):
            penalty = satac.critics.aggression_limited_penalty(q_cost_policy, q_cost_reference)
            return satac.actor_loss(jnp.array([1.0, 2.0, 0.0]), jnp.zeros(3), 0.1, penalty, 3.0)

        reference = jnp.array([1.0, 1.0, 1.0])
        within = jnp.array([0.2, 1.0, -4.0])  # never costlier than the reference: no penalty at all
        atac = satac.actor_loss(jnp.array([1.0, 2.0, 0.0]), jnp.zeros(3), 0.1)
        np.testing.assert_allclose(loss(within, reference), atac, rtol=1e-6)
        np.testing.assert_array_equal(jax.grad(loss)(within, reference), 0.0)
        mixed = jnp.array([0.2, 1.5, 4.0])
        np.testing.assert_allclose(jax.grad(loss)(mixed, reference), [0.0, 1.0, 1.0], rtol=1e-6)  # lambda / B

    def test_alpha_falls_while_entropy_exceeds_target(self):
        log_probs = jnp.array([-1.0, -3.0])  # entropy 2
        np.testing.assert_allclose(satac.alpha_loss(jnp.array(0.3), log_probs, -2.0), 0.3 * 4.0, rtol=1e-6)
        assert jax.grad(satac.alpha_loss)(jnp.array(0.3), log_probs, -2.0) > 0  # descent lowers log alpha
        assert jax.grad(satac.alpha_loss)(jnp.array(0.3), log_probs, 5.0) < 0


def test_projection_is_per_head():
    kernel = jnp.stack([jnp.full((2, 2), 25.0), jnp.full((2, 2), 100.0)])  # Frobenius norms 50 and 200
    projected = satac.project_ensemble({"kernel": kernel, "bias": jnp.full((2, 2), 500.0)}, 100.0)
    np.testing.assert_allclose(projected["kernel"][0], kernel[0])
    np.testing.assert_allclose(jnp.linalg.norm(projected["kernel"][1]), 100.0, rtol=1e-5)
    np.testing.assert_array_equal(projected["bias"], 500.0)


def test_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="reference"):
        satac.Config(reference="data")
    with pytest.raises(ConfigError, match="warmup_updates"):
        satac.Config(warmup_updates=150, updates_per_chunk=100, num_updates=100)
    with pytest.raises(ConfigError, match="tau"):
        satac.Config(tau=0.0)
    with pytest.raises(ConfigError, match="reward_scale"):
        satac.Config(reward_scale=0.0)


def test_atac_is_satac_without_cost_and_registered():
    atac = registry.load("atac")
    assert atac.config_cls is satac.ATACConfig and atac.run is satac.run
    config = atac.config_cls()
    assert not config.use_cost_critic and not config.uses_cost_limit and not config.trains_reference
    assert registry.load("satac").config_cls().uses_cost_limit
    # The fixed-lambda behaviour reference ignores kappa: one run per seed serves every limit.
    assert not satac.Config(reference="behaviour").uses_cost_limit
    assert satac.Config(reference="behaviour", multiplier=PID_MULTIPLIER).uses_cost_limit


def test_warm_start_can_clone_only_the_safe_episodes():
    problem = offline.Problem(observation_size=3, action_size=2, episode_length=10)
    default = satac.make_algorithm(satac.Config(), problem)
    safe = satac.make_algorithm(satac.Config(reference="behaviour", warmup_data="safe"), problem)
    assert {p.name: p.rows for p in default.phases}["warmup"] == "all"
    assert {p.name: p.rows for p in safe.phases}["warmup"] == "safe"
    # The margin reaches the reference's and the warm start's rows, not the adversarial phases'.
    halved = satac.make_algorithm(satac.Config(warmup_data="safe", safe_fraction=0.5), problem)
    assert [(p.rows, p.safe_fraction) for p in halved.phases] == [
        ("safe", 0.5), ("safe", 0.5), ("all", 1.0), ("all", 1.0)]
    # Safe warm-start data depends on kappa, so each limit needs its own runs.
    assert safe.uses_cost_limit and satac.Config(warmup_data="safe", use_cost_critic=False).uses_cost_limit
    with pytest.raises(ConfigError, match="warmup_data"):
        satac.Config(warmup_data="unsafe")
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="safe_fraction"):
            satac.Config(safe_fraction=bad)


# --------------------------------------------------------------------------------------------------
# Learning: a one-step problem whose answer is known.
#
# Every transition is terminal, so Q_r(s, a) = a_0 and Q_c(s, a) = a_0^2 whatever the state. With the
# threshold reference at kappa = 0 (threshold 0) and lambda = 2 the actor maximises a_0 - 2 a_0^2,
# best at a_0 = 0.25; ATAC, or a cost critic with the wrong sign, drives a_0 to the edge (about 1).

LEARNING = satac.Config(
    cost_limits=(0.0,), num_seeds=1, hidden_sizes=(32, 32), batch_size=64, actor_learning_rate=3e-3,
    critic_learning_rate=3e-3, init_alpha=0.1, beta=16.0, reference="threshold",
    multiplier=dataclasses.replace(satac.MULTIPLIER, init=2.0), warmup_updates=100, num_updates=500,
    updates_per_chunk=100, eval_every=0)


def one_step_dataset(size: int = 2000) -> dsrl.OfflineDataset:
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (size, 2)).astype(np.float32)
    return dsrl.offline_dataset_from_arrays({
        "observations": rng.normal(size=(size, 5)).astype(np.float32),
        "next_observations": rng.normal(size=(size, 5)).astype(np.float32),
        "actions": actions, "rewards": actions[:, 0], "costs": actions[:, 0] ** 2,
        "terminals": np.ones(size, bool), "timeouts": np.zeros(size, bool),
    })


@pytest.fixture(scope="module")
def session():
    return offline.make_session(LEARNING, one_step_dataset(), satac.make_algorithm)


@pytest.fixture(scope="module")
def trained(session, tmp_path_factory):
    ctx = RunContext(tmp_path_factory.mktemp("satac"), progress=False)
    return offline.train(LEARNING, ctx, session), ctx


def test_actor_moves_to_the_best_safe_action(session, trained):
    state, ctx = trained
    run_state = jax.tree.map(lambda x: x[0], state.learner)
    actions, _ = session.algorithm.policy(run_state, session.dataset.observations[:256], None)
    a0 = float(jnp.mean(actions[:, 0]))
    # From 0 (the initial and the cloned mean action) toward 0.25, well short of the reward-only edge.
    assert 0.05 < a0 < 0.5, a0
    objective = lambda a: a - 2 * a ** 2
    assert objective(a0) > objective(0.0) + 0.04
    rows = [r for r in ctx.read_metrics() if r["stage"] == "train"]
    assert [r["step"] for r in rows] == [100, 200, 300, 400, 500]
    assert rows[-1]["multiplier"] == 2.0  # fixed lambda
    warm = [r for r in ctx.read_metrics() if r["stage"] == "warmup"]
    assert len(warm) == 1 and "log_likelihood" in warm[0] and "penalty" not in warm[0]


def test_resume_through_the_loop_is_exact(session, trained, tmp_path):
    uninterrupted, _ = trained
    config = dataclasses.replace(LEARNING, checkpoint_every=2)
    with pytest.raises(StopRequested):  # after the warm start and three chunks of the main phase
        offline.train(config, RunContext(tmp_path, progress=False, stop_after_chunks=4), session)
    # The main phase restarts from its checkpoint after two chunks and recomputes the third.
    resumed = offline.train(config, RunContext(tmp_path, progress=False), session)
    chex.assert_trees_all_equal(resumed, uninterrupted)


# --------------------------------------------------------------------------------------------------
# The warm start: fast-timescale cloning, and critics fitted to Monte-Carlo returns.


def _warm_learner(**overrides):
    config = satac.Config(**{**dict(hidden_sizes=(16, 16), actor_learning_rate=1e-9, critic_learning_rate=1e-2,
                                    warmup_updates=0, reference_updates=0), **overrides})
    learner = satac.make_learner(config, offline.Problem(observation_size=5, action_size=2, episode_length=10))
    dataset = dsrl.with_returns_to_go(one_step_dataset(64), config.discount)
    batch = dsrl.take_transitions(dataset, jnp.arange(64))
    update = jax.jit(functools.partial(satac.update, learner), static_argnames="warm")
    return learner, satac.init_state(learner, jax.random.PRNGKey(0), jnp.float32(10.0)), batch, update


def test_warm_start_clones_at_the_fast_rate_and_alpha_restarts_after_it():
    learner, state, batch, update = _warm_learner(init_alpha=0.5)
    warm = state
    for i in range(5):
        warm, _ = update(warm, batch, jax.random.PRNGKey(i), warm=True)
    moved = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), warm.actor.params, state.actor.params)
    # Five Adam steps at the slow rate 1e-9 could move no weight by more than 5e-9.
    assert max(jax.tree.leaves(moved)) > 1e-3
    chex.assert_trees_all_equal(warm.actor.opt_state, state.actor.opt_state)  # the slow Adam is untouched
    # ATAC's entropy weight: the warm start tunes its own log alpha; the adversarial phase's waits at
    # log(init_alpha) with untouched Adam moments.
    assert abs(float(warm.warmup_alpha.params["log_alpha"]) - np.log(0.5)) > 1e-3
    chex.assert_trees_all_equal(warm.alpha, state.alpha)
    key = jax.random.PRNGKey(9)
    trained, metrics = update(warm, batch, key)
    moved = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), trained.actor.params, warm.actor.params)
    assert max(jax.tree.leaves(moved)) < 1e-8  # the adversarial phase keeps the slow rate
    # Alpha restarts there at the critics' rate (1e-2 here, not the actor's 1e-9): Adam's first step is
    # lr * g / (|g| + eps) = lr * sign(g), with g = H - target and H the entropy of the update's samples.
    _, log_probs = satac._sample_actions(learner, warm.actor.params, batch.observations, jax.random.split(key, 3)[0])
    step = float(trained.alpha.params["log_alpha"]) - np.log(0.5)
    np.testing.assert_allclose(step, -1e-2 * np.sign(-float(jnp.mean(log_probs)) - learner.target_entropy), rtol=1e-4)
    np.testing.assert_allclose(metrics["alpha"], 0.5 * np.exp(step), rtol=1e-5)
    chex.assert_trees_all_equal(trained.warmup_alpha, warm.warmup_alpha)  # the warm start's is left behind


def test_wsac_is_satac_under_its_published_name():
    """``wsac`` and ``satac`` build the same config and learner, and give the same updates."""
    from experiments import cli

    wsac, plain = registry.load("wsac"), registry.load("satac")
    assert wsac.config_cls is plain.config_cls is satac.Config and wsac.run is plain.run
    assert "WSAC" in dict(line.split(None, 1) for line in registry.describe())["wsac"]
    overrides = [cli.Override("hidden_sizes", "8", "--hidden_sizes", from_text=True),
                 cli.Override("reference", "behaviour", "--reference", from_text=True)]
    configs = [cli.build_config(entry.config_cls, overrides) for entry in (wsac, plain)]
    assert configs[0] == configs[1] and configs[0].hidden_sizes == (8,)
    problem = offline.Problem(observation_size=5, action_size=2, episode_length=10)
    learners = [satac.make_learner(config, problem) for config in configs]
    assert learners[0].networks == learners[1].networks
    batch = dsrl.take_transitions(one_step_dataset(16), jnp.arange(16))

    @jax.jit
    def warm_then_adversarial(key):
        runs = []
        for learner in learners:
            state = satac.init_state(learner, key, jnp.float32(10.0))
            state, _ = satac.update(learner, state, batch, key, warm=True)
            runs.append(satac.update(learner, state, batch, key))
        return runs

    by_wsac, by_satac = warm_then_adversarial(jax.random.PRNGKey(3))
    chex.assert_trees_all_equal(jax.tree.leaves(by_wsac), jax.tree.leaves(by_satac))


def test_returns_warm_start_regresses_on_bootstrapped_returns():
    learner, state, batch, update = _warm_learner(critic_warmup="returns")
    tail_actions = jnp.full((64, 2), 0.3)
    reward_target, cost_target = satac._critic_targets(learner, state, batch, batch.actions, tail_actions)
    nets = learner.networks
    tail_reward = jnp.min(nets.reward_critic.apply(state.reward_target, batch.returns.tail_observations, tail_actions), 0)
    tail_cost = jnp.max(nets.cost_critic.apply(state.cost_target, batch.returns.tail_observations, tail_actions), 0)
    # Every transition is terminal here, so the returns are the one-step signals and nothing bootstraps.
    np.testing.assert_allclose(batch.returns.tail_discounts, 0.0)
    np.testing.assert_allclose(reward_target, batch.rewards, rtol=1e-6)
    np.testing.assert_allclose(cost_target, batch.costs, rtol=1e-6)
    # A timeout bootstraps: G + tail_discount * min_e Q_target(s_tail, a_tail).
    cut = batch._replace(returns=batch.returns._replace(tail_discounts=jnp.full((64,), 0.25)))
    reward_target, cost_target = satac._critic_targets(learner, state, cut, batch.actions, tail_actions)
    np.testing.assert_allclose(reward_target, batch.rewards + 0.25 * tail_reward, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cost_target, batch.costs + 0.25 * tail_cost, rtol=1e-5, atol=1e-6)

    # The algorithm asks the scaffold for returns-to-go only when its warm start uses them.
    problem = offline.Problem(observation_size=5, action_size=2, episode_length=10)
    assert satac.make_algorithm(satac.Config(critic_warmup="returns"), problem).uses_returns
    assert not satac.make_algorithm(satac.Config(), problem).uses_returns
    with pytest.raises(ConfigError, match="critic_warmup"):
        satac.Config(critic_warmup="monte_carlo")
    # Fitting the returns: the data's Q values approach them within a few hundred fast steps.
    for i in range(300):
        state, _ = update(state, batch, jax.random.PRNGKey(i), warm=True)
    q = nets.reward_critic.apply(state.reward_critic.params, batch.observations, batch.actions)
    assert float(jnp.mean((q - batch.rewards) ** 2)) < 0.1 * float(jnp.var(batch.rewards))


def test_actor_can_enter_the_warm_start_as_the_reference():
    problem = offline.Problem(observation_size=5, action_size=2, episode_length=10)
    config = satac.Config(hidden_sizes=(16,), actor_from_reference=True, reference_updates=0, warmup_updates=0)
    algorithm = satac.make_algorithm(config, problem)
    reference_phase = {p.name: p for p in algorithm.phases}["reference"]
    state = satac.init_state(satac.make_learner(config, problem), jax.random.PRNGKey(0), jnp.float32(10.0))
    batch = dsrl.take_transitions(one_step_dataset(32), jnp.arange(32))
    after, _ = reference_phase.update(state, batch, jax.random.PRNGKey(1))
    chex.assert_trees_all_equal(after.actor.params, after.reference.actor.params)
    plain = satac.make_algorithm(dataclasses.replace(config, actor_from_reference=False), problem)
    unchanged, _ = {p.name: p for p in plain.phases}["reference"].update(state, batch, jax.random.PRNGKey(1))
    chex.assert_trees_all_equal(unchanged.actor, state.actor)
    with pytest.raises(ConfigError, match="actor_from_reference"):
        satac.Config(reference="threshold", actor_from_reference=True)


def test_signal_scales_act_as_scaled_data():
    """``reward_scale`` and ``cost_scale`` give the update of an unscaled learner on scaled data,
    with the per-step threshold scaled alike."""
    scales = dict(reward_scale=0.1, cost_scale=3.0, reference="threshold", multiplier=PID_MULTIPLIER,
                  critic_warmup="returns")
    scaled_learner, state, batch, scaled_update = _warm_learner(**scales)
    plain_learner, _, _, plain_update = _warm_learner(**{**scales, "reward_scale": 1.0, "cost_scale": 1.0})
    scaled_batch = batch.scaled(0.1, 3.0)
    np.testing.assert_allclose(satac.cost_threshold(scaled_learner, state),
                               3.0 * satac.cost_threshold(plain_learner, state), rtol=1e-6)
    # The threshold is linear in kappa: the unscaled learner holds three times the limit.
    plain_state = state.replace(cost_limit=3.0 * state.cost_limit)
    for warm in (True, False):
        a, metrics_a = scaled_update(state, batch, jax.random.PRNGKey(3), warm=warm)
        b, metrics_b = plain_update(plain_state, scaled_batch, jax.random.PRNGKey(3), warm=warm)
        # Leaf by leaf: the two learners' train states hold distinct (equal) optimizer objects.
        chex.assert_trees_all_close(jax.tree.leaves(a.replace(cost_limit=b.cost_limit)), jax.tree.leaves(b),
                                    rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(metrics_a, metrics_b, rtol=1e-5, atol=1e-6)


def test_mode_penalty_reads_the_cost_of_the_deterministic_action():
    """``penalty_action = mode``: the penalty compares ``g(s, tanh(mean))``, the action evaluation
    runs, with the reference's."""
    learner, state, batch, _ = _warm_learner(penalty_action="mode", reference="behaviour")
    nets = learner.networks
    key = jax.random.PRNGKey(4)
    _, metrics = satac._actor_step(learner, state, batch, key, jnp.float32(10.0), warm=False)
    mean, _ = nets.actor.apply(state.actor.params, batch.observations)
    mode_cost = jnp.max(nets.cost_critic.apply(state.cost_critic.params, batch.observations, jnp.tanh(mean)), 0)
    reference = jnp.max(nets.cost_critic.apply(state.cost_critic.params, batch.observations, batch.actions), 0)
    np.testing.assert_allclose(metrics["q_cost_policy"], jnp.mean(mode_cost), rtol=1e-5)
    np.testing.assert_allclose(metrics["penalty"], jnp.mean(jnp.maximum(mode_cost - reference, 0.0)),
                               rtol=1e-5, atol=1e-7)
    sampled_learner, _, _, _ = _warm_learner(reference="behaviour")
    _, sampled = satac._actor_step(sampled_learner, state, batch, key, jnp.float32(10.0), warm=False)
    assert abs(float(sampled["q_cost_policy"] - metrics["q_cost_policy"])) > 1e-4  # samples differ from the mode
    with pytest.raises(ConfigError, match="penalty_action"):
        satac.Config(penalty_action="mean")


def test_cost_beta_sets_the_cost_critics_bellman_weight_alone():
    """``cost_beta`` moves the cost critic as ``beta`` would and leaves the reward critic at ``beta``."""
    _, state, batch, split_update = _warm_learner(beta=1.0, cost_beta=4.0)
    _, _, _, reward_update = _warm_learner(beta=1.0)
    _, _, _, cost_update = _warm_learner(beta=4.0)
    key = jax.random.PRNGKey(5)
    split, _ = split_update(state, batch, key)
    as_reward, _ = reward_update(state, batch, key)
    as_cost, _ = cost_update(state, batch, key)
    chex.assert_trees_all_close(split.reward_critic.params, as_reward.reward_critic.params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(split.cost_critic.params, as_cost.cost_critic.params, rtol=1e-6, atol=1e-7)
    moved = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), as_reward.cost_critic.params, as_cost.cost_critic.params)
    assert max(jax.tree.leaves(moved)) > 1e-5  # the two betas do give different cost critics
    with pytest.raises(ConfigError, match="cost_beta"):
        satac.Config(cost_beta=-1.0)


def test_hold_trains_the_critics_alone_as_the_adversarial_step_does():
    """``actor_hold_updates``: the adversarial critic step of a full update, with the actor, alpha and
    the multiplier held; a phase of its own between the warm start and the adversarial phase."""
    learner, state, batch, full_update = _warm_learner(multiplier=PID_MULTIPLIER, actor_learning_rate=1e-3)
    held_update = jax.jit(functools.partial(satac.update, learner, actor_moves=False))
    key = jax.random.PRNGKey(6)
    held, metrics = held_update(state, batch, key)
    full, _ = full_update(state, batch, key)
    chex.assert_trees_all_equal((held.reward_critic, held.cost_critic), (full.reward_critic, full.cost_critic))
    chex.assert_trees_all_equal((held.actor.params, held.alpha.params, held.multiplier_state, held.actor.opt_state),
                                (state.actor.params, state.alpha.params, state.multiplier_state, state.actor.opt_state))
    # The full update does move what the hold keeps, so the equalities above can fail.
    moved = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)),
                         (full.actor.params, full.alpha.params, full.multiplier_state),
                         (state.actor.params, state.alpha.params, state.multiplier_state))
    assert all(max(jax.tree.leaves(part)) > 0 for part in moved) and max(jax.tree.leaves(moved[0])) > 1e-5
    assert "cost_pessimism" in metrics and "penalty" not in metrics

    problem = offline.Problem(observation_size=5, action_size=2, episode_length=10)
    phases = satac.make_algorithm(satac.Config(actor_hold_updates=3000), problem).phases
    assert [(p.name, p.num_updates) for p in phases[1:]] == [("warmup", 100_000), ("hold", 3000), ("train", 200_000)]
    assert {p.name: p.num_updates for p in satac.make_algorithm(satac.Config(), problem).phases}["hold"] == 0
    with pytest.raises(ConfigError, match="actor_hold_updates"):
        satac.Config(actor_hold_updates=150, updates_per_chunk=100)


def test_mean_cost_target_averages_the_twin_targets():
    """``cost_target = mean``: the cost critic's TD target is ``c + gamma (1 - d) mean_e g^target``."""
    learner, state, batch, _ = _warm_learner(cost_target="mean")
    max_learner, _, _, _ = _warm_learner()
    # Move one target head away from the other so that max and mean differ.
    state = state.replace(cost_target=jax.tree.map(lambda p: p.at[0].add(0.3), state.cost_target))
    nonterminal = batch._replace(terminals=jnp.zeros_like(batch.terminals))
    next_actions = jnp.full((64, 2), 0.2)
    _, mean_target = satac._critic_targets(learner, state, nonterminal, next_actions, None)
    _, max_target = satac._critic_targets(max_learner, state, nonterminal, next_actions, None)
    q_next = learner.networks.cost_critic.apply(state.cost_target, batch.next_observations, next_actions)
    gamma = learner.config.discount
    np.testing.assert_allclose(mean_target, batch.costs + gamma * jnp.mean(q_next, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(max_target, batch.costs + gamma * jnp.max(q_next, 0), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(mean_target - max_target))) > 1e-3
    with pytest.raises(ConfigError, match="cost_target"):
        satac.Config(cost_target="min")
