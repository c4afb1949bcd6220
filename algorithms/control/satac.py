"""SATAC, Safe Adversarially Trained Actor-Critic (Wei, Peng, Ghosh, Liu 2024, arXiv 2401.00629),
published as WSAC ("Adversarially Trained Weighted Actor-Critic for Safe Offline Reinforcement
Learning", NeurIPS 2024; the ``wsac`` experiment is the same learner as ``satac``), and ATAC (Cheng,
Xie, Jiang, Agarwal 2022), the same learner with its cost critic switched off.

A Stackelberg game per update, the critics (followers) first, then the actor (leader):

* **reward critic** ``f_r`` (twin Q), ATAC's: per head ``normalized_sum(pess_r, bellman_r, beta)`` with
  relative pessimism ``pess_r = mean[f_r(s, pi(s)) - f_r(s, a)]``: the critic makes the policy look
  *less rewarding* than the data wherever the Bellman error allows;
* **cost critic** ``f_c`` (twin Q), SATAC's: per head ``normalized_sum(-lambda * pess_c, bellman_c,
  beta_c)``: the policy looks *costlier* than the data (pessimism about safety); ``beta_c = beta``
  unless ``cost_beta`` sets it apart;
* both Bellman errors are ATAC's mix ``0.5 * TD + 0.5 * residual``: the TD part regresses on
  ``r + gamma (1 - d) min_e f_r^target(s', a')`` (cost: ``c + gamma (1 - d) max_e f_c^target(s', a')``,
  pessimistic for safety; ``cost_target = mean`` averages the twin targets instead), ``a' ~ pi(s')``;
  the residual part on ``r + gamma (1 - d) f(s', a')`` with the gradient through ``f(s', a')``. After
  every step each head's weight matrices are projected onto the L2 ball of radius 100 and the targets
  move by Polyak averaging (tau 5e-3);
* **actor**, tanh-Gaussian: ``normalized_sum(-objective, -entropy, alpha)`` with

      objective = mean[f_r(s, pi(s))] - lambda * mean[ f_c(s, pi(s)) - f_c(s, a_ref) ]^+

  (ATAC reads the first reward head; the cost penalty reads the larger cost head, at the sampled
  action or, with ``penalty_action = mode``, at the deterministic ``tanh(mean)``), the
  aggression-limited objective: the actor pays only where it looks costlier than the reference
  ``a_ref``: the dataset action (``behaviour``), a BC-Safe policy trained first on the episodes within
  the run's cost limit, or within ``safe_fraction`` of it (``bc_safe``), or the absolute per-step
  threshold ``kappa (1 - gamma^T) / ((1 - gamma) T)`` in place of ``f_c(s, a_ref)`` (``threshold``);
* ``alpha`` auto-tuned toward the target entropy ``-|A|`` (loss ``log_alpha * (H - target)``) by Adam
  at the critics' rate (ATAC's ``alpha_lr = qf_lr``), restarted at ``log(init_alpha)`` with a fresh
  Adam when the adversarial phase begins (ATAC resets log alpha and its optimizer there);
* ``lambda`` fixed (the paper's) or moved by a :mod:`constrained_rl.lagrangian` rule on the policy's
  estimated cost value ``mean_b max_e f_c(s_b, pi(s_b))`` against the per-step threshold.

Warm start (ATAC's behaviour pretraining): the actor clones the data
(``normalized_sum(-log pi(a|s), -entropy, alpha)``, alpha tuned from ``init_alpha`` by its own Adam)
and both critics minimise their Bellman errors only, everything at the fast (critic) learning rate. An optional hold (``actor_hold_updates``) then trains the
critics adversarially against the warm-started actor before it moves. All losses come from
:mod:`constrained_rl.critics`; every default and choice is listed with its source in
docs/algorithms/satac.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training.train_state import TrainState

from algorithms.control import cloning, offline
from constrained_rl import critics, distributions, lagrangian
from constrained_rl.config import Experiment, require
from constrained_rl.data.dsrl import TransitionBatch
from constrained_rl.models import mlp
from constrained_rl.models.mlp import GaussianActor, QEnsemble

Params = Any
Reference = Literal["behaviour", "bc_safe", "threshold"]
WarmupData = Literal["all", "safe"]
CriticWarmup = Literal["bellman", "returns"]
PenaltyAction = Literal["sample", "mode"]
CostTarget = Literal["max", "mean"]

# lambda fixed at 1 (the paper's aggression-limited objective, lambda a hyperparameter). Under
# --multiplier.kind projected_ascent or pid it starts there, capped at 100; the PID gains are OSRL's BCQ-Lag.
MULTIPLIER = lagrangian.MultiplierConfig(kind="fixed", init=1.0, max=100.0, learning_rate=0.01,
                                         kp=0.1, ki=0.003, kd=0.001)


@dataclasses.dataclass(frozen=True)
class Config(offline.OfflineConfig):
    """SATAC hyperparameters; sources of the defaults in docs/algorithms/satac.md."""

    use_cost_critic: bool = True  # SATAC; false gives ATAC (reward critic only, no cost penalty)
    reference: Reference = "bc_safe"  # a_ref of the actor penalty: behaviour, bc_safe or threshold
    multiplier: lagrangian.MultiplierConfig = dataclasses.field(default_factory=lambda: MULTIPLIER)  # lambda's rule
    penalty_action: PenaltyAction = "sample"  # the actor's action in the penalty: a sample of pi, or its mode
    cost_target: CostTarget = "max"  # twin reduction in the cost critic's Bellman target: max or mean
    beta: float = 4.0  # Bellman weight of both critics (ATAC: 1 to 16)
    cost_beta: float | None = None  # Bellman weight of the cost critic alone; none: beta
    reward_scale: float = 1.0  # rewards are multiplied by this before any loss sees them (ATAC: 1; OSRL: 0.1)
    cost_scale: float = 1.0  # costs (and the per-step threshold) are multiplied by this
    hidden_sizes: tuple[int, ...] = (256, 256, 256)  # actor and critic MLP widths (ATAC: 3 x 256)
    actor_learning_rate: float = 5e-7  # Adam, actor: the slow timescale (ATAC)
    critic_learning_rate: float = 5e-4  # Adam, both critics: the fast timescale (ATAC)
    init_alpha: float = 1.0  # entropy weight at the start of the warm start and again of the adversarial phase (ATAC: log alpha 0)
    tau: float = 5e-3  # Polyak rate of the target critics (ATAC)
    td_weight: float = 0.5  # share of the TD error in the Bellman error; the rest is residual (ATAC)
    critic_norm: float = 100.0  # L2-ball radius of each critic weight matrix (ATAC)
    warmup_updates: int = 100_000  # warm start: BC actor and Bellman-only critics (ATAC: 100k)
    warmup_data: WarmupData = "all"  # warm start on all data (ATAC) or on the episodes within kappa (BC-Safe's)
    safe_fraction: float = 1.0  # the reference and a safe warm start clone the episodes with C <= this x kappa
    critic_warmup: CriticWarmup = "bellman"  # warm-start critics on Bellman errors (ATAC) or Monte-Carlo returns
    actor_from_reference: bool = False  # bc_safe only: the actor enters the warm start as the BC-Safe reference
    reference_updates: int = 100_000  # BC-Safe reference updates before the warm start (bc_safe only)
    reference_learning_rate: float = 1e-3  # Adam step size of the BC-Safe reference (OSRL BC)
    actor_hold_updates: int = 0  # adversarial critic updates with the actor held, before it moves (ATAC: 0)
    num_updates: int = 200_000  # adversarial updates after the warm start (and the hold)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.reference in ("behaviour", "bc_safe", "threshold"), "reference",
                f"must be behaviour, bc_safe or threshold (got {self.reference!r})")
        require(self.warmup_data in ("all", "safe"), "warmup_data",
                f"must be all or safe (got {self.warmup_data!r})")
        require(self.critic_warmup in ("bellman", "returns"), "critic_warmup",
                f"must be bellman or returns (got {self.critic_warmup!r})")
        require(self.penalty_action in ("sample", "mode"), "penalty_action",
                f"must be sample or mode (got {self.penalty_action!r})")
        require(self.cost_target in ("max", "mean"), "cost_target",
                f"must be max or mean (got {self.cost_target!r})")
        for name in ("actor_learning_rate", "critic_learning_rate", "init_alpha",
                     "critic_norm", "reference_learning_rate",
                     "reward_scale", "cost_scale"):
            value = getattr(self, name)
            require(value > 0, name, f"must be > 0 (got {value})")
        require(self.beta >= 0, "beta", f"must be >= 0 (got {self.beta})")
        require(self.cost_beta is None or self.cost_beta >= 0, "cost_beta", f"must be >= 0 (got {self.cost_beta})")
        require(0 < self.tau <= 1, "tau", f"must be in (0, 1] (got {self.tau})")
        require(0 < self.safe_fraction <= 1, "safe_fraction", f"must be in (0, 1] (got {self.safe_fraction})")
        require(0 <= self.td_weight <= 1, "td_weight", f"must be in [0, 1] (got {self.td_weight})")
        require(len(self.hidden_sizes) >= 1 and all(w >= 1 for w in self.hidden_sizes), "hidden_sizes",
                f"must be one or more positive widths (got {self.hidden_sizes})")
        require(not self.actor_from_reference or self.trains_reference, "actor_from_reference",
                "needs the BC-Safe reference (reference = bc_safe, with the cost critic on)")
        offline.require_whole_chunks(self, "warmup_updates")
        offline.require_whole_chunks(self, "reference_updates")
        offline.require_whole_chunks(self, "actor_hold_updates")

    @property
    def cost_critic_beta(self) -> float:
        return self.beta if self.cost_beta is None else self.cost_beta

    @property
    def trains_reference(self) -> bool:
        return self.use_cost_critic and self.reference == "bc_safe"

    @property
    def uses_cost_limit(self) -> bool:
        """Whether training depends on kappa: through the reference, the threshold, the rule or the
        warm start's data."""
        return self.warmup_data == "safe" or self.use_cost_critic and (
            self.reference != "behaviour" or self.multiplier.kind != "fixed")


