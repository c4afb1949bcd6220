from __future__ import annotations

import functools
import math

import chex
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from constrained_rl import objectives
from constrained_rl.config import ConfigError

# Ratios 0.5, 1, 1.5, 2 against advantages +1, -1, +1, -1 with eps = 0.2 give per-sample losses
#   r=0.5, A=+1: max(-0.5, -0.8) = -0.5      (unclipped side wins, gradient flows)
#   r=1.0, A=-1: max( 1.0,  1.0) =  1.0
#   r=1.5, A=+1: max(-1.5, -1.2) = -1.2      (clipped: no gradient)
#   r=2.0, A=-1: max( 2.0,  1.2) =  2.0      (dual clip c=1.5 caps it at 1.5)
RATIOS = np.array([0.5, 1.0, 1.5, 2.0], np.float32)
OLD_LOG_PROBS = np.array([-1.0, -2.0, -0.5, -3.0], np.float32)
LOG_PROBS = OLD_LOG_PROBS + np.log(RATIOS)
ADVANTAGES = np.array([1.0, -1.0, 1.0, -1.0], np.float32)
small_floats = st.floats(-5.0, 5.0, width=32)


class MaskedMeanTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_by_hand(self):
        x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        mask = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
        np.testing.assert_allclose(self.variant(objectives.masked_mean)(x, mask), 1.5)
        per_row = self.variant(functools.partial(objectives.masked_mean, axis=1))(x, mask)
        np.testing.assert_allclose(per_row, [1.5, 0.0])  # the empty row gives 0, not NaN
        np.testing.assert_allclose(self.variant(objectives.masked_mean)(x), 3.5)

    def test_weights_and_empty_mask_gradient(self):
        x = jnp.array([2.0, 4.0])
        np.testing.assert_allclose(objectives.masked_mean(x, jnp.array([0.25, 0.75])), 3.5)
        grad = jax.grad(objectives.masked_mean)(x, jnp.zeros(2))
        np.testing.assert_array_equal(grad, [0.0, 0.0])

    def test_shape_mismatch_is_refused(self):
        with pytest.raises(AssertionError):
            objectives.masked_mean(jnp.ones((2, 3)), jnp.ones((2,)))

    @settings(max_examples=15, deadline=None)
    @given(
        hnp.arrays(np.float32, (7,), elements=small_floats),
        hnp.arrays(np.bool_, (7,)),
    )
    def test_equals_mean_of_selected(self, x, mask):
        result = objectives.masked_mean(jnp.asarray(x), jnp.asarray(mask))
        expected = x[mask].mean() if mask.any() else 0.0
        np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


class PPOSurrogateTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_by_hand(self):
        loss = self.variant(objectives.ppo_clipped_surrogate)
        np.testing.assert_allclose(loss(LOG_PROBS, OLD_LOG_PROBS, ADVANTAGES), 1.3 / 4, rtol=1e-5)
        mask = jnp.array([1.0, 1.0, 1.0, 0.0])
        np.testing.assert_allclose(
            loss(LOG_PROBS, OLD_LOG_PROBS, ADVANTAGES, mask=mask), -0.7 / 3, rtol=1e-5
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_dual_clip_bounds_negative_advantages(self):
        loss = self.variant(functools.partial(objectives.ppo_clipped_surrogate, dual_clip=1.5))
        np.testing.assert_allclose(loss(LOG_PROBS, OLD_LOG_PROBS, ADVANTAGES), 0.8 / 4, rtol=1e-5)
        # A loose dual clip changes nothing.
        loose = functools.partial(objectives.ppo_clipped_surrogate, dual_clip=3.0)
        np.testing.assert_allclose(loose(LOG_PROBS, OLD_LOG_PROBS, ADVANTAGES), 1.3 / 4, rtol=1e-5)

    def test_gradient_vanishes_where_clipped(self):
        grad = jax.grad(objectives.ppo_clipped_surrogate)
        # d(-r A)/d log_prob = -r A on unclipped samples, divided by the batch size.
        np.testing.assert_allclose(
            grad(LOG_PROBS, OLD_LOG_PROBS, ADVANTAGES), [-0.125, 0.25, 0.0, 0.5], rtol=1e-5
        )
        dual = jax.grad(functools.partial(objectives.ppo_clipped_surrogate, dual_clip=1.5))
        np.testing.assert_allclose(
            dual(LOG_PROBS, OLD_LOG_PROBS, ADVANTAGES), [-0.125, 0.25, 0.0, 0.0], rtol=1e-5
        )
        # Old log-probs and advantages are data.
        grads = jax.grad(objectives.ppo_clipped_surrogate, argnums=(1, 2))(
            LOG_PROBS, OLD_LOG_PROBS, ADVANTAGES
        )
        for g in grads:
            np.testing.assert_array_equal(g, np.zeros(4))

    def test_token_level_with_mask(self):
        log_probs = jnp.asarray(LOG_PROBS).reshape(2, 2)
        old = jnp.asarray(OLD_LOG_PROBS).reshape(2, 2)
        adv = jnp.asarray(ADVANTAGES).reshape(2, 2)
        mask = jnp.array([[1.0, 0.0], [1.0, 1.0]])
        loss = objectives.ppo_clipped_surrogate(log_probs, old, adv, mask=mask)
        np.testing.assert_allclose(loss, (-0.5 - 1.2 + 2.0) / 3, rtol=1e-5)

    def test_bad_hyperparameters(self):
        with pytest.raises(ConfigError, match="clip_epsilon"):
            objectives.ppo_clipped_surrogate(LOG_PROBS, OLD_LOG_PROBS, ADVANTAGES, clip_epsilon=0.0)
        with pytest.raises(ConfigError, match="dual_clip"):
            objectives.ppo_clipped_surrogate(LOG_PROBS, OLD_LOG_PROBS, ADVANTAGES, dual_clip=1.0)

    def test_diagnostics(self):
        np.testing.assert_allclose(objectives.clip_fraction(LOG_PROBS, OLD_LOG_PROBS), 0.75)
        mask = jnp.array([0.0, 1.0, 0.0, 1.0])
        np.testing.assert_allclose(objectives.clip_fraction(LOG_PROBS, OLD_LOG_PROBS, mask=mask), 0.5)
        # k3 of KL(old || new) with r = new/old: (r - 1) - log r.
        expected = np.mean((RATIOS - 1.0) - np.log(RATIOS))
        np.testing.assert_allclose(objectives.approx_kl(LOG_PROBS, OLD_LOG_PROBS), expected, rtol=1e-5)


class ClippedValueLossTest(chex.TestCase):
    values = jnp.array([1.0, 3.0, 3.0])
    old_values = jnp.zeros(3)
    targets = jnp.array([0.5, 0.0, 3.0])

    @chex.variants(with_jit=True, without_jit=True)
    def test_by_hand(self):
        clipped = self.variant(functools.partial(objectives.clipped_value_loss, clip_range=1.0))
        # Per sample: max(0.25, 0.25), max(9, 1), max(0, (1 - 3)^2 = 4).
        np.testing.assert_allclose(
            clipped(self.values, self.old_values, self.targets), 0.5 * 13.25 / 3, rtol=1e-6
        )
        plain = self.variant(objectives.clipped_value_loss)
        np.testing.assert_allclose(
            plain(self.values, self.old_values, self.targets), 0.5 * 9.25 / 3, rtol=1e-6
        )
        mask = jnp.array([1.0, 0.0, 1.0])
        np.testing.assert_allclose(
            clipped(self.values, self.old_values, self.targets, mask=mask), 0.5 * 4.25 / 2, rtol=1e-6
        )

    @settings(max_examples=15, deadline=None)
    @given(hnp.arrays(np.float32, (3, 5), elements=small_floats), st.floats(0.1, 5.0))
    def test_clipping_never_lowers_the_loss(self, data, clip_range):
        values, old, targets = (jnp.asarray(row) for row in data[:3])
        clipped = objectives.clipped_value_loss(values, old, targets, clip_range=clip_range)
        plain = objectives.clipped_value_loss(values, old, targets)
        assert clipped >= plain - 1e-5


class KLAndEntropyTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_estimators_by_hand(self):
        log_p, log_q = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25]))
        np.testing.assert_allclose(
            self.variant(objectives.kl_k1)(log_p, log_q), [math.log(2.0)], rtol=1e-6
        )
        np.testing.assert_allclose(
            self.variant(objectives.kl_k2)(log_p, log_q), [0.5 * math.log(2.0) ** 2], rtol=1e-6
        )
        np.testing.assert_allclose(
            self.variant(objectives.kl_k3)(log_p, log_q), [-0.5 + math.log(2.0)], rtol=1e-6
        )

    def test_k1_and_k3_are_unbiased(self):
        p = np.array([0.2, 0.3, 0.5], np.float32)
        q = np.array([0.4, 0.4, 0.2], np.float32)
        exact_kl = np.sum(p * np.log(p / q))
        for estimator in (objectives.kl_k1, objectives.kl_k3):
            expectation = jnp.sum(p * estimator(jnp.log(p), jnp.log(q)))
            np.testing.assert_allclose(expectation, exact_kl, rtol=1e-5)

    @settings(max_examples=15, deadline=None)
    @given(hnp.arrays(np.float32, (2, 6), elements=st.floats(-8.0, 0.0, width=32)))
    def test_k2_and_k3_are_non_negative(self, log_probs):
        log_p, log_q = jnp.asarray(log_probs[0]), jnp.asarray(log_probs[1])
        assert np.all(objectives.kl_k3(log_p, log_q) >= 0.0)
        assert np.all(objectives.kl_k2(log_p, log_q) >= 0.0)
        np.testing.assert_array_equal(objectives.kl_k3(log_p, log_p), np.zeros(6))

    @chex.variants(with_jit=True, without_jit=True)
    def test_categorical_entropy(self):
        logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [0.0, -jnp.inf, -jnp.inf, -jnp.inf]]])  # [1, 2, 4]
        entropy = self.variant(objectives.categorical_entropy)
        np.testing.assert_allclose(entropy(logits), 0.5 * math.log(4.0), rtol=1e-6)
        np.testing.assert_allclose(entropy(logits, jnp.array([[1.0, 0.0]])), math.log(4.0), rtol=1e-6)
        two_way = jnp.array([[0.0, math.log(3.0)]])  # probabilities 1/4, 3/4
        expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
        np.testing.assert_allclose(entropy(two_way), expected, rtol=1e-6)

    def test_entropy_gradient_finite_with_banned_tokens(self):
        logits = jnp.array([[0.3, -jnp.inf, 1.0]])
        grad = jax.grad(objectives.categorical_entropy)(logits)
        assert np.all(np.isfinite(grad))


