"""CDT: the Constrained Decision Transformer (Liu, Guo, Yao, Cen, Yu, Zhang & Zhao 2023, "Constrained
Decision Transformer for Offline Safe Reinforcement Learning", ICML), as in OSRL.

CDT does no dynamic programming: it is return-conditioned sequence modelling. A causal transformer
(:mod:`constrained_rl.models.decision_transformer`) reads the last ``K`` steps of
``(R_t, C_t, s_t, a_t)``, where ``R_t = sum_{i>=t} r_i`` and ``C_t = sum_{i>=t} c_i`` are the reward and
cost still to come, and predicts ``a_t``. Trained on the data's own returns-to-go, it is steered at
evaluation by *asking*: the episode starts from a target ``(R_0, C_0) = (target reward, kappa)`` and
each step subtracts what was received, ``R_{t+1} = R_t - r_t``, ``C_{t+1} = C_t - c_t``.

The loss, on segments of ``K`` consecutive steps (mask ``m`` zero on padding past an episode's end):

    L = -(mean_m log pi(a_t | .) + alpha * mean_m H[pi(. | .)]) + w_c * mean CE(cost head, 1[c_t > 0]),

a diagonal Gaussian policy (log-std unbounded, as OSRL's ``DiagGaussianActor``) with entropy
regularisation, its temperature tuned towards
``H_target = -|A|`` by ``min_alpha alpha * (H - H_target)`` (OSRL's stochastic CDT), plus the
auxiliary cost classifier at the action tokens (weight 0.02). Tokens carry ``0.1 * R_t`` and
``50 - C_t`` (OSRL's reward scale and cost transform).

Two data devices make the conditioning on cost work (CDT paper section 4.3; OSRL's
``SequenceDataset``):

* **Return relabelling** (:func:`relabel_targets`). A target above what any safe episode achieved
  is infeasible; without examples of such targets the model extrapolates. CDT adds ``20%`` more
  trajectories whose targets ``(R, C)`` lie *above* the data's Pareto frontier (a degree-4 polynomial
  fit of its non-dominated episodes) and whose behaviour is that of the nearest episode costing at
  most ``C``: asked for the impossible, the model learns to act like the best episode within the cost.
* **Cost-weighted sampling**: a trajectory is drawn with probability ``max(0, 50 - C) / Z`` (its
  transformed cost return), then a segment start uniformly within it.

The evaluation policy acts with the Gaussian's mean, clipped to ``[-1, 1]``, on its own context
window (:func:`context_policy`, a :class:`~constrained_rl.rollouts.HistoryPolicy`): on a JAX task all
episodes play on the device, on a real task (``SafetyBallCircle-v0``...) the host runner keeps each
episode's window beside its simulator. CDT is trained once per seed, whatever the cost limit, and scored
under each limit by asking for that limit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training.train_state import TrainState

from algorithms.control import offline
from constrained_rl import distributions, rollouts
from constrained_rl.config import ConfigError, Experiment, require, require_positive_integers
from constrained_rl.data import dsrl
from constrained_rl.models.decision_transformer import DecisionTransformer

Params = Any


@dataclasses.dataclass(frozen=True)
class Config(offline.OfflineConfig):
    """CDT hyperparameters; defaults are OSRL's CDT config (``cdt_configs.py``)."""

    embedding_dim: int = 128  # token width (OSRL)
    num_layers: int = 3  # transformer blocks (OSRL)
    num_heads: int = 8  # attention heads (OSRL)
    context_length: int = 10  # K, steps in the context window (OSRL seq_len)
    attention_dropout: float = 0.1  # (OSRL)
    residual_dropout: float = 0.1  # (OSRL)
    embedding_dropout: float = 0.1  # (OSRL)
    batch_size: int = 2048  # segments per update (OSRL)
    num_updates: int = 100_000  # gradient updates (OSRL)
    learning_rate: float = 1e-4  # AdamW peak step size (OSRL)
    weight_decay: float = 1e-4  # AdamW decoupled weight decay (OSRL)
    learning_rate_warmup: int = 500  # updates of linear learning-rate warm-up (OSRL lr_warmup_steps)
    max_grad_norm: float = 0.25  # global gradient-norm clip (OSRL clip_grad)
    reward_scale: float = 0.1  # reward-to-go tokens carry reward_scale * R_t (OSRL)
    cost_scale: float = 1.0  # cost-to-go tokens carry cost_offset - cost_scale * C_t (OSRL)
    cost_offset: float = 50.0  # cost transform 50 - C of tokens and of trajectory sampling weights (OSRL)
    cost_loss_weight: float = 0.02  # weight of the auxiliary cost classifier (OSRL loss_cost_weight)
    init_temperature: float = 0.1  # initial entropy temperature alpha (OSRL)
    temperature_learning_rate: float = 1e-4  # Adam step of log alpha (OSRL)
    augment_fraction: float = 0.2  # relabelled trajectories added, as a fraction of the episodes (OSRL augment_percent)
    frontier_degree: int = 4  # degree of the polynomial fit of the Pareto frontier (OSRL deg)
    min_reward_above_frontier: float = 1.0  # relabelled rewards start this far above the frontier (OSRL min_reward)
    max_reward: float | None = None  # relabelled rewards' upper end; none: the data's highest episode reward
    max_reward_decrease: float | None = None  # neighbours' reward shortfall allowed; none: 20% of the reward range
    neighbour_beta: float = 1.0  # neighbour weights 1 / (distance + beta) when relabelling (OSRL beta)
    target_reward: float | None = None  # evaluation's reward target R_0; none: the data's highest episode reward

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_integers(self, "embedding_dim", "num_layers", "num_heads", "context_length",
                                  "frontier_degree")
        require(self.embedding_dim % self.num_heads == 0, "num_heads",
                f"must divide embedding_dim={self.embedding_dim} (got {self.num_heads})")
        for name in ("attention_dropout", "residual_dropout", "embedding_dropout"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, name, f"must be in [0, 1) (got {value})")
        for name in ("learning_rate", "max_grad_norm", "reward_scale", "cost_scale", "init_temperature",
                     "temperature_learning_rate", "neighbour_beta"):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, name, f"must be > 0 (got {value})")
        for name in ("weight_decay", "cost_loss_weight", "min_reward_above_frontier"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, name, f"must be >= 0 (got {value})")
        require(isinstance(self.learning_rate_warmup, int) and self.learning_rate_warmup >= 0,
                "learning_rate_warmup", f"must be an integer >= 0 (got {self.learning_rate_warmup!r})")
        require(0.0 <= self.augment_fraction <= 1.0, "augment_fraction",
                f"must be in [0, 1] (got {self.augment_fraction})")
        require(math.isfinite(self.cost_offset), "cost_offset", f"must be finite (got {self.cost_offset})")
        if self.max_reward_decrease is not None:
            require(self.max_reward_decrease >= 0, "max_reward_decrease",
                    f"must be >= 0 (got {self.max_reward_decrease})")