@dataclasses.dataclass(frozen=True)
class ATACConfig(Config):
    """ATAC: the SATAC learner with the cost critic switched off."""

    use_cost_critic: bool = False  # SATAC; false gives ATAC (reward critic only, no cost penalty)


# --------------------------------------------------------------------------------------------------
# Losses over arrays (the networks stay outside, so each is checked by hand)


def critic_loss(
    q_data: jax.Array,
    q_policy: jax.Array,
    q_next: jax.Array,
    td_target: jax.Array,
    signals: jax.Array,
    discounts: jax.Array,
    beta: float,
    pessimism_sign: jax.Array | float,
    adversarial: bool = True,
    td_weight: float = 0.5,
) -> jax.Array:
    """The loss of a twin critic, summed over heads (ATAC's per-head losses).

    Per head ``e``: ``bellman_e = td_weight * mean(Q_e(s,a) - sg(td_target))^2 + (1 - td_weight) *
    mean(Q_e(s,a) - signal - discount * Q_e(s',a'))^2`` and, when ``adversarial``,
    ``normalized_sum(pessimism_sign * mean[Q_e(s,pi) - Q_e(s,a)], bellman_e, beta)``, else
    ``bellman_e`` alone (the warm start). ``pessimism_sign`` is ``+1`` for a reward critic and
    ``-lambda`` for a cost critic.

    Args:
      q_data, q_policy, q_next: ``[E, B]`` at ``(s, a)``, ``(s, sg(a~pi(s)))`` and ``(s', sg(a'~pi(s')))``.
      td_target, signals, discounts: ``[B]``; ``signals`` are rewards or costs, ``discounts`` are
        ``gamma * (1 - terminal)``.
    """

    def head(q_data_e, q_policy_e, q_next_e):
        residual_target = signals + discounts * q_next_e
        bellman = critics.atac_bellman_loss(q_data_e, td_target, residual_target, td_weight)
        if not adversarial:
            return bellman
        return critics.adversarial_critic_loss(q_policy_e, q_data_e, bellman, beta, pessimism_sign)

    return jnp.sum(jax.vmap(head)(q_data, q_policy, q_next))


