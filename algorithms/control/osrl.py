"""What the OSRL baselines share (Liu et al. 2023, "Datasets and Benchmarks for Offline Safe Reinforcement
Learning"): their common config and defaults, twin critics with BCQ's candidate target, the VAE step,
the train states of the Q-learners (BCQ-Lag, BEAR-Lag, CPQ), OSRL's PID multiplier and the Q_c set point.
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
from flax.training.train_state import TrainState

from algorithms.control import offline
from constrained_rl import critics, distributions, lagrangian
from constrained_rl.config import require
from constrained_rl.data import dsrl
from constrained_rl.models import vae
from constrained_rl.models.mlp import GaussianActor, QEnsemble

LOG_ALPHA_BOUND = 5.0  # OSRL's log alpha (BEAR-Lag's MMD weight, CPQ's conservative weight) stays in [-5, 5]


def log_alpha_multiplier(learning_rate: float) -> lagrangian.MultiplierConfig:
    """OSRL's rule for a log-space alpha: ``log alpha <- clip(log alpha + lr * alpha * (x - d), -5, 5)``
    from log alpha 0 (``log_ascent`` with ``init`` 1 and bounds ``e^-5``, ``e^5``)."""
    return lagrangian.MultiplierConfig(kind="log_ascent", init=1.0, learning_rate=learning_rate,
                                       min=1 / math.exp(LOG_ALPHA_BOUND), max=math.exp(LOG_ALPHA_BOUND))


def sample_pre_squash(actor: GaussianActor, actor_params: Any, observations: jax.Array, key: jax.Array) -> jax.Array:
    """Reparameterised ``u ~ N(mean(s), std(s))`` of a tanh-Gaussian actor, before the tanh (the action
    is ``tanh(u)``): the samples BEAR's MMD compares and CPQ's OOD test scores (OSRL's ``pi_dist``)."""
    mean, log_std = actor.apply({"params": actor_params}, observations)
    return distributions.gaussian_sample_and_log_prob(key, mean, log_std)[0]


@dataclasses.dataclass(frozen=True)
class OSRLConfig(offline.OfflineConfig):
    """What the OSRL baselines (BCQ-Lag, BEAR-Lag, CPQ, COptiDICE) share, with OSRL's defaults."""

    batch_size: int = 512  # transitions per update (OSRL)
    reward_scale: float = 0.1  # rewards are multiplied by this before any loss sees them (OSRL)
    cost_scale: float = 1.0  # costs (and the cost limit) are multiplied by this (OSRL)
    actor_learning_rate: float = 1e-3  # Adam step of the actor
    critic_learning_rate: float = 1e-3  # Adam step of the critics
    actor_hidden_sizes: tuple[int, ...] = (256, 256)  # actor widths (OSRL: 2 x 256)
    critic_hidden_sizes: tuple[int, ...] = (256, 256)  # widths of every critic network (OSRL: 2 x 256)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("reward_scale", "cost_scale", "actor_learning_rate", "critic_learning_rate")
        for name in ("actor_hidden_sizes", "critic_hidden_sizes"):
            check_hidden_sizes(getattr(self, name), name)

    def require_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, name, f"must be finite and > 0 (got {value})")

    def require_non_negative(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, name, f"must be finite and >= 0 (got {value})")

    def require_unit_interval(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, name, f"must be in [0, 1] (got {value})")



def check_hidden_sizes(sizes: tuple[int, ...], field: str) -> None:
    require(len(sizes) >= 1 and all(isinstance(s, int) and s >= 1 for s in sizes), field,
            f"must be one or more positive widths (got {sizes})")



def bcq_target_value(next_q: chex.Array, target_mix: float | jax.Array) -> jax.Array:
    """BCQ's soft clipped double-Q value of the next state, ``[E, B, N] -> [B]``:

        V(s'_b) = max_j [m * min_e Q_e(s'_b, a'_bj) + (1 - m) * max_e Q_e(s'_b, a'_bj)]

    over ``N`` candidate actions ``a'_bj`` and the ensemble axis ``e`` (Fujimoto et al. 2019, eq. 13;
    ``m = 1`` is TD3's clipped double Q).
    """
    chex.assert_rank(next_q, 3)
    mixed = target_mix * critics.double_q_min(next_q) + (1.0 - target_mix) * critics.double_q_max(next_q)
    return jnp.max(mixed, axis=-1)



def twin_min_q(critic: QEnsemble, params: Any, observations: jax.Array, actions: jax.Array) -> jax.Array:
    """``min_e Q_e(s, a)`` of a twin critic: the estimate the OSRL Q-learners' actors and targets read."""
    return critics.double_q_min(critic.apply({"params": params}, observations, actions))



