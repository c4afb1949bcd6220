"""PPO-Lagrangian losses: the actor advantage, the clipped surrogate, two value losses and entropy.

Ray, Achiam & Amodei 2019 ("Benchmarking Safe Exploration in Deep Reinforcement Learning") solve
``max_pi J_r(pi) s.t. J_c(pi) <= d`` with PPO on the Lagrangian ``J_r - lambda * J_c``. The actor sees
one advantage that mixes the reward and cost streams; both critics regress their own GAE targets. The
multiplier is data here (updated once per rollout by a rule of ``constrained_rl.lagrangian``).

Advantage normalisation (the choice this module makes, after Ray et al.'s safety-starter-agents and
OmniSafe): over the whole rollout, the reward advantage is standardised (zero mean, unit std) and the
cost advantage is only centred, then the two are combined as Safe-RLHF's
``(A_r - lambda * A_c) / (1 + lambda)`` (Dai et al. 2023). Centring without scaling keeps the cost
advantage in cost units, so lambda keeps its meaning of "reward per unit cost" and one episode with a
single costly step is not blown up to unit variance; centring removes the baseline shift the cost
critic lags behind with. Normalising per rollout (not per minibatch, as PureJaxRL does) gives every
minibatch of an update the same advantage scale, which the multiplier's trade-off relies on.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from algorithms.control.ppo_lag.networks import PPOLagNetworks, PPOLagParams, tanh_gaussian_log_prob_of_pre_squash
from constrained_rl import distributions, lagrangian, objectives


class LossHyperparameters(NamedTuple):
    clip_epsilon: float  # PPO ratio clip range
    value_clip: float | None  # PPO2 value clipping range, None for plain regression
    value_coef: float  # weight of the (reward + cost) value losses
    entropy_coef: float  # weight of the entropy bonus


class UpdateBatch(NamedTuple):
    """A flat batch of rollout samples, every leaf with the sample axis first ([B, ...])."""

    observation: jax.Array  # [B, obs]
    pre_squash: jax.Array  # [B, act] Gaussian sample u, the action was tanh(u)
    log_prob: jax.Array  # [B] log pi_old(a | s)
    advantage: jax.Array  # [B] actor advantage (normalised, combined)
    reward_value: jax.Array  # [B] V_r(s) at collection time
    cost_value: jax.Array  # [B] V_c(s) at collection time
    reward_target: jax.Array  # [B] GAE target for V_r
    cost_target: jax.Array  # [B] GAE target for V_c


def actor_advantage(
    reward_advantage: jax.Array, cost_advantage: jax.Array, multiplier: jax.Array, eps: float = 1e-8
) -> jax.Array:
    """``(z(A_r) - lambda * (A_c - mean A_c)) / (1 + lambda)`` over all elements of the rollout.

    ``z(x) = (x - mean x) / (std x + eps)``. Any equal shapes; statistics over every element.
    """
    standardised_reward = (reward_advantage - jnp.mean(reward_advantage)) / (jnp.std(reward_advantage) + eps)
    centred_cost = cost_advantage - jnp.mean(cost_advantage)
    return lagrangian.combined_advantage(standardised_reward, centred_cost, multiplier)


def ppo_lag_loss(
    params: PPOLagParams,
    networks: PPOLagNetworks,
    batch: UpdateBatch,
    key: jax.Array,
    hp: LossHyperparameters,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss ``L_clip + c_v * (L_Vr + L_Vc) - c_H * H`` on one minibatch, and diagnostics.

    ``L_clip`` is PPO's clipped surrogate (Schulman et al. 2017) on the actor advantage; ``L_Vr`` and
    ``L_Vc`` the (optionally clipped) squared errors of the two critics; ``H`` a one-sample estimate of
    the tanh-Gaussian entropy (as Brax's tanh-normal PPO). The ratio is evaluated at the stored
    pre-squash sample, so no ``atanh`` is taken of a saturated action.
    """
    mean, log_std = networks.actor.apply(params.actor, batch.observation)
    log_prob = tanh_gaussian_log_prob_of_pre_squash(mean, log_std, batch.pre_squash)
    policy_loss = objectives.ppo_clipped_surrogate(log_prob, batch.log_prob, batch.advantage, hp.clip_epsilon)
    entropy = jnp.mean(distributions.tanh_gaussian_entropy(key, mean, log_std))

    reward_values = networks.reward_critic.apply(params.reward_critic, batch.observation)
    cost_values = networks.cost_critic.apply(params.cost_critic, batch.observation)
    reward_value_loss = objectives.clipped_value_loss(
        reward_values, batch.reward_value, batch.reward_target, hp.value_clip)
    cost_value_loss = objectives.clipped_value_loss(
        cost_values, batch.cost_value, batch.cost_target, hp.value_clip)

    total = (policy_loss + hp.value_coef * (reward_value_loss + cost_value_loss)
             - hp.entropy_coef * entropy)
    ratio = jnp.exp(log_prob - batch.log_prob)
    metrics = {
        "policy_loss": policy_loss,
        "reward_value_loss": reward_value_loss,
        "cost_value_loss": cost_value_loss,
        "entropy": entropy,
        "approx_kl": objectives.approx_kl(log_prob, batch.log_prob),
        "clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > hp.clip_epsilon).astype(jnp.float32)),
    }
    return total, metrics