def actor_loss(
    q_reward_policy: jax.Array,
    log_probs: jax.Array,
    alpha: jax.Array,
    penalty: jax.Array | None = None,
    multiplier: jax.Array | float = 0.0,
) -> jax.Array:
    """``normalized_sum(-(mean Q_r(s, pi) - lambda * mean penalty), -entropy, alpha)``.

    ``entropy = -mean log pi(a|s)`` at the sampled actions (ATAC's one-sample estimate); ``penalty`` is
    SATAC's per-sample ``[Q_c(s, pi) - Q_c(s, a_ref)]^+`` (None: ATAC's objective). All ``[B]``.
    """
    objective = jnp.mean(q_reward_policy)
    if penalty is not None:
        objective = objective - jax.lax.stop_gradient(multiplier) * jnp.mean(penalty)
    return critics.normalized_sum(-objective, jnp.mean(log_probs), alpha)


def alpha_loss(log_alpha: jax.Array, log_probs: jax.Array, target_entropy: float) -> jax.Array:
    """``log_alpha * (H - target)`` with ``H = -mean log pi`` held fixed: alpha falls while the policy
    is more random than the target entropy and rises when it is less (ATAC's, SAC's rule)."""
    entropy = -jnp.mean(jax.lax.stop_gradient(log_probs))
    return log_alpha * (entropy - target_entropy)


