"""Losses for learning from preferences and demonstrations: Bradley-Terry, the cost-model sign loss, SFT,
and the direct preference objectives (DPO, SafeDPO).

The reward and cost models of Safe-RLHF (Dai et al. 2023, "Safe RLHF: Safe Reinforcement Learning from
Human Feedback", PKU-Alignment) are score models read at the last token of a response. They are fitted to
pairwise comparisons with the Bradley-Terry model (Bradley & Terry 1952; Ouyang et al. 2022,
"InstructGPT"), P(y_better > y_worse) = sigmoid(s_better - s_worse). The cost model adds a sign term that
pins its zero: unsafe responses score above 0, safe ones below, so the constraint C(x, y) <= 0 of the RL
stage means "safe". The SFT loss is the token-level cross-entropy of the response given the prompt
(Alpaca, Taori et al. 2023; Safe-RLHF's SFT stage). DPO (Rafailov et al. 2023) fits the policy itself to
the comparisons, its log-ratio against a frozen reference playing the reward; SafeDPO (Kim et al. 2025)
makes the chosen response the safe one and adds a safety margin; SACPO (Wachi et al. 2024) runs DPO twice,
on the helpfulness and then on the safety comparisons.

Conventions: losses are scalars to *minimise*. Score functions take ``[B]`` arrays with batch axis 0 and
an optional ``[B]`` ``mask`` (1 = a real row, 0 = padding of a partial batch); the SFT loss takes ``[B, T]``
tokens. Every mean is :func:`constrained_rl.objectives.masked_mean`, so masked rows never count and an
all-masked batch gives 0.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from constrained_rl.objectives import masked_mean


def _check_pair(first: chex.Array, second: chex.Array, mask: chex.Array | None) -> None:
    chex.assert_rank([first, second], 1)
    chex.assert_equal_shape([first, second])
    if mask is not None:
        chex.assert_equal_shape([first, mask])


def bradley_terry_loss(
    better_scores: chex.Array, worse_scores: chex.Array, mask: chex.Array | None = None
) -> jax.Array:
    """Negative log-likelihood of the Bradley-Terry model: ``mean_i -log sigmoid(s_better_i - s_worse_i)``.

    Bradley & Terry 1952; the reward-model loss of InstructGPT (Ouyang et al. 2022) and Safe-RLHF
    (Dai et al. 2023, "sequence-wise" loss). ``-log sigmoid(d)`` is computed as ``softplus(-d)``, exact
    for large margins of either sign.

    Args:
      better_scores: [B] scores of the preferred responses.
      worse_scores: [B] scores of the other responses.
      mask: optional [B], 1 on real rows.
    Returns:
      the scalar mean loss over real rows.
    """
    _check_pair(better_scores, worse_scores, mask)
    return masked_mean(jax.nn.softplus(worse_scores - better_scores), mask)


def cost_sign_loss(scores: chex.Array, signs: chex.Array, mask: chex.Array | None = None) -> jax.Array:
    """Safe-RLHF's sign loss ``mean_i -log sigmoid(sign_i * c_i)``.

    ``sign = +1`` for an unsafe response pushes its cost above 0, ``sign = -1`` for a safe one pushes it
    below 0 (Dai et al. 2023, cost-model objective), so that "safe" is ``c <= 0`` in the RL stage.

    Args:
      scores: [B] cost scores.
      signs: [B] +1 (unsafe) or -1 (safe), any numeric dtype.
      mask: optional [B], 1 on real rows.
    """
    _check_pair(scores, signs, mask)
    return masked_mean(jax.nn.softplus(-signs.astype(scores.dtype) * scores), mask)


def safe_rlhf_cost_loss(
    safer_costs: chex.Array,
    unsafer_costs: chex.Array,
    safer_signs: chex.Array,
    unsafer_signs: chex.Array,
    mask: chex.Array | None = None,
) -> jax.Array:
    """The cost-model loss of Safe-RLHF (Dai et al. 2023): a ranking term plus the sign terms.

        L = mean_i [ -log sigmoid(c_unsafer_i - c_safer_i)
                     -log sigmoid(sign_safer_i * c_safer_i) - log sigmoid(sign_unsafer_i * c_unsafer_i) ]

    The less safe response should cost more (Bradley-Terry with the *unsafer* response as the "higher"
    one), and every response's cost should have the sign of its safety label (+1 unsafe, -1 safe).

    Args:
      safer_costs, unsafer_costs: [B] costs of the safer and the less safe response of each pair.
      safer_signs, unsafer_signs: [B] safety signs (+1 unsafe, -1 safe) of the same responses.
      mask: optional [B], 1 on real rows.
    """
    ranking = bradley_terry_loss(unsafer_costs, safer_costs, mask)
    return ranking + cost_sign_loss(safer_costs, safer_signs, mask) + cost_sign_loss(unsafer_costs, unsafer_signs, mask)


def score_square_penalty(
    first_scores: chex.Array, second_scores: chex.Array, mask: chex.Array | None = None
) -> jax.Array:
    """``mean_i (s1_i^2 + s2_i^2) / 2``: Safe-RLHF's score regularizer (its ``--regularization`` term).

    Bradley-Terry sees only differences of scores, so without it the scores may drift; the RL stage
    reads their absolute values (the cost model's zero in particular). Args as :func:`bradley_terry_loss`.
    """
    _check_pair(first_scores, second_scores, mask)
    return masked_mean(0.5 * (jnp.square(first_scores) + jnp.square(second_scores)), mask)


def ranking_accuracy(
    better_scores: chex.Array, worse_scores: chex.Array, mask: chex.Array | None = None
) -> jax.Array:
    """Fraction of pairs ranked right, ``mean_i 1[s_better_i > s_worse_i]`` (ties count as wrong)."""
    _check_pair(better_scores, worse_scores, mask)
    return masked_mean((better_scores > worse_scores).astype(jnp.float32), mask)


def sign_accuracy(scores: chex.Array, signs: chex.Array, mask: chex.Array | None = None) -> jax.Array:
    """Fraction of responses classified right by the cost's sign: ``c > 0`` for unsafe (+1), ``c <= 0``
    for safe (-1), Safe-RLHF's definition of safety."""
    _check_pair(scores, signs, mask)
    predicted_unsafe = scores > 0
    return masked_mean((predicted_unsafe == (signs > 0)).astype(jnp.float32), mask)


def next_token_log_probs(logits: chex.Array, tokens: chex.Array) -> jax.Array:
    """``log p(tokens[:, t+1] | tokens[:, :t+1])`` for every t: ``[B, T-1]`` from logits ``[B, T, V]``.

    Teacher forcing: the logits at position t predict the token at t + 1. Computed in float32.
    """
    chex.assert_rank([logits, tokens], [3, 2])
    chex.assert_equal_shape_prefix([logits, tokens], 2)
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]