def candidate_critic_step(critic: QEnsemble, state: TrainState, batch: dsrl.TransitionBatch, signal: jax.Array,
                          target_params: Any, next_observations: jax.Array, next_candidates: jax.Array,
                          target_mix: float, discount: float) -> tuple[TrainState, jax.Array]:
    """One Adam step of a twin critic on ``sum_e mean_b (Q_e(s_b, a_b) - y_b)^2`` with BCQ's target
    ``y = x + gamma (1 - d) max_j [m min_e Q_e,targ(s', a'_j) + (1 - m) max_e Q_e,targ(s', a'_j)]``
    over ``N`` candidate next actions ``[B, N, A]`` (BCQ-Lag, BEAR-Lag); returns the loss too."""
    next_q = critic.apply({"params": target_params}, next_observations, next_candidates)  # [E, B, N]
    target = critics.bellman_target(signal, batch.discounts(discount), bcq_target_value(next_q, target_mix))

    def loss_fn(params):
        return critics.ensemble_td_loss(critic.apply({"params": params}, batch.observations, batch.actions), target)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss



def reward_and_cost_critic_steps(critic: QEnsemble, state: Any, batch: dsrl.TransitionBatch,
                                 next_observations: jax.Array, next_candidates: jax.Array, config: Any):
    """:func:`candidate_critic_step` of the reward critic, then of the cost critic, on the same candidates;
    ``state`` carries ``critic``, ``cost_critic`` and their targets. Returns both states and both losses."""
    reward = candidate_critic_step(critic, state.critic, batch, batch.rewards, state.target_critic, next_observations,
                                   next_candidates, config.target_mix, config.discount)
    cost = candidate_critic_step(critic, state.cost_critic, batch, batch.costs, state.target_cost_critic,
                                 next_observations, next_candidates, config.target_mix, config.discount)
    return (*reward, *cost)



def make_optimizers(config: Any) -> tuple[optax.GradientTransformation, ...]:
    """Adam of the actor, the critics and the VAE. Built once per learner, so that every run's state
    carries the same (static) optimizer objects."""
    return (optax.adam(config.actor_learning_rate), optax.adam(config.critic_learning_rate),
            optax.adam(config.vae_learning_rate))



def vae_step(model: vae.ConditionalVAE, state: TrainState, batch: dsrl.TransitionBatch, kl_weight: float,
             key: jax.Array) -> tuple[TrainState, jax.Array]:
    """One Adam step of the VAE on :func:`vae.vae_loss` (BCQ-Lag and CPQ); returns the loss too."""

    def loss_fn(params):
        output = model.apply({"params": params}, batch.observations, batch.actions, rngs={"latent": key})
        return vae.vae_loss(output, batch.actions, kl_weight)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss



class TrainStates(NamedTuple):
    actor: TrainState
    critic: TrainState
    cost_critic: TrainState
    vae: TrainState



def init_train_states(actor: nn.Module, critic: QEnsemble, vae_model: vae.ConditionalVAE, problem: offline.Problem,
                      key: jax.Array, optimizers: tuple[optax.GradientTransformation, ...],
                      actor_takes_action: bool = False) -> TrainStates:
    """The actor, the reward and cost critics (one architecture, initialised apart) and the VAE of an OSRL
    Q-learner (BCQ-Lag, BEAR-Lag, CPQ), each with its optimizer ``(actor, critic, vae)``'s state. The
    actor takes ``(s, a)`` when ``actor_takes_action`` (BCQ's perturbation model), ``s`` otherwise."""
    actor_tx, critic_tx, vae_tx = optimizers
    actor_key, critic_key, cost_key, vae_key, latent_key = jax.random.split(key, 5)
    obs = jnp.zeros((1, problem.observation_size))
    action = jnp.zeros((1, problem.action_size))
    actor_inputs = (obs, action) if actor_takes_action else (obs,)

    def trained(module: nn.Module, params: Any, tx: optax.GradientTransformation) -> TrainState:
        return TrainState.create(apply_fn=module.apply, params=params, tx=tx)

    return TrainStates(
        actor=trained(actor, actor.init(actor_key, *actor_inputs)["params"], actor_tx),
        critic=trained(critic, critic.init(critic_key, obs, action)["params"], critic_tx),
        cost_critic=trained(critic, critic.init(cost_key, obs, action)["params"], critic_tx),
        vae=trained(vae_model, vae_model.init({"params": vae_key, "latent": latent_key}, obs, action)["params"], vae_tx),
    )



# The cost multiplier of BCQ-Lag and BEAR-Lag: OSRL's PID controller (gains 0.1, 0.003, 0.001), unsmoothed
# (no EMA on the error, the derivative over one step), lambda starting at 0 with no cap.
PID_MULTIPLIER = lagrangian.MultiplierConfig(kind="pid", init=0.0, max=math.inf, kp=0.1, ki=0.003,
                                             kd=0.001, proportional_ema_alpha=0.0,
                                             derivative_ema_alpha=0.0, derivative_delay=1)
