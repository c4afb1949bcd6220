"""BEAR-Lag: bootstrapping error accumulation reduction with a cost critic and a PID Lagrange multiplier.

BEAR (Kumar, Fu, Tucker & Levine 2019, "Stabilizing Off-Policy Q-Learning via Bootstrapping Error
Reduction") keeps the policy on the *support* of the data rather than close to its density: the maximum
mean discrepancy (MMD) between the policy's actions and samples of a behaviour model (BCQ's conditional
VAE) must stay below a small ``epsilon``, enforced by a Lagrange multiplier ``alpha``. OSRL's BEAR-Lag
(Liu et al. 2023, "Datasets and Benchmarks for Offline Safe Reinforcement Learning") adds a cost critic
and a PID-controlled cost multiplier ``lambda`` (Stooke, Achiam & Abbeel 2020). One update, in OSRL's
order:

1. VAE: BCQ's ``mean ||D(s, z) - a||^2 + beta * KL`` (:func:`vae.vae_loss`).
2. Critics, reward then cost (twin Q each), on BCQ's soft clipped double-Q target over ``N`` actions
   ``a'_j ~ pi_targ(s')`` sampled from the *target* policy (:func:`osrl.candidate_critic_step`).
3. Actor (tanh-Gaussian), with ``M`` samples of the policy and of the VAE per state, compared before the
   tanh (``u = atanh(a)``, as BEAR's code does):

       L_pi = mean_b [ -w min_e Q_r,e(s_b, a_b) + alpha (MMD_b - epsilon) ] + lambda mean_b (min_e Q_c,e(s_b, a_b) - l)

   with ``a_b`` the first policy sample, ``w = 0`` for the first ``policy_start_update`` updates (BEAR's
   support-matching warm-up) and 1 after; ``lambda`` is the PID controller's output measured on
   ``mean_b min_e Q_c,e(s_b, a_b)`` against the per-step threshold ``l`` before the step.
4. ``log alpha <- clip(log alpha + lr_alpha * alpha * (mean_b MMD_b - epsilon), -5, 5)``: alpha grows
   while the policy leaves the data's support (:func:`lagrangian.log_space_ascent`).
5. Polyak averaging (``tau``) of both critics' and the actor's targets.

See docs/algorithms/osrl_baselines.md for the equations, defaults and the differences from OSRL's code.
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
from algorithms.control.osrl import (PID_MULTIPLIER, OSRLConfig, check_hidden_sizes, init_train_states,
                                make_optimizers, reward_and_cost_critic_steps, twin_min_q, vae_step)
from constrained_rl import critics, lagrangian
from constrained_rl.config import Experiment, require, require_positive_integers
from constrained_rl.data import dsrl
from constrained_rl.models import vae
from constrained_rl.models import mlp
from constrained_rl.models.mlp import GaussianActor, QEnsemble

Kernel = Literal["gaussian", "laplacian"]
# The MMD multiplier alpha: ascent on log alpha by lr * alpha * (mean MMD - epsilon), clipped to [-5, 5] (BEAR),
# with OSRL's trainer default step 1e-3 and log alpha starting at 0.
ALPHA = osrl.log_alpha_multiplier(learning_rate=1e-3)


@dataclasses.dataclass(frozen=True)
class Config(OSRLConfig):
    """BEAR-Lag hyperparameters; defaults are OSRL's BEAR-L config (``bearl_configs.py``)."""

    num_updates: int = 300_000  # gradient updates (OSRL)
    vae_learning_rate: float = 1e-3  # Adam step of the VAE (OSRL)
    vae_hidden_sizes: tuple[int, ...] = (400, 400)  # encoder and decoder widths (OSRL: 400)
    kl_weight: float = 0.5  # beta of the VAE's KL term (OSRL)
    target_mix: float = 0.75  # m in m * min + (1 - m) * max over the twin targets (BEAR, OSRL lmbda)
    num_sampled_actions: int = 10  # target-policy actions per next state in the critics' target (OSRL)
    num_mmd_samples: int = 10  # policy and VAE samples per state in the MMD (OSRL num_samples_mmd_match)
    mmd_kernel: Kernel = "gaussian"  # gaussian or laplacian (OSRL: gaussian)
    mmd_sigma: float = 50.0  # kernel width sigma (OSRL)
    mmd_threshold: float = 0.05  # epsilon: the support constraint MMD <= epsilon (OSRL target_mmd_thresh)
    alpha: lagrangian.MultiplierConfig = dataclasses.field(default_factory=lambda: ALPHA)  # the MMD multiplier's rule
    policy_start_update: int = 0  # updates during which the actor only matches the support (OSRL: 0)
    target_update_rate: float = 0.005  # Polyak tau of the critic and actor targets (OSRL)
    multiplier: lagrangian.MultiplierConfig = dataclasses.field(default_factory=lambda: PID_MULTIPLIER)  # lambda's rule

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("vae_learning_rate", "mmd_sigma")
        self.require_non_negative("kl_weight", "mmd_threshold")
        self.require_unit_interval("target_mix", "target_update_rate")
        require(self.mmd_kernel in ("gaussian", "laplacian"), "mmd_kernel",
                f"must be gaussian or laplacian (got {self.mmd_kernel!r})")
        require(self.policy_start_update >= 0, "policy_start_update", f"must be >= 0 (got {self.policy_start_update})")
        require_positive_integers(self, "num_sampled_actions", "num_mmd_samples")
        check_hidden_sizes(self.vae_hidden_sizes, "vae_hidden_sizes")


