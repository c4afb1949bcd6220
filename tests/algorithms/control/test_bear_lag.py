from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.control import bear_lag
from constrained_rl import lagrangian
from constrained_rl.config import ConfigError
from tests.algorithms.control.test_bcq_lag import (LOOSE, PROBLEM, TIGHT, assert_runs_match_alone, bandit_dataset,
                                           tiny, train_runs)

pytestmark = pytest.mark.quick_compile  # tiny learners, a few updates: mostly compiling


class LossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_mmd_by_hand(self):
        # State 0: x = {0, 0}, y = {1, 1}: k(x, x') = k(y, y') = 1 and k(x, y) = exp(-d / (2 sigma)).
        # State 1: both sets {0, 2}: the squared MMD is 0.
        x = jnp.array([[[0.0], [0.0]], [[0.0], [2.0]]])
        y = jnp.array([[[1.0], [1.0]], [[2.0], [0.0]]])
        mmd = self.variant(bear_lag.mmd, static_argnums=(2, 3))
        np.testing.assert_allclose(mmd(x, y, 0.5, "gaussian"), [math.sqrt(2 - 2 * math.exp(-1) + 1e-6), 1e-3],
                                   rtol=1e-5)
        # Two action dimensions: squared L2 distance 2 against L1 distance 2 for (0, 0) vs (1, 1); the
        # laplacian kernel differs from the gaussian one where |difference| != 1 per dimension.
        x2, y2 = jnp.zeros((1, 1, 2)), jnp.array([[[1.0, 1.0]]])
        np.testing.assert_allclose(mmd(x2, y2, 1.0, "gaussian"), [math.sqrt(2 - 2 * math.exp(-1) + 1e-6)], rtol=1e-5)
        x3, y3 = jnp.zeros((1, 1, 2)), jnp.array([[[2.0, 0.0]]])
        np.testing.assert_allclose(mmd(x3, y3, 1.0, "gaussian"), [math.sqrt(2 - 2 * math.exp(-2) + 1e-6)], rtol=1e-5)
        np.testing.assert_allclose(mmd(x3, y3, 1.0, "laplacian"), [math.sqrt(2 - 2 * math.exp(-1) + 1e-6)], rtol=1e-5)

    def test_mmd_of_unequal_sets_averages_over_all_pairs(self):
        # x = {0, 1}, y = {0}: E k(x, x') = (2 + 2 e^-1) / 4, E k(y, y') = 1, E k(x, y) = (1 + e^-1) / 2.
        x, y = jnp.array([[[0.0], [1.0]]]), jnp.array([[[0.0]]])
        e = math.exp(-1)
        expected = math.sqrt((2 + 2 * e) / 4 + 1 - (1 + e) + 1e-6)
        np.testing.assert_allclose(bear_lag.mmd(x, y, 0.5), [expected], rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_actor_loss_by_hand(self):
        q_reward, q_cost = jnp.array([1.0, 3.0]), jnp.array([0.5, 2.5])
        mmd_values = jnp.array([0.05, 0.25])
        loss = self.variant(bear_lag.bear_actor_loss)(q_reward, q_cost, mmd_values, 2.0, 3.0, 1.0, 0.05)
        # -mean Q_r + alpha mean (MMD - eps) + lambda mean (Q_c - l) = -2 + 2 * 0.1 + 3 * 0.5
        np.testing.assert_allclose(loss, -2.0 + 0.2 + 1.5, rtol=1e-6)
        # Before policy_start_update the reward drops out: support matching and the cost term only.
        loss = self.variant(bear_lag.bear_actor_loss)(q_reward, q_cost, mmd_values, 2.0, 3.0, 1.0, 0.05, 0.0)
        np.testing.assert_allclose(loss, 0.2 + 1.5, rtol=1e-6)

    def test_actor_loss_moves_neither_multiplier(self):
        grads = jax.grad(bear_lag.bear_actor_loss, argnums=(0, 2, 3, 4))(
            jnp.array([1.0, 3.0]), jnp.array([0.5, 2.5]), jnp.array([0.1, 0.3]), 2.0, 3.0, 1.0, 0.05)
        np.testing.assert_allclose(grads[0], [-0.5, -0.5])
        np.testing.assert_allclose(grads[1], [1.0, 1.0])  # alpha / B per sample
        assert float(grads[2]) == 0.0 and float(grads[3]) == 0.0

    def test_alpha_rises_while_the_policy_leaves_the_support_and_stays_in_its_bounds(self):
        rule = lagrangian.make_rule(bear_lag.Config(alpha=dataclasses.replace(bear_lag.ALPHA, learning_rate=0.5)).alpha)
        state = rule.init()
        state = rule.update(state, jnp.float32(1.05), jnp.float32(0.05))  # MMD above epsilon by 1
        np.testing.assert_allclose(state.log_multiplier, 0.5, rtol=1e-6)
        for _ in range(50):
            state = rule.update(state, jnp.float32(10.0), jnp.float32(0.05))
        np.testing.assert_allclose(state.log_multiplier, 5.0, rtol=1e-6)
        state = rule.update(state, jnp.float32(0.0), jnp.float32(0.05))  # 5 - 0.5 e^5 0.05 = 1.29
        np.testing.assert_allclose(state.log_multiplier, 5.0 - 0.025 * math.exp(5.0), rtol=1e-5)
        state = rule.update(state, jnp.float32(0.0), jnp.float32(10.0))
        np.testing.assert_allclose(state.log_multiplier, -5.0, rtol=1e-6)


def test_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="mmd_kernel"):
        bear_lag.Config(mmd_kernel="cosine")
    with pytest.raises(ConfigError, match="init"):
        bear_lag.Config(alpha=dataclasses.replace(bear_lag.ALPHA, init=1e3))
    with pytest.raises(ConfigError, match="num_mmd_samples"):
        bear_lag.Config(num_mmd_samples=0)
    with pytest.raises(ConfigError, match="mmd_sigma"):
        bear_lag.Config(mmd_sigma=0.0)