# --------------------------------------------------------------------------------------------------
# Return relabelling (host-side, once)


def pareto_frontier(reward_returns: np.ndarray, cost_returns: np.ndarray) -> np.ndarray:
    """Indices of the episodes no other episode dominates (costs no more and earns more, or costs
    less and earns as much), in increasing cost."""
    order = np.lexsort((-reward_returns, cost_returns))  # by cost, then highest reward first
    frontier, best = [], -np.inf
    for i in order:
        if reward_returns[i] > best:
            frontier.append(i)
            best = reward_returns[i]
    return np.asarray(frontier, np.int64)


class Relabelled(NamedTuple):
    """Relabelled trajectories: episode ``source[j]`` asked for ``(target_reward[j], target_cost[j])``."""

    source: np.ndarray  # [M] int64, the episode whose behaviour answers the target
    target_reward: np.ndarray  # [M] float64, R_0 asked for
    target_cost: np.ndarray  # [M] float64, C_0 asked for


def relabel_targets(reward_returns: np.ndarray, cost_returns: np.ndarray, rng: np.random.Generator,
                    fraction: float = 0.2, degree: int = 4, min_above_frontier: float = 1.0,
                    max_reward: float | None = None, max_reward_decrease: float | None = None,
                    beta: float = 1.0) -> Relabelled:
    """CDT's return relabelling (OSRL ``augmentation``): infeasible targets and who answers them.

    1. ``f``: a polynomial of degree ``degree`` fitted to the Pareto frontier ``(C, R)``.
    2. ``M = floor(fraction * E)`` target costs evenly spaced over ``[C_min, C_max]``; each target
       reward uniform in ``[f(C) + min_above_frontier, max(max_reward, f(C) + min_above_frontier)]``.
    3. Each target is answered by the episode nearest to it (Euclidean in ``(C, R)``) among those
       costing at most its ``C``. When several targets pick one episode, the first keeps it and the
       others draw a neighbour with weight ``1 / (distance + beta)`` among the episodes costing no
       more than it and earning at least its reward minus ``max_reward_decrease``.

    ``max_reward`` defaults to the highest episode reward and ``max_reward_decrease`` to 20% of the
    reward range (OSRL's per-task values sit near these: CarCircle 500 and 100).
    """
    rewards = np.asarray(reward_returns, np.float64)
    costs = np.asarray(cost_returns, np.float64)
    count = int(fraction * rewards.shape[0])
    if count == 0:
        empty = np.zeros(0)
        return Relabelled(np.zeros(0, np.int64), empty, empty)
    top = rewards.max() if max_reward is None else max_reward
    decrease = 0.2 * (rewards.max() - rewards.min()) if max_reward_decrease is None else max_reward_decrease
    frontier = pareto_frontier(rewards, costs)
    fit = np.poly1d(np.polyfit(costs[frontier], rewards[frontier], deg=min(degree, frontier.size - 1)))
    target_costs = np.linspace(costs.min(), costs.max(), count)
    low = fit(target_costs) + min_above_frontier
    target_rewards = rng.uniform(low, np.maximum(top, low))

    def distances(cost: float, reward: float, candidates: np.ndarray) -> np.ndarray:
        return np.hypot(costs[candidates] - cost, rewards[candidates] - reward)

    nearest = np.empty(count, np.int64)
    for j in range(count):
        candidates = np.flatnonzero(costs <= target_costs[j])
        nearest[j] = candidates[np.argmin(distances(target_costs[j], target_rewards[j], candidates))]
    source = nearest.copy()
    for episode in np.unique(nearest):
        repeats = np.flatnonzero(nearest == episode)[1:]
        if repeats.size == 0:
            continue
        candidates = np.flatnonzero((costs <= costs[episode]) & (rewards >= rewards[episode] - decrease))
        weights = 1.0 / (distances(costs[episode], rewards[episode], candidates) + beta)
        source[repeats] = rng.choice(candidates, size=repeats.size, p=weights / weights.sum())
    return Relabelled(source, target_rewards, target_costs)