# --------------------------------------------------------------------------------------------------
# Networks and state


class Networks(NamedTuple):
    actor: GaussianActor
    reward_critic: QEnsemble
    cost_critic: QEnsemble


@struct.dataclass
class SATACState:
    """One run's learner state: a train state per trained network and optimizer.

    The actor has two optimizers, the warm start's fast Adam and the adversarial phase's slow one, which
    starts from fresh moments: two train states over the same parameters (:func:`phase_step` steps one
    and gives the other the new parameters), so the state's tree is the same in every phase. Alpha has
    two train states with parameters of their own: the warm start tunes ``warmup_alpha``; ``alpha``
    waits at ``log(init_alpha)`` with untouched Adam moments until the adversarial phase, as ATAC
    restarts log alpha and its optimizer when its objective changes.
    """

    actor: TrainState  # the actor's variables, with the slow Adam of the adversarial phase
    warmup_actor: TrainState  # the same variables, with the fast Adam of the warm start's cloning
    reward_critic: TrainState
    reward_target: Params
    cost_critic: TrainState  # trained only by SATAC (ATAC keeps its initial value)
    cost_target: Params
    alpha: TrainState  # params {"log_alpha": log alpha} of the adversarial phase, Adam at the critics' rate
    warmup_alpha: TrainState  # log alpha of the warm start, with an Adam of its own at the same rate
    multiplier_state: Any
    reference: cloning.BCState  # the BC-Safe reference policy (trained only when reference = bc_safe)
    cost_limit: jax.Array  # kappa of this run


def entropy_weight(alpha_params: dict[str, jax.Array]) -> jax.Array:
    """``alpha = exp(log_alpha)`` of the alpha train state's parameters."""
    return jnp.exp(alpha_params["log_alpha"])


class Learner(NamedTuple):
    """The static parts: config, problem, networks, optimizers and multiplier rule."""

    config: Config
    problem: offline.Problem
    networks: Networks
    actor_optimizer: optax.GradientTransformation
    critic_optimizer: optax.GradientTransformation  # each critic's
    alpha_optimizer: optax.GradientTransformation  # log alpha, both phases (the critics' rate)
    warmup_optimizer: optax.GradientTransformation  # the actor in the warm start (fast timescale)
    reference_optimizer: optax.GradientTransformation
    multiplier_rule: lagrangian.MultiplierRule

    @property
    def target_entropy(self) -> float:
        return -float(self.problem.action_size)


