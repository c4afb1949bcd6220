"""BCQ-Lag: batch-constrained Q-learning with reward and cost critics and a PID Lagrange multiplier.

BCQ (Fujimoto, Meger & Precup 2019, "Off-Policy Deep Reinforcement Learning without Exploration") keeps
the policy on the data's support: a conditional VAE proposes actions like the behaviour's, and a
perturbation actor ``xi(s, a)`` may only nudge them by at most ``Phi`` per dimension. OSRL's BCQ-Lag
(Liu et al. 2023, "Datasets and Benchmarks for Offline Safe Reinforcement Learning") adds a cost critic
and a PID-controlled multiplier (Stooke, Achiam & Abbeel 2020). One update, in OSRL's order:

1. VAE: ``mean ||D(s, z) - a||^2 + beta * KL(q(z|s,a) || N(0, I))`` (:func:`vae.vae_loss`).
2. Critics, reward then cost (twin Q each): for ``N`` candidates ``a'_j = xi_targ(s', D(s', z_j))`` with
   clipped-prior latents ``z_j``, the BCQ target

       y = x + gamma * (1 - terminal) * max_j [m * min_e Q_e,targ(s', a'_j) + (1 - m) * max_e Q_e,targ(s', a'_j)]

   (``x`` the scaled reward or cost, ``m = 0.75``), and the loss ``sum_e mean (Q_e(s, a) - y)^2``.
3. Multiplier: ``Q_c_hat = mean_b min_e Q_c,e(s_b, a~_b)`` at the actor's action ``a~ = xi(s, D(s, z))``
   is the PID controller's measurement and the per-step-converted threshold
   ``kappa * (1 - gamma^T) / ((1 - gamma) T)`` its set point (:func:`constrained_rl.returns.per_step_cost_threshold`).
4. Actor: minimise ``-mean min_e Q_r,e(s, a~) + lambda * mean (min_e Q_c,e(s, a~) - threshold)``.
5. Polyak averaging (``tau``) of both critics' and the actor's targets.

See docs/algorithms/osrl_baselines.md for the equations, defaults and the differences from OSRL's code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training.train_state import TrainState

from algorithms.control import offline, osrl
from algorithms.control.osrl import PID_MULTIPLIER, OSRLConfig, check_hidden_sizes
from constrained_rl import critics, lagrangian
from constrained_rl.config import Experiment, require, require_positive_integers
from constrained_rl.data import dsrl
from constrained_rl.models import vae
from constrained_rl.models.mlp import MLP, QEnsemble


@dataclasses.dataclass(frozen=True)
class Config(OSRLConfig):
    """BCQ-Lag hyperparameters; defaults are OSRL's BCQ-L config (``bcql_configs.py``)."""

    num_updates: int = 100_000  # gradient updates (OSRL)
    vae_learning_rate: float = 1e-3  # Adam step of the VAE (OSRL)
    vae_hidden_sizes: tuple[int, ...] = (400, 400)  # encoder and decoder widths (OSRL: 400)
    max_perturbation: float = 0.05  # Phi: the actor moves a VAE action by at most this per dimension (OSRL)
    target_mix: float = 0.75  # m in m * min + (1 - m) * max over the twin targets (BCQ, OSRL)
    kl_weight: float = 0.5  # beta of the VAE's KL term (BCQ, OSRL)
    num_sampled_actions: int = 10  # VAE candidates per next state in the target (BCQ, OSRL)
    target_update_rate: float = 0.005  # Polyak tau of the critic and actor targets (OSRL)
    multiplier: lagrangian.MultiplierConfig = dataclasses.field(default_factory=lambda: PID_MULTIPLIER)  # lambda's rule

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("vae_learning_rate", "max_perturbation")
        self.require_unit_interval("target_mix", "target_update_rate")
        self.require_non_negative("kl_weight")
        require_positive_integers(self, "num_sampled_actions")
        check_hidden_sizes(self.vae_hidden_sizes, "vae_hidden_sizes")


# --------------------------------------------------------------------------------------------------
# Networks


