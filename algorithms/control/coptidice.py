"""COptiDICE: offline constrained RL by stationary distribution correction estimation (Lee, Paduraru,
Mankowitz, Heess, Precup, Kim & Guez 2022, "COptiDICE: Offline Constrained Reinforcement Learning via
Stationary Distribution Correction Estimation", ICLR), as in OSRL (Liu et al. 2023).

COptiDICE optimises over stationary distributions ``d = w * d_D`` rather than over Q-functions:

    max_w E_{d_D}[w r] - alpha D_f(w d_D || d_D)   s.t.  E_{d_D}[w c] <= c_hat,  Bellman flow on w d_D.

With Lagrange multipliers ``nu(s)`` (flow) and ``lambda >= 0`` (cost), the inner maximum over ``w`` has the
closed form ``w*(s, a) = max(0, (f')^{-1}(e(s, a, s') / alpha))`` with the advantage-like

    e_{nu, lambda}(s, a, s') = r - lambda c + gamma (1 - terminal) nu(s') - nu(s),

leaving ``min_{nu, lambda >= 0} (1 - gamma) E_{p0}[nu(s0)] + E_{d_D}[w* e - alpha f(w*)] + lambda c_hat``.
Because ``E_{d_D}[w* c]`` underestimates the policy's cost from finite data, lambda ascends on an upper
bound: the worst case of the cost over distributions within ``KL <= epsilon`` of the data, whose dual

    C_UB = min_{tau >= 0, chi} tau log E[exp(ell / tau)] + tau epsilon,
    ell = (1 - gamma) chi(s0) + w* (c + gamma (1 - terminal) chi(s') - chi(s)),

reweights the data by ``p~ = softmax(ell / tau)``. The policy is then extracted by weighted behaviour
cloning, ``max_pi E_{d_D}[w* log pi(a | s)]``. See docs/algorithms/osrl_baselines.md for each loss,
the defaults and the differences from OSRL's code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training.train_state import TrainState

from algorithms.control import offline
from algorithms.control.osrl import OSRLConfig
from constrained_rl import critics, distributions
from constrained_rl.config import Experiment, require, require_positive_integers
from constrained_rl.data import dsrl
from constrained_rl.models import mlp
from constrained_rl.models.mlp import GaussianActor, QEnsemble

Divergence = Literal["chi2", "softchi"]
ThresholdConvention = Literal["occupancy", "osrl"]


@dataclasses.dataclass(frozen=True)
class Config(OSRLConfig):
    """COptiDICE hyperparameters; defaults are OSRL's COptiDICE config (``coptidice_configs.py``)."""

    num_updates: int = 100_000  # gradient updates (OSRL coptidice_configs.py: update_steps 100_000)
    actor_learning_rate: float = 1e-4  # Adam step of the policy (OSRL)
    critic_learning_rate: float = 1e-4  # Adam step of the nu and chi networks (OSRL)
    scalar_learning_rate: float = 1e-4  # Adam step of lambda and tau, both softplus-parameterised (OSRL)
    num_nu: int = 2  # nu networks; nu(s) is their minimum (OSRL)
    num_chi: int = 2  # chi networks; chi(s) is their minimum (OSRL)
    alpha: float = 0.5  # weight of the f-divergence regulariser (OSRL)
    divergence: Divergence = "softchi"  # f: chi2 or softchi (COptiDICE paper, OSRL default softchi)
    cost_ub_epsilon: float = 0.01  # KL radius of the cost upper bound; 0 uses the plain E[w c] (OSRL)
    cost_threshold_convention: ThresholdConvention = "occupancy"  # c_hat: (1-gamma)*Q_c threshold, or osrl's unnormalised one
    augmentation_scale: float = 0.1  # policy extraction adds N(0, (this * std)^2) to states and actions (OSRL)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("scalar_learning_rate", "alpha")
        self.require_non_negative("cost_ub_epsilon", "augmentation_scale")
        require_positive_integers(self, "num_nu", "num_chi")
        require(self.divergence in DIVERGENCES, "divergence",
                f"must be one of {', '.join(DIVERGENCES)} (got {self.divergence!r})")
        require(self.cost_threshold_convention in ("occupancy", "osrl"), "cost_threshold_convention",
                f"must be occupancy or osrl (got {self.cost_threshold_convention!r})")