class PerSequenceMeanTest(chex.TestCase):
    # Two responses of different lengths: 3 tokens and 1 token.
    X = jnp.array([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    MASK = jnp.array([[1, 1, 1], [1, 0, 0]])

    @chex.variants(with_jit=True, without_jit=True)
    def test_by_hand(self):
        # Per response: (1 + 2 + 3) / 3 = 2 and 4; then over responses: 3. Over all tokens it would be 10 / 4.
        self.assertAlmostEqual(float(self.variant(objectives.per_sequence_mean)(self.X, self.MASK)), 3.0)
        self.assertAlmostEqual(float(objectives.masked_mean(self.X, self.MASK)), 2.5)
        # A response without tokens is left out; an all-empty batch gives 0.
        empty_row = jnp.array([[1, 1, 1], [0, 0, 0]])
        self.assertAlmostEqual(float(objectives.per_sequence_mean(self.X, empty_row)), 2.0)
        self.assertEqual(float(objectives.per_sequence_mean(self.X, jnp.zeros_like(self.MASK))), 0.0)

    def test_surrogate_weighs_each_response_equally(self):
        # At ratio 1 the loss is -mean A: per response -(1 + 2 + 3) / 3 = -2 and -4, so -3 over responses.
        loss = objectives.ppo_clipped_surrogate(jnp.zeros((2, 3)), jnp.zeros((2, 3)), self.X, mask=self.MASK,
                                                per_sequence=True)
        self.assertAlmostEqual(float(loss), -3.0, places=6)
        # d loss / d log pi: -A / (N |o_i|): -[1, 2, 3] / 6 for the long response, -4 / 2 for the short one.
        grad = jax.grad(lambda lp: objectives.ppo_clipped_surrogate(lp, jnp.zeros((2, 3)), self.X, mask=self.MASK,
                                                                    per_sequence=True))(jnp.zeros((2, 3)))
        np.testing.assert_allclose(grad, [[-1 / 6, -2 / 6, -3 / 6], [-2.0, 0.0, 0.0]], rtol=1e-6)
        value = objectives.clipped_value_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), self.X, mask=self.MASK,
                                              per_sequence=True)
        self.assertAlmostEqual(float(value), 0.5 * ((1 + 4 + 9) / 3 + 16) / 2, places=5)
        with pytest.raises(ValueError, match="mask"):
            objectives.ppo_clipped_surrogate(jnp.zeros((2, 3)), jnp.zeros((2, 3)), self.X, per_sequence=True)


class GroupRelativeAdvantagesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_by_hand(self):
        # Group 0 scores (1, 3): mean 2, sample std sqrt(2); group 1 (2, 2): equal scores, advantage 0;
        # group 2 (5, 6, 10): mean 7, std sqrt((4 + 1 + 9) / 2) = sqrt(7).
        scores = jnp.array([1.0, 3.0, 2.0, 2.0, 5.0, 6.0, 10.0])
        ids = jnp.array([0, 0, 1, 1, 2, 2, 2])
        advantages = self.variant(objectives.group_relative_advantages, static_argnums=2)(scores, ids, 3)
        eps = objectives.GROUP_STD_EPS
        expected = [-1 / (2 ** 0.5 + eps), 1 / (2 ** 0.5 + eps), 0.0, 0.0,
                    -2 / (7 ** 0.5 + eps), -1 / (7 ** 0.5 + eps), 3 / (7 ** 0.5 + eps)]
        np.testing.assert_allclose(advantages, expected, rtol=1e-5)
        # A single sample is its own baseline.
        np.testing.assert_array_equal(objectives.group_relative_advantages(jnp.array([4.0]), jnp.array([0]), 1), 0.0)