class PerturbationActor(nn.Module):
    """BCQ's ``xi(s, a) = clip(a + Phi * tanh(f(s, a)), -1, 1)``: a bounded correction of ``a``."""

    hidden_sizes: tuple[int, ...]
    action_size: int
    max_perturbation: float

    @nn.compact
    def __call__(self, observation: jax.Array, action: jax.Array) -> jax.Array:
        raw = MLP(self.hidden_sizes, self.action_size, nn.tanh)(jnp.concatenate([observation, action], -1))
        return jnp.clip(action + self.max_perturbation * jnp.tanh(raw), -1.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Losses


def lagrangian_actor_loss(q_reward: chex.Array, q_cost: chex.Array, multiplier: chex.Array,
                          threshold: chex.Array) -> jax.Array:
    """OSRL BCQ-Lag's actor loss ``-mean_b Q_r(s_b, a~_b) + lambda * mean_b (Q_c(s_b, a~_b) - threshold)``.

    ``q_reward``, ``q_cost``: ``[B]`` (each already the min over its twin critics); ``lambda`` is held
    under ``stop_gradient``: the actor must not move the multiplier.
    """
    chex.assert_equal_shape([q_reward, q_cost])
    chex.assert_rank(q_reward, 1)
    return -jnp.mean(q_reward) + jax.lax.stop_gradient(multiplier) * jnp.mean(q_cost - threshold)


# --------------------------------------------------------------------------------------------------
# Learner


@struct.dataclass
class LearnerState:
    actor: TrainState
    critic: TrainState
    cost_critic: TrainState
    vae: TrainState
    target_actor: Any
    target_critic: Any
    target_cost_critic: Any
    multiplier: Any  # the cost multiplier's rule state (a PIDState by default)
    cost_threshold: jax.Array  # per-step-converted threshold compared with Q_c, in scaled cost units


class Networks(NamedTuple):
    actor: PerturbationActor
    critic: QEnsemble  # the architecture of both the reward and the cost twin critics
    vae: vae.ConditionalVAE
    latent_size: int


def make_networks(config: Config, problem: offline.Problem) -> Networks:
    latent_size = 2 * problem.action_size  # BCQ / OSRL
    return Networks(
        actor=PerturbationActor(config.actor_hidden_sizes, problem.action_size, config.max_perturbation),
        critic=QEnsemble(config.critic_hidden_sizes, ensemble_size=2),
        vae=vae.ConditionalVAE(config.vae_hidden_sizes, problem.action_size, latent_size),
        latent_size=latent_size,
    )


def decode_candidates(networks: Networks, vae_params: Any, observations: jax.Array, key: jax.Array) -> jax.Array:
    """VAE actions ``D(s, z)`` with latents from BCQ's clipped prior, one per row of ``observations``."""
    latents = vae.clipped_prior_latents(key, observations.shape[:-1] + (networks.latent_size,))
    return networks.vae.apply({"params": vae_params}, observations, latents, method=vae.ConditionalVAE.decode)


def make_algorithm(config: Config, problem: offline.Problem) -> offline.Algorithm:
    networks = make_networks(config, problem)
    rule = lagrangian.make_rule(config.multiplier)

    def act(actor_params: Any, vae_params: Any, observations: jax.Array, key: jax.Array) -> jax.Array:
        candidates = decode_candidates(networks, vae_params, observations, key)
        return networks.actor.apply({"params": actor_params}, observations, candidates)

    optimizers = osrl.make_optimizers(config)

    def init(key: jax.Array, cost_limit: jax.Array) -> LearnerState:
        trained = osrl.init_train_states(networks.actor, networks.critic, networks.vae, problem, key, optimizers,
                                           actor_takes_action=True)
        return LearnerState(
            **trained._asdict(),
            target_actor=trained.actor.params,
            target_critic=trained.critic.params,
            target_cost_critic=trained.cost_critic.params,
            multiplier=rule.init(),
            cost_threshold=offline.cost_threshold(config, problem, cost_limit),
        )

    def update(state: LearnerState, batch: dsrl.TransitionBatch, key: jax.Array):
        batch = batch.scaled(config.reward_scale, config.cost_scale)  # what every loss below sees
        vae_key, next_key, actor_key = jax.random.split(key, 3)
        vae_state, vae_loss_value = osrl.vae_step(networks.vae, state.vae, batch, config.kl_weight, vae_key)

        # N candidate next actions per next state, perturbed by the target actor (BCQ's target policy).
        repeated = jnp.repeat(batch.next_observations[:, None], config.num_sampled_actions, axis=1)
        next_candidates = act(state.target_actor, vae_state.params, repeated, next_key)
        critic, critic_loss, cost_critic, cost_critic_loss = osrl.reward_and_cost_critic_steps(
            networks.critic, state, batch, repeated, next_candidates, config)

        def q_values(actor_params):
            actions = act(actor_params, vae_state.params, batch.observations, actor_key)
            return (osrl.twin_min_q(networks.critic, critic.params, batch.observations, actions),
                    osrl.twin_min_q(networks.critic, cost_critic.params, batch.observations, actions))

        # The controller measures Q_c at the actor's current action, then the actor steps against it.
        cost_estimate = jnp.mean(q_values(state.actor.params)[1])
        multiplier_state = rule.update(state.multiplier, cost_estimate, state.cost_threshold)
        lam = lagrangian.multiplier(multiplier_state)

        def actor_loss_fn(params):
            return lagrangian_actor_loss(*q_values(params), lam, state.cost_threshold)

        actor_loss, grads = jax.value_and_grad(actor_loss_fn)(state.actor.params)
        actor = state.actor.apply_gradients(grads=grads)

        tau = config.target_update_rate
        new_state = LearnerState(
            actor=actor, critic=critic, cost_critic=cost_critic, vae=vae_state,
            target_actor=critics.polyak_update(state.target_actor, actor.params, tau),
            target_critic=critics.polyak_update(state.target_critic, critic.params, tau),
            target_cost_critic=critics.polyak_update(state.target_cost_critic, cost_critic.params, tau),
            multiplier=multiplier_state, cost_threshold=state.cost_threshold,
        )
        metrics = {
            "vae_loss": vae_loss_value, "critic_loss": critic_loss, "cost_critic_loss": cost_critic_loss,
            "actor_loss": actor_loss, "multiplier": lam, "cost_value": cost_estimate,
            "cost_threshold": state.cost_threshold,
        }
        return new_state, metrics

    def policy(state: LearnerState, observations: jax.Array, key: jax.Array):
        """OSRL's evaluation action: one clipped-prior VAE sample, perturbed by the actor."""
        return act(state.actor.params, state.vae.params, observations, key), {}

    return offline.Algorithm(init, (offline.Phase("train", update, config.num_updates),), policy,
                             policy_fields=("actor.params", "vae.params"))


def run(config: Config, ctx) -> dict:
    return offline.run(config, ctx, make_algorithm)


BCQ_LAG = Experiment(Config, run)