# --------------------------------------------------------------------------------------------------
# Segments: the prepared data and the sampler


@struct.dataclass
class SequenceData:
    """Per row: the step and its undiscounted returns-to-go; per trajectory (episodes, then the
    relabelled ones): where it lies, the shift of its returns-to-go and its log sampling weight."""

    observations: jax.Array  # [N, obs]
    actions: jax.Array  # [N, act]
    costs: jax.Array  # [N]
    reward_to_go: jax.Array  # [N], sum_{i >= t} r_i within the row's episode
    cost_to_go: jax.Array  # [N]
    starts: jax.Array  # [E'] int32, first row
    lengths: jax.Array  # [E'] int32
    reward_shift: jax.Array  # [E'], target R_0 minus the episode's own (0 for the data's episodes)
    cost_shift: jax.Array  # [E']
    log_weights: jax.Array  # [E'], log max(0, cost_offset - C_0)


class Segments(NamedTuple):
    """A minibatch of ``B`` segments of ``K`` steps; every field ``[B, K, ...]``."""

    observations: jax.Array
    actions: jax.Array
    costs: jax.Array
    reward_to_go: jax.Array
    cost_to_go: jax.Array
    timesteps: jax.Array  # int32, the step's index within its episode
    valid: jax.Array  # bool, False past the episode's end (padding)


