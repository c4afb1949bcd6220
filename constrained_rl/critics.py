"""Adversarially trained critics: relative pessimism, Bellman errors, targets and weight projection.

ATAC (Cheng, Xie, Jiang, Agarwal 2022, "Adversarially Trained Actor Critic for Offline Reinforcement
Learning") trains its critic ``f`` as the follower of a Stackelberg game: it makes the learned policy
look *worse than the data* wherever the data allows (relative pessimism) while keeping the Bellman error
small. SATAC (Wei, Peng, Ghosh, Liu 2024, arXiv 2401.00629) adds a cost critic trained adversarially
the other way, to make the policy look *costlier* than the data.

Every function here works on arrays of Q-values computed by the caller's networks, never on networks,
with **axis 0 the batch axis** (``[B]``; any trailing axes are averaged too). Functions over a critic
ensemble (:func:`double_q_min`, :func:`double_q_max`) take the ensemble on a leading axis ``[E, B]``.
Losses are scalars to minimise. For twin critics, call a loss once per head (or vmap over the head
axis) and sum, as ATAC does.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from constrained_rl.config import require_if_concrete
from constrained_rl.penalties import rectified_violation


def _check_batch(*arrays: chex.Array) -> None:
    chex.assert_equal_shape(arrays)
    chex.assert_rank(arrays[0], {1, 2})


def _mean_squared_error(q: chex.Array, target: chex.Array) -> jax.Array:
    _check_batch(q, target)
    return jnp.mean(jnp.square(q - target))


def relative_pessimism(q_policy: chex.Array, q_data: chex.Array) -> jax.Array:
    """ATAC's relative pessimism ``mean_b[f(s_b, pi(s_b)) - f(s_b, a_b)]`` over the batch.

    Args:
      q_policy: ``f(s, a~pi(s))``, shape ``[B]``. The caller samples the policy action and stops its
        gradient (``jax.lax.stop_gradient``) before evaluating the critic: this term trains the
        critic, not the actor.
      q_data: ``f(s, a)`` at the dataset action (or a reference action), shape ``[B]``.
    """
    _check_batch(q_policy, q_data)
    return jnp.mean(q_policy - q_data)


def bellman_target(rewards: chex.Array, discounts: chex.Array, next_q: chex.Array) -> jax.Array:
    """The TD target ``r + discount * Q(s', a')`` with its gradient stopped.

    ``discounts = gamma * (1 - terminal)``. ``next_q`` usually comes from target networks through
    :func:`double_q_min` (reward) or :func:`double_q_max` (cost). All shapes ``[B]``.
    """
    _check_batch(rewards, discounts, next_q)
    return jax.lax.stop_gradient(rewards + discounts * next_q)


def double_q_min(q_ensemble: chex.Array) -> jax.Array:
    """``min_e Q_e`` over the leading ensemble axis ``[E, B] -> [B]``: the pessimistic reward target
    of clipped double-Q learning (Fujimoto et al. 2018, TD3), as in ATAC."""
    chex.assert_rank(q_ensemble, {2, 3})
    return jnp.min(q_ensemble, axis=0)


def double_q_max(q_ensemble: chex.Array) -> jax.Array:
    """``max_e Q_e`` over the leading ensemble axis ``[E, B] -> [B]``: the pessimistic target of a
    *cost* critic, which over- rather than under-estimates the policy's cost."""
    chex.assert_rank(q_ensemble, {2, 3})
    return jnp.max(q_ensemble, axis=0)


def double_q_mean(q_ensemble: chex.Array) -> jax.Array:
    """``mean_e Q_e`` over the leading ensemble axis ``[E, B] -> [B]``: a target without the upward
    bias of ``max_e``, which bootstrapping would otherwise compound (SATAC's ``cost_target = mean``)."""
    chex.assert_rank(q_ensemble, {2, 3})
    return jnp.mean(q_ensemble, axis=0)


def td_error_loss(q: chex.Array, target: chex.Array) -> jax.Array:
    """``mean_b (Q(s_b, a_b) - target_b)^2`` with the target's gradient stopped (semi-gradient TD)."""
    return _mean_squared_error(q, jax.lax.stop_gradient(target))


def ensemble_td_loss(q_ensemble: chex.Array, target: chex.Array) -> jax.Array:
    """``sum_e mean_b (Q_e(s_b, a_b) - y_b)^2``: every head of a ``[E, B]`` ensemble regresses on the
    same ``[B]`` target (twin critics in TD3, BCQ and OSRL's baselines)."""
    chex.assert_rank(q_ensemble, 2)
    return jnp.sum(jax.vmap(td_error_loss, in_axes=(0, None))(q_ensemble, target))


def residual_bellman_loss(
    q: chex.Array, rewards: chex.Array, discounts: chex.Array, next_q_online: chex.Array
) -> jax.Array:
    """The residual-gradient Bellman error ``mean_b (Q(s, a) - r - discount * Q(s', a'))^2``.

    Unlike :func:`td_error_loss`, the gradient flows through ``next_q_online`` too: it must be the
    *online* critic evaluated at ``(s', a' ~ pi(s'))`` (Baird 1995; ATAC's residual term). All ``[B]``.
    """
    _check_batch(q, rewards, discounts, next_q_online)
    return _mean_squared_error(q, rewards + discounts * next_q_online)