def sft_loss(logits: chex.Array, tokens: chex.Array, loss_mask: chex.Array) -> jax.Array:
    """Token-level cross-entropy of the response: ``-sum_{t in mask} log p(x_t | x_<t) / |mask|``.

    The mean is over all response tokens of the batch (not per sequence first), as Hugging Face causal-LM
    training with prompt labels ignored computes it (Alpaca; Safe-RLHF's SFT trainer).

    Args:
      logits: [B, T, V] next-token logits of the whole sequence (prompt and response).
      tokens: [B, T] token ids.
      loss_mask: [B, T], 1 on the tokens to predict (response tokens, the final eos included); position 0
        is never predicted, so ``loss_mask[:, 0]`` is ignored.
    Returns:
      the scalar mean negative log-likelihood per response token.
    """
    chex.assert_equal_shape([tokens, loss_mask])
    return masked_mean(-next_token_log_probs(logits, tokens), loss_mask[:, 1:])


def token_accuracy(logits: chex.Array, tokens: chex.Array, loss_mask: chex.Array) -> jax.Array:
    """Fraction of masked tokens that are the argmax of the previous position's logits (shapes as :func:`sft_loss`)."""
    chex.assert_rank([logits, tokens], [3, 2])
    chex.assert_equal_shape([tokens, loss_mask])
    hits = (jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]).astype(jnp.float32)
    return masked_mean(hits, loss_mask[:, 1:])


# --------------------------------------------------------------------------------------------------
# Direct preference optimization: the policy's own log-ratios against a frozen reference are the reward.


