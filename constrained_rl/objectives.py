"""Policy-gradient objectives: the PPO surrogate, value clipping, KL estimators and entropy.

One module serves two very different learners. Control PPO-Lagrangian calls these functions on a
batch of transitions with shape ``[B]``; token-level LLM PPO (Safe-RLHF, RePO) calls them on
``[B, T]`` arrays of per-token quantities together with a ``mask`` of the same shape that marks the
generated tokens. Every loss is reduced with :func:`masked_mean`, the one masked mean of the project,
so padded positions never count. Inputs are arrays of any equal shape; there is no special batch
axis: every element is one sample and the reduction is over all of them, unless a loss is asked for
``per_sequence``: then rows are axis 0 and :func:`per_sequence_mean` averages each row's tokens first, as
Safe-RLHF and GRPO do. :func:`group_relative_advantages` is GRPO's critic-free advantage.

Conventions:
  * losses are returned as scalars to *minimise*;
  * ``old_log_probs``, ``old_values`` and ``advantages`` are treated as data: gradients are stopped
    through them here, so callers need not remember to.

References:
  * Schulman, Wolski, Dhariwal, Radford, Klimov (2017), "Proximal Policy Optimization Algorithms".
  * Ye et al. (2020), "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning"
    (dual-clip PPO).
  * Schulman (2020), "Approximating KL Divergence" (the k1 / k2 / k3 estimators).
  * Dai et al. (2023), "Safe RLHF" (PKU-Alignment): value clipping with range 5.0, per-token KL.
  * Shao et al. (2024), "DeepSeekMath" (GRPO): group-relative advantages, the per-sequence mean.
"""

from __future__ import annotations


import chex
import jax
import jax.numpy as jnp

from constrained_rl.config import require_if_concrete
from constrained_rl.penalties import group_mean


def masked_mean(
    x: chex.Array, mask: chex.Array | None = None, axis: int | tuple[int, ...] | None = None
) -> jax.Array:
    """Mean of ``x`` over ``axis`` counting only positions where ``mask`` is non-zero.

    ``sum(x * mask) / sum(mask)``; the mask may hold 0/1 flags or non-negative weights and must have
    ``x``'s shape. Where a reduction sees no valid position (an all-zero mask) the result is 0, not
    NaN, so an empty micro-batch cannot poison a training step. Without a mask this is ``jnp.mean``.

    Args:
      x: values, any shape.
      mask: same shape as ``x``, or None.
      axis: axes to reduce, as in ``jnp.mean``; None reduces over everything.
    """
    if mask is None:
        return jnp.mean(x, axis=axis)
    chex.assert_equal_shape([x, mask])
    mask = mask.astype(x.dtype)
    total = jnp.sum(x * mask, axis=axis)
    count = jnp.sum(mask, axis=axis)
    # Divide by a safe count so the unused branch of the where cannot leak inf/NaN into gradients.
    safe_count = jnp.where(count > 0, count, 1.0)
    return jnp.where(count > 0, total / safe_count, 0.0)


def per_sequence_mean(x: chex.Array, mask: chex.Array) -> jax.Array:
    """Mean over each sequence's valid tokens, then over the sequences that have any: rows on axis 0.

        per_sequence_mean(x, m) = (1 / |S|) sum_{i in S} [ sum_t m_it x_it / sum_t m_it ],
        S = {i : sum_t m_it > 0}

    Safe-RLHF's ``masked_mean`` (PKU-Alignment/safe-rlhf, ``safe_rlhf/utils.py``: the mean over each
    response's tokens, then over responses) and GRPO's ``1/G sum_i 1/|o_i| sum_t`` (Shao et al. 2024,
    "DeepSeekMath"): every response weighs the same whatever its length, where :func:`masked_mean` over all
    tokens lets a long response weigh more. ``x`` and ``mask`` ``[N, T]`` (any trailing shape reduces as one
    token axis); a row without a valid token is left out, and an all-zero mask gives 0.
    """
    chex.assert_equal_shape([x, mask])
    if x.ndim < 2:
        raise ValueError(f"per_sequence_mean: needs a sequence axis after the batch axis, got shape {x.shape}")
    token_axes = tuple(range(1, x.ndim))
    per_row = masked_mean(x, mask, axis=token_axes)
    has_tokens = jnp.any(mask != 0, axis=token_axes)
    return masked_mean(per_row, has_tokens)


def _reduce(loss: jax.Array, mask: chex.Array | None, per_sequence: bool) -> jax.Array:
    """:func:`per_sequence_mean` when asked (needs a mask), else :func:`masked_mean` over everything."""
    if per_sequence:
        if mask is None:
            raise ValueError("per_sequence: needs a mask")
        return per_sequence_mean(loss, mask)
    return masked_mean(loss, mask)