def atac_bellman_loss(
    q: chex.Array, td_target: chex.Array, residual_target: chex.Array, td_weight: float = 0.5
) -> jax.Array:
    """ATAC's Bellman error, a mix of the TD and the residual-gradient errors:

        w * mean (Q - sg(td_target))^2 + (1 - w) * mean (Q - residual_target)^2

    with ``w = td_weight`` (ATAC: 0.5). ``td_target`` comes from target networks (gradient stopped
    here); ``residual_target = r + discount * Q_online(s', a')`` keeps its gradient.
    """
    require_if_concrete((td_weight,), lambda: 0.0 <= td_weight <= 1.0, "td_weight",
                        f"must lie in [0, 1], got {td_weight}")
    residual = _mean_squared_error(q, residual_target)
    return td_weight * td_error_loss(q, td_target) + (1.0 - td_weight) * residual


def normalized_sum(loss: chex.Array, regularizer: chex.Array, weight: chex.Array) -> jax.Array:
    """ATAC's ``loss / w + regularizer`` if ``w > 1`` else ``loss + w * regularizer``.

    The same minimiser as ``loss + w * regularizer`` but with gradients of bounded scale for any
    ``w >= 0`` (Cheng et al. 2022). Jit-safe with a traced ``w``; the unused branch cannot leak a
    division by zero into gradients at ``w = 0``.
    """
    weight = jnp.asarray(weight)
    safe_weight = jnp.where(weight > 1.0, weight, 1.0)
    return jnp.where(weight > 1.0, loss / safe_weight + regularizer, loss + weight * regularizer)


def adversarial_critic_loss(
    q_policy: chex.Array,
    q_data: chex.Array,
    bellman_loss: chex.Array,
    beta: chex.Array,
    pessimism_sign: chex.Array = 1.0,
) -> jax.Array:
    """The adversarial critic's loss ``normalized_sum(sign * [f(s, pi) - f(s, a)], bellman, beta)``.

    Sign convention (the critic *minimises* this loss):

      * Reward critic (ATAC), ``pessimism_sign = +1``: minimising ``+[Q_r(s, pi) - Q_r(s, a)]`` pushes
        ``Q_r(s, pi)`` **down** relative to the data, so the policy looks *less rewarding* than the
        behaviour wherever the Bellman error allows. ``d loss / d q_policy > 0``.
      * Cost critic (SATAC), ``pessimism_sign = -lambda`` (``lambda > 0``, SATAC's fixed trade-off):
        minimising ``-lambda * [Q_c(s, pi) - Q_c(s, a)]`` pushes ``Q_c(s, pi)`` **up**, so the policy
        looks *costlier* than the data: pessimism about safety. ``d loss / d q_policy < 0``.

    With ``beta <= 1`` this is exactly SATAC's ``sign * [..] + beta * Bellman``; with ``beta > 1`` it is
    that divided by ``beta`` (see :func:`normalized_sum`), the same minimiser.

    Args:
      q_policy: critic at the policy's action, ``[B]``; the action's gradient stopped by the caller.
      q_data: critic at the dataset action, ``[B]``.
      bellman_loss: scalar Bellman error of this critic (e.g. :func:`atac_bellman_loss`).
      beta: Bellman weight ``>= 0`` (ATAC uses 1 to 16).
      pessimism_sign: ``+1`` for a reward critic, ``-lambda`` for a cost critic.
    """
    chex.assert_rank(bellman_loss, 0)
    pessimism = pessimism_sign * relative_pessimism(q_policy, q_data)
    return normalized_sum(pessimism, bellman_loss, beta)


def aggression_limited_penalty(
    q_cost_policy: chex.Array, q_cost_reference: chex.Array
) -> jax.Array:
    """SATAC's actor penalty ``[Q_c(s, pi(s)) - Q_c(s, a_ref)]^+``, per sample ``[B] -> [B]``.

    The actor maximises ``mean[Q_r(s, pi) - lambda * penalty]``: it is charged only where its action
    looks costlier than the reference action, so it may be as aggressive as the reference but no more.
    This is RePO's rectified violation with the reference's cost as the limit, hence shared code; at a
    tie the gradient is 0.
    """
    _check_batch(q_cost_policy, q_cost_reference)
    return rectified_violation(q_cost_policy, q_cost_reference)


def project_l2_ball(params: Any, max_norm: float = 100.0) -> Any:
    """Projects every weight matrix of a pytree onto the Frobenius-norm ball of radius ``max_norm``.

    Leaves with ``ndim >= 2`` (kernels) become ``W * min(1, max_norm / ||W||_F)``, the norm taken over
    the whole matrix; biases and other 1-D or scalar leaves are untouched. ATAC applies this to its
    critics after every step (``max_norm = 100``) to keep the adversary's function class bounded.
    """
    require_if_concrete((max_norm,), lambda: max_norm > 0, "max_norm",
                        f"must be positive, got {max_norm}")

    def project(leaf: chex.Array) -> chex.Array:
        if jnp.ndim(leaf) < 2:
            return leaf
        norm = jnp.sqrt(jnp.sum(jnp.square(leaf)))
        # Dividing by max(norm, max_norm) never divides by zero and leaves in-ball matrices exact.
        return (leaf * (max_norm / jnp.maximum(norm, max_norm))).astype(leaf.dtype)

    return jax.tree.map(project, params)


def polyak_update(target_params: Any, online_params: Any, tau: chex.Array) -> Any:
    """Soft target update ``(1 - tau) * target + tau * online`` over matching pytrees.

    ATAC and SAC use ``tau = 5e-3``; ``tau = 1`` copies the online parameters.
    """
    return optax.incremental_update(online_params, target_params, tau)