def make_learner(config: Config, problem: offline.Problem) -> Learner:
    networks = Networks(
        actor=mlp.state_dependent_actor(problem.action_size, config.hidden_sizes),
        reward_critic=QEnsemble(tuple(config.hidden_sizes)),
        cost_critic=QEnsemble(tuple(config.hidden_sizes)),
    )
    # The warm start clones at the critics' (fast) rate, as ATAC's behaviour pretraining does: at
    # the actor's slow rate a 100k-update warm start would leave the actor at its initialisation.
    # Alpha, the innermost variable, moves at the critics' rate in both phases (ATAC: alpha_lr = qf_lr).
    fast = optax.adam(config.critic_learning_rate)
    return Learner(config, problem, networks, optax.adam(config.actor_learning_rate), fast, fast, fast,
                   optax.adam(config.reference_learning_rate), lagrangian.make_rule(config.multiplier))


def init_state(learner: Learner, key: jax.Array, cost_limit: jax.Array) -> SATACState:
    nets, sizes = learner.networks, learner.problem
    actor_key, reward_key, cost_key, reference_key = jax.random.split(key, 4)
    obs = jnp.zeros((1, sizes.observation_size), jnp.float32)
    action = jnp.zeros((1, sizes.action_size), jnp.float32)
    actor = mlp.init_actor(nets.actor, actor_key, sizes.observation_size)
    reward_critic = nets.reward_critic.init(reward_key, obs, action)
    cost_critic = nets.cost_critic.init(cost_key, obs, action)
    alpha = {"log_alpha": jnp.log(jnp.asarray(learner.config.init_alpha, jnp.float32))}

    def trained(apply_fn: Any, params: Params, tx: optax.GradientTransformation) -> TrainState:
        return TrainState.create(apply_fn=apply_fn, params=params, tx=tx)

    return SATACState(
        actor=trained(nets.actor.apply, actor, learner.actor_optimizer),
        warmup_actor=trained(nets.actor.apply, actor, learner.warmup_optimizer),
        reward_critic=trained(nets.reward_critic.apply, reward_critic, learner.critic_optimizer),
        reward_target=reward_critic,
        cost_critic=trained(nets.cost_critic.apply, cost_critic, learner.critic_optimizer),
        cost_target=cost_critic,
        alpha=trained(entropy_weight, alpha, learner.alpha_optimizer),
        warmup_alpha=trained(entropy_weight, alpha, learner.alpha_optimizer),
        multiplier_state=learner.multiplier_rule.init(),
        reference=cloning.init_bc_state(nets.actor, learner.reference_optimizer, reference_key,
                                   sizes.observation_size),
        cost_limit=jnp.asarray(cost_limit, jnp.float32),
    )


def project_ensemble(params: Params, max_norm: float) -> Params:
    """Each head's weight matrices onto the L2 ball: the projection vmapped over the ensemble axis."""
    return jax.vmap(lambda p: critics.project_l2_ball(p, max_norm))(params)


def cost_threshold(learner: Learner, state: SATACState) -> jax.Array:
    return offline.cost_threshold(learner.config, learner.problem, state.cost_limit)


# --------------------------------------------------------------------------------------------------
# One update


def _sample_actions(learner: Learner, actor_params: Params, observations: jax.Array, key: jax.Array):
    mean, log_std = learner.networks.actor.apply(actor_params, observations)
    return distributions.tanh_gaussian_sample_and_log_prob(key, mean, log_std)


def _critic_targets(learner: Learner, state: SATACState, batch: TransitionBatch, next_actions: jax.Array,
                    tail_actions: jax.Array | None):
    """Regression targets of the reward and cost critics (cost: None for ATAC).

    One-step Bellman targets ``r + gamma (1 - d) min_e f^target(s', a')`` (cost: ``c``, ``max_e``);
    with ``tail_actions`` (a' ~ pi at the episodes' tail states) the Monte-Carlo targets
    ``G_t + tail_discount * min_e f^target(s_tail, a_tail)`` of the returns warm start instead.
    """
    config, nets = learner.config, learner.networks
    if tail_actions is None:
        observations, actions = batch.next_observations, next_actions
        signals = (batch.rewards, batch.costs)
        discounts = batch.discounts(config.discount)
    else:
        returns = batch.returns
        observations, actions = returns.tail_observations, tail_actions
        signals = (returns.reward_returns, returns.cost_returns)
        discounts = returns.tail_discounts
    reward_target = critics.bellman_target(
        signals[0], discounts, critics.double_q_min(nets.reward_critic.apply(state.reward_target, observations, actions)))
    if not config.use_cost_critic:
        return reward_target, None
    reduce_heads = critics.double_q_max if config.cost_target == "max" else critics.double_q_mean
    cost_target = critics.bellman_target(
        signals[1], discounts, reduce_heads(nets.cost_critic.apply(state.cost_target, observations, actions)))
    return reward_target, cost_target