class Trajectories(NamedTuple):
    """The episodes and relabelled trajectories CDT samples from (host-side)."""

    episodes: dsrl.Episodes
    relabelled: Relabelled


def trajectories(config: Config, dataset: dsrl.OfflineDataset) -> Trajectories:
    """The dataset's complete episodes and their relabelled copies (seeded by ``config.seed``)."""
    episodes = dsrl.split_episodes(dataset)
    if episodes.num_episodes == 0:
        raise ConfigError("dataset: CDT needs at least one complete episode (a terminal or timeout flag)")
    rng = np.random.default_rng(config.seed)
    relabelled = relabel_targets(episodes.reward_returns, episodes.cost_returns, rng, config.augment_fraction,
                                 config.frontier_degree, config.min_reward_above_frontier, config.max_reward,
                                 config.max_reward_decrease, config.neighbour_beta)
    data = Trajectories(episodes, relabelled)
    require(sampling_weights(config, data).sum() > 0, "cost_offset",
            f"every trajectory's cost return is >= {config.cost_offset:g}, so none would be sampled; raise it")
    return data


def sampling_weights(config: Config, data: Trajectories) -> np.ndarray:
    """``max(0, cost_offset - C_0)`` per trajectory (episodes, then relabelled): OSRL's cost sampling."""
    return np.maximum(0.0, config.cost_offset - np.concatenate([data.episodes.cost_returns,
                                                                data.relabelled.target_cost]))


def prepare(config: Config, data: Trajectories, dataset: dsrl.OfflineDataset) -> SequenceData:
    """The device arrays segments are sampled from (host-side, once per training session)."""
    episodes, relabelled = data
    rewards = np.asarray(dataset.rewards, np.float64)
    costs = np.asarray(dataset.costs, np.float64)
    # Returns-to-go as differences of prefix sums: sum_{i=t}^{end-1} x_i = P[end] - P[t].
    end_of_row = np.full(rewards.shape[0], rewards.shape[0], np.int64)
    end_of_row[: episodes.ends[-1]] = np.repeat(episodes.ends, episodes.lengths)
    rows = np.arange(rewards.shape[0])

    def to_go(values: np.ndarray) -> jax.Array:
        prefix = np.concatenate([np.zeros(1), np.cumsum(values)])
        return jnp.asarray(prefix[end_of_row] - prefix[rows], jnp.float32)

    source = relabelled.source
    starts = np.concatenate([episodes.starts, episodes.starts[source]])
    lengths = np.concatenate([episodes.lengths, episodes.lengths[source]])
    reward_shift = np.concatenate([np.zeros(episodes.num_episodes),
                                   relabelled.target_reward - episodes.reward_returns[source]])
    cost_shift = np.concatenate([np.zeros(episodes.num_episodes),
                                 relabelled.target_cost - episodes.cost_returns[source]])
    weights = sampling_weights(config, data)
    with np.errstate(divide="ignore"):
        log_weights = np.log(weights / weights.sum())
    return SequenceData(
        observations=dataset.observations, actions=dataset.actions, costs=dataset.costs,
        reward_to_go=to_go(rewards), cost_to_go=to_go(costs),
        starts=jnp.asarray(starts, jnp.int32), lengths=jnp.asarray(lengths, jnp.int32),
        reward_shift=jnp.asarray(reward_shift, jnp.float32), cost_shift=jnp.asarray(cost_shift, jnp.float32),
        log_weights=jnp.asarray(log_weights, jnp.float32))


