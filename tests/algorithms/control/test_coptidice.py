from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.control import coptidice
from constrained_rl.config import ConfigError
from constrained_rl import returns
from constrained_rl.data import dsrl
from tests.algorithms.control.test_bcq_lag import (LOOSE, PROBLEM, TIGHT, assert_runs_match_alone, bandit_dataset,
                                           tiny, train_runs)
from tests.constrained_rl.data import tiny_dataset

pytestmark = pytest.mark.quick_compile  # tiny learners, a few updates: mostly compiling

CHI2, SOFTCHI = coptidice.DIVERGENCES["chi2"], coptidice.DIVERGENCES["softchi"]


class DivergenceTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_generators_by_hand(self):
        x = jnp.array([0.0, 0.5, 1.0, 3.0])
        np.testing.assert_allclose(self.variant(CHI2.f)(x), [0.5, 0.125, 0.0, 2.0], rtol=1e-6)
        # x log x - x + 1 below 1 (0 at x = 0 gives 1), (x - 1)^2 / 2 from 1 on.
        np.testing.assert_allclose(self.variant(SOFTCHI.f)(x), [1.0, 0.5 * np.log(0.5) + 0.5, 0.0, 2.0], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_closed_form_ratio(self):
        advantages = jnp.array([-1.0, 0.0, 1.0])
        # e / alpha = -2, 0, 2: chi2 gives max(0, y + 1); softchi exp(y) below 0, y + 1 above.
        chi2 = self.variant(lambda e: coptidice.optimal_ratio(e, 0.5, CHI2))
        softchi = self.variant(lambda e: coptidice.optimal_ratio(e, 0.5, SOFTCHI))
        np.testing.assert_allclose(chi2(advantages), [0.0, 1.0, 3.0])
        np.testing.assert_allclose(softchi(advantages), [np.exp(-2.0), 1.0, 3.0], rtol=1e-6)

    def test_ratio_inverts_the_generator_derivative(self):
        # w* solves f'(w) = e / alpha wherever w* > 0.
        e = jnp.linspace(-3.0, 3.0, 13)
        for divergence in (CHI2, SOFTCHI):
            w = coptidice.optimal_ratio(e, 1.0, divergence)
            slope = jax.vmap(jax.grad(divergence.f))(w)
            positive = np.asarray(w) > 0
            np.testing.assert_allclose(np.asarray(slope)[positive], np.asarray(e)[positive], atol=1e-5)


def test_tabular_bandit_ratios_form_a_distribution_and_follow_the_advantage():
    # One state, four equally likely actions, gamma = 0 (every state is initial): r - lambda c = x.
    x = jnp.array([0.0, 0.5, 1.0, 1.5])

    def loss(nu):
        advantages = coptidice.advantage(x, jnp.zeros(4), jnp.zeros(4), jnp.full(4, nu), jnp.zeros(4), 0.0)
        return coptidice.nu_loss(jnp.full(1, nu), advantages, 1.0, 0.0, CHI2)

    nu = 0.0
    for _ in range(200):
        nu -= 0.5 * jax.grad(loss)(nu)
    # Stationarity 1 - E[w] = 0 with w = x - nu + 1 (chi2, alpha 1): nu = mean x, w = x - 0.75 + 1.
    np.testing.assert_allclose(nu, 0.75, atol=1e-4)
    w = coptidice.optimal_ratio(x - nu, 1.0, CHI2)
    np.testing.assert_allclose(w, [0.25, 0.75, 1.25, 1.75], atol=1e-4)


class CostBoundTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_upper_bound_by_hand(self):
        zeros = jnp.zeros(2)
        bound = self.variant(coptidice.cost_upper_bound, static_argnums=7)(
            zeros, zeros, zeros, jnp.ones(2), jnp.array([0.0, 1.0]), zeros, 1.0, 0.99)
        # ell = w c = [0, 1]; p~ = 2 softmax([0, 1]).
        weights = 2 * np.exp([0.0, 1.0]) / (1 + np.e)
        np.testing.assert_allclose(bound.chi_loss, np.log((1 + np.e) / 2), rtol=1e-6)
        np.testing.assert_allclose(bound.weighted_cost, weights[1] / 2, rtol=1e-6)
        np.testing.assert_allclose(bound.kl, np.mean(weights * np.log(weights) - weights + 1), rtol=1e-5)
        assert float(bound.weighted_cost) > 0.5  # above the plain estimate mean(w c)

    def test_chi_gradient_is_the_reweighted_bellman_gradient(self):
        ratio, costs = jnp.array([1.0, 2.0, 0.5]), jnp.array([1.0, 0.0, 2.0])
        zeros = jnp.zeros(3)

        def chi_loss(chi):
            return coptidice.cost_upper_bound(zeros, chi, zeros, ratio, costs, zeros, 0.7, 0.99).chi_loss

        chi = jnp.array([0.1, -0.2, 0.3])
        ell = ratio * (costs - chi)
        weights = 3 * jax.nn.softmax(ell / 0.7)
        np.testing.assert_allclose(jax.grad(chi_loss)(chi), -weights * ratio / 3, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_weighted_log_likelihood(self):
        loss = self.variant(coptidice.weighted_log_likelihood_loss)(jnp.array([2.0, 0.0]), jnp.array([-1.0, -5.0]))
        np.testing.assert_allclose(loss, 1.0, rtol=1e-6)


def test_dataset_statistics_picks_episode_starts():
    dataset = dsrl.offline_dataset_from_arrays(tiny_dataset.make_arrays())
    statistics = coptidice.dataset_statistics(dataset)
    # Episodes start at rows 0, 3, 7; the unfinished tail starts at row 9.
    np.testing.assert_array_equal(statistics.initial_observations[:, 0], [0.0, 3.0, 7.0, 9.0])
    np.testing.assert_allclose(statistics.observation_std[0], np.arange(10).std(), rtol=1e-6)


def test_cost_threshold_conventions():
    problem = PROBLEM._replace(episode_length=10)
    occupancy = coptidice.Config(discount=0.9)
    value = returns.per_step_cost_threshold(20.0, 0.9, 10)
    np.testing.assert_allclose(coptidice.cost_threshold(occupancy, problem, 20.0), 0.1 * value, rtol=1e-6)
    osrl = coptidice.Config(discount=0.9, cost_threshold_convention="osrl")
    np.testing.assert_allclose(coptidice.cost_threshold(osrl, problem, 20.0), value, rtol=1e-6)


def test_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="divergence"):
        coptidice.Config(divergence="kl")
    with pytest.raises(ConfigError, match="cost_threshold_convention"):
        coptidice.Config(cost_threshold_convention="per_step")


NUM_UPDATES = 300


@pytest.fixture(scope="module")
def trained():
    # gamma = 0 makes the one-step bandit's occupancy the data's own state distribution.
    config = tiny(coptidice.Config, discount=0.0, reward_scale=1.0, actor_learning_rate=3e-3,
                  critic_learning_rate=3e-3, scalar_learning_rate=0.03)
    dataset = bandit_dataset()
    algorithm = coptidice.make_algorithm(config, PROBLEM, coptidice.dataset_statistics(dataset))
    state, metrics = train_runs(algorithm, dataset, (LOOSE, TIGHT), NUM_UPDATES)
    return algorithm, dataset, state, metrics


def test_weighted_cloning_moves_towards_reward_or_away_from_cost(trained):
    algorithm, dataset, state, metrics = trained
    observations = dataset.observations[:256]

    def mean_action(run: int) -> float:
        learner = jax.tree.map(lambda x: x[run], state.learner)
        return float(jnp.mean(algorithm.policy(learner, observations, jax.random.PRNGKey(0))[0]))

    # Plain cloning of the uniform behaviour would act ~0. Loose: lambda falls, the ratios favour
    # reward (r = a). Tight (E[c] = 3 (E[a] + 1) <= 1.5 needs E[a] <= -0.5): lambda rises until the
    # ratios favour cheap actions.
    multiplier = np.asarray(metrics["multiplier"])[:, -1]
    assert multiplier[0] < 0.2 and multiplier[1] > 0.5
    assert mean_action(0) > 0.2
    assert mean_action(1) < -0.2


def test_vmapped_runs_match_runs_alone(trained):
    algorithm, dataset, state, _ = trained
    assert_runs_match_alone(algorithm, dataset, state, (LOOSE, TIGHT), NUM_UPDATES)


def test_update_count_is_osrl_s():
    """OSRL HEAD's ``coptidice_configs.py``: ``update_steps = 100_000`` (200k only for its MetaDrive tasks)."""
    assert coptidice.Config().num_updates == 100_000