def _critic_step(learner: Learner, state: SATACState, batch: TransitionBatch, policy_actions: jax.Array,
                 next_actions: jax.Array, multiplier: jax.Array, adversarial: bool,
                 tail_actions: jax.Array | None = None):
    """One Adam step of both critics, then projection and Polyak targets.

    With ``tail_actions`` the critics regress on the Monte-Carlo targets alone (the returns warm start).
    """
    config, nets = learner.config, learner.networks
    batch_size = batch.rewards.shape[0]
    discounts = batch.discounts(config.discount)
    # One forward pass per critic over the stacked (s, a), (s, pi(s)), (s', a') inputs.
    observations = jnp.concatenate([batch.observations, batch.observations, batch.next_observations])
    actions = jnp.concatenate([batch.actions, policy_actions, next_actions])

    def split(q: jax.Array):
        return q[:, :batch_size], q[:, batch_size:2 * batch_size], q[:, 2 * batch_size:]

    reward_td_target, cost_td_target = _critic_targets(learner, state, batch, next_actions, tail_actions)
    td_weight = config.td_weight if tail_actions is None else 1.0

    def loss_fn(critic_params):
        reward_params, cost_params = critic_params
        q_data, q_policy, q_next = split(nets.reward_critic.apply(reward_params, observations, actions))
        reward_loss = critic_loss(q_data, q_policy, q_next, reward_td_target, batch.rewards, discounts,
                                  config.beta, 1.0, adversarial, td_weight)
        metrics = {"reward_critic_loss": reward_loss, "q_reward_data": jnp.mean(q_data),
                   "reward_pessimism": jnp.mean(q_policy - q_data)}
        if not config.use_cost_critic:
            return reward_loss, metrics
        c_data, c_policy, c_next = split(nets.cost_critic.apply(cost_params, observations, actions))
        cost_loss = critic_loss(c_data, c_policy, c_next, cost_td_target, batch.costs, discounts,
                                config.cost_critic_beta, -multiplier, adversarial, td_weight)
        metrics.update(cost_critic_loss=cost_loss, q_cost_data=jnp.mean(c_data),
                       cost_pessimism=jnp.mean(c_policy - c_data))
        return reward_loss + cost_loss, metrics

    (reward_grads, cost_grads), metrics = jax.grad(loss_fn, has_aux=True)(
        (state.reward_critic.params, state.cost_critic.params))

    def step(critic: TrainState, grads: Params) -> TrainState:
        critic = critic.apply_gradients(grads=grads)
        return critic.replace(params=project_ensemble(critic.params, config.critic_norm))

    reward_critic, cost_critic = step(state.reward_critic, reward_grads), step(state.cost_critic, cost_grads)
    return state.replace(
        reward_critic=reward_critic,
        cost_critic=cost_critic,
        reward_target=critics.polyak_update(state.reward_target, reward_critic.params, config.tau),
        cost_target=critics.polyak_update(state.cost_target, cost_critic.params, config.tau),
    ), metrics


def phase_step(slow: TrainState, fast: TrainState, grads: Any, warm: bool) -> tuple[TrainState, TrainState]:
    """One Adam step of parameters held by two train states: the warm start's fast Adam (``fast``, when
    ``warm``) or the adversarial phase's slow one (``slow``). The other state takes the new parameters and
    keeps its moments, so the slow Adam enters the adversarial phase fresh. Returns ``(slow, fast)``."""
    if warm:
        fast = fast.apply_gradients(grads=grads)
        return slow.replace(params=fast.params), fast
    slow = slow.apply_gradients(grads=grads)
    return slow, fast.replace(params=slow.params)


def phase_alpha(state: SATACState, warm: bool) -> TrainState:
    """The alpha train state of the phase: the warm start's own, or the adversarial phase's."""
    return state.warmup_alpha if warm else state.alpha