def sample_segments(data: SequenceData, key: jax.Array, batch_size: int, context_length: int) -> Segments:
    """``batch_size`` segments: a trajectory by its weight, a start uniform within it, ``K`` steps
    from there, zero-padded past its end (OSRL ``SequenceDataset``)."""
    trajectory_key, start_key = jax.random.split(key)
    trajectory = jax.random.categorical(trajectory_key, data.log_weights, shape=(batch_size,))
    length = data.lengths[trajectory]
    offset = jax.random.randint(start_key, (batch_size,), 0, length)
    steps = offset[:, None] + jnp.arange(context_length)[None, :]  # [B, K] index within the episode
    valid = steps < length[:, None]
    rows = data.starts[trajectory][:, None] + jnp.minimum(steps, length[:, None] - 1)

    def take(values: jax.Array, shift: jax.Array | None = None) -> jax.Array:
        taken = values[rows] if shift is None else values[rows] + shift[trajectory][:, None]
        mask = valid.reshape(valid.shape + (1,) * (taken.ndim - 2))
        return jnp.where(mask, taken, 0.0)

    return Segments(
        observations=take(data.observations), actions=take(data.actions), costs=take(data.costs),
        reward_to_go=take(data.reward_to_go, data.reward_shift), cost_to_go=take(data.cost_to_go, data.cost_shift),
        timesteps=steps.astype(jnp.int32), valid=valid)


# --------------------------------------------------------------------------------------------------
# Loss and update


@struct.dataclass
class CDTState:
    model: TrainState  # the transformer's variables, with the clipped, warmed-up AdamW
    temperature: TrainState  # params {"log_temperature": log alpha}, with Adam
    target_reward: jax.Array  # R_0 at evaluation, unscaled


def temperature_value(params: dict[str, jax.Array]) -> jax.Array:
    """The entropy temperature ``alpha = exp(log_temperature)`` of the temperature train state's parameters."""
    return jnp.exp(params["log_temperature"])


def make_model(config: Config, problem: offline.Problem) -> DecisionTransformer:
    return DecisionTransformer(
        action_size=problem.action_size, max_timestep=problem.episode_length + config.context_length,
        embedding_dim=config.embedding_dim, num_layers=config.num_layers, num_heads=config.num_heads,
        attention_dropout=config.attention_dropout, residual_dropout=config.residual_dropout,
        embedding_dropout=config.embedding_dropout)


def token_values(config: Config, reward_to_go: jax.Array, cost_to_go: jax.Array) -> tuple[jax.Array, jax.Array]:
    """What the return tokens carry: ``reward_scale * R`` and ``cost_offset - cost_scale * C``."""
    return config.reward_scale * reward_to_go, config.cost_offset - config.cost_scale * cost_to_go


