"""Discounted returns and generalized advantage estimation (GAE), as reverse ``lax.scan`` recurrences.

GAE is from Schulman, Moritz, Levine, Jordan & Abbeel 2016, "High-Dimensional Continuous Control Using
Generalized Advantage Estimation". Every function here is one instance of the linear recurrence

    acc_t = x_t + f_t * acc_{t+1},    acc_T = init

run backwards in time by :func:`_reverse_recurrence`, so returns, GAE and token-level GAE share one
implementation.

A cost stream is just another stream: pass per-step costs as ``rewards`` and cost-critic values as
``values`` to get cost advantages ``A_c`` and cost-value targets, exactly as for the reward stream.
Constrained learners (PPO-Lagrangian, Safe-RLHF, RePO) call these functions twice, once per stream.

Two layouts:
  * time-major (``discounted_returns``, ``gae``): leading axis T is time, any trailing batch shape
    (``[T]``, ``[T, num_envs]``, ...), as produced by a ``lax.scan`` rollout.
  * batch-major padded token sequences (``sequence_gae``): ``[B, T]`` with a validity mask, as in
    RLHF where responses of different lengths share one padded batch.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from constrained_rl.config import ConfigError


def _reverse_recurrence(inputs: jax.Array, factors: jax.Array, init: jax.Array) -> jax.Array:
    """``acc_t = inputs_t + factors_t * acc_{t+1}`` with ``acc_T = init``, over the leading axis."""

    def step(acc_next, input_and_factor):
        x, f = input_and_factor
        acc = x + f * acc_next
        return acc, acc

    _, accumulated = jax.lax.scan(step, init, (inputs, factors), reverse=True)
    return accumulated


def _check_time_major(rewards: jax.Array, *per_step: jax.Array) -> None:
    if rewards.ndim < 1:
        raise ValueError(f"time-major arrays need a leading time axis; got shape {rewards.shape}")
    chex.assert_equal_shape([rewards, *per_step])


def discounted_returns(
    rewards: jax.Array, discounts: jax.Array, bootstrap_value: jax.Array
) -> jax.Array:
    """Discounted returns ``G_t = r_t + discount_t * G_{t+1}``, ``G_T = bootstrap_value``.

    Time-major: ``rewards``, ``discounts`` [T, ...]; ``bootstrap_value`` [...] is the value of the state
    after the last step. ``discount_t = gamma * (1 - terminated_t)`` cuts the sum at a termination.
    """
    _check_time_major(rewards, discounts)
    chex.assert_shape(bootstrap_value, rewards.shape[1:])
    return _reverse_recurrence(rewards, discounts, bootstrap_value.astype(rewards.dtype))


def next_values_from_bootstrap(values: jax.Array, bootstrap_value: jax.Array) -> jax.Array:
    """``V(s_{t+1})`` for every t from ``values`` [T, ...] and the value after the last step [...].

    Convenience for the Brax / PureJaxRL layout, where a rollout stores ``V(s_t)`` and one bootstrap
    value: ``next_values = concat(values[1:], bootstrap_value)``. After an auto-reset, ``values[t + 1]``
    belongs to the next episode's first state: harmless where step t terminated (its discount is 0), but
    wrong where it was truncated; there, put the value of the true final observation into
    ``next_values`` before calling :func:`gae`.
    """
    chex.assert_shape(bootstrap_value, values.shape[1:])
    return jnp.concatenate([values[1:], bootstrap_value[None].astype(values.dtype)], axis=0)


def gae(
    rewards: jax.Array,
    values: jax.Array,
    next_values: jax.Array,
    discounts: jax.Array,
    lambda_: float | jax.Array,
    episode_continues: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation (Schulman et al. 2016); returns ``(advantages, value_targets)``.

    Time-major: every array [T, ...] with any trailing batch shape; ``lambda_`` a scalar.

        delta_t = r_t + discount_t * V(s_{t+1}) - V(s_t)
        A_t     = delta_t + discount_t * lambda * continues_t * A_{t+1},    A_T = 0
        target_t = A_t + V(s_t)

    * ``discounts`` = ``gamma * (1 - terminated)``: a termination stops bootstrapping.
    * ``next_values`` = ``V(s_{t+1})``; on a truncated (time-limit) step, the value of the true final
      observation, so that truncation still bootstraps.
    * ``episode_continues`` = ``1 - (terminated or truncated)``: stops the lambda-recursion at episode
      boundaries inside an auto-reset rollout, so advantages never leak across episodes. ``None`` means
      the rollout has no boundaries other than terminations (which ``discounts`` already cut).

    With ``lambda = 1`` the advantage is the discounted return minus the value; with ``lambda = 0`` it is
    the one-step TD error. Use it unchanged for a cost stream (costs as ``rewards``, cost values as
    ``values``).
    """
    _check_time_major(rewards, values, next_values, discounts)
    if episode_continues is None:
        episode_continues = jnp.ones_like(discounts)
    chex.assert_equal_shape([rewards, episode_continues])
    td_errors = rewards + discounts * next_values - values
    advantages = _reverse_recurrence(
        td_errors, discounts * lambda_ * episode_continues, jnp.zeros_like(rewards[0]))
    return advantages, advantages + values