def _alpha_step(learner: Learner, state: SATACState, log_probs: jax.Array, warm: bool) -> SATACState:
    """One Adam step of the phase's log alpha on :func:`alpha_loss`; the other phase's is untouched, so
    the adversarial phase starts from ``log(init_alpha)`` and fresh moments (ATAC's reset)."""
    alpha = phase_alpha(state, warm)
    grad = jax.grad(alpha_loss)(alpha.params["log_alpha"], log_probs, learner.target_entropy)
    alpha = alpha.apply_gradients(grads={"log_alpha": grad})
    return state.replace(warmup_alpha=alpha) if warm else state.replace(alpha=alpha)


def reference_cost(learner: Learner, state: SATACState, batch: TransitionBatch) -> jax.Array:
    """``Q_c(s, a_ref)`` per sample (the threshold itself for ``threshold``), gradient stopped."""
    config, nets = learner.config, learner.networks
    if config.reference == "threshold":
        return jnp.broadcast_to(cost_threshold(learner, state), batch.rewards.shape)
    if config.reference == "bc_safe":
        mean, _ = nets.actor.apply(state.reference.actor.params, batch.observations)
        reference_actions = distributions.tanh_gaussian_mode(mean)
    else:
        reference_actions = batch.actions
    return jax.lax.stop_gradient(critics.double_q_max(
        nets.cost_critic.apply(state.cost_critic.params, batch.observations, reference_actions)))


def _actor_step(learner: Learner, state: SATACState, batch: TransitionBatch, key: jax.Array,
                multiplier: jax.Array, warm: bool):
    config, nets = learner.config, learner.networks
    alpha = entropy_weight(phase_alpha(state, warm).params)
    q_cost_reference = reference_cost(learner, state, batch) if config.use_cost_critic else None

    def loss_fn(actor_params):
        mean, log_std = nets.actor.apply(actor_params, batch.observations)
        actions, log_probs = distributions.tanh_gaussian_sample_and_log_prob(key, mean, log_std)
        metrics = {"entropy": -jnp.mean(log_probs)}
        if warm:
            log_likelihood = mlp.actor_log_likelihood(nets.actor, actor_params, batch.observations, batch.actions)
            metrics["log_likelihood"] = jnp.mean(log_likelihood)
            # Cloning as ATAC warm-starts: maximise the data's likelihood with the entropy bonus.
            return actor_loss(log_likelihood, log_probs, alpha), metrics
        q_reward = nets.reward_critic.apply(state.reward_critic.params, batch.observations, actions)[0]
        metrics["q_reward_policy"] = jnp.mean(q_reward)
        penalty = None
        if config.use_cost_critic:
            # mode: the deterministic action evaluation runs, compared like for like with the reference's.
            penalty_actions = distributions.tanh_gaussian_mode(mean) if config.penalty_action == "mode" else actions
            q_cost = critics.double_q_max(nets.cost_critic.apply(state.cost_critic.params, batch.observations,
                                                                 penalty_actions))
            penalty = critics.aggression_limited_penalty(q_cost, q_cost_reference)
            metrics.update(q_cost_policy=jnp.mean(q_cost), penalty=jnp.mean(penalty))
        return actor_loss(q_reward, log_probs, alpha, penalty, multiplier), metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.actor.params)
    actor, warmup_actor = phase_step(state.actor, state.warmup_actor, grads, warm)
    return state.replace(actor=actor, warmup_actor=warmup_actor), metrics