def cdt_loss(output, segments: Segments, temperature: jax.Array,
             cost_loss_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``-(mean_m log pi + alpha mean_m H) + w_c mean(m * CE)`` with OSRL's averaging: the policy terms
    per valid step and action dimension, the cost term over all ``B K`` positions."""
    mask = segments.valid.astype(jnp.float32)
    action_size = segments.actions.shape[-1]
    per_dimension = mask.sum() * action_size
    log_likelihood = jnp.sum(mask * distributions.gaussian_log_prob(
        output.action_mean, output.action_log_std, segments.actions)) / per_dimension
    entropy = jnp.sum(mask * distributions.gaussian_entropy(output.action_log_std)) / per_dimension
    labels = (segments.costs > 0).astype(jnp.int32)
    cost_nll = -jnp.take_along_axis(output.cost_logits, labels[..., None], axis=-1)[..., 0]
    cost_loss = jnp.mean(mask * cost_nll)
    action_loss = -(log_likelihood + jax.lax.stop_gradient(temperature) * entropy)
    metrics = {"log_likelihood": log_likelihood, "entropy": entropy, "cost_loss": cost_loss}
    return action_loss + cost_loss_weight * cost_loss, metrics


def temperature_loss(log_temperature: jax.Array, entropy: jax.Array, target_entropy: float) -> jax.Array:
    """``alpha (H - H_target)`` with ``H`` held fixed: alpha grows while the entropy is below target."""
    return jnp.exp(log_temperature) * jax.lax.stop_gradient(entropy - target_entropy)


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """AdamW behind a global-norm clip, its step warmed up linearly: ``lr * min((n + 1) / W, 1)``."""
    warmup = max(config.learning_rate_warmup, 1)
    schedule = lambda n: config.learning_rate * jnp.minimum((n + 1) / warmup, 1.0)
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                       optax.adamw(schedule, weight_decay=config.weight_decay))


def make_update(config: Config, model: DecisionTransformer, target_entropy: float):
    """One update ``(CDTState, segments, key) -> (CDTState, metrics)`` of the model and the temperature, each
    with its train state's optimizer."""

    def loss_fn(params: Params, state: CDTState, segments: Segments, key: jax.Array):
        reward_tokens, cost_tokens = token_values(config, segments.reward_to_go, segments.cost_to_go)
        output = model.apply(params, segments.observations, segments.actions, reward_tokens, cost_tokens,
                             segments.timesteps, segments.valid, deterministic=False, rngs={"dropout": key})
        return cdt_loss(output, segments, temperature_value(state.temperature.params), config.cost_loss_weight)

    def update(state: CDTState, segments: Segments, key: jax.Array) -> tuple[CDTState, dict]:
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.model.params, state, segments, key)
        temperature_grad = jax.grad(temperature_loss)(state.temperature.params["log_temperature"],
                                                      metrics["entropy"], target_entropy)
        new_state = state.replace(
            model=state.model.apply_gradients(grads=grads),
            temperature=state.temperature.apply_gradients(grads={"log_temperature": temperature_grad}))
        return new_state, {**metrics, "loss": loss, "temperature": temperature_value(state.temperature.params)}

    return update


# --------------------------------------------------------------------------------------------------
# Evaluation: the policy on its own context window


class Context(NamedTuple):
    """The last ``K`` steps of each episode ``[E, K, ...]``, the newest last, with the action of the
    newest step still a zero placeholder (the causal mask keeps it from its own prediction)."""

    observations: jax.Array
    actions: jax.Array
    reward_to_go: jax.Array
    cost_to_go: jax.Array
    timesteps: jax.Array
    valid: jax.Array


def context_policy(config: Config, model: DecisionTransformer) -> rollouts.HistoryPolicy:
    """CDT's evaluation policy, its parameters ``(CDTState, cost limit)``: target ``(R_0, kappa)``."""
    steps = config.context_length

    def start(params: tuple[CDTState, jax.Array], observations: jax.Array) -> Context:
        learner, cost_limit = params
        episodes = observations.shape[0]
        newest = jnp.arange(steps) == steps - 1

        def newest_only(value: jax.Array) -> jax.Array:
            return jnp.where(newest, value, 0.0) * jnp.ones((episodes, steps))

        return Context(
            observations=jnp.zeros((episodes, steps, observations.shape[-1])).at[:, -1].set(observations),
            actions=jnp.zeros((episodes, steps, model.action_size)),
            reward_to_go=newest_only(learner.target_reward), cost_to_go=newest_only(cost_limit),
            timesteps=jnp.zeros((episodes, steps), jnp.int32),
            valid=jnp.broadcast_to(newest, (episodes, steps)))

    def act(params: tuple[CDTState, jax.Array], context: Context, key: jax.Array) -> tuple[jax.Array, Context]:
        del key  # the mean action
        reward_tokens, cost_tokens = token_values(config, context.reward_to_go, context.cost_to_go)
        output = model.apply(params[0].model.params, context.observations, context.actions, reward_tokens, cost_tokens,
                             context.timesteps, context.valid, deterministic=True)
        action = jnp.clip(output.action_mean[:, -1], -1.0, 1.0)
        return action, context._replace(actions=context.actions.at[:, -1].set(action))

    def remember(params: Any, context: Context, transition: rollouts.Transition) -> Context:
        del params

        def push(values: jax.Array, newest: jax.Array) -> jax.Array:
            return jnp.concatenate([values[:, 1:], newest[:, None]], axis=1)

        return Context(
            observations=push(context.observations, transition.next_obs),
            actions=push(context.actions, jnp.zeros_like(transition.action)),
            reward_to_go=push(context.reward_to_go, context.reward_to_go[:, -1] - transition.reward),
            cost_to_go=push(context.cost_to_go, context.cost_to_go[:, -1] - transition.cost),
            timesteps=push(context.timesteps, context.timesteps[:, -1] + 1),
            valid=push(context.valid, jnp.ones_like(context.valid[:, -1])))

    return rollouts.HistoryPolicy(start, act, remember)


