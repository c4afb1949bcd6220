from __future__ import annotations

import chex
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from constrained_rl import critics
from constrained_rl.config import ConfigError

Q_POLICY = jnp.array([1.0, 2.0, 3.0])
Q_DATA = jnp.array([0.5, 2.5, 1.0])  # differences 0.5, -0.5, 2.0: mean 2/3
REWARDS = jnp.array([1.0, 0.0, -1.0])
DISCOUNTS = jnp.array([0.9, 0.9, 0.0])  # the last transition is terminal
NEXT_Q = jnp.array([2.0, -1.0, 5.0])
small_floats = st.floats(-10.0, 10.0, width=32)


class BellmanTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_pessimism_and_target_by_hand(self):
        pessimism = self.variant(critics.relative_pessimism)(Q_POLICY, Q_DATA)
        np.testing.assert_allclose(pessimism, 2.0 / 3, rtol=1e-6)
        target = self.variant(critics.bellman_target)(REWARDS, DISCOUNTS, NEXT_Q)
        np.testing.assert_allclose(target, [2.8, -0.9, -1.0], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_ensemble_min_and_max(self):
        q_ensemble = jnp.array([[1.0, 5.0, -2.0], [3.0, 4.0, -1.0]])
        np.testing.assert_array_equal(self.variant(critics.double_q_min)(q_ensemble), [1.0, 4.0, -2.0])
        np.testing.assert_array_equal(self.variant(critics.double_q_max)(q_ensemble), [3.0, 5.0, -1.0])
        np.testing.assert_array_equal(self.variant(critics.double_q_mean)(q_ensemble), [2.0, 4.5, -1.5])

    @chex.variants(with_jit=True, without_jit=True)
    def test_losses_by_hand(self):
        q = jnp.array([3.0, -1.0, 0.0])
        target = critics.bellman_target(REWARDS, DISCOUNTS, NEXT_Q)
        td = self.variant(critics.td_error_loss)(q, target)
        np.testing.assert_allclose(td, (0.04 + 0.01 + 1.0) / 3, rtol=1e-5)
        residual = self.variant(critics.residual_bellman_loss)(q, REWARDS, DISCOUNTS, NEXT_Q)
        np.testing.assert_allclose(residual, td, rtol=1e-6)  # same values, different gradients
        # Residual target against a TD target of zero: 0.5 * mean q^2 + 0.5 * TD error.
        mixed = self.variant(critics.atac_bellman_loss)(q, jnp.zeros(3), target)
        np.testing.assert_allclose(mixed, 0.5 * 10.0 / 3 + 0.5 * td, rtol=1e-5)

    def test_gradient_paths(self):
        q = jnp.array([3.0, -1.0, 0.0])
        # TD: no gradient into the target. Residual: d/d next_q = -2 * discount * (q - target) / B.
        def td_loss_of_next_q(next_q):
            return critics.td_error_loss(q, critics.bellman_target(REWARDS, DISCOUNTS, next_q))

        td_grad = jax.grad(td_loss_of_next_q)(NEXT_Q)
        np.testing.assert_array_equal(td_grad, np.zeros(3))
        residual_grad = jax.grad(critics.residual_bellman_loss, argnums=3)(q, REWARDS, DISCOUNTS, NEXT_Q)
        errors = np.array([3.0 - 2.8, -1.0 + 0.9, 0.0 + 1.0])
        np.testing.assert_allclose(residual_grad, -2.0 * np.asarray(DISCOUNTS) * errors / 3, rtol=1e-5)
        # The ATAC mix carries a (1 - w) share of that residual gradient and none of the TD target's.
        residual_target = REWARDS + DISCOUNTS * NEXT_Q
        def mixed_loss(td_target, next_q):
            return critics.atac_bellman_loss(q, td_target, REWARDS + DISCOUNTS * next_q)

        mix_grads = jax.grad(mixed_loss, argnums=(0, 1))(residual_target, NEXT_Q)
        np.testing.assert_array_equal(mix_grads[0], np.zeros(3))
        np.testing.assert_allclose(mix_grads[1], 0.5 * residual_grad, rtol=1e-5)

    def test_td_weight_out_of_range(self):
        with pytest.raises(ConfigError, match="td_weight"):
            critics.atac_bellman_loss(Q_POLICY, Q_DATA, Q_DATA, td_weight=1.5)


class AdversarialLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_normalized_sum_branches(self):
        normalized_sum = self.variant(critics.normalized_sum)
        np.testing.assert_allclose(normalized_sum(2.0, 3.0, 4.0), 2.0 / 4 + 3.0)
        np.testing.assert_allclose(normalized_sum(2.0, 3.0, 0.5), 2.0 + 0.5 * 3.0)
        np.testing.assert_allclose(normalized_sum(2.0, 3.0, 1.0), 5.0)
        np.testing.assert_allclose(normalized_sum(2.0, 3.0, 0.0), 2.0)

    def test_normalized_sum_gradient_finite_at_zero_weight(self):
        grads = jax.grad(critics.normalized_sum, argnums=(0, 1, 2))(2.0, 3.0, 0.0)
        np.testing.assert_allclose(grads, [1.0, 0.0, 3.0])

    @settings(max_examples=15, deadline=None)
    @given(small_floats, small_floats, st.floats(0.0, 20.0))
    def test_normalized_sum_is_a_rescaled_weighted_sum(self, loss, regularizer, weight):
        # Same minimiser as loss + w * reg: it is that sum divided by max(w, 1).
        result = critics.normalized_sum(loss, regularizer, weight) * max(weight, 1.0)
        np.testing.assert_allclose(result, loss + weight * regularizer, rtol=1e-4, atol=1e-3)

    @chex.variants(with_jit=True, without_jit=True)
    def test_reward_and_cost_critic_by_hand(self):
        loss = self.variant(critics.adversarial_critic_loss)
        # Reward critic, beta = 2 > 1: (2/3) / 2 + bellman.
        reward_loss = loss(Q_POLICY, Q_DATA, jnp.float32(0.3), 2.0)
        np.testing.assert_allclose(reward_loss, 1.0 / 3 + 0.3, rtol=1e-6)
        # Cost critic with lambda = 0.5, beta = 0.5: -0.5 * (2/3) + 0.5 * bellman.
        np.testing.assert_allclose(
            loss(Q_POLICY, Q_DATA, jnp.float32(0.3), 0.5, -0.5), -1.0 / 3 + 0.15, rtol=1e-6
        )

    def test_cost_critic_pushes_policy_values_up_and_reward_critic_down(self):
        def pessimism_gradient(sign):
            def loss(q_policy):
                return critics.adversarial_critic_loss(q_policy, Q_DATA, jnp.float32(0.0), 1.0, sign)

            return jax.grad(loss)(Q_POLICY)

        reward_grad = pessimism_gradient(1.0)
        cost_grad = pessimism_gradient(-2.0)
        assert np.all(reward_grad > 0)  # descent lowers Q_r(s, pi): the policy looks worse
        assert np.all(cost_grad < 0)  # descent raises Q_c(s, pi): the policy looks costlier
        np.testing.assert_allclose(reward_grad, np.full(3, 1.0 / 3), rtol=1e-6)
        np.testing.assert_allclose(cost_grad, np.full(3, -2.0 / 3), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_aggression_limited_penalty(self):
        penalty = self.variant(critics.aggression_limited_penalty)(Q_POLICY, Q_DATA)
        np.testing.assert_allclose(penalty, [0.5, 0.0, 2.0])
        grad = jax.grad(lambda q: critics.aggression_limited_penalty(q, Q_DATA).sum())(Q_POLICY)
        np.testing.assert_array_equal(grad, [1.0, 0.0, 1.0])  # only where the policy looks costlier


PARAMS = {
    "dense_0": {"kernel": jnp.full((2, 2), 30.0), "bias": jnp.full((2,), 500.0)},  # ||W||_F = 60
    "dense_1": {"kernel": jnp.full((4, 1), 100.0), "bias": jnp.zeros((1,))},  # ||W||_F = 200
    "conv": {"kernel": jnp.ones((3, 3, 2, 2)) * 50.0},  # ||W||_F = 300
}


class ParameterUtilitiesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_projection(self):
        projected = self.variant(critics.project_l2_ball)(PARAMS)
        np.testing.assert_array_equal(projected["dense_0"]["kernel"], PARAMS["dense_0"]["kernel"])
        np.testing.assert_array_equal(projected["dense_0"]["bias"], PARAMS["dense_0"]["bias"])
        np.testing.assert_allclose(projected["dense_1"]["kernel"], np.full((4, 1), 50.0), rtol=1e-6)
        for name in ("dense_1", "conv"):
            norm = np.linalg.norm(np.ravel(projected[name]["kernel"]))
            np.testing.assert_allclose(norm, 100.0, rtol=1e-6)

    @settings(max_examples=15, deadline=None)
    @given(hnp.arrays(np.float32, (3, 4), elements=small_floats), st.floats(0.5, 30.0))
    def test_projection_is_idempotent_and_inside_the_ball(self, kernel, max_norm):
        once = critics.project_l2_ball({"w": jnp.asarray(kernel)}, max_norm)
        assert np.linalg.norm(once["w"]) <= max_norm * (1 + 1e-5)
        twice = critics.project_l2_ball(once, max_norm)
        np.testing.assert_allclose(twice["w"], once["w"], rtol=1e-5)

    def test_projection_refuses_non_positive_radius(self):
        with pytest.raises(ConfigError, match="max_norm"):
            critics.project_l2_ball(PARAMS, 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_polyak(self):
        target = {"w": jnp.array([[0.0, 4.0]]), "b": jnp.array([1.0])}
        online = {"w": jnp.array([[2.0, 0.0]]), "b": jnp.array([3.0])}
        update = self.variant(critics.polyak_update)
        copied = update(target, online, 1.0)
        chex.assert_trees_all_equal(copied, online)
        chex.assert_trees_all_equal(update(target, online, 0.0), target)
        soft = update(target, online, 0.25)
        chex.assert_trees_all_close(soft, {"w": jnp.array([[0.5, 3.0]]), "b": jnp.array([1.5])})


class EnsembleTDLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_sums_the_heads(self):
        q = jnp.array([[1.0, 2.0], [0.0, 4.0]])
        target = jnp.array([0.0, 2.0])
        # head 0: (1 + 0) / 2, head 1: (0 + 4) / 2.
        np.testing.assert_allclose(self.variant(critics.ensemble_td_loss)(q, target), 0.5 + 2.0, rtol=1e-6)