def sequence_gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    gamma: float | jax.Array = 1.0,
    lambda_: float | jax.Array = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """Token-level GAE over padded sequences; returns ``(advantages, value_targets)``, both [B, T].

    Batch-major: ``rewards``, ``values``, ``mask`` [B, T]; ``mask`` is 1 on valid (response) tokens and
    0 on padding, which may sit on the left, on the right or both. Each row is one episode over its valid
    tokens, which are treated as consecutive: the value after a valid token is the value of the next
    valid token in the row, and 0 after the last one (the episode ends with the response). Padded
    positions get advantage and target 0, and their rewards and values, whatever they hold, do not
    affect valid positions.

    This is the estimator Safe-RLHF (Dai et al. 2023) applies to both its reward stream (KL penalty per
    token plus the reward score at the end) and its cost stream, with ``gamma = 1``, ``lambda = 0.95``.
    """
    chex.assert_rank(rewards, 2)
    chex.assert_equal_shape([rewards, values, mask])
    valid = mask.astype(bool).T  # time-major from here on
    rewards = jnp.where(valid, rewards.T, 0.0)
    values = jnp.where(valid, values.T, 0.0)
    batch_zeros = jnp.zeros_like(values[0])
    # The value at the first valid position at or after t; padding passes the later value through.
    value_at_or_after = _reverse_recurrence(values, jnp.where(valid, 0.0, 1.0), batch_zeros)
    next_values = jnp.concatenate([value_at_or_after[1:], batch_zeros[None]], axis=0)
    td_errors = jnp.where(valid, rewards + gamma * next_values - values, 0.0)
    # On padding the factor is 1 and the input 0, so the accumulated advantage passes through unchanged.
    advantages = _reverse_recurrence(
        td_errors, jnp.where(valid, gamma * lambda_, 1.0), batch_zeros)
    advantages = jnp.where(valid, advantages, 0.0)
    value_targets = jnp.where(valid, advantages + values, 0.0)
    return advantages.T, value_targets.T


def per_step_cost_threshold(
    cost_limit: float | jax.Array, gamma: float | jax.Array, episode_length: int | jax.Array
) -> jax.Array:
    """The cost-value threshold Q-based offline learners (OSRL's BCQ-Lag, BEAR-Lag, CPQ; SATAC) compare Q_c against.

    If the episodic budget ``kappa`` is spent evenly, ``kappa / T`` per step over ``T`` steps, the
    discounted cost value from the first state is

        kappa * (1 - gamma^T) / ((1 - gamma) * T),

    which tends to ``kappa`` as ``gamma -> 1`` (the undiscounted sum) and equals ``kappa / T`` at
    ``gamma = 0``. Computed as ``expm1(T log gamma) / expm1(log gamma)`` so that gamma near 1 loses no
    precision to cancellation; exactly ``kappa`` at ``gamma = 1``. Scalars (or broadcastable arrays).
    """
    _check_concrete_range(cost_limit, "cost_limit", low=0.0)
    _check_concrete_range(gamma, "gamma", low=0.0, high=1.0)
    _check_concrete_range(episode_length, "episode_length", low=1.0)
    gamma = jnp.asarray(gamma, jnp.float32)
    horizon = jnp.asarray(episode_length, jnp.float32)
    undiscounted = gamma >= 1.0
    # The other branch of the where must stay finite at gamma = 1 for gradients to stay finite.
    log_gamma = jnp.log(jnp.where(undiscounted, 0.5, gamma))
    geometric_sum = jnp.expm1(horizon * log_gamma) / jnp.expm1(log_gamma)
    geometric_sum = jnp.where(undiscounted, horizon, geometric_sum)
    return jnp.asarray(cost_limit, jnp.float32) * geometric_sum / horizon


def _check_concrete_range(
    value: Any, field: str, low: float | None = None, high: float | None = None
) -> None:
    # Traced values (a vmapped sweep over limits) cannot be checked on the host; the caller owns them.
    if isinstance(value, jax.core.Tracer):
        return
    array = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ConfigError(f"{field}: must be finite, got {value}")
    if low is not None and np.any(array < low):
        raise ConfigError(f"{field}: must be >= {low}, got {value}")
    if high is not None and np.any(array > high):
        raise ConfigError(f"{field}: must be <= {high}, got {value}")