def _importance_ratio(log_probs: chex.Array, old_log_probs: chex.Array) -> jax.Array:
    chex.assert_equal_shape([log_probs, old_log_probs])
    return jnp.exp(log_probs - jax.lax.stop_gradient(old_log_probs))


def ppo_clipped_surrogate(
    log_probs: chex.Array,
    old_log_probs: chex.Array,
    advantages: chex.Array,
    clip_epsilon: float = 0.2,
    dual_clip: float | None = None,
    mask: chex.Array | None = None,
    per_sequence: bool = False,
) -> jax.Array:
    """PPO's clipped surrogate loss (Schulman et al. 2017), with optional dual clip (Ye et al. 2020).

    With ratio ``r = exp(log_probs - old_log_probs)`` and advantage ``A``, per sample:

        L_clip = max(-r * A, -clip(r, 1 - eps, 1 + eps) * A)

    i.e. the negative of PPO's ``min(r A, clip(r) A)``. Dual clip (``dual_clip = c > 1``) bounds the
    loss of samples with ``A < 0``, where a huge ratio would otherwise give an unbounded loss:

        L = min(L_clip, -c * A)   if A < 0,   L_clip otherwise

    (in objective terms ``max(min(r A, clip(r) A), c A)``). The result is ``masked_mean(L, mask)``, or with
    ``per_sequence`` :func:`per_sequence_mean` (token-level LM PPO as Safe-RLHF averages it).

    Args:
      log_probs: log pi(a|s) under the current policy; any shape ([B] or [B, T]).
      old_log_probs: log-probs under the behaviour policy; same shape. Gradient is stopped.
      advantages: same shape. Gradient is stopped.
      clip_epsilon: the PPO clip range eps > 0.
      dual_clip: the constant c > 1 of dual-clip PPO, or None to disable it.
      mask: same shape, 1 for samples that count (generated tokens), or None.
      per_sequence: average per row (axis 0), then over rows; needs ``mask``.

    Returns:
      The scalar loss to minimise.
    """
    chex.assert_equal_shape([log_probs, old_log_probs, advantages])
    require_if_concrete((clip_epsilon,), lambda: clip_epsilon > 0, "clip_epsilon", "must be positive")
    advantages = jax.lax.stop_gradient(advantages)
    ratio = _importance_ratio(log_probs, old_log_probs)
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon)
    loss = jnp.maximum(-ratio * advantages, -clipped_ratio * advantages)
    if dual_clip is not None:
        require_if_concrete((dual_clip,), lambda: dual_clip > 1, "dual_clip", "must be greater than 1")
        loss = jnp.where(advantages < 0, jnp.minimum(loss, -dual_clip * advantages), loss)
    return _reduce(loss, mask, per_sequence)


def clipped_value_loss(
    values: chex.Array,
    old_values: chex.Array,
    targets: chex.Array,
    clip_range: float | None = None,
    mask: chex.Array | None = None,
    per_sequence: bool = False,
) -> jax.Array:
    """Value regression with PPO2-style clipping around the old prediction.

    Per sample, with ``v_clip = old + clip(v - old, -c, c)``:

        L = 0.5 * max((v - target)^2, (v_clip - target)^2)

    so an update that moves the value more than ``c`` away from ``old_values`` gets no extra credit
    (OpenAI Baselines PPO2; Safe-RLHF uses ``c = 5.0`` for both reward and cost critics). With
    ``clip_range=None`` this is the plain ``0.5 * (v - target)^2``. Reduced with :func:`masked_mean`, or with
    ``per_sequence`` :func:`per_sequence_mean` (Safe-RLHF's critic loss).

    Args:
      values: current value predictions; any shape ([B] or [B, T]).
      old_values: predictions at collection time; same shape. Gradient is stopped.
      targets: regression targets (returns); same shape. Gradient is stopped.
      clip_range: the clip range c > 0, or None for no clipping.
      mask: same shape, or None.
      per_sequence: average per row (axis 0), then over rows; needs ``mask``.
    """
    chex.assert_equal_shape([values, old_values, targets])
    targets = jax.lax.stop_gradient(targets)
    loss = jnp.square(values - targets)
    if clip_range is not None:
        require_if_concrete((clip_range,), lambda: clip_range > 0, "clip_range", "must be positive")
        old_values = jax.lax.stop_gradient(old_values)
        clipped_values = old_values + jnp.clip(values - old_values, -clip_range, clip_range)
        loss = jnp.maximum(loss, jnp.square(clipped_values - targets))
    return 0.5 * _reduce(loss, mask, per_sequence)


