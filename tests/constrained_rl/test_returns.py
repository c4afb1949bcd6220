from __future__ import annotations

import chex
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from constrained_rl import returns
from constrained_rl.config import ConfigError


class ReturnsByHandTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_discounted_returns(self):
        # G2 = 3 + .9 * 10, G1 = 2 + 0 * G2 (terminated), G0 = 1 + .9 * G1
        out = self.variant(returns.discounted_returns)(
            jnp.array([1.0, 2.0, 3.0]), jnp.array([0.9, 0.0, 0.9]), jnp.float32(10.0))
        np.testing.assert_allclose(out, [2.8, 2.0, 12.0], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gae(self):
        advantages, targets = self.variant(returns.gae)(
            jnp.array([1.0, 2.0, 3.0]),  # rewards
            jnp.array([0.5, 1.0, 1.5]),  # values
            jnp.array([1.0, 1.5, 2.0]),  # next values
            jnp.full((3,), 0.9),  # discounts
            0.5,
        )
        # deltas: 1 + .9 - .5 = 1.4, 2 + 1.35 - 1 = 2.35, 3 + 1.8 - 1.5 = 3.3; factor .9 * .5
        a2 = 3.3
        a1 = 2.35 + 0.45 * a2
        a0 = 1.4 + 0.45 * a1
        np.testing.assert_allclose(advantages, [a0, a1, a2], rtol=1e-6)
        np.testing.assert_allclose(targets, [a0 + 0.5, a1 + 1.0, a2 + 1.5], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_truncation_bootstraps_and_termination_does_not(self):
        # Auto-reset rollout of 3 steps; the episode ends after step 1, then a new one starts at step 2.
        rewards = jnp.array([1.0, 1.0, 1.0])
        values = jnp.array([0.0, 0.0, 7.0])
        next_values = jnp.array([0.0, 4.0, 0.0])  # step 1's next value: its true final observation
        continues = jnp.array([1.0, 0.0, 1.0])
        run = self.variant(returns.gae)
        truncated, _ = run(rewards, values, next_values, jnp.array([0.5, 0.5, 0.5]), 1.0, continues)
        terminated, _ = run(rewards, values, next_values, jnp.array([0.5, 0.0, 0.5]), 1.0, continues)
        np.testing.assert_allclose(truncated, [1 + 0.5 * 3.0, 1 + 0.5 * 4.0, 1 - 7.0], rtol=1e-6)
        np.testing.assert_allclose(terminated, [1 + 0.5 * 1.0, 1.0, 1 - 7.0], rtol=1e-6)
        # Without the episode boundary, the next episode's advantage would leak into step 1.
        leaky, _ = run(rewards, values, next_values, jnp.array([0.5, 0.5, 0.5]), 1.0)
        assert leaky[1] != truncated[1]

    @chex.variants(with_jit=True, without_jit=True)
    def test_sequence_gae_left_right_and_interior_padding(self):
        rewards = jnp.array([[9.0, 0.0, 1.0, 9.0],  # left and right padded
                             [0.0, 9.0, 1.0, 9.0],  # interior padding, then right padding
                             [0.0, 1.0, 9.0, 9.0]])  # right padded
        values = jnp.array([[9.0, 0.5, 0.2, 9.0],
                            [0.5, 9.0, 0.2, 9.0],
                            [0.5, 0.2, 9.0, 9.0]])
        mask = jnp.array([[0, 1, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0]])
        advantages, targets = self.variant(returns.sequence_gae)(rewards, values, mask, 1.0, 0.95)
        # Valid tokens: deltas 0 + .2 - .5 = -.3 and 1 + 0 - .2 = .8; A = [-.3 + .95 * .8, .8].
        first, last = -0.3 + 0.95 * 0.8, 0.8
        np.testing.assert_allclose(advantages, [[0, first, last, 0], [first, 0, last, 0],
                                                [first, last, 0, 0]], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(targets, [[0, first + 0.5, last + 0.2, 0],
                                             [first + 0.5, 0, last + 0.2, 0],
                                             [first + 0.5, last + 0.2, 0, 0]], rtol=1e-6, atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    def test_trailing_batch_axes(self):
        rewards = jnp.arange(6.0).reshape(3, 2)
        discounts = jnp.full((3, 2), 0.5)
        out = self.variant(returns.discounted_returns)(rewards, discounts, jnp.array([8.0, 16.0]))
        np.testing.assert_allclose(out[:, 0], [0 + 0.5 * (2 + 0.5 * (4 + 4)), 2 + 0.5 * 8, 4 + 4])
        np.testing.assert_allclose(out[:, 1], [1 + 0.5 * (3 + 0.5 * (5 + 8)), 3 + 0.5 * 13, 5 + 8])


def test_next_values_from_bootstrap():
    out = returns.next_values_from_bootstrap(jnp.array([[1.0], [2.0], [3.0]]), jnp.array([4.0]))
    np.testing.assert_allclose(out[:, 0], [2.0, 3.0, 4.0])


def test_shape_checks():
    with pytest.raises(AssertionError):
        returns.gae(jnp.zeros(3), jnp.zeros(3), jnp.zeros(4), jnp.zeros(3), 0.9)
    with pytest.raises(AssertionError):
        returns.discounted_returns(jnp.zeros((3, 2)), jnp.zeros((3, 2)), jnp.zeros(3))
    with pytest.raises(AssertionError):
        returns.sequence_gae(jnp.zeros(3), jnp.zeros(3), jnp.ones(3))


T, BATCH = 6, 2
finite = st.floats(-5, 5, width=32)
per_step = hnp.arrays(np.float32, (T, BATCH), elements=finite)
terminations = hnp.arrays(np.bool_, (T, BATCH))


@jax.jit
def _gae_laws(rewards, values, bootstrap, terminated):
    discounts = 0.9 * (1.0 - terminated.astype(jnp.float32))
    next_values = returns.next_values_from_bootstrap(values, bootstrap)
    full_return = returns.discounted_returns(rewards, discounts, bootstrap) - values
    td_error = rewards + discounts * next_values - values
    lambda_one = returns.gae(rewards, values, next_values, discounts, 1.0)[0]
    lambda_zero = returns.gae(rewards, values, next_values, discounts, 0.0)[0]
    return full_return, td_error, lambda_one, lambda_zero


@settings(max_examples=30, deadline=None)
@given(rewards=per_step, values=per_step,
       bootstrap=hnp.arrays(np.float32, BATCH, elements=finite), terminated=terminations)
def test_gae_lambda_one_is_return_minus_value_and_lambda_zero_is_td_error(
        rewards, values, bootstrap, terminated):
    full_return, td_error, lambda_one, lambda_zero = _gae_laws(rewards, values, bootstrap, terminated)
    np.testing.assert_allclose(lambda_one, full_return, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(lambda_zero, td_error, rtol=1e-5, atol=1e-5)


def _reference_gae(rewards, values, gamma, lambda_):
    """Plain loop over one unpadded episode; the value after the last step is 0."""
    advantages = np.zeros_like(rewards)
    next_advantage, next_value = 0.0, 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_value - values[t]
        next_advantage = delta + gamma * lambda_ * next_advantage
        next_value = values[t]
        advantages[t] = next_advantage
    return advantages


SEQUENCE_GAE = jax.jit(returns.sequence_gae)
ROWS, LENGTH = 3, 7


@settings(max_examples=30, deadline=None)
@given(
    rewards=hnp.arrays(np.float32, (ROWS, LENGTH), elements=finite),
    values=hnp.arrays(np.float32, (ROWS, LENGTH), elements=finite),
    garbage=hnp.arrays(np.float32, (ROWS, LENGTH), elements=st.floats(-1e6, 1e6, width=32)),
    mask=hnp.arrays(np.bool_, (ROWS, LENGTH)),
    gamma=st.sampled_from([1.0, 0.9]),
)
def test_sequence_gae_ignores_padding(rewards, values, garbage, mask, gamma):
    advantages, targets = map(np.asarray, SEQUENCE_GAE(
        np.where(mask, rewards, garbage), np.where(mask, values, garbage), mask, gamma, 0.95))
    assert np.all(advantages[~mask] == 0) and np.all(targets[~mask] == 0)
    for row in range(ROWS):
        valid = mask[row]
        want = _reference_gae(rewards[row, valid], values[row, valid], gamma, 0.95)
        np.testing.assert_allclose(advantages[row, valid], want, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(targets[row, valid], want + values[row, valid], rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Per-step cost threshold


class PerStepCostThresholdTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_by_hand(self):
        threshold = self.variant(returns.per_step_cost_threshold)
        # kappa (1 - gamma^T) / ((1 - gamma) T): 10 * 0.75 / (0.5 * 2) = 7.5
        np.testing.assert_allclose(threshold(10.0, 0.5, 2), 7.5, rtol=1e-6)
        # 20 * (1 - 0.9^3) / (0.1 * 3) = 20 * 0.271 / 0.3
        np.testing.assert_allclose(threshold(20.0, 0.9, 3), 20 * 0.271 / 0.3, rtol=1e-5)
        np.testing.assert_allclose(threshold(10.0, 1.0, 300), 10.0, rtol=1e-6)
        np.testing.assert_allclose(threshold(10.0, 0.0, 300), 10.0 / 300, rtol=1e-6)
        np.testing.assert_allclose(threshold(0.0, 0.99, 300), 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gamma_to_one_approaches_the_limit_without_cancellation(self):
        threshold = self.variant(returns.per_step_cost_threshold)
        for gap in (1e-2, 1e-4, 1e-6):
            gamma = np.float32(1.0 - gap)
            g = np.float64(gamma)
            exact = 40.0 * (1 - g**300) / ((1 - g) * 300)
            np.testing.assert_allclose(threshold(40.0, gamma, 300), exact, rtol=2e-5)
        np.testing.assert_allclose(threshold(40.0, np.float32(1 - 1e-6), 300), 40.0, rtol=2e-4)

    def test_vmaps_over_limits_and_has_finite_gradient_at_gamma_one(self):
        limits = jnp.array([10.0, 20.0, 40.0])
        values = jax.vmap(returns.per_step_cost_threshold, in_axes=(0, None, None))(limits, 0.99, 200)
        np.testing.assert_allclose(values, limits * (1 - 0.99**200) / (0.01 * 200), rtol=1e-5)
        assert np.isfinite(jax.grad(returns.per_step_cost_threshold, argnums=1)(10.0, 1.0, 200))

    def test_bad_values_are_refused(self):
        bad = {"gamma": (10.0, 1.5, 300), "episode_length": (10.0, 0.9, 0), "cost_limit": (-1.0, 0.9, 300)}
        for field, args in bad.items():
            with pytest.raises(ConfigError, match=field):
                returns.per_step_cost_threshold(*args)
