from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.control import cpq, osrl
from constrained_rl import lagrangian
from constrained_rl.config import ConfigError
from tests.algorithms.control.test_bcq_lag import (LOOSE, PROBLEM, TIGHT, assert_runs_match_alone, bandit_dataset,
                                           tiny, train_runs)

pytestmark = pytest.mark.quick_compile  # tiny learners, a few updates: mostly compiling


class LossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_constraints_penalized_backup_masks_unsafe_next_values(self):
        rewards = jnp.array([1.0, 1.0, 0.0, 2.0])
        discounts = jnp.array([0.9, 0.9, 0.9, 0.0])
        next_q_reward = jnp.array([10.0, 10.0, -4.0, 10.0])
        next_q_cost = jnp.array([0.5, 1.5, 1.0, 0.0])  # threshold 1: safe, unsafe, safe (at it), safe
        target = self.variant(cpq.constraints_penalized_target)(rewards, discounts, next_q_reward, next_q_cost, 1.0)
        np.testing.assert_allclose(target, [10.0, 1.0, -3.6, 2.0], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_ood_mask_and_value(self):
        kl = jnp.array([[0.0, 1.0], [2.0, 3.0]])  # [N=2, B=2]; the 75% quantile (linear) is 2.25
        mask = self.variant(cpq.ood_mask)(kl, 0.75)
        np.testing.assert_array_equal(mask, [[0.0, 0.0], [0.0, 1.0]])
        mask = jnp.array([[1.0, 0.0], [0.0, 1.0]])
        q_cost = jnp.array([[[1.0, 9.0], [9.0, 3.0]], [[3.0, 9.0], [9.0, 5.0]]])  # [E=2, N, B]
        # Flagged entries: head 0 -> 1 and 3, head 1 -> 3 and 5; mean over them and the heads.
        np.testing.assert_allclose(self.variant(cpq.ood_cost_value)(q_cost, mask), 3.0, rtol=1e-6)
        np.testing.assert_allclose(self.variant(cpq.ood_cost_value)(q_cost, jnp.zeros((2, 2))), 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_osrl_ood_value_averages_over_every_sample(self):
        # OSRL's ((KL >= quantile) * qc_sampled).mean(0).mean(): unflagged samples count as 0.
        q_min, mask = jnp.array([[1.0, 9.0], [9.0, 3.0]]), jnp.array([[1.0, 0.0], [0.0, 1.0]])
        np.testing.assert_allclose(self.variant(cpq.osrl_ood_cost_value)(q_min, mask), (1.0 + 3.0) / 4, rtol=1e-6)
        assert cpq.Config().conservative_term == "osrl"
        with pytest.raises(ConfigError, match="conservative_term"):
            cpq.Config(conservative_term="cql")

    @chex.variants(with_jit=True, without_jit=True)
    def test_conservative_cost_loss(self):
        q_cost = jnp.array([[1.0, 2.0], [1.0, 0.0]])
        target = jnp.array([1.0, 1.0])
        loss = self.variant(cpq.conservative_cost_loss)(q_cost, target, 0.8, 0.5, 1.5)
        # TD: head 0 (0 + 1) / 2, head 1 (0 + 1) / 2; minus 0.5 * (0.8 - 1.5).
        np.testing.assert_allclose(loss, 1.0 + 0.35, rtol=1e-6)

    def test_conservative_term_pushes_ood_cost_values_up(self):
        grad_ood, grad_alpha = jax.grad(cpq.conservative_cost_loss, argnums=(2, 3))(
            jnp.zeros((2, 2)), jnp.zeros(2), 0.8, 0.5, 1.5)
        assert float(grad_ood) == -0.5  # descending the loss raises E_nu[Q_c]
        assert float(grad_alpha) == 0.0  # alpha is moved by its own rule, not by this loss

    @chex.variants(with_jit=True, without_jit=True)
    def test_safe_actor_loss(self):
        q_reward, q_cost = jnp.array([2.0, 4.0, -1.0]), jnp.array([0.5, 3.0, 1.0])
        loss = self.variant(cpq.safe_actor_loss)(q_reward, q_cost, 1.0)
        np.testing.assert_allclose(loss, -(2.0 + 0.0 - 1.0) / 3, rtol=1e-6)

    def test_alpha_is_osrl_s_log_space_rule(self):
        """OSRL HEAD: log alpha from 0, ``+= lr * alpha * (l_c - E_nu[Q_c])``, clamped to [-5, 5], lr 1e-4."""
        assert (cpq.ALPHA.kind, cpq.ALPHA.init, cpq.ALPHA.learning_rate) == ("log_ascent", 1.0, 1e-4)
        rule = lagrangian.make_rule(cpq.Config(alpha=dataclasses.replace(cpq.ALPHA, learning_rate=0.1)).alpha)
        state = rule.init()
        state = rule.update(state, -jnp.float32(0.5), -jnp.float32(1.5))  # E_nu[Q_c] = 0.5 < l_c = 1.5
        np.testing.assert_allclose(state.multiplier, np.exp(0.1 * 1.0 * 1.0), rtol=1e-6)  # log alpha 0.1
        state = rule.update(state, -jnp.float32(4.0), -jnp.float32(1.5))  # 4 > 1.5: log alpha falls
        np.testing.assert_allclose(state.multiplier, np.exp(0.1 + 0.1 * np.exp(0.1) * -2.5), rtol=1e-5)
        for _ in range(300):
            state = rule.update(state, -jnp.float32(0.5), -jnp.float32(1.5))
        np.testing.assert_allclose(state.multiplier, np.exp(5.0), rtol=1e-5)  # clamped at log alpha 5
        for _ in range(300):
            state = rule.update(state, -jnp.float32(100.0), -jnp.float32(1.5))
        np.testing.assert_allclose(state.multiplier, np.exp(-5.0), rtol=1e-5)  # and at -5

    def test_ood_actions_are_pre_tanh_samples(self):
        """OSRL samples CPQ's OOD actions from the actor's Gaussian before the tanh (``pi_dist``)."""

        class FixedGaussian:  # an actor whose every state gives mean 2, std 0.5
            def apply(self, variables, observations):
                shape = observations.shape[:-1] + (2,)
                return jnp.full(shape, 2.0), jnp.full(shape, jnp.log(0.5))

        key = jax.random.PRNGKey(0)
        u = osrl.sample_pre_squash(FixedGaussian(), None, jnp.zeros((4000, 3)), key)
        np.testing.assert_allclose(u, 2.0 + 0.5 * jax.random.normal(key, (4000, 2)), rtol=1e-6)
        # Not squashed: about 97.7% lie above 1 (P(N(2, 0.5^2) > 1)), where a tanh sample never goes.
        np.testing.assert_allclose(float(jnp.mean(u > 1.0)), 0.977, atol=0.01)


def test_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="init"):
        cpq.Config(alpha=dataclasses.replace(cpq.ALPHA, init=200.0))
    with pytest.raises(ConfigError, match="ood_quantile"):
        cpq.Config(ood_quantile=1.5)


NUM_UPDATES = 300


@pytest.fixture(scope="module")
def trained():
    config = tiny(cpq.Config, vae_hidden_sizes=(16, 16), actor_learning_rate=3e-3)
    algorithm = cpq.make_algorithm(config, PROBLEM)
    dataset = bandit_dataset()
    state, metrics = train_runs(algorithm, dataset, (LOOSE, TIGHT), NUM_UPDATES)
    return algorithm, dataset, state, metrics


def test_policy_improves_and_cost_critic_flags_unsafe_actions(trained):
    algorithm, dataset, state, metrics = trained
    observations = dataset.observations[:256]
    learner = jax.tree.map(lambda x: x[0], state.learner)
    # Loose limit (every action safe): reward r = a drives the deterministic action up from ~0.
    assert float(jnp.mean(algorithm.policy(learner, observations, jax.random.PRNGKey(0))[0])) > 0.5
    # Tight limit (safe iff Q_c = 3 (a + 1) <= 1.5): the learned cost critic judges the policy's
    # actions unsafe, so the penalized backup and the actor's mask switch them off.
    safe_fraction = np.asarray(metrics["safe_fraction"])[:, -20:].mean(axis=1)
    assert safe_fraction[0] == 1.0 and safe_fraction[1] < 0.2


def test_alpha_steps_after_the_cost_critic_and_both_critics_learn(trained):
    *_, metrics = trained
    # Each update's loss weighs the alpha it logs (1, log alpha 0, at the first), and alpha then takes
    # one log-space step on l_c - E_nu[Q_c] with E_nu[Q_c] measured before the step (OSRL's order):
    # log alpha_{k+1} - log alpha_k = 1e-4 * alpha_k * (1.5 l - E_nu[Q_c]_k) at every update.
    alpha = np.asarray(metrics["alpha"], np.float64)
    ood, threshold = np.asarray(metrics["ood_cost_value"]), np.asarray(metrics["cost_threshold"])
    assert np.all(alpha[:, 0] == 1.0)
    np.testing.assert_allclose(np.diff(np.log(alpha), axis=1), 1e-4 * alpha[:, :-1] * (1.5 * threshold - ood)[:, :-1],
                               rtol=2e-3, atol=1e-7)
    # The tight limit's level l_c = 2.25 is lower than the loose one's (15), so its alpha ends lower.
    assert alpha[1, -1] < alpha[0, -1] - 0.2
    losses = np.asarray(metrics["critic_loss"])
    assert losses[:, -20:].mean() < 0.3 * losses[:, :20].mean()


def test_vmapped_runs_match_runs_alone(trained):
    algorithm, dataset, state, _ = trained
    assert_runs_match_alone(algorithm, dataset, state, (LOOSE, TIGHT), NUM_UPDATES)