# --------------------------------------------------------------------------------------------------
# Losses


def mmd(samples_x: chex.Array, samples_y: chex.Array, sigma: float, kernel: Kernel = "gaussian") -> jax.Array:
    """The maximum mean discrepancy between two sample sets per state, ``[B, N, A], [B, M, A] -> [B]``:

        MMD_b = sqrt( E k(x, x') + E k(y, y') - 2 E k(x, y) + 1e-6 )

    each expectation the mean over all pairs of the state's samples (self-pairs included), with BEAR's
    kernels ``k(x, y) = exp(-||x - y||_2^2 / (2 sigma))`` (gaussian) or ``exp(-||x - y||_1 / (2 sigma))``
    (laplacian). Note ``sigma``, not ``sigma^2``: the width convention of BEAR's code and OSRL's. The
    ``1e-6`` keeps the square root differentiable when the two sets coincide.
    """
    chex.assert_rank([samples_x, samples_y], 3)

    def mean_kernel(a: jax.Array, b: jax.Array) -> jax.Array:
        difference = a[:, :, None, :] - b[:, None, :, :]  # [B, N, M, A]
        if kernel == "gaussian":
            distance = jnp.sum(jnp.square(difference), axis=-1)
        else:
            distance = jnp.sum(jnp.abs(difference), axis=-1)
        return jnp.mean(jnp.exp(-distance / (2.0 * sigma)), axis=(1, 2))

    squared = (mean_kernel(samples_x, samples_x) + mean_kernel(samples_y, samples_y)
               - 2.0 * mean_kernel(samples_x, samples_y))
    return jnp.sqrt(squared + 1e-6)


def bear_actor_loss(q_reward: chex.Array, q_cost: chex.Array, mmd_values: chex.Array, alpha: chex.Array,
                    multiplier: chex.Array, threshold: chex.Array, mmd_threshold: float,
                    reward_weight: chex.Array | float = 1.0) -> jax.Array:
    """BEAR-Lag's actor loss, all inputs ``[B]`` (each Q already the twin minimum):

        mean_b [ -w Q_r(s_b, a_b) + alpha (MMD_b - epsilon) ] + lambda mean_b (Q_c(s_b, a_b) - l)

    ``alpha`` and ``lambda`` are held under ``stop_gradient``: each is moved by its own rule.
    """
    chex.assert_equal_shape([q_reward, q_cost, mmd_values])
    chex.assert_rank(q_reward, 1)
    alpha, multiplier = jax.lax.stop_gradient(alpha), jax.lax.stop_gradient(multiplier)
    support = jnp.mean(-reward_weight * q_reward + alpha * (mmd_values - mmd_threshold))
    return support + multiplier * jnp.mean(q_cost - threshold)


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
    alpha: Any  # the MMD multiplier's rule state (a LogSpaceState by default)
    multiplier: Any  # the cost multiplier's rule state (a PIDState by default)
    cost_threshold: jax.Array  # per-step-converted threshold compared with Q_c, in scaled cost units


class Networks(NamedTuple):
    actor: GaussianActor
    critic: QEnsemble  # the architecture of both the reward and the cost twin critics
    vae: vae.ConditionalVAE
    latent_size: int


def make_networks(config: Config, problem: offline.Problem) -> Networks:
    latent_size = 2 * problem.action_size  # BEAR / OSRL
    return Networks(
        # OSRL's squashed Gaussian clips log-std to [-20, 2].
        actor=GaussianActor(config.actor_hidden_sizes, problem.action_size, log_std_min=-20.0, log_std_max=2.0),
        critic=QEnsemble(config.critic_hidden_sizes, ensemble_size=2),
        vae=vae.ConditionalVAE(config.vae_hidden_sizes, problem.action_size, latent_size),
        latent_size=latent_size,
    )


