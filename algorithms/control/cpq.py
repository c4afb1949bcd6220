"""CPQ: Constraints Penalized Q-learning (Xu, Zhang & Li 2022, "Constraints Penalized Q-learning for
Safe Offline Reinforcement Learning", AAAI), as in OSRL (Liu et al. 2023).

CPQ makes the cost critic pessimistic where the data says nothing, then treats every action whose cost
value exceeds the threshold as unusable. One update, in OSRL's order:

1. VAE on ``(s, a)`` (BCQ's, :mod:`constrained_rl.models.vae`). It flags out-of-distribution (OOD)
   actions: of ``N`` actions sampled from the policy's Gaussian at each state *before* the tanh (OSRL's
   ``pi_dist.sample``, so they may leave ``[-1, 1]``), those whose encoder KL ``KL(q(z|s,a) || N(0, I))``
   is at or above the batch's 75% quantile.
2. Reward critic (twin Q) with the constraints-penalized backup: the next value counts only where the
   next action is judged safe,

       y_r = r + gamma (1 - terminal) 1[min_e Q_c,targ(s', a') <= l] min_e Q_r,targ(s', a'),  a' ~ pi(s').

3. Cost critic (twin Q): TD to ``y_c = c + gamma (1 - d) min_e Q_c,targ(s', a')`` minus the
   conservative term ``alpha * (E_{s, a~nu}[Q_c(s, a)] - l_c)``. With ``conservative_term = "paper"``
   it is differentiated through the online critic and pushes ``Q_c`` *up* on the OOD actions ``nu``;
   by default (``"osrl"``) it is OSRL's: ``mean(mask * min_e Q_c,targ)`` over all sampled pairs, a
   constant of the target critic, so the cost critic fits its TD target alone and alpha only tracks it. ``alpha`` is a Lagrange multiplier in log space, OSRL's: after the step,
   ``log alpha <- clip(log alpha + lr * alpha * (l_c - E_nu[Q_c]), -5, 5)`` with ``E_nu[Q_c]`` measured
   before the step, from log alpha 0, so it grows while OOD actions still look cheaper than
   ``l_c = 1.5 l``.
4. Actor (tanh-Gaussian): maximise ``mean 1[min_e Q_c(s, a) <= l] min_e Q_r(s, a)``, ``a ~ pi(s)``.
5. Polyak averaging of both critics' targets.

``l`` is the per-step-converted threshold ``kappa (1 - gamma^T) / ((1 - gamma) T)``; ``d`` is the
terminal flag (a timeout bootstraps; OSRL's ``done`` includes timeouts). See
docs/algorithms/osrl_baselines.md for the equations, defaults and the differences from OSRL's code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import struct
from flax.training.train_state import TrainState

from algorithms.control import offline, osrl
from algorithms.control.osrl import (OSRLConfig, check_hidden_sizes, init_train_states, make_optimizers,
                               twin_min_q, vae_step)
from constrained_rl import critics, distributions, lagrangian
from constrained_rl.config import Experiment, require, require_positive_integers
from constrained_rl.data import dsrl
from constrained_rl.models import vae
from constrained_rl.models import mlp
from constrained_rl.models.mlp import GaussianActor, QEnsemble

# CPQ's alpha (OSRL HEAD, cpq.py): log alpha from 0, += alpha_lr * alpha * (qc_thres - qc_ood), clamped to
# [-5, 5], alpha_lr 1e-4 (cpq_configs.py): log_ascent fed (-E_nu[Q_c], -l_c). --alpha.kind fixed holds it at
# alpha.init (the paper's fixed-weight form).
ALPHA = osrl.log_alpha_multiplier(learning_rate=1e-4)
ConservativeTerm = Literal["osrl", "paper"]


@dataclasses.dataclass(frozen=True)
class Config(OSRLConfig):
    """CPQ hyperparameters; defaults are OSRL's CPQ config (``cpq_configs.py``)."""

    num_updates: int = 100_000  # gradient updates (OSRL)
    actor_learning_rate: float = 1e-4  # Adam step of the actor (OSRL)
    vae_learning_rate: float = 1e-3  # Adam step of the VAE (OSRL)
    alpha: lagrangian.MultiplierConfig = dataclasses.field(default_factory=lambda: ALPHA)  # alpha's rule
    vae_hidden_sizes: tuple[int, ...] = (400, 400)  # encoder and decoder widths (OSRL: 400)
    kl_weight: float = 0.5  # beta of the VAE's KL term (OSRL config)
    num_sampled_actions: int = 10  # policy actions per state scored for being OOD (OSRL)
    ood_quantile: float = 0.75  # actions with encoder KL at or above this batch quantile are OOD (OSRL)
    cost_threshold_scale: float = 1.5  # l_c = this * l, the level the OOD cost values are pushed to (OSRL qc_scalar)
    conservative_term: ConservativeTerm = "osrl"  # osrl: E_nu[Q_c] of the target critic, a constant in the loss; paper: online, differentiated
    target_update_rate: float = 0.005  # Polyak tau of the critic targets (OSRL)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("vae_learning_rate")
        self.require_non_negative("kl_weight", "cost_threshold_scale")
        self.require_unit_interval("ood_quantile", "target_update_rate")
        require_positive_integers(self, "num_sampled_actions")
        check_hidden_sizes(self.vae_hidden_sizes, "vae_hidden_sizes")
        require(self.conservative_term in ("osrl", "paper"), "conservative_term",
                f"must be osrl or paper (got {self.conservative_term!r})")