# --------------------------------------------------------------------------------------------------
# Learning


NUM_UPDATES = 300


def train_bandit(**overrides):
    # sigma 0.5 on this one-dimensional bandit: with OSRL's 50 (set for 2- to 8-dimensional actions
    # spread over [-1, 1]) the kernel is nearly flat here and no threshold would bind.
    config = tiny(bear_lag.Config, vae_hidden_sizes=(16, 16), mmd_sigma=0.5, actor_learning_rate=3e-3,
                  alpha=dataclasses.replace(bear_lag.ALPHA, learning_rate=0.1), **overrides)
    algorithm = bear_lag.make_algorithm(config, PROBLEM)
    dataset = bandit_dataset()
    state, metrics = train_runs(algorithm, dataset, (LOOSE, TIGHT), NUM_UPDATES)
    return algorithm, dataset, state, metrics


def mean_actions(algorithm, dataset, state) -> list[float]:
    """Each run's mean deterministic action on the data's states."""
    observations = dataset.observations[:256]
    actions = []
    for run in range(jax.tree.leaves(state.learner)[0].shape[0]):
        learner = jax.tree.map(lambda x: x[run], state.learner)
        actions.append(float(jnp.mean(algorithm.policy(learner, observations, jax.random.PRNGKey(0))[0])))
    return actions


@pytest.fixture(scope="module")
def trained():
    """A loose support constraint (epsilon 1): the reward and cost terms decide."""
    return train_bandit(mmd_threshold=1.0)


@pytest.fixture(scope="module")
def support_bound():
    """OSRL's epsilon (0.05): the policy must stay close to the uniform behaviour."""
    return train_bandit(mmd_threshold=0.05)


def test_policy_follows_reward_when_loose_and_cost_when_tight(trained):
    algorithm, dataset, state, metrics = trained
    # Loose: lambda stays 0 and r = a drives the action up; tight (Q_c = 3 (a + 1) > 1.5 unless
    # a < -0.5): the PID multiplier rises and the action goes down until Q_c is near the threshold.
    multiplier = np.asarray(metrics["multiplier"])
    assert multiplier[0, -1] == 0.0 and multiplier[1, -1] > 0.0
    loose, tight = mean_actions(algorithm, dataset, state)
    assert loose > 0.5 and tight < -0.2
    cost_value = np.asarray(metrics["cost_value"])[:, -20:].mean(axis=1)
    assert cost_value[0] > 3.0 and cost_value[1] < 2.0


def test_support_constraint_holds_the_policy_to_the_data(trained, support_bound):
    algorithm, dataset, state, metrics = support_bound
    # With epsilon 0.05 the reward cannot pull the policy off the behaviour's (uniform) distribution:
    # the loose run's action stays near the data's mean, far below the loose-epsilon run's.
    loose_bound = mean_actions(algorithm, dataset, state)[0]
    loose_free = mean_actions(*trained[:3])[0]
    assert abs(loose_bound) < 0.25 and loose_free - loose_bound > 0.4
    # alpha rises while the MMD exceeds epsilon, and falls while it stays within it.
    assert np.asarray(metrics["alpha"])[0, -1] > 1.0 > np.asarray(trained[3]["alpha"])[0, -1]
    assert np.asarray(metrics["mmd"])[0, -20:].mean() < np.asarray(trained[3]["mmd"])[0, -20:].mean()


def test_policy_ignores_reward_before_policy_start_update(trained):
    # The loose-epsilon setting of `trained`, with the reward switched off for longer than the run: the
    # actor only matches the data's support, so its action stays near the uniform data's mean.
    algorithm, dataset, state, metrics = train_bandit(mmd_threshold=1.0, policy_start_update=10 * NUM_UPDATES)
    assert abs(mean_actions(algorithm, dataset, state)[0]) < 0.25 < mean_actions(*trained[:3])[0]


def test_critics_and_vae_learn(trained):
    *_, metrics = trained
    for name, ratio in (("critic_loss", 0.3), ("cost_critic_loss", 0.3), ("vae_loss", 0.8)):
        losses = np.asarray(metrics[name])
        assert losses[:, -20:].mean() < ratio * losses[:, :20].mean(), name


def test_vmapped_runs_match_runs_alone(trained):
    # Over 100 updates: the MMD's square root and alpha's exponential steps amplify float32 rounding
    # beyond the shared tolerance after 300 (about 0.015 in a few weights), not a mix-up of runs.
    algorithm, dataset, *_ = trained
    state, _ = train_runs(algorithm, dataset, (LOOSE, TIGHT), 100)
    assert_runs_match_alone(algorithm, dataset, state, (LOOSE, TIGHT), 100)
