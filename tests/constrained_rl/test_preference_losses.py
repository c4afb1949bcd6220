"""Preference and SFT losses on hand-computed values, with and without jit, and their laws."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from constrained_rl import preference_losses as pl


def log_sigmoid(x: float) -> float:
    return -np.log1p(np.exp(-x))


class BradleyTerryTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_by_hand(self) -> None:
        loss = self.variant(pl.bradley_terry_loss)(jnp.array([2.0, 0.0, -1.0]), jnp.array([0.0, 0.0, 1.0]))
        expected = -(log_sigmoid(2.0) + log_sigmoid(0.0) + log_sigmoid(-2.0)) / 3
        np.testing.assert_allclose(loss, expected, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_mask_drops_rows(self) -> None:
        loss = self.variant(pl.bradley_terry_loss)(
            jnp.array([2.0, 100.0]), jnp.array([0.0, -100.0]), jnp.array([1.0, 0.0]))
        np.testing.assert_allclose(loss, -log_sigmoid(2.0), rtol=1e-6)
        np.testing.assert_allclose(pl.bradley_terry_loss(jnp.ones(2), jnp.zeros(2), jnp.zeros(2)), 0.0)

    def test_large_margins_are_finite_and_exact(self) -> None:
        loss = pl.bradley_terry_loss(jnp.array([-200.0]), jnp.array([0.0]))
        np.testing.assert_allclose(loss, 200.0, rtol=1e-6)
        grad = jax.grad(lambda b: pl.bradley_terry_loss(b, jnp.array([0.0])))(jnp.array([-200.0]))
        np.testing.assert_allclose(grad, [-1.0], rtol=1e-6)

    def test_gradient_raises_better_lowers_worse(self) -> None:
        better, worse = jnp.array([0.3]), jnp.array([0.5])
        grad_better, grad_worse = jax.grad(pl.bradley_terry_loss, argnums=(0, 1))(better, worse)
        # d/d s_better of -log sigmoid(s_b - s_w) = -(1 - sigmoid(-0.2))
        np.testing.assert_allclose(grad_better, [-(1 - 1 / (1 + np.exp(0.2)))], rtol=1e-6)
        np.testing.assert_allclose(grad_worse, -grad_better, rtol=1e-6)

    def test_shape_mismatch_is_refused(self) -> None:
        with pytest.raises(AssertionError):
            pl.bradley_terry_loss(jnp.zeros(3), jnp.zeros(2))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(-20, 20), st.floats(-20, 20)), min_size=1, max_size=8))
def test_bradley_terry_swap_law(pairs: list[tuple[float, float]]) -> None:
    # softplus(-d) - softplus(d) = -d: swapping the roles changes the loss by the mean margin.
    a, b = (jnp.array(column, jnp.float32) for column in zip(*pairs))
    difference = pl.bradley_terry_loss(a, b) - pl.bradley_terry_loss(b, a)
    np.testing.assert_allclose(difference, jnp.mean(b - a), atol=1e-4)


class CostLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_sign_loss_by_hand(self) -> None:
        # An unsafe response (+1) with cost 2, a safe one (-1) with cost 2 (wrong side), a safe one at -1.
        loss = self.variant(pl.cost_sign_loss)(jnp.array([2.0, 2.0, -1.0]), jnp.array([1, -1, -1]))
        expected = -(log_sigmoid(2.0) + log_sigmoid(-2.0) + log_sigmoid(1.0)) / 3
        np.testing.assert_allclose(loss, expected, rtol=1e-6)

    def test_sign_loss_direction(self) -> None:
        """Descending the sign loss raises unsafe costs above 0 and lowers safe costs below 0."""
        grad = jax.grad(pl.cost_sign_loss)(jnp.array([0.0, 0.0]), jnp.array([1, -1]))
        assert grad[0] < 0 < grad[1]
        unsafe = jnp.array([1])
        assert pl.cost_sign_loss(jnp.array([3.0]), unsafe) < pl.cost_sign_loss(jnp.array([-3.0]), unsafe)

    @chex.variants(with_jit=True, without_jit=True)
    def test_safe_rlhf_cost_loss_by_hand(self) -> None:
        safer, unsafer = jnp.array([-1.0, 0.5]), jnp.array([2.0, 0.0])
        safer_sign, unsafer_sign = jnp.array([-1, -1]), jnp.array([1, 1])
        loss = self.variant(pl.safe_rlhf_cost_loss)(safer, unsafer, safer_sign, unsafer_sign)
        rows = [-log_sigmoid(2.0 + 1.0) - log_sigmoid(1.0) - log_sigmoid(2.0),
                -log_sigmoid(0.0 - 0.5) - log_sigmoid(-0.5) - log_sigmoid(0.0)]
        np.testing.assert_allclose(loss, np.mean(rows), rtol=1e-6)

    def test_ranking_term_wants_the_unsafer_response_costlier(self) -> None:
        signs = jnp.array([1]), jnp.array([1])
        right = pl.safe_rlhf_cost_loss(jnp.array([1.0]), jnp.array([3.0]), *signs)
        wrong = pl.safe_rlhf_cost_loss(jnp.array([3.0]), jnp.array([1.0]), *signs)
        np.testing.assert_allclose(wrong - right, -log_sigmoid(-2.0) + log_sigmoid(2.0), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_score_square_penalty(self) -> None:
        penalty = self.variant(pl.score_square_penalty)(jnp.array([1.0, 3.0]), jnp.array([2.0, 0.0]),
                                                        jnp.array([1.0, 1.0]))
        np.testing.assert_allclose(penalty, ((1 + 4) / 2 + 9 / 2) / 2, rtol=1e-6)


class AccuracyTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_ranking_accuracy_counts_ties_wrong(self) -> None:
        accuracy = self.variant(pl.ranking_accuracy)(jnp.array([1.0, 0.0, 2.0, 5.0]), jnp.array([0.0, 0.0, 3.0, 0.0]),
                                                     jnp.array([1.0, 1.0, 1.0, 0.0]))
        np.testing.assert_allclose(accuracy, 1 / 3, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sign_accuracy_zero_is_safe(self) -> None:
        accuracy = self.variant(pl.sign_accuracy)(jnp.array([0.0, 0.0, 1.0, -1.0]), jnp.array([-1, 1, 1, 1]))
        np.testing.assert_allclose(accuracy, 0.5, rtol=1e-6)


class SFTLossTest(chex.TestCase):
    def setUp(self) -> None:
        super().setUp()
        # One sequence of 4 tokens over a vocabulary of 3; the response is tokens 2 and 3.
        self.logits = jnp.array([[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0], [9.0, 9.0, 9.0]]])
        self.tokens = jnp.array([[2, 1, 0, 2]])
        self.loss_mask = jnp.array([[1, 0, 1, 1]])  # position 0 is never predicted: its flag is ignored

    @staticmethod
    def log_softmax(row: list[float]) -> np.ndarray:
        row = np.asarray(row, np.float64)
        return row - np.log(np.sum(np.exp(row)))

    @chex.variants(with_jit=True, without_jit=True)
    def test_sft_loss_by_hand(self) -> None:
        loss = self.variant(pl.sft_loss)(self.logits, self.tokens, self.loss_mask)
        # Position 1 predicts token 0 (masked 1 at index 2), position 2 predicts token 2 (index 3).
        expected = -(self.log_softmax([1.0, 0.0, 0.0])[0] + self.log_softmax([0.0, 0.0, 3.0])[2]) / 2
        np.testing.assert_allclose(loss, expected, rtol=1e-6)

    def test_next_token_log_probs_shift(self) -> None:
        log_probs = pl.next_token_log_probs(self.logits, self.tokens)
        expected = [self.log_softmax([0.0, 1.0, 2.0])[1], self.log_softmax([1.0, 0.0, 0.0])[0],
                    self.log_softmax([0.0, 0.0, 3.0])[2]]
        np.testing.assert_allclose(log_probs[0], expected, rtol=1e-6)

    def test_prompt_tokens_get_no_gradient(self) -> None:
        grad = jax.grad(pl.sft_loss)(self.logits, self.tokens, self.loss_mask)
        # Logits at position 0 predict token 1, whose flag is 0; the last position predicts nothing.
        np.testing.assert_array_equal(grad[0, 0], 0.0)
        np.testing.assert_array_equal(grad[0, 3], 0.0)
        assert jnp.all(grad[0, 1:3] != 0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_token_accuracy(self) -> None:
        accuracy = self.variant(pl.token_accuracy)(self.logits, self.tokens, self.loss_mask)
        np.testing.assert_allclose(accuracy, 1.0)  # argmax 0 at position 1, argmax 2 at position 2
        np.testing.assert_allclose(pl.token_accuracy(self.logits, self.tokens, jnp.array([[0, 1, 0, 0]])), 0.0)


class DirectPreferenceTest(chex.TestCase):
    # Two pairs. Pair 0: policy (-1, -3), reference (-2, -2): h = (-1 + 2) - (-3 + 2) = 2.
    # Pair 1: policy (-4, -1), reference (-3, -1): h = -1 - 0 = -1.
    POLICY = (jnp.array([-1.0, -4.0]), jnp.array([-3.0, -1.0]))
    REFERENCE = (jnp.array([-2.0, -3.0]), jnp.array([-2.0, -1.0]))

    @chex.variants(with_jit=True, without_jit=True)
    def test_dpo_by_hand(self) -> None:
        loss = self.variant(lambda *a: pl.dpo_loss(*a, beta=0.5))(*self.POLICY, *self.REFERENCE)
        np.testing.assert_allclose(loss, -(log_sigmoid(0.5 * 2) + log_sigmoid(0.5 * -1)) / 2, rtol=1e-6)
        with_margins = pl.dpo_loss(*self.POLICY, *self.REFERENCE, beta=0.5, margins=jnp.array([0.4, 0.0]))
        np.testing.assert_allclose(with_margins, -(log_sigmoid(1.0 - 0.4) + log_sigmoid(-0.5)) / 2, rtol=1e-6)
        # d L / d log pi(y_w) = -beta sigmoid(-z) / B; the reference gets no gradient.
        grads = jax.grad(lambda *a: pl.dpo_loss(*a, beta=0.5), argnums=(0, 2))(*self.POLICY, *self.REFERENCE)
        np.testing.assert_allclose(grads[0], -0.5 * jax.nn.sigmoid(-jnp.array([1.0, -0.5])) / 2, rtol=1e-6)
        np.testing.assert_array_equal(grads[1], 0.0)

    def test_safedpo_pairs_by_hand(self) -> None:
        # (better, worse) unsafe: (no, no) kept, (yes, no) swapped, (yes, yes) dropped, (no, yes) kept.
        swap, keep = pl.safedpo_pairs(jnp.array([False, True, True, False]), jnp.array([False, False, True, True]))
        np.testing.assert_array_equal(swap, [False, True, False, False])
        np.testing.assert_array_equal(keep, [True, True, False, True])

    @chex.variants(with_jit=True, without_jit=True)
    def test_safedpo_loss_by_hand(self) -> None:
        # Pair 0: a safe chosen over an unsafe rejected (margin Delta = 3); pair 1: two safe ones (no margin).
        loss = self.variant(lambda *a: pl.safedpo_loss(*a, beta=0.5, safety_margin=3.0))(
            *self.POLICY, *self.REFERENCE, jnp.array([0, 0]), jnp.array([1, 0]))
        np.testing.assert_allclose(loss, -(log_sigmoid(1.0 - 3.0) + log_sigmoid(-0.5)) / 2, rtol=1e-6)
        plain = pl.safedpo_loss(*self.POLICY, *self.REFERENCE, jnp.array([0, 0]), jnp.array([1, 0]), 0.5, 0.0)
        np.testing.assert_allclose(plain, pl.dpo_loss(*self.POLICY, *self.REFERENCE, beta=0.5), rtol=1e-6)

    def test_sequence_log_probs_sum_the_response(self) -> None:
        logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))
        tokens, mask = jnp.array([[0, 1, 0]]), jnp.array([[0, 1, 1]])
        # Tokens 1 and 2 are the response: log 0.5 + log 0.25.
        np.testing.assert_allclose(pl.sequence_log_probs(logits, tokens, mask), [np.log(0.5 * 0.25)], rtol=1e-6)
        np.testing.assert_allclose(pl.sequence_log_probs(logits, tokens, jnp.array([[0, 0, 1]])), [np.log(0.25)],
                                   rtol=1e-6)