# --------------------------------------------------------------------------------------------------
# f-divergences and the closed-form ratio


class FDivergence(NamedTuple):
    """A generator ``f`` of an f-divergence and the inverse of its derivative, elementwise."""

    f: Callable[[jax.Array], jax.Array]
    f_prime_inverse: Callable[[jax.Array], jax.Array]


def _chi2(x: jax.Array) -> jax.Array:
    return 0.5 * jnp.square(x - 1.0)


def _softchi(x: jax.Array) -> jax.Array:
    # x log x - x + 1 below 1 (KL-like, keeps w >= 0 smooth), (x - 1)^2 / 2 above; 0 log 0 = 0.
    x_log_x = jnp.where(x > 0, x * jnp.log(jnp.where(x > 0, x, 1.0)), 0.0)
    return jnp.where(x < 1.0, x_log_x - x + 1.0, _chi2(x))


def _softchi_prime_inverse(y: jax.Array) -> jax.Array:
    return jnp.where(y < 0.0, jnp.exp(jnp.minimum(y, 0.0)), y + 1.0)


DIVERGENCES: dict[str, FDivergence] = {
    # f(x) = (x - 1)^2 / 2, f'(x) = x - 1.
    "chi2": FDivergence(_chi2, lambda y: y + 1.0),
    # Soft-chi (Lee et al. 2021 OptiDICE, 2022 COptiDICE): f'(x) = log x below 1, x - 1 above.
    "softchi": FDivergence(_softchi, _softchi_prime_inverse),
}


def advantage(rewards: chex.Array, costs: chex.Array, discounts: chex.Array, nu: chex.Array,
              next_nu: chex.Array, multiplier: chex.Array) -> jax.Array:
    """``e(s, a, s') = r - lambda c + discount * nu(s') - nu(s)``, all ``[B]`` (COptiDICE eq. 8).

    ``discount = gamma (1 - terminal)``; ``lambda`` is held under ``stop_gradient`` (the nu step must
    not move it).
    """
    chex.assert_equal_shape([rewards, costs, discounts, nu, next_nu])
    return rewards - jax.lax.stop_gradient(multiplier) * costs + discounts * next_nu - nu


def optimal_ratio(advantages: chex.Array, alpha: float | jax.Array, divergence: FDivergence) -> jax.Array:
    """The closed-form ``w*(s, a) = max(0, (f')^{-1}(e / alpha))`` (any shape)."""
    return jax.nn.relu(divergence.f_prime_inverse(advantages / alpha))


def nu_loss(initial_nu: chex.Array, advantages: chex.Array, alpha: float | jax.Array, gamma: float,
            divergence: FDivergence) -> jax.Array:
    """The dual objective in ``nu`` with the inner maximum over ``w`` solved in closed form:

        (1 - gamma) E_{p0}[nu(s0)] + E_{d_D}[w* e - alpha f(w*)],   w* = optimal_ratio(e)

    ``initial_nu`` ``[B0]`` at initial states, ``advantages`` ``[B]`` (gradient flows through both).
    """
    chex.assert_rank([initial_nu, advantages], 1)
    ratio = optimal_ratio(advantages, alpha, divergence)
    return (1.0 - gamma) * jnp.mean(initial_nu) + jnp.mean(ratio * advantages - alpha * divergence.f(ratio))


class CostUpperBound(NamedTuple):
    chi_loss: jax.Array  # tau * log E[exp(ell / tau)]: minimised over chi (tau held)
    weighted_cost: jax.Array  # E_p~[w c]: the cost estimate lambda ascends on (gradient stopped)
    kl: jax.Array  # KL(p~ || d_D) of the reweighting (gradient stopped)


