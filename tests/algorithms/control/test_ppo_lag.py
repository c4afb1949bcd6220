"""PPO-Lagrangian: the loss by hand, the multiplier's direction, learning on a tiny task, vmapped seeds."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.control.ppo_lag import losses, networks as ppo_networks, ppo
from algorithms.control.ppo_lag import train as ppo_lag
from constrained_rl import lagrangian
from constrained_rl.config import ConfigError
from constrained_rl.envs.base import Env, EnvState, initial_state
from constrained_rl.rollouts import Transition

pytestmark = pytest.mark.quick_compile  # tiny networks, a few iterations: mostly compiling


class LinearCostBandit(Env):
    """Ten steps of a one-dimensional choice: reward ``a``, cost ``(a + 1) / 2`` per step.

    Reward and cost pull the same action in opposite directions: plain PPO drives ``a`` to +1 and the
    episode cost to 10; meeting a limit ``d`` needs a mean action of at most ``2 d / 10 - 1``.
    """

    def reset(self, key: jax.Array) -> EnvState:
        return initial_state(jnp.ones((1,), jnp.float32), physics=jnp.zeros((), jnp.float32))

    def step(self, state: EnvState, action: jax.Array) -> EnvState:
        a = jnp.clip(action[0], -1.0, 1.0)
        return state.replace(reward=a, cost=(a + 1.0) / 2.0, done=jnp.zeros(()), truncation=jnp.zeros(()),
                             next_obs=state.obs)

    observation_size = 1
    action_size = 1
    episode_length = 10


TINY = dict(task="BallCircle", num_envs=8, unroll_length=10, num_epochs=4, num_minibatches=2,
            actor_hidden_sizes=(16,), critic_hidden_sizes=(16,), learning_rate=3e-3, init_log_std=0.0)


def tiny_config(**overrides) -> ppo_lag.Config:
    return ppo_lag.Config(**{**TINY, "total_env_steps": 80 * 30, **overrides})


# ---------------------------------------------------------------------------------------------------
# Losses against hand computations


def test_actor_advantage_by_hand():
    reward_advantage = jnp.array([1.0, 2.0, 3.0, 4.0])
    cost_advantage = jnp.array([0.0, 1.0, 0.0, 3.0])
    # z(A_r) = (A_r - 2.5) / sqrt(1.25); A_c - mean = [-1, 0, -1, 2]; lambda = 1 halves the difference.
    z = np.array([-1.5, -0.5, 0.5, 1.5]) / np.sqrt(1.25)
    expected = (z - np.array([-1.0, 0.0, -1.0, 2.0])) / 2.0
    got = losses.actor_advantage(reward_advantage, cost_advantage, jnp.asarray(1.0))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    # lambda = 0 is plain PPO: the standardised reward advantage alone.
    np.testing.assert_allclose(losses.actor_advantage(reward_advantage, cost_advantage, 0.0), z, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_networks():
    nets = ppo_networks.make_networks(2, (8,), (8,), "tanh", init_log_std=-0.3)
    params = ppo_networks.init_params(nets, jax.random.PRNGKey(0), 3)
    return nets, params


def _gaussian_log_prob_np(mean, log_std, u):
    std = np.exp(log_std)
    log_normal = np.sum(-0.5 * ((u - mean) / std) ** 2 - log_std - 0.5 * np.log(2 * np.pi), axis=-1)
    return log_normal - np.sum(np.log(1.0 - np.tanh(u) ** 2), axis=-1)


@pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "nojit"])
@pytest.mark.parametrize("value_clip", [None, 0.1])
def test_loss_matches_hand_computation(tiny_networks, value_clip, use_jit):
    nets, params = tiny_networks
    obs = jnp.array([[0.1, -0.2, 0.3], [1.0, 0.5, -0.5], [-0.7, 0.2, 0.9]])
    pre_squash = jnp.array([[0.2, -0.1], [1.5, 0.3], [-0.4, -2.0]])
    old_log_prob = jnp.array([-1.0, -3.0, -2.5])
    advantage = jnp.array([1.0, -0.5, 2.0])
    old_reward_value, old_cost_value = jnp.array([0.5, -0.3, 0.0]), jnp.array([0.2, 0.2, 0.2])
    reward_target, cost_target = jnp.array([1.0, 0.0, -1.0]), jnp.array([0.0, 1.0, 0.5])
    batch = losses.UpdateBatch(obs, pre_squash, old_log_prob, advantage, old_reward_value, old_cost_value,
                               reward_target, cost_target)
    hp = losses.LossHyperparameters(clip_epsilon=0.2, value_clip=value_clip, value_coef=0.5, entropy_coef=0.0)
    loss_fn = lambda p, b, k: losses.ppo_lag_loss(p, nets, b, k, hp)
    loss, metrics = (jax.jit(loss_fn) if use_jit else loss_fn)(params, batch, jax.random.PRNGKey(1))

    mean, log_std = (np.asarray(x) for x in nets.actor.apply(params.actor, obs))
    log_prob = _gaussian_log_prob_np(mean, log_std, np.asarray(pre_squash))
    ratio = np.exp(log_prob - np.asarray(old_log_prob))
    adv = np.asarray(advantage)
    policy_loss = np.mean(np.maximum(-ratio * adv, -np.clip(ratio, 0.8, 1.2) * adv))

    def value_loss(values, old, target):
        loss = (values - target) ** 2
        if value_clip is not None:
            clipped = old + np.clip(values - old, -value_clip, value_clip)
            loss = np.maximum(loss, (clipped - target) ** 2)
        return 0.5 * np.mean(loss)

    v_r = np.asarray(nets.reward_critic.apply(params.reward_critic, obs))
    v_c = np.asarray(nets.cost_critic.apply(params.cost_critic, obs))
    expected_r = value_loss(v_r, np.asarray(old_reward_value), np.asarray(reward_target))
    expected_c = value_loss(v_c, np.asarray(old_cost_value), np.asarray(cost_target))
    np.testing.assert_allclose(metrics["policy_loss"], policy_loss, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["reward_value_loss"], expected_r, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["cost_value_loss"], expected_c, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(loss, policy_loss + 0.5 * (expected_r + expected_c), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["clip_fraction"], np.mean(np.abs(ratio - 1) > 0.2), rtol=1e-6)


def test_entropy_bonus_enters_with_its_sign(tiny_networks):
    nets, params = tiny_networks
    batch = losses.UpdateBatch(jnp.zeros((4, 3)), jnp.zeros((4, 2)), jnp.zeros(4), jnp.zeros(4), jnp.zeros(4),
                               jnp.zeros(4), jnp.zeros(4), jnp.zeros(4))
    key = jax.random.PRNGKey(3)
    hp = losses.LossHyperparameters(0.2, None, 0.5, 0.0)
    base, metrics = losses.ppo_lag_loss(params, nets, batch, key, hp)
    with_bonus, _ = losses.ppo_lag_loss(params, nets, batch, key, hp._replace(entropy_coef=0.1))
    np.testing.assert_allclose(with_bonus, base - 0.1 * metrics["entropy"], rtol=1e-4, atol=1e-6)


def test_truncated_step_bootstraps_and_terminal_does_not(tiny_networks):
    config = tiny_config()
    learner = ppo_lag.make_learner(config, env=LinearCostBandit())
    params = ppo_lag.network_params(ppo_lag.init_state(learner, jax.random.PRNGKey(0)))
    obs = jnp.array([[[1.0]], [[0.5]]])  # [T=2, N=1, 1]
    next_obs = jnp.array([[[3.0]], [[2.0]]])
    transitions = Transition(obs=obs, action=jnp.zeros((2, 1, 1)), reward=jnp.array([[1.0], [2.0]]),
                             cost=jnp.array([[0.5], [0.0]]), termination=jnp.array([[0.0], [1.0]]),
                             truncation=jnp.array([[1.0], [0.0]]), next_obs=next_obs, extras={})
    targets = ppo_lag.compute_targets(learner, params, transitions)
    v = lambda o: np.asarray(learner.networks.reward_critic.apply(params.reward_critic, o))[..., 0]
    # Step 0 was truncated: one-step TD error bootstrapping from V(true final obs), no lambda term.
    np.testing.assert_allclose(targets.reward_advantage[0, 0], 1.0 + 0.99 * v(next_obs[0]) - v(obs[0]), rtol=1e-4, atol=1e-6)
    # Step 1 terminated: no bootstrap at all.
    np.testing.assert_allclose(targets.reward_advantage[1, 0], 2.0 - v(obs[1]), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# The multiplier and learning


UNREACHABLE = 1e6  # a limit no episode reaches: the ascent multiplier stays at 0, i.e. plain PPO
LEARNING_ITERATIONS = 30


CHUNK = 2  # iterations per compiled chunk, shared by the learning fixture and the vmap check


@pytest.fixture(scope="module")
def two_runs():
    """Two vmapped runs compiled once: run 0 held to a cost limit of 3, run 1 to an unreachable one.

    Returns the learner, the initial state, the state after the first chunk, and the metrics of all
    ``LEARNING_ITERATIONS`` iterations ``[runs, iterations]``.
    """
    config = tiny_config(num_seeds=2, multiplier=dataclasses.replace(ppo_lag.MULTIPLIER, learning_rate=0.2),
                         total_env_steps=80 * LEARNING_ITERATIONS)
    learner = ppo_lag.make_learner(config, env=LinearCostBandit())
    chunk = ppo_lag.make_chunk(learner, CHUNK)
    initial = ppo_lag.init_runs(learner, jnp.array([3.0, UNREACHABLE]))
    state, first_metrics = chunk(initial)
    after_first_chunk, all_metrics = state, [first_metrics]
    for _ in range(LEARNING_ITERATIONS // CHUNK - 1):
        state, metrics = chunk(state)
        all_metrics.append(metrics)
    metrics = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=1), *jax.device_get(all_metrics))
    return learner, initial, after_first_chunk, metrics


@pytest.fixture(scope="module")
def lag_and_unconstrained(two_runs):
    return two_runs[3]


def test_multiplier_rises_above_the_limit_and_stays_at_zero_below(lag_and_unconstrained):
    metrics = lag_and_unconstrained
    assert metrics["episodes"].min() > 0  # 10-step episodes end in every 10-step rollout
    # The initial policy spends about 5 per episode: over the limit 3 the multiplier climbs at once.
    assert metrics["episode_cost"][0, 0] > 3.0
    assert np.all(np.diff(metrics["multiplier"][0, :3]) > 0) and metrics["multiplier"][0, 0] > 0
    np.testing.assert_array_equal(metrics["multiplier"][1], 0.0)


def test_ppo_lag_meets_the_limit_where_unconstrained_ppo_does_not(lag_and_unconstrained):
    costs = lag_and_unconstrained["episode_cost"]
    lag_cost, plain_cost, start_cost = costs[0, -5:].mean(), costs[1, -5:].mean(), costs[0, 0]
    # Without the constraint PPO chases reward into cost (start ~5, optimum 10); the Lagrangian run is
    # pulled back to its limit 3. A multiplier that never reached the actor would end near 10 too.
    assert plain_cost > 8.0, plain_cost
    assert lag_cost < 4.0 and lag_cost < start_cost - 1.0, (lag_cost, start_cost)


def test_pid_rule_rises_above_the_limit():
    rule = lagrangian.make_rule(tiny_config(multiplier=dataclasses.replace(ppo_lag.MULTIPLIER, kind="pid")).multiplier)
    state = rule.update(rule.init(), jnp.asarray(5.0), jnp.asarray(3.0))
    assert float(state.multiplier) > 0


def test_vmapped_seeds_equal_seeds_run_one_by_one(two_runs):
    learner, initial, batched_state, batched_metrics = two_runs
    one_run = jax.jit(lambda s: jax.lax.scan(lambda c, _: ppo_lag.train_iteration(learner, c), s, None,
                                             length=CHUNK))
    for i, key in enumerate(ppo_lag.seed_keys(learner.config)):
        alone = ppo_lag.init_state(learner, key, initial.cost_limit[i])
        chex.assert_trees_all_close(ppo_lag.network_params(jax.tree_util.tree_map(lambda x: x[i], initial)),
                                    ppo_lag.network_params(alone))
        state, metrics = one_run(alone)
        run_i = jax.tree_util.tree_map(lambda x: x[i], batched_state)
        chex.assert_trees_all_close(ppo_lag.network_params(run_i), ppo_lag.network_params(state), atol=1e-5, rtol=1e-4)
        chex.assert_trees_all_close(run_i.multiplier_state, state.multiplier_state, atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(batched_metrics["episode_cost"][i, :CHUNK], metrics["episode_cost"], rtol=1e-4)
    # Different seeds really are different runs.
    assert not np.allclose(batched_metrics["policy_loss"][0], batched_metrics["policy_loss"][1])


# ---------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("field, value", [
    ("num_minibatches", 7), ("task", "NoSuchTask"), ("clip_epsilon", 0.0), ("discount", 1.5),
    ("activation", "sigmoid"), ("total_env_steps", 10),
])
def test_config_refuses_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        ppo_lag.Config(**{field: value})


def test_config_refuses_a_bad_multiplier_rule_naming_the_field():
    with pytest.raises(ConfigError, match="kind"):
        ppo_lag.Config(multiplier=dataclasses.replace(ppo_lag.MULTIPLIER, kind="bogus"))


def test_plain_ppo_is_ppo_lag_with_the_multiplier_fixed_at_zero():
    config = ppo.Config()
    assert (config.multiplier.kind, config.multiplier.init) == ("fixed", 0.0)
    assert float(lagrangian.make_rule(config.multiplier).init().multiplier) == 0.0


def test_on_a_real_task_it_trains_on_the_twin_and_evaluates_on_the_simulator():
    pytest.importorskip("bullet_safety_gym")
    from constrained_rl import envs
    from constrained_rl.config import ConfigError

    config = ppo_lag.Config(task="SafetyBallRun-v0", num_envs=2, unroll_length=10, num_minibatches=1,
                            total_env_steps=20, actor_hidden_sizes=(4,), critic_hidden_sizes=(4,), num_seeds=2)
    learner = ppo_lag.make_learner(config)
    assert config.train_task == "BallRunTwin" and learner.env.layout == envs.task_layout("SafetyBallRun-v0")
    state = ppo_lag.init_runs(learner)
    scores = ppo_lag.evaluate_runs(learner, state, 1, jax.random.PRNGKey(0))
    assert scores["reward"].shape == (2,) and np.all(np.isfinite(scores["reward"]))
    with pytest.raises(ConfigError, match="not trained for SafetyBallRun-v0"):
        ppo_lag.evaluate_runs(learner, state, 1, jax.random.PRNGKey(0), policy_layout=envs.task_layout("BallRun"))