def sequence_log_probs(logits: chex.Array, tokens: chex.Array, loss_mask: chex.Array) -> jax.Array:
    """``log pi(y | x) = sum_{t in mask} log p(x_t | x_<t)``: each row's response log-likelihood, ``[B]``.

    Shapes as :func:`sft_loss`; the sum (not the mean) over response tokens is DPO's sequence log-probability
    (Rafailov et al. 2023), so a longer response is a product of more token probabilities.
    """
    chex.assert_equal_shape([tokens, loss_mask])
    return jnp.sum(next_token_log_probs(logits, tokens) * loss_mask[:, 1:].astype(jnp.float32), axis=1)


def dpo_loss(
    policy_chosen: chex.Array,
    policy_rejected: chex.Array,
    reference_chosen: chex.Array,
    reference_rejected: chex.Array,
    beta: float,
    margins: chex.Array | None = None,
    mask: chex.Array | None = None,
) -> jax.Array:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization"), with an optional per-pair margin:

        h_i = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
        L   = mean_i -log sigmoid(beta h_i - m_i)

    ``beta h_i`` is the difference of the implicit rewards ``beta log pi / pi_ref`` of the chosen (w) and the
    rejected (l) response; a margin ``m_i > 0`` asks for more than a win (SafeDPO's safety margin). All
    arguments ``[B]`` sequence log-probs (:func:`sequence_log_probs`); the reference ones are data (gradient
    stopped). ``-log sigmoid(z)`` is ``softplus(-z)``.
    """
    _check_pair(policy_chosen, policy_rejected, mask)
    chex.assert_equal_shape([policy_chosen, reference_chosen, reference_rejected])
    reference = jax.lax.stop_gradient(reference_chosen - reference_rejected)
    logits = beta * (policy_chosen - policy_rejected - reference)
    if margins is not None:
        chex.assert_equal_shape([policy_chosen, margins])
        logits = logits - margins
    return masked_mean(jax.nn.softplus(-logits), mask)


def safedpo_pairs(better_unsafe: chex.Array, worse_unsafe: chex.Array) -> tuple[jax.Array, jax.Array]:
    """SafeDPO's safety-aware transform T(D) of a helpfulness pair (Kim et al. 2025, "SafeDPO: A Simple
    Approach to Direct Preference Optimization with Enhanced Safety", section 3.2), per row ``[B]``:

        better safe                    -> kept:    (y_w, y_l) = (better, worse)
        better unsafe, worse safe      -> swapped: (y_w, y_l) = (worse, better)
        both unsafe                    -> dropped

    so the chosen response is always safe, and helpfulness decides only between two safe ones. Returns
    ``(swap, keep)`` boolean ``[B]``. (Under the hard constraint every unsafe response has reward -inf, so
    two unsafe responses carry no preference.)
    """
    chex.assert_equal_shape([better_unsafe, worse_unsafe])
    better_unsafe, worse_unsafe = jnp.asarray(better_unsafe, bool), jnp.asarray(worse_unsafe, bool)
    swap = better_unsafe & ~worse_unsafe
    return swap, ~(better_unsafe & worse_unsafe)


def safedpo_loss(
    policy_chosen: chex.Array,
    policy_rejected: chex.Array,
    reference_chosen: chex.Array,
    reference_rejected: chex.Array,
    chosen_unsafe: chex.Array,
    rejected_unsafe: chex.Array,
    beta: float,
    safety_margin: float,
    mask: chex.Array | None = None,
) -> jax.Array:
    """SafeDPO's objective (Kim et al. 2025, Eq. 12) on pairs already through :func:`safedpo_pairs`:

        L = mean_i -log sigmoid(beta h_i - (u_l,i - u_w,i) Delta)

    with ``h_i`` as in :func:`dpo_loss` and ``u = 1[unsafe]``: a safe chosen response over an unsafe
    rejected one must win by the margin ``Delta >= 0`` (the one hyperparameter SafeDPO adds to DPO); pairs
    of two safe responses are plain DPO. Indicators ``[B]`` of any numeric or boolean dtype.
    """
    margins = safety_margin * (jnp.asarray(rejected_unsafe, jnp.float32) - jnp.asarray(chosen_unsafe, jnp.float32))
    return dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, margins, mask)