def cost_upper_bound(initial_chi: chex.Array, chi: chex.Array, next_chi: chex.Array, ratio: chex.Array,
                     costs: chex.Array, discounts: chex.Array, tau: chex.Array, gamma: float) -> CostUpperBound:
    """COptiDICE's upper-bound cost estimate (eq. 14), per batch; all inputs ``[B]``.

    ``ell_b = (1 - gamma) chi(s0_b) + w_b (c_b + discount_b chi(s'_b) - chi(s_b))`` with ``w`` held; the
    worst-case reweighting within KL radius epsilon is ``p~_b = B softmax(ell / tau)_b``, and

        chi_loss      = tau log mean_b exp(ell_b / tau)      (its chi-gradient is mean p~ grad ell)
        weighted_cost = mean_b p~_b w_b c_b                   (OSRL's cost estimate)
        kl            = mean_b (p~_b log p~_b - p~_b + 1)
    """
    chex.assert_equal_shape([initial_chi, chi, next_chi, ratio, costs, discounts])
    ratio = jax.lax.stop_gradient(ratio)
    tau = jax.lax.stop_gradient(tau)
    ell = (1.0 - gamma) * initial_chi + ratio * (costs + discounts * next_chi - chi)
    batch = ell.shape[0]
    logits = ell / tau
    chi_loss = tau * (jax.nn.logsumexp(logits) - jnp.log(batch))
    log_weights = jax.lax.stop_gradient(jax.nn.log_softmax(logits) + jnp.log(batch))
    weights = jnp.exp(log_weights)
    return CostUpperBound(
        chi_loss=chi_loss,
        weighted_cost=jnp.mean(weights * ratio * costs),
        kl=jnp.mean(weights * log_weights - weights + 1.0),
    )


def weighted_log_likelihood_loss(ratio: chex.Array, log_prob: chex.Array) -> jax.Array:
    """Policy extraction by weighted behaviour cloning: ``-mean_b w_b log pi(a_b | s_b)`` (w held)."""
    chex.assert_equal_shape([ratio, log_prob])
    return -jnp.mean(jax.lax.stop_gradient(ratio) * log_prob)


# --------------------------------------------------------------------------------------------------
# Dataset facts the learner needs


class DatasetStatistics(NamedTuple):
    """What COptiDICE reads from the whole dataset, once, before training."""

    initial_observations: jax.Array  # [E, obs] first state of each episode (samples of p0)
    observation_std: jax.Array  # [obs] per-dimension std of the observations
    action_std: jax.Array  # [act] per-dimension std of the actions


def dataset_statistics(dataset: dsrl.OfflineDataset) -> DatasetStatistics:
    """Episode-start states (row 0 and every row after a terminal or timeout) and the data's stds."""
    done = (np.asarray(dataset.terminals) > 0) | (np.asarray(dataset.timeouts) > 0)
    is_initial = np.concatenate([[True], done[:-1]])
    observations = np.asarray(dataset.observations)
    return DatasetStatistics(
        initial_observations=jnp.asarray(observations[is_initial]),
        observation_std=jnp.asarray(observations.std(axis=0)),
        action_std=jnp.asarray(np.asarray(dataset.actions).std(axis=0)),
    )


# --------------------------------------------------------------------------------------------------
# Learner


@struct.dataclass
class LearnerState:
    actor: TrainState
    nu: TrainState
    chi: TrainState
    multiplier: TrainState  # params {"raw": r}; lambda = softplus(r)
    temperature: TrainState  # params {"raw": r}; tau = softplus(r)
    cost_threshold: jax.Array  # c_hat, in scaled cost units


class Networks(NamedTuple):
    actor: GaussianActor
    nu: QEnsemble  # state-value ensembles: evaluated with an empty action
    chi: QEnsemble


def positive(scalar_params: dict[str, jax.Array]) -> jax.Array:
    """``softplus(raw)``: OSRL's parameterisation of lambda >= 0 and tau > 0."""
    return jax.nn.softplus(scalar_params["raw"])


def state_value(network: QEnsemble, params: Any, observations: jax.Array) -> jax.Array:
    """``min_e V_e(s)`` of a value ensemble: a Q ensemble fed a zero-width action (OSRL's nu and chi)."""
    no_action = jnp.zeros(observations.shape[:-1] + (0,), observations.dtype)
    return critics.double_q_min(network.apply({"params": params}, observations, no_action))