# --------------------------------------------------------------------------------------------------
# Losses


def safe_mask(q_cost: chex.Array, threshold: chex.Array) -> jax.Array:
    """``1[Q_c <= l]`` as float32: where CPQ trusts an action to be safe (any shape)."""
    return (q_cost <= threshold).astype(jnp.float32)


def constraints_penalized_target(rewards: chex.Array, discounts: chex.Array, next_q_reward: chex.Array,
                                 next_q_cost: chex.Array, threshold: chex.Array) -> jax.Array:
    """CPQ's reward backup ``r + discount * 1[Q_c(s', a') <= l] * Q_r(s', a')``, all ``[B]``.

    The next state's value is cut to 0 where the next action is judged unsafe, so unsafe
    continuations cannot make a transition look good (Xu et al. 2022, eq. 9). Gradient stopped.
    """
    chex.assert_equal_shape([next_q_reward, next_q_cost])
    return critics.bellman_target(rewards, discounts, safe_mask(next_q_cost, threshold) * next_q_reward)


def ood_mask(kl: chex.Array, quantile: float | jax.Array) -> jax.Array:
    """``1[KL >= quantile_q(KL)]`` over all entries of ``kl`` (OSRL's VAE-based OOD test), float32."""
    return (kl >= jnp.quantile(kl, quantile)).astype(jnp.float32)


def ood_cost_value(q_cost: chex.Array, mask: chex.Array) -> jax.Array:
    """``E_{(s, a) ~ nu}[Q_c(s, a)]``: the mean of ``q_cost`` over the entries ``mask`` flags, and over
    any leading ensemble axis of ``q_cost`` (``[E, ...]`` against a mask of shape ``[...]``).

    The mean over the flagged entries only (Xu et al. 2022's expectation under the OOD distribution
    ``nu``); 0 when nothing is flagged.
    """
    chex.assert_rank(q_cost, mask.ndim + 1)
    total = jnp.sum(q_cost * mask, axis=tuple(range(1, q_cost.ndim)))
    return jnp.mean(total) / jnp.maximum(jnp.sum(mask), 1.0)


def osrl_ood_cost_value(q_cost_min: chex.Array, mask: chex.Array) -> jax.Array:
    """OSRL's ``qc_ood.mean()``: ``mean(mask * Q_c)`` over all ``[N, B]`` entries, unflagged ones
    counting 0, of the twin minimum ``Q_c`` of the *target* cost critic (``cost_critic_old.predict``).
    Computed under ``no_grad`` there, so it enters the cost critic's loss as a constant."""
    chex.assert_equal_shape([q_cost_min, mask])
    return jnp.mean(mask * q_cost_min)