def make_algorithm(config: Config, problem: offline.Problem) -> offline.Algorithm:
    networks = make_networks(config, problem)
    cost_rule, alpha_rule = lagrangian.make_rule(config.multiplier), lagrangian.make_rule(config.alpha)

    def sample_pre_squash(actor_params: Any, observations: jax.Array, key: jax.Array) -> jax.Array:
        return osrl.sample_pre_squash(networks.actor, actor_params, observations, key)

    optimizers = make_optimizers(config)

    def init(key: jax.Array, cost_limit: jax.Array) -> LearnerState:
        trained = init_train_states(networks.actor, networks.critic, networks.vae, problem, key, optimizers)
        return LearnerState(
            **trained._asdict(),
            target_actor=trained.actor.params,
            target_critic=trained.critic.params,
            target_cost_critic=trained.cost_critic.params,
            alpha=alpha_rule.init(),
            multiplier=cost_rule.init(),
            cost_threshold=offline.cost_threshold(config, problem, cost_limit),
        )

    def update(state: LearnerState, batch: dsrl.TransitionBatch, key: jax.Array):
        batch = batch.scaled(config.reward_scale, config.cost_scale)  # what every loss below sees
        vae_key, next_key, latent_key, actor_key = jax.random.split(key, 4)
        vae_state, vae_loss_value = vae_step(networks.vae, state.vae, batch, config.kl_weight, vae_key)

        # N target-policy actions per next state: the critics' soft clipped double-Q target.
        repeated = jnp.repeat(batch.next_observations[:, None], config.num_sampled_actions, axis=1)
        next_actions = jnp.tanh(sample_pre_squash(state.target_actor, repeated, next_key))
        critic, critic_loss, cost_critic, cost_critic_loss = reward_and_cost_critic_steps(
            networks.critic, state, batch, repeated, next_actions, config)

        # M samples per state of the behaviour model and of the policy, compared before the tanh.
        tiled = jnp.repeat(batch.observations[:, None], config.num_mmd_samples, axis=1)  # [B, M, S]
        latents = vae.clipped_prior_latents(latent_key, tiled.shape[:-1] + (networks.latent_size,))
        data_samples = networks.vae.apply({"params": vae_state.params}, tiled, latents,
                                          method=vae.ConditionalVAE.decode_pre_squash)

        alpha = lagrangian.multiplier(state.alpha)
        # The actor steps once per update, so its step counter counts the updates done.
        reward_weight = (state.actor.step >= config.policy_start_update).astype(jnp.float32)

        def actor_loss_fn(params):
            policy_samples = sample_pre_squash(params, tiled, actor_key)  # [B, M, A]
            mmd_values = mmd(data_samples, policy_samples, config.mmd_sigma, config.mmd_kernel)
            actions = jnp.tanh(policy_samples[:, 0])
            q_reward = twin_min_q(networks.critic, critic.params, batch.observations, actions)
            q_cost = twin_min_q(networks.critic, cost_critic.params, batch.observations, actions)
            # The controller measures Q_c at the actor's current samples; the actor then steps against
            # its output (held under stop_gradient in the loss).
            cost_estimate = jnp.mean(jax.lax.stop_gradient(q_cost))
            multiplier_state = cost_rule.update(state.multiplier, cost_estimate, state.cost_threshold)
            loss = bear_actor_loss(q_reward, q_cost, mmd_values, alpha, lagrangian.multiplier(multiplier_state),
                                   state.cost_threshold, config.mmd_threshold, reward_weight)
            return loss, (jnp.mean(mmd_values), cost_estimate, multiplier_state)

        (actor_loss, (mean_mmd, cost_estimate, multiplier_state)), grads = jax.value_and_grad(
            actor_loss_fn, has_aux=True)(state.actor.params)
        actor = state.actor.apply_gradients(grads=grads)
        lam = lagrangian.multiplier(multiplier_state)
        alpha_state = alpha_rule.update(state.alpha, mean_mmd, jnp.float32(config.mmd_threshold))

        tau = config.target_update_rate
        new_state = LearnerState(
            actor=actor, critic=critic, cost_critic=cost_critic, vae=vae_state,
            target_actor=critics.polyak_update(state.target_actor, actor.params, tau),
            target_critic=critics.polyak_update(state.target_critic, critic.params, tau),
            target_cost_critic=critics.polyak_update(state.target_cost_critic, cost_critic.params, tau),
            alpha=alpha_state, multiplier=multiplier_state, cost_threshold=state.cost_threshold,
        )
        metrics = {
            "vae_loss": vae_loss_value, "critic_loss": critic_loss, "cost_critic_loss": cost_critic_loss,
            "actor_loss": actor_loss, "mmd": mean_mmd, "alpha": alpha, "multiplier": lam,
            "cost_value": cost_estimate, "cost_threshold": state.cost_threshold,
        }
        return new_state, metrics

    # Evaluation acts with tanh(mean), deterministically, as OSRL.
    policy = mlp.mode_policy(networks.actor, lambda state: {"params": state.actor.params})

    return offline.Algorithm(init, (offline.Phase("train", update, config.num_updates),), policy,
                             policy_fields=("actor.params",))


def run(config: Config, ctx) -> dict:
    return offline.run(config, ctx, make_algorithm)


BEAR_LAG = Experiment(Config, run)