def cost_threshold(config: Config, problem: offline.Problem, cost_limit: jax.Array) -> jax.Array:
    """c_hat: the per-step Q_c threshold times ``1 - gamma`` (the scale of ``E_{d}[c]`` under a
    normalised occupancy), or OSRL's unnormalised per-step threshold."""
    value = offline.cost_threshold(config, problem, cost_limit)
    return value * (1.0 - config.discount) if config.cost_threshold_convention == "occupancy" else value


def make_algorithm(config: Config, problem: offline.Problem,
                   statistics: DatasetStatistics | None) -> offline.Algorithm:
    """COptiDICE; ``statistics`` None builds it for evaluation only (training reads them, the policy not)."""
    divergence = DIVERGENCES[config.divergence]
    gamma = config.discount
    networks = Networks(
        actor=GaussianActor(config.actor_hidden_sizes, problem.action_size),
        nu=QEnsemble(config.critic_hidden_sizes, ensemble_size=config.num_nu),
        chi=QEnsemble(config.critic_hidden_sizes, ensemble_size=config.num_chi),
    )
    # Built once, so that every run's state carries the same (static) optimizer objects.
    actor_tx, critic_tx = optax.adam(config.actor_learning_rate), optax.adam(config.critic_learning_rate)
    scalar_tx = optax.adam(config.scalar_learning_rate)

    def init(key: jax.Array, cost_limit: jax.Array) -> LearnerState:
        actor_key, nu_key, chi_key = jax.random.split(key, 3)
        obs = jnp.zeros((1, problem.observation_size))
        no_action = jnp.zeros((1, 0))

        def trained(apply_fn: Any, params: Any, tx: optax.GradientTransformation) -> TrainState:
            return TrainState.create(apply_fn=apply_fn, params=params, tx=tx)

        def scalar() -> TrainState:  # raw parameter 1, as OSRL's torch.ones(1)
            return trained(positive, {"raw": jnp.ones((), jnp.float32)}, scalar_tx)

        return LearnerState(
            actor=trained(networks.actor.apply, networks.actor.init(actor_key, obs)["params"], actor_tx),
            nu=trained(networks.nu.apply, networks.nu.init(nu_key, obs, no_action)["params"], critic_tx),
            chi=trained(networks.chi.apply, networks.chi.init(chi_key, obs, no_action)["params"], critic_tx),
            multiplier=scalar(),
            temperature=scalar(),
            cost_threshold=cost_threshold(config, problem, cost_limit),
        )

    def advantages_of(nu_params: Any, batch: dsrl.TransitionBatch, rewards: jax.Array, costs: jax.Array,
                      lam: jax.Array) -> jax.Array:
        return advantage(rewards, costs, batch.discounts(gamma), state_value(networks.nu, nu_params, batch.observations),
                         state_value(networks.nu, nu_params, batch.next_observations), lam)

    def update(state: LearnerState, batch: dsrl.TransitionBatch, key: jax.Array):
        init_key, obs_noise_key, action_noise_key = jax.random.split(key, 3)
        rewards, costs = config.reward_scale * batch.rewards, config.cost_scale * batch.costs
        discounts = batch.discounts(gamma)
        initial_observations = statistics.initial_observations
        initial = initial_observations[jax.random.randint(init_key, batch.rewards.shape, 0,
                                                          initial_observations.shape[0])]
        lam = positive(state.multiplier.params)
        tau = positive(state.temperature.params)
        ratio = optimal_ratio(advantages_of(state.nu.params, batch, rewards, costs, lam), config.alpha, divergence)
        ratio = jax.lax.stop_gradient(ratio)

        # Cost upper bound: chi and tau steps (or the plain importance-weighted cost).
        if config.cost_ub_epsilon > 0:
            def chi_loss_fn(params):
                bound = cost_upper_bound(
                    state_value(networks.chi, params, initial), state_value(networks.chi, params, batch.observations),
                    state_value(networks.chi, params, batch.next_observations), ratio, costs, discounts, tau, gamma)
                return bound.chi_loss, bound

            (chi_loss, bound), grads = jax.value_and_grad(chi_loss_fn, has_aux=True)(state.chi.params)
            chi = state.chi.apply_gradients(grads=grads)
            # d/d raw_tau of softplus(raw_tau) * (epsilon - KL): tau shrinks while the KL is within epsilon.
            temperature = state.temperature.apply_gradients(grads=jax.grad(
                lambda raw: positive(raw) * (config.cost_ub_epsilon - bound.kl))(state.temperature.params))
            weighted_cost, kl = bound.weighted_cost, bound.kl
        else:
            chi, temperature, chi_loss = state.chi, state.temperature, jnp.zeros(())
            weighted_cost, kl = jnp.mean(ratio * costs), jnp.zeros(())

        def nu_loss_fn(params):
            return nu_loss(state_value(networks.nu, params, initial),
                           advantages_of(params, batch, rewards, costs, lam), config.alpha, gamma, divergence)

        nu_loss_value, grads = jax.value_and_grad(nu_loss_fn)(state.nu.params)
        nu = state.nu.apply_gradients(grads=grads)

        # lambda descends on lambda * (c_hat - E[w c]): it grows while the cost estimate exceeds c_hat.
        # Not a lagrangian.MultiplierConfig rule: OSRL moves softplus(raw) by Adam on raw, a step no kind
        # there takes (Adam's does not scale with the gap, and softplus is not the log), so it stays here.
        multiplier = state.multiplier.apply_gradients(grads=jax.grad(
            lambda raw: positive(raw) * (state.cost_threshold - weighted_cost))(state.multiplier.params))

        # Policy extraction with the ratios of the updated nu, on noise-augmented states and actions.
        new_ratio = optimal_ratio(advantages_of(nu.params, batch, rewards, costs, lam), config.alpha, divergence)
        noisy_obs = batch.observations + config.augmentation_scale * statistics.observation_std * \
            jax.random.normal(obs_noise_key, batch.observations.shape)
        noisy_actions = batch.actions + config.augmentation_scale * statistics.action_std * \
            jax.random.normal(action_noise_key, batch.actions.shape)

        def actor_loss_fn(params):
            mean, log_std = networks.actor.apply({"params": params}, noisy_obs)
            log_prob = distributions.tanh_gaussian_log_prob(mean, log_std, jnp.clip(noisy_actions, -1.0, 1.0))
            return weighted_log_likelihood_loss(new_ratio, log_prob)

        actor_loss, grads = jax.value_and_grad(actor_loss_fn)(state.actor.params)
        actor = state.actor.apply_gradients(grads=grads)

        new_state = LearnerState(actor=actor, nu=nu, chi=chi, multiplier=multiplier, temperature=temperature,
                                 cost_threshold=state.cost_threshold)
        metrics = {
            "nu_loss": nu_loss_value, "chi_loss": chi_loss, "actor_loss": actor_loss, "multiplier": lam,
            "temperature": tau, "weighted_cost": weighted_cost, "kl": kl, "mean_ratio": jnp.mean(ratio),
            "divergence": jnp.mean(divergence.f(ratio)), "cost_threshold": state.cost_threshold,
        }
        return new_state, metrics

    # Evaluation acts with tanh(mean), deterministically, as OSRL.
    policy = mlp.mode_policy(networks.actor, lambda state: {"params": state.actor.params})

    return offline.Algorithm(init, (offline.Phase("train", update, config.num_updates),), policy,
                             policy_fields=("actor.params",))


def builder(config: Config, dataset: dsrl.OfflineDataset) -> offline.MakeAlgorithm:
    """The scaffold's ``make_algorithm`` for ``dataset`` (its statistics, computed once)."""
    return functools.partial(make_algorithm, statistics=dataset_statistics(dataset))


def evaluation_algorithm(config: Config, problem: offline.Problem) -> offline.Algorithm:
    """The learner as its evaluation needs it, built without its data (the ``evaluate`` experiment)."""
    return make_algorithm(config, problem, statistics=None)


def run(config: Config, ctx) -> dict:
    """offline.run, with the dataset statistics COptiDICE's learner is built with."""
    return offline.run_built(config, ctx, builder)


COPTIDICE = Experiment(Config, run)