def conservative_cost_loss(q_cost: chex.Array, target: chex.Array, ood_value: chex.Array,
                           alpha: chex.Array, ood_threshold: chex.Array) -> jax.Array:
    """CPQ's cost-critic loss ``sum_e mean (Q_c,e(s, a) - y_c)^2 - alpha * (E_nu[Q_c] - l_c)``.

    ``q_cost`` ``[E, B]`` at the data; ``ood_value`` the differentiable :func:`ood_cost_value`;
    ``alpha`` (held under ``stop_gradient``) weighs how hard OOD cost values are pushed up.
    """
    conservative = jax.lax.stop_gradient(alpha) * (ood_value - ood_threshold)
    return critics.ensemble_td_loss(q_cost, target) - conservative


def safe_actor_loss(q_reward: chex.Array, q_cost: chex.Array, threshold: chex.Array) -> jax.Array:
    """CPQ's actor loss ``-mean_b 1[Q_c(s_b, a_b) <= l] Q_r(s_b, a_b)``, ``[B]`` inputs, ``a ~ pi``.

    Where the action looks unsafe the reward value drops out: the actor is penalised by losing it.
    """
    chex.assert_equal_shape([q_reward, q_cost])
    return -jnp.mean(safe_mask(q_cost, threshold) * q_reward)


# --------------------------------------------------------------------------------------------------
# Learner


@struct.dataclass
class LearnerState:
    actor: TrainState
    critic: TrainState
    cost_critic: TrainState
    vae: TrainState
    target_critic: Any
    target_cost_critic: Any
    alpha: Any  # alpha's rule state (a ProjectedState by default)
    cost_threshold: jax.Array  # l, in scaled cost units


class Networks(NamedTuple):
    actor: GaussianActor
    critic: QEnsemble  # the architecture of both the reward and the cost twin critics
    vae: vae.ConditionalVAE


def make_networks(config: Config, problem: offline.Problem) -> Networks:
    return Networks(
        # OSRL's SquashedGaussianMLPActor clips log-std to [-20, 2].
        actor=GaussianActor(config.actor_hidden_sizes, problem.action_size, log_std_min=-20.0, log_std_max=2.0),
        critic=QEnsemble(config.critic_hidden_sizes, ensemble_size=2),
        vae=vae.ConditionalVAE(config.vae_hidden_sizes, problem.action_size, 2 * problem.action_size),
    )