def update(learner: Learner, state: SATACState, batch: TransitionBatch, key: jax.Array,
           warm: bool = False, actor_moves: bool = True) -> tuple[SATACState, dict[str, jax.Array]]:
    """One SATAC (or ATAC) update of one run: critics, alpha, actor, then the multiplier.

    ``warm`` selects the warm start: Bellman-only critics, a cloning actor, the multiplier held.
    ``actor_moves = False`` is the hold: the adversarial critic step alone (actor, alpha and
    multiplier held), so the critics answer the warm-started policy before it moves.
    The actor's sampled actions use the same noise in the critic step (as ``sg(pi(s))``) and in the
    actor step, as ATAC draws them once.
    """
    # The critics, and so the actor's objective, see the scaled signals.
    batch = batch.scaled(learner.config.reward_scale, learner.config.cost_scale)
    policy_key, next_key, tail_key = jax.random.split(key, 3)
    policy_actions, log_probs = _sample_actions(learner, state.actor.params, batch.observations, policy_key)
    next_actions, _ = _sample_actions(learner, state.actor.params, batch.next_observations, next_key)
    tail_actions = None
    if warm and learner.config.critic_warmup == "returns":
        tail_actions, _ = _sample_actions(learner, state.actor.params, batch.returns.tail_observations, tail_key)
        tail_actions = jax.lax.stop_gradient(tail_actions)
    multiplier = lagrangian.multiplier(state.multiplier_state)
    state, critic_metrics = _critic_step(learner, state, batch, jax.lax.stop_gradient(policy_actions),
                                         jax.lax.stop_gradient(next_actions), multiplier, adversarial=not warm,
                                         tail_actions=tail_actions)
    if not actor_moves:
        return state, {**critic_metrics, "alpha": entropy_weight(state.alpha.params), "multiplier": multiplier}
    state = _alpha_step(learner, state, log_probs, warm)
    state, actor_metrics = _actor_step(learner, state, batch, policy_key, multiplier, warm)
    if learner.config.use_cost_critic and not warm:
        # The constraint estimate: the policy's discounted cost value on the batch states, which the
        # per-step threshold bounds (the comparison OSRL's Q-based learners make).
        cost_value = jax.lax.stop_gradient(actor_metrics["q_cost_policy"])
        multiplier_state = learner.multiplier_rule.update(state.multiplier_state, cost_value,
                                                          cost_threshold(learner, state))
        state = state.replace(multiplier_state=multiplier_state)
    metrics = {**critic_metrics, **actor_metrics, "alpha": entropy_weight(phase_alpha(state, warm).params),
               "multiplier": multiplier}
    return state, metrics


def _reference_update(learner: Learner):
    clone = cloning.bc_update(learner.networks.actor)

    def reference_update(state: SATACState, batch: TransitionBatch, key: jax.Array):
        reference, metrics = clone(state.reference, batch, key)
        state = state.replace(reference=reference)
        if learner.config.actor_from_reference:
            # The actor follows the reference through this phase, so it enters the warm start as BC-Safe.
            params = reference.actor.params
            state = state.replace(actor=state.actor.replace(params=params),
                                  warmup_actor=state.warmup_actor.replace(params=params))
        return state, {f"reference_{k}": v for k, v in metrics.items()}

    return reference_update


def make_algorithm(config: Config, problem: offline.Problem) -> offline.Algorithm:
    """Phases: the BC-Safe reference (bc_safe only), the warm start, the actor's hold (critics only,
    adversarial; none by default), then adversarial training."""
    learner = make_learner(config, problem)
    phases = (
        offline.Phase("reference", _reference_update(learner),
                      config.reference_updates if config.trains_reference else 0, rows="safe",
                      safe_fraction=config.safe_fraction),
        offline.Phase("warmup", lambda s, b, k: update(learner, s, b, k, warm=True), config.warmup_updates,
                      rows=config.warmup_data, safe_fraction=config.safe_fraction),
        offline.Phase("hold", lambda s, b, k: update(learner, s, b, k, actor_moves=False),
                      config.actor_hold_updates),
        offline.Phase("train", lambda s, b, k: update(learner, s, b, k), config.num_updates),
    )
    return offline.Algorithm(lambda key, limit: init_state(learner, key, limit), phases,
                             mlp.mode_policy(learner.networks.actor), uses_cost_limit=config.uses_cost_limit,
                             uses_returns=config.critic_warmup == "returns" and config.warmup_updates > 0,
                             policy_fields=("actor.params",))


def run(config: Config, ctx) -> dict[str, Any]:
    """Trains SATAC (or ATAC) for every cost limit and seed; returns the DSRL scores."""
    return offline.run(config, ctx, make_algorithm)


SATAC = Experiment(Config, run)
WSAC = SATAC  # the published name (NeurIPS 2024) of the same learner and config
ATAC = Experiment(ATACConfig, run)