# --------------------------------------------------------------------------------------------------
# KL estimators. Each takes log p(x) and log q(x) of samples x ~ p and returns a per-sample estimate
# of KL(p || q); its mean over samples estimates the divergence (Schulman, "Approximating KL
# Divergence"). With p the trained policy and q the frozen reference, k1 is the per-token KL that
# Safe-RLHF subtracts from the reward.


def kl_k1(log_p: chex.Array, log_q: chex.Array) -> jax.Array:
    """``k1 = log p(x) - log q(x)``: unbiased, high variance, can be negative. Per sample."""
    chex.assert_equal_shape([log_p, log_q])
    return log_p - log_q


def kl_k2(log_p: chex.Array, log_q: chex.Array) -> jax.Array:
    """``k2 = 0.5 * (log p(x) - log q(x))^2``: biased, low variance, non-negative. Per sample."""
    chex.assert_equal_shape([log_p, log_q])
    return 0.5 * jnp.square(log_p - log_q)


def kl_k3(log_p: chex.Array, log_q: chex.Array) -> jax.Array:
    """``k3 = (r - 1) - log r`` with ``r = q(x) / p(x)``: unbiased, low variance, >= 0. Per sample."""
    chex.assert_equal_shape([log_p, log_q])
    log_ratio = log_q - log_p
    # expm1 keeps precision when the two policies are close and r - 1 is tiny.
    return jnp.expm1(log_ratio) - log_ratio


def categorical_entropy(logits: chex.Array, mask: chex.Array | None = None) -> jax.Array:
    """Mean entropy of categorical distributions given by ``logits`` (last axis = categories).

    ``H = -sum_k p_k log p_k`` per position, ``p = softmax(logits)``, then :func:`masked_mean` over all
    leading positions (``mask`` has the shape ``logits.shape[:-1]``, e.g. ``[B, T]`` for tokens).
    Logits of ``-inf`` (banned tokens) contribute 0 instead of ``0 * -inf = NaN``.
    """
    if logits.ndim < 1:
        raise ValueError(f"logits: need a category axis, got shape {logits.shape}")
    if mask is not None:
        chex.assert_shape(mask, logits.shape[:-1])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    probs = jnp.exp(log_probs)
    safe_log_probs = jnp.where(probs > 0, log_probs, 0.0)
    entropy = -jnp.sum(probs * safe_log_probs, axis=-1)
    return masked_mean(entropy, mask)


def approx_kl(
    log_probs: chex.Array, old_log_probs: chex.Array, mask: chex.Array | None = None
) -> jax.Array:
    """Diagnostic: the k3 estimate of ``KL(pi_old || pi)`` from samples of ``pi_old``, masked mean."""
    return masked_mean(kl_k3(old_log_probs, log_probs), mask)


def clip_fraction(
    log_probs: chex.Array,
    old_log_probs: chex.Array,
    clip_epsilon: float = 0.2,
    mask: chex.Array | None = None,
) -> jax.Array:
    """Diagnostic: the fraction of samples whose ratio left ``[1 - eps, 1 + eps]``, masked mean."""
    ratio = _importance_ratio(log_probs, old_log_probs)
    clipped = (jnp.abs(ratio - 1.0) > clip_epsilon).astype(ratio.dtype)
    return masked_mean(clipped, mask)


GROUP_STD_EPS = 1e-4  # keeps a group of equal scores at advantage 0 (TRL's GRPOTrainer adds the same)


def group_relative_advantages(
    scores: chex.Array, group_ids: chex.Array, num_groups: int, eps: float = GROUP_STD_EPS
) -> jax.Array:
    """GRPO's outcome advantage (Shao et al. 2024, "DeepSeekMath"): each sample against its group.

        A_i = (s_i - mean_g) / (std_g + eps),   g = group_ids[i]
        mean_g = mean{s_j : g_j = g},   std_g = sqrt( sum_{g_j = g} (s_j - mean_g)^2 / (n_g - 1) )

    (the sample standard deviation, as ``torch.std`` in TRL's GRPOTrainer). The K responses to one prompt
    form a group, so the prompt's mean score is the baseline a critic would otherwise learn. A group whose
    scores are all equal, or of a single sample, gets advantage 0. Unbatched over groups: ``scores`` and
    ``group_ids`` ``[N]`` (ids in ``[0, num_groups)``, static ``num_groups``); returns ``[N]``.
    """
    chex.assert_rank([scores, group_ids], 1)
    chex.assert_equal_shape([scores, group_ids])
    means = group_mean(scores, group_ids, num_groups)
    deviations = scores - means[group_ids]
    counts = jax.ops.segment_sum(jnp.ones_like(scores), group_ids, num_segments=num_groups)
    variance = jax.ops.segment_sum(jnp.square(deviations), group_ids, num_segments=num_groups) / jnp.maximum(
        counts - 1, 1)
    return deviations / (jnp.sqrt(variance)[group_ids] + eps)