def make_algorithm(config: Config, problem: offline.Problem) -> offline.Algorithm:
    networks = make_networks(config, problem)
    alpha_rule = lagrangian.make_rule(config.alpha)

    def sample_actions(actor_params: Any, observations: jax.Array, key: jax.Array) -> jax.Array:
        mean, log_std = networks.actor.apply({"params": actor_params}, observations)
        return distributions.tanh_gaussian_sample_and_log_prob(key, mean, log_std)[0]

    def min_q(params: Any, observations: jax.Array, actions: jax.Array) -> jax.Array:
        return twin_min_q(networks.critic, params, observations, actions)

    optimizers = make_optimizers(config)

    def init(key: jax.Array, cost_limit: jax.Array) -> LearnerState:
        trained = init_train_states(networks.actor, networks.critic, networks.vae, problem, key, optimizers)
        return LearnerState(
            **trained._asdict(),
            target_critic=trained.critic.params,
            target_cost_critic=trained.cost_critic.params,
            alpha=alpha_rule.init(),
            cost_threshold=offline.cost_threshold(config, problem, cost_limit),
        )

    def ood_batch(state: LearnerState, vae_params: Any, observations: jax.Array, key: jax.Array):
        """``N`` pre-tanh policy samples per state ``[N, B, A]`` (OSRL's ``pi_dist.sample``), the states
        tiled alike, and their OOD mask."""
        tiled = jnp.broadcast_to(observations, (config.num_sampled_actions,) + observations.shape)
        actions = jax.lax.stop_gradient(osrl.sample_pre_squash(networks.actor, state.actor.params, tiled, key))
        mean, log_std = networks.vae.apply({"params": vae_params}, tiled, actions, method=vae.ConditionalVAE.encode)
        return tiled, actions, ood_mask(vae.kl_to_standard_normal(mean, log_std), config.ood_quantile)

    def update(state: LearnerState, batch: dsrl.TransitionBatch, key: jax.Array):
        batch = batch.scaled(config.reward_scale, config.cost_scale)  # what every loss below sees
        vae_key, next_key, ood_key, actor_key = jax.random.split(key, 4)
        vae_state, vae_loss_value = vae_step(networks.vae, state.vae, batch, config.kl_weight, vae_key)
        discounts = batch.discounts(config.discount)
        threshold = state.cost_threshold
        ood_threshold = config.cost_threshold_scale * threshold

        # Reward critic: the constraints-penalized backup.
        next_actions = sample_actions(state.actor.params, batch.next_observations, next_key)
        next_q_cost = min_q(state.target_cost_critic, batch.next_observations, next_actions)
        reward_target = constraints_penalized_target(
            batch.rewards, discounts,
            min_q(state.target_critic, batch.next_observations, next_actions), next_q_cost, threshold)

        def critic_loss_fn(params):
            q_reward = networks.critic.apply({"params": params}, batch.observations, batch.actions)
            return critics.ensemble_td_loss(q_reward, reward_target)

        critic_loss, grads = jax.value_and_grad(critic_loss_fn)(state.critic.params)
        critic = state.critic.apply_gradients(grads=grads)

        # Cost critic: TD plus the alpha-weighted push upwards on OOD actions.
        cost_target = critics.bellman_target(batch.costs, discounts, next_q_cost)
        tiled_obs, ood_actions, mask = ood_batch(state, vae_state.params, batch.observations, ood_key)

        def ood_value_of(params):
            q = networks.critic.apply({"params": params}, tiled_obs, ood_actions)
            if config.conservative_term == "osrl":
                # OSRL reads the target critic under no_grad: a constant term that never moves the critic.
                return jax.lax.stop_gradient(osrl_ood_cost_value(critics.double_q_min(q), mask))
            return ood_cost_value(q, mask)

        # This step's loss weighs the current alpha; alpha then ascends on l_c - E_nu[Q_c], measured
        # before the step (OSRL's order).
        ood_params = state.target_cost_critic if config.conservative_term == "osrl" else state.cost_critic.params
        ood_before = ood_value_of(ood_params)
        alpha = lagrangian.multiplier(state.alpha)

        def cost_loss_fn(params):
            q_cost = networks.critic.apply({"params": params}, batch.observations, batch.actions)
            ood_value = ood_before if config.conservative_term == "osrl" else ood_value_of(params)
            return conservative_cost_loss(q_cost, cost_target, ood_value, alpha, ood_threshold)

        cost_loss, grads = jax.value_and_grad(cost_loss_fn)(state.cost_critic.params)
        cost_critic = state.cost_critic.apply_gradients(grads=grads)
        alpha_state = alpha_rule.update(state.alpha, -ood_before, -ood_threshold)

        def actor_loss_fn(params):
            actions = sample_actions(params, batch.observations, actor_key)
            return safe_actor_loss(min_q(critic.params, batch.observations, actions),
                                   min_q(cost_critic.params, batch.observations, actions), threshold)

        actor_loss, grads = jax.value_and_grad(actor_loss_fn)(state.actor.params)
        actor = state.actor.apply_gradients(grads=grads)

        tau = config.target_update_rate
        new_state = LearnerState(
            actor=actor, critic=critic, cost_critic=cost_critic, vae=vae_state,
            target_critic=critics.polyak_update(state.target_critic, critic.params, tau),
            target_cost_critic=critics.polyak_update(state.target_cost_critic, cost_critic.params, tau),
            alpha=alpha_state, cost_threshold=threshold,
        )
        metrics = {
            "vae_loss": vae_loss_value, "critic_loss": critic_loss, "cost_critic_loss": cost_loss,
            "actor_loss": actor_loss, "alpha": alpha, "ood_cost_value": ood_before,
            "safe_fraction": jnp.mean(safe_mask(next_q_cost, threshold)), "cost_threshold": threshold,
        }
        return new_state, metrics

    # Evaluation acts with tanh(mean), deterministically, as OSRL.
    policy = mlp.mode_policy(networks.actor, lambda state: {"params": state.actor.params})

    return offline.Algorithm(init, (offline.Phase("train", update, config.num_updates),), policy,
                             policy_fields=("actor.params",))


def run(config: Config, ctx) -> dict:
    return offline.run(config, ctx, make_algorithm)


CPQ = Experiment(Config, run)