# --------------------------------------------------------------------------------------------------
# The learner


def make_algorithm(config: Config, problem: offline.Problem, data: Trajectories | None) -> offline.Algorithm:
    """CDT; ``data`` None builds it for evaluation only: R_0 is then a placeholder, a trained state's own
    ``target_reward`` being restored over it."""
    model = make_model(config, problem)
    optimizer = make_optimizer(config)
    temperature_optimizer = optax.adam(config.temperature_learning_rate)
    if config.target_reward is not None:
        target_reward = float(config.target_reward)
    else:
        target_reward = float(data.episodes.reward_returns.max()) if data is not None else math.nan
    steps = config.context_length

    def init(key: jax.Array, cost_limit: jax.Array) -> CDTState:
        del cost_limit  # asked for at evaluation, not trained for
        zeros = jnp.zeros((1, steps))
        params = model.init(key, jnp.zeros((1, steps, problem.observation_size)),
                            jnp.zeros((1, steps, problem.action_size)), zeros, zeros,
                            jnp.zeros((1, steps), jnp.int32), jnp.ones((1, steps), bool))
        log_temperature = {"log_temperature": jnp.asarray(math.log(config.init_temperature), jnp.float32)}
        return CDTState(model=TrainState.create(apply_fn=model.apply, params=params, tx=optimizer),
                        temperature=TrainState.create(apply_fn=temperature_value, params=log_temperature,
                                                      tx=temperature_optimizer),
                        target_reward=jnp.asarray(target_reward, jnp.float32))

    update = make_update(config, model, target_entropy=-float(problem.action_size))
    evaluate = offline.ConditionedEvaluation(context_policy(config, model))
    sampler = offline.DataSampler(
        prepare=lambda dataset: prepare(config, data, dataset),
        sample=lambda prepared, key, batch_size: sample_segments(prepared, key, batch_size, steps))
    return offline.Algorithm(init, (offline.Phase("train", update, config.num_updates),), uses_cost_limit=False,
                             sampler=sampler, evaluate=evaluate, policy_fields=("model.params", "target_reward"))


def builder(config: Config, dataset: dsrl.OfflineDataset) -> offline.MakeAlgorithm:
    """The scaffold's ``make_algorithm`` for ``dataset`` (its episodes, relabelled once)."""
    data = trajectories(config, dataset)
    return lambda config, problem: make_algorithm(config, problem, data)


def evaluation_algorithm(config: Config, problem: offline.Problem) -> offline.Algorithm:
    """The learner as its evaluation needs it, built without its data (the ``evaluate`` experiment)."""
    return make_algorithm(config, problem, data=None)


def run(config: Config, ctx) -> dict[str, Any]:
    """Trains CDT once per seed and scores it under every cost limit; returns the DSRL scores."""
    return offline.run_built(config, ctx, builder)


CDT = Experiment(Config, run)
