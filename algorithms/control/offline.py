"""The shared scaffold of the offline safe-RL learners (SATAC, ATAC, BC, BCQ-Lag, BEAR-Lag, CPQ, COptiDICE, CDT).

An offline learner is three things (:class:`Algorithm`), built from its config and the
:class:`Problem` it faces:

* ``init(key, cost_limit) -> state``: the learner state of one run (networks, optimizers,
  multipliers; the cost limit it is held to, if it needs one);
* ``phases``: one or more :class:`Phase` trained in order (a warm start, then the main phase...),
  each a pure ``update(state, batch, key) -> (state, metrics)`` on one minibatch of transitions,
  drawn from all the data or only from the episodes within the run's cost limit (BC-Safe);
* ``policy(state, obs, key) -> (action, extras)``: the deterministic evaluation policy, in the form
  of :mod:`constrained_rl.rollouts` policies with the whole learner state as its parameters, and
  ``policy_fields``, the parts of the state it reads (what the run exports).

A sequence learner (CDT) replaces two of these defaults: its ``sampler`` draws its own minibatches
(trajectory segments) from data it prepares once, and its ``evaluate`` (:class:`ConditionedEvaluation`)
is a policy with memory (a :class:`~constrained_rl.rollouts.HistoryPolicy`) told the cost limit it is
scored under, played on the device for a JAX task and by the host runner for a real one.

Everything else lives here, once: the dataset (a DSRL file, or one collected first with
:mod:`algorithms.control.collect`), runs vmapped over seeds *and* cost limits (``len(cost_limits) x
num_seeds`` runs trained by one jitted call, the runs of one seed sharing their initial weights), a
jitted chunk of ``updates_per_chunk`` updates as one ``lax.scan`` whose minibatches are sampled on
the device from the device-resident dataset, periodic evaluation on the jitted environment with the
DSRL normalization, checkpointed and resumable through ``ctx.loop``, the final policies exported to
``policy/`` of the run directory (:mod:`algorithms.control.policy_export`; re-scored by the ``evaluate``
experiment), and the final DSRL scores.

A learner module then reads::

    @dataclasses.dataclass(frozen=True)
    class Config(offline.OfflineConfig):
        learning_rate: float = 1e-3  # ...

    def make_algorithm(config: Config, problem: offline.Problem) -> offline.Algorithm: ...

    def run(config: Config, ctx) -> dict:
        return offline.run(config, ctx, make_algorithm)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from algorithms.control import collect, policy_export
from constrained_rl import envs, evaluation, lagrangian, returns, rollouts
from constrained_rl.config import ConfigError, require, require_positive_integers
from constrained_rl.data import dsrl, dsrl_tasks
from constrained_rl.rollouts import PolicyFn

Rows = Literal["all", "safe"]
Metrics = dict[str, jax.Array]
Update = Callable[[Any, dsrl.TransitionBatch, jax.Array], tuple[Any, Metrics]]


@dataclasses.dataclass(frozen=True)
class OfflineConfig:
    """Settings every offline learner shares; a learner's Config subclasses it."""

    task: str = "BallCircle"  # evaluated on: a JAX task or a real task's id (SafetyBallCircle-v0; envs.task_names)
    dataset: str = ""  # DSRL HDF5 file; empty: collect one first at collect's defaults (see collect)
    reward_min: float | None = None  # reference return scored 0, overriding the file's (DSRL spec)
    reward_max: float | None = None  # reference return scored 1, overriding the file's (DSRL spec)
    cost_limits: tuple[float, ...] = (10.0, 20.0, 40.0)  # episodic cost limits kappa (SATAC's Circle set)
    seed: int = 0  # base PRNG seed; seed i of num_seeds draws from fold_in(seed, i)
    num_seeds: int = 3  # training seeds per cost limit (DSRL protocol: 3)
    num_updates: int = 100_000  # gradient updates of the main phase
    batch_size: int = 256  # transitions per gradient update
    discount: float = 0.99  # gamma of the Bellman targets and of the per-step cost threshold
    updates_per_chunk: int = 1_000  # updates per jitted device call (one lax.scan)
    checkpoint_every: int = 10  # chunks between checkpoints of the training state
    eval_every: int = 10  # chunks between evaluations during training; 0 for none
    eval_episodes_during: int = 5  # episodes per run at each evaluation during training
    eval_episodes: int = 20  # episodes per run in the final evaluation (DSRL protocol: 20)

    def __post_init__(self) -> None:
        envs.require_task(self.task)
        require(len(self.cost_limits) >= 1, "cost_limits", "needs at least one cost limit")
        require(all(math.isfinite(k) and k >= 0 for k in self.cost_limits), "cost_limits",
                f"must be finite and >= 0 (got {self.cost_limits})")
        require(len(set(self.cost_limits)) == len(self.cost_limits), "cost_limits",
                f"must be distinct (got {self.cost_limits})")
        require(self.seed >= 0, "seed", f"must be >= 0 (got {self.seed})")
        require_positive_integers(self, "num_seeds", "num_updates", "batch_size", "updates_per_chunk",
                                  "checkpoint_every", "eval_episodes", "eval_episodes_during")
        require(isinstance(self.eval_every, int) and self.eval_every >= 0, "eval_every",
                f"must be an integer >= 0 (got {self.eval_every!r})")
        require(0.0 <= self.discount < 1.0, "discount", f"must be in [0, 1) (got {self.discount})")
        require_whole_chunks(self, "num_updates")
        if self.reward_min is not None and self.reward_max is not None:
            require(self.reward_max > self.reward_min, "reward_max",
                    f"must exceed reward_min={self.reward_min} (got {self.reward_max})")

    @property
    def num_runs(self) -> int:
        return len(self.cost_limits) * self.num_seeds


def require_whole_chunks(config: OfflineConfig, field: str) -> None:
    """Refuses an update count (``config.<field>``) that is not a whole number of chunks.

    A count below ``updates_per_chunk`` is one chunk of that size; 0 skips the phase.
    """
    count = getattr(config, field)
    require(isinstance(count, int) and count >= 0, field, f"must be an integer >= 0 (got {count!r})")
    if count:
        per_chunk = min(count, config.updates_per_chunk)
        require(count % per_chunk == 0, field,
                f"must be a multiple of updates_per_chunk={config.updates_per_chunk} (got {count})")


# --------------------------------------------------------------------------------------------------
# What a learner provides


class Problem(NamedTuple):
    """The static facts a learner is built for."""

    observation_size: int
    action_size: int
    episode_length: int  # T of the evaluation environment, for per-step cost thresholds


class Phase(NamedTuple):
    """A stretch of training with one update function (a stage of ``ctx.loop``)."""

    name: str  # stage name: checkpoint folder and metrics prefix; unique within a learner
    update: Update  # pure (state, batch, key) -> (state, metrics) of one run
    num_updates: int  # 0 skips the phase
    rows: Rows = "all"  # sample from all transitions, or from episodes with cost return <= kappa
    safe_fraction: float = 1.0  # "safe" rows: the episodes with cost return <= this x kappa


class DataSampler(NamedTuple):
    """A learner's own minibatches in place of uniform transitions (CDT's trajectory segments)."""

    prepare: Callable[[dsrl.OfflineDataset], Any]  # host-side, once: the device pytree sampled from
    sample: Callable[[Any, jax.Array, int], Any]  # (prepared, key, batch_size) -> the update's batch


@dataclasses.dataclass(frozen=True)
class ConditionedEvaluation:
    """A learner's own evaluation: a history policy whose parameters are ``(learner state, cost limit)``
    (CDT's target cost), played once per scored limit by :func:`play_episodes`, on the device or on the
    host as the task demands (:func:`constrained_rl.envs.evaluate_runs`).

    Called, it plays one run's episodes on a JAX task:
    ``(env, learner, cost_limit, key, num_episodes) -> EpisodeStats [num_episodes]``.
    """

    policy: rollouts.HistoryPolicy

    def __call__(self, env: envs.Env, learner: Any, cost_limit: jax.Array, key: jax.Array,
                 num_episodes: int) -> rollouts.EpisodeStats:
        return rollouts.evaluate_history_episodes(env, self.policy, (learner, cost_limit), key, num_episodes)


class Algorithm(NamedTuple):
    init: Callable[[jax.Array, jax.Array], Any]  # (key, cost_limit) -> learner state of one run
    phases: tuple[Phase, ...]  # trained in order
    policy: PolicyFn | None = None  # deterministic evaluation policy(state, obs, key) -> (action, extras)
    # False when training ignores the cost limit (BC-All, ATAC): one run per seed is trained and
    # scored under every limit, instead of identical copies per limit.
    uses_cost_limit: bool = True
    # True when an update reads ``batch.returns`` (Monte-Carlo targets): the scaffold then adds the
    # dataset's discounted returns-to-go (dsrl.with_returns_to_go at the config's discount).
    uses_returns: bool = False
    # Set: the phases' minibatches come from it (all rows; ``Phase.rows`` must be "all").
    sampler: DataSampler | None = None
    # Set: episodes are played by its history policy instead of by ``policy``, once per scored cost
    # limit (the policy conditions on the limit: CDT's target cost), so a learner that ignores the limit
    # in training is still scored under each limit by its own conditioned policy.
    evaluate: ConditionedEvaluation | None = None
    # The learner-state fields (dotted paths: "actor", "actor.params") that ``policy`` / ``evaluate``
    # read, exported at the end of training; a state holding only these of a trained one (the rest
    # freshly initialised) evaluates exactly alike. None: the whole learner state.
    policy_fields: tuple[str, ...] | None = None


MakeAlgorithm = Callable[[Any, Problem], Algorithm]
# (config, dataset) -> make_algorithm: a learner built with facts of its data (COptiDICE's statistics,
# CDT's relabelled trajectories).
Builder = Callable[[Any, dsrl.OfflineDataset], MakeAlgorithm]


# --------------------------------------------------------------------------------------------------
# Runs: a flat leading axis over (cost limit, seed)


@struct.dataclass
class RunState:
    """One run's learner state with its sampling key; training states carry a leading run axis."""

    learner: Any
    key: jax.Array  # draws minibatches and the update's own randomness
    updates: jax.Array  # int32, gradient updates done in all phases so far


class RunLayout(NamedTuple):
    """Which cost limit and seed each run has: run ``r`` is limit ``r // S``, seed ``r % S``."""

    cost_limits: np.ndarray  # [R] float32
    seed_indices: np.ndarray  # [R] int
    limit_values: tuple[float, ...]  # the distinct limits, in config order


def run_layout(cost_limits: Sequence[float], num_seeds: int) -> RunLayout:
    limits = np.repeat(np.asarray(cost_limits, np.float32), num_seeds)
    seeds = np.tile(np.arange(num_seeds), len(cost_limits))
    return RunLayout(limits, seeds, tuple(float(k) for k in cost_limits))


def seed_keys(seed: int, seed_indices: np.ndarray) -> jax.Array:
    """``fold_in(PRNGKey(seed), i)`` per run: a seed's runs start alike whatever else is batched."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(seed_indices))


def init_runs(algorithm: Algorithm, keys: jax.Array, cost_limits: jax.Array) -> RunState:
    """The batched initial state of ``len(keys)`` runs (one key and one cost limit each)."""
    return _initialiser(algorithm)(keys, jnp.asarray(cost_limits, jnp.float32))


@functools.lru_cache(maxsize=32)
def _initialiser(algorithm: Algorithm):
    def one_run(key: jax.Array, cost_limit: jax.Array) -> RunState:
        init_key, run_key = jax.random.split(key)
        return RunState(algorithm.init(init_key, cost_limit), run_key, jnp.zeros((), jnp.int32))

    # Initialisation runs once: compiling it without XLA's optimisations takes a fraction of the
    # time and gives the same values.
    return jax.jit(jax.vmap(one_run), compiler_options={"xla_backend_optimization_level": 0})


# --------------------------------------------------------------------------------------------------
# Rows each run samples from


@struct.dataclass
class RowSet:
    """The dataset rows a run samples from: the first ``count`` entries of ``indices`` (padded)."""

    indices: jax.Array  # [N] int32 (a leading run axis when batched)
    count: jax.Array  # int32


def safe_rows(episodes: dsrl.Episodes, cost_limit: float, fraction: float = 1.0) -> np.ndarray:
    """Rows of the episodes with cost return ``C <= fraction * cost_limit`` (OSRL's BC-Safe data at
    ``fraction = 1``), in order."""
    bound = fraction * cost_limit
    keep = episodes.cost_returns <= bound
    if not keep.any():
        lowest = episodes.cost_returns.min() if episodes.num_episodes else float("nan")
        within = f"{bound:g}" if fraction == 1 else f"{bound:g} ({fraction:g} x {cost_limit:g})"
        raise ConfigError(f"cost_limits: no episode has cost return <= {within}; the lowest is {lowest:g}")
    return np.concatenate([np.arange(s, e) for s, e in zip(episodes.starts[keep], episodes.ends[keep])])


def row_sets(dataset: dsrl.OfflineDataset, rows: Rows, layout: RunLayout, safe_fraction: float = 1.0) -> RowSet:
    """Each run's rows ``[R, N]``: every row, or the rows of the episodes within ``safe_fraction`` of
    its limit."""
    num_rows = dataset.num_transitions
    if rows == "all":
        per_limit = {k: np.arange(num_rows) for k in layout.limit_values}
    else:
        episodes = dsrl.split_episodes(dataset)
        per_limit = {k: safe_rows(episodes, k, safe_fraction) for k in layout.limit_values}
    padded = {k: np.pad(r, (0, num_rows - r.size)).astype(np.int32) for k, r in per_limit.items()}
    limits = [float(k) for k in layout.cost_limits]
    return RowSet(indices=jnp.asarray(np.stack([padded[k] for k in limits])),
                  count=jnp.asarray([per_limit[k].size for k in limits], jnp.int32))


def sample_rows(rows: RowSet, key: jax.Array, batch_size: int) -> jax.Array:
    """``batch_size`` row indices drawn uniformly with replacement from one run's rows (jittable)."""
    positions = jax.random.randint(key, (batch_size,), 0, rows.count)
    return rows.indices[positions]


# --------------------------------------------------------------------------------------------------
# The jitted chunk


@functools.lru_cache(maxsize=32)
def make_chunk(update: Update, batch_size: int, num_updates: int,
               sampler: DataSampler | None = None) -> Callable[..., tuple[RunState, Metrics]]:
    """A jitted ``(states [R], rows [R], dataset) -> (states, metrics [R, num_updates])``.

    Each run does ``num_updates`` updates in a ``lax.scan``; every update samples its minibatch on the
    device from the run's rows of the shared dataset (the dataset is an argument, not a constant, so
    a large one is neither copied into the program nor recompiled per run). With a ``sampler``,
    ``dataset`` is its prepared data and the minibatch is ``sampler.sample(dataset, key, batch_size)``.
    Cached: the same update function gets the same compiled chunk.
    """

    def draw(dataset: Any, rows: RowSet, key: jax.Array) -> Any:
        if sampler is not None:
            return sampler.sample(dataset, key, batch_size)
        return dsrl.take_transitions(dataset, sample_rows(rows, key, batch_size))

    def one_run(state: RunState, rows: RowSet, dataset: Any):
        def body(state: RunState, _):
            key, sample_key, update_key = jax.random.split(state.key, 3)
            batch = draw(dataset, rows, sample_key)
            learner, metrics = update(state.learner, batch, update_key)
            return RunState(learner, key, state.updates + 1), metrics

        return jax.lax.scan(body, state, None, length=num_updates)

    return jax.jit(jax.vmap(one_run, in_axes=(0, 0, None)))


def cost_threshold(config: Any, problem: Problem, cost_limit: jax.Array) -> jax.Array:
    """``cost_scale * kappa * (1 - gamma^T) / ((1 - gamma) T)``: the set point Q-based learners compare Q_c
    with (:func:`constrained_rl.returns.per_step_cost_threshold`), in scaled cost units; ``config`` has
    ``cost_scale`` and ``discount``."""
    return config.cost_scale * returns.per_step_cost_threshold(cost_limit, config.discount, problem.episode_length)


# --------------------------------------------------------------------------------------------------
# Evaluation


@functools.lru_cache(maxsize=8)
def evaluation_env(task: str) -> envs.Env | envs.HostTaskEnv:
    """The task as evaluation plays it (:func:`constrained_rl.envs.evaluation_env`: on the device, or on
    the host for a real task)."""
    return envs.evaluation_env(task)


def play_episodes(session: "Session", learner: Any, key: jax.Array,
                  num_episodes: int) -> dict[float, rollouts.EpisodeStats]:
    """``num_episodes`` episodes of every run ``[R, num_episodes]`` per scored cost limit, on the device or
    the host as :func:`constrained_rl.envs.evaluate_runs` decides, the policies' layout checked there.

    A policy that does not condition on the limit plays once and its episodes serve every limit;
    a learner's own ``evaluate`` plays once per limit, told that limit. Each run gets one key,
    whatever the limit (common random numbers across limits).
    """
    num_runs = session.layout.cost_limits.shape[0]
    keys = jax.random.split(key, num_runs)
    conditioned = session.algorithm.evaluate
    if conditioned is None:
        stats = envs.evaluate_runs(session.env, session.algorithm.policy, learner, keys, num_episodes,
                                   session.policy_layout)
        return {limit: stats for limit in session.cost_limits}
    return {limit: envs.evaluate_runs(session.env, conditioned.policy,
                                      (learner, jnp.full((num_runs,), limit, jnp.float32)), keys, num_episodes,
                                      session.policy_layout)
            for limit in session.cost_limits}


def score_runs(stats: rollouts.EpisodeStats | Mapping[float, rollouts.EpisodeStats], layout: RunLayout,
               cost_limits: Sequence[float],
               reference: evaluation.ReferenceReturns) -> dict[float, evaluation.ScoreSummary]:
    """DSRL scores summarized over the seeds of each cost limit in ``cost_limits``.

    A run trained for one of the limits is scored under it; when the layout holds a single limit
    that is not in ``cost_limits`` (a learner that ignores the limit), every run is scored under
    every limit. ``stats`` holds every run's episodes, or one such set per limit
    (:func:`play_episodes`).
    """
    stats = jax.device_get(stats)
    summaries = {}
    for limit in cost_limits:
        played = stats[limit] if isinstance(stats, Mapping) else stats
        runs = scored_runs(layout, limit)
        scores = [evaluation.score_episodes(played.reward_return[r], played.cost_return[r], played.length[r],
                                            float(limit), reference) for r in runs]
        summaries[float(limit)] = evaluation.aggregate_seeds(scores)
    return summaries


def scored_runs(layout: RunLayout, cost_limit: float) -> list[int]:
    """The runs scored under ``cost_limit``: those trained for it, or every run when none was (a
    learner that ignores the limit)."""
    trained_for = {float(k) for k in layout.cost_limits}
    return [r for r, k in enumerate(layout.cost_limits) if float(k) == cost_limit or cost_limit not in trained_for]


def limit_label(cost_limit: float) -> str:
    return f"limit_{cost_limit:g}"


def evaluation_row(summaries: Mapping[float, evaluation.ScoreSummary]) -> dict[str, float]:
    """Logged figures of an evaluation: means over limits, and each limit's own."""
    row = {
        "eval/normalized_reward": float(np.mean([s.normalized_reward_mean for s in summaries.values()])),
        "eval/normalized_cost": float(np.mean([s.normalized_cost_mean for s in summaries.values()])),
    }
    if len(summaries) > 1:
        for limit, s in summaries.items():
            row[f"eval/normalized_reward/{limit_label(limit)}"] = s.normalized_reward_mean
            row[f"eval/normalized_cost/{limit_label(limit)}"] = s.normalized_cost_mean
    return row


# --------------------------------------------------------------------------------------------------
# Training through ctx.loop


class Session(NamedTuple):
    """Everything training needs besides the config: data, runs, learner and evaluation."""

    dataset: dsrl.OfflineDataset
    layout: RunLayout  # the trained runs
    cost_limits: tuple[float, ...]  # the limits scored
    algorithm: Algorithm
    env: envs.Env
    reference: evaluation.ReferenceReturns | None  # None: no reference returns, no periodic scores
    training_data: Any = None  # the sampler's prepared data, which the chunks then sample from
    policy_layout: envs.Layout | None = None  # the layout of the data's task: what the policies were trained on


def train(config: OfflineConfig, ctx, session: Session) -> RunState:
    """Trains every run through each phase in turn; returns the batched final state.

    Each phase is a stage of ``ctx.loop`` (checkpointed, resumable, logged per chunk as the mean
    over runs). Every ``eval_every`` chunks of a phase the current policies are evaluated and the
    DSRL scores are logged beside the training metrics.
    """
    algorithm, layout = session.algorithm, session.layout
    training_data = session.dataset if session.training_data is None else session.training_data
    eval_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)

    def initial() -> RunState:
        return init_runs(algorithm, seed_keys(config.seed, layout.seed_indices), jnp.asarray(layout.cost_limits))

    state_fn = initial
    updates_before = 0  # updates of the earlier phases: a phase's chunks count from there
    for phase in algorithm.phases:
        if phase.num_updates == 0:
            continue
        per_chunk = min(config.updates_per_chunk, phase.num_updates)
        require(phase.num_updates % per_chunk == 0, phase.name,
                f"{phase.num_updates} updates are not a whole number of chunks of {per_chunk}")
        chunk = make_chunk(phase.update, config.batch_size, per_chunk, algorithm.sampler)
        rows = row_sets(session.dataset, phase.rows, layout, phase.safe_fraction)

        def chunk_fn(state: RunState, chunk=chunk, rows=rows, per_chunk=per_chunk,
                     offset=updates_before) -> tuple[RunState, dict]:
            state, metrics = chunk(state, rows, training_data)
            row: dict[str, Any] = {name: jnp.mean(value, axis=0) for name, value in metrics.items()}
            updates = int(jax.device_get(state.updates[0]))
            chunks_done = (updates - offset) // per_chunk
            if session.reference is not None and config.eval_every and chunks_done % config.eval_every == 0:
                # The key depends on the update count only, so a resumed run evaluates identically.
                stats = play_episodes(session, state.learner, jax.random.fold_in(eval_key, updates),
                                      config.eval_episodes_during)
                row.update(evaluation_row(score_runs(stats, layout, session.cost_limits, session.reference)))
            return state, row

        state = ctx.loop(phase.name, state_fn, chunk_fn, phase.num_updates // per_chunk,
                         steps_per_chunk=per_chunk, checkpoint_every=config.checkpoint_every)
        state_fn = lambda state=state: state
        updates_before += phase.num_updates
    return state_fn()


def load_dataset(config: OfflineConfig, ctx, collection: collect.Config | None = None) -> dsrl.OfflineDataset:
    """The config's DSRL file, or a dataset collected now into the run directory (stage "behaviour") with
    ``collection``'s settings (collect's defaults when none) on the config's task and seed.

    ``reward_min`` / ``reward_max`` override the file's reference returns.
    """
    override = dsrl.DatasetMetadata(reward_min=config.reward_min, reward_max=config.reward_max)
    if config.dataset:
        return dsrl.load_dsrl(config.dataset, override)
    collect_config = dataclasses.replace(collection or collect.Config(), task=config.task, seed=config.seed)
    summary = collect.run(collect_config, ctx)
    return dsrl.load_dsrl(summary["dataset"], override)


def check_dataset(dataset: dsrl.OfflineDataset, env: envs.Env | envs.HostTaskEnv, source: str,
                  task: str = "the task") -> Problem:
    """The :class:`Problem`, after checking that the data fits the environment: the sizes, and the layout
    of the data's task (:func:`data_layout`) against the environment's when it is known. A real task
    demands a known layout: data of unknown origin never trains a policy that runs on it."""
    obs_size, action_size = dataset.observations.shape[1], dataset.actions.shape[1]
    if (obs_size, action_size) != (env.observation_size, env.action_size):
        raise ConfigError(
            f"{source}: observations/actions have sizes ({obs_size}, {action_size}) but the task needs "
            f"({env.observation_size}, {env.action_size})")
    layout = data_layout(dataset.metadata)
    if layout is not None:
        envs.check_layout(layout, env.layout, task=task)
    elif isinstance(env, envs.HostTaskEnv):
        raise ConfigError(f"{source}: the data names no known task it was recorded on (task "
                          f"{dataset.metadata.task!r}), so its layout cannot be checked against {task}; "
                          f"a DSRL file keeps DSRL's file name, a collected one its task attribute")
    return Problem(obs_size, action_size, env.episode_length)


def data_layout(metadata: dsrl.DatasetMetadata) -> envs.Layout | None:
    """The layout of the task a dataset was recorded on (a DSRL task's simulator, or any task of
    ``envs.task_names``), or ``None`` when its task is unknown."""
    task = dsrl_tasks.dsrl_task(metadata.task)
    name = task.env_id if task is not None else metadata.task
    return envs.task_layout(name) if name in envs.task_names() else None


def trained_layout(config: OfflineConfig, algorithm: Algorithm) -> RunLayout:
    """The runs a config trains: a limit-seed grid, or one run per seed for a learner that ignores the
    limit, held to a nominal (unused) limit."""
    return run_layout(config.cost_limits if algorithm.uses_cost_limit else (-1.0,), config.num_seeds)


def make_session(config: OfflineConfig, dataset: dsrl.OfflineDataset, make_algorithm: MakeAlgorithm,
                 source: str = "dataset") -> Session:
    env = evaluation_env(config.task)
    problem = check_dataset(dataset, env, source, config.task)
    has_reference = dataset.metadata.reward_min is not None and dataset.metadata.reward_max is not None
    reference = evaluation.reference_returns(dataset.metadata) if has_reference else None
    algorithm = make_algorithm(config, problem)
    if algorithm.uses_returns:
        dataset = dsrl.with_returns_to_go(dataset, config.discount)
    if not algorithm.uses_cost_limit:
        require(all(p.rows == "all" for p in algorithm.phases if p.num_updates), "cost_limits",
                "a learner sampling safe episodes depends on the cost limit")
    layout = trained_layout(config, algorithm)
    training_data = None
    if algorithm.sampler is not None:
        require(all(p.rows == "all" for p in algorithm.phases), "rows",
                "a learner with its own sampler samples from all rows")
        training_data = algorithm.sampler.prepare(dataset)
    require(algorithm.policy is not None or algorithm.evaluate is not None, "policy",
            "a learner needs an evaluation policy or its own evaluate")
    return Session(dataset, layout, tuple(float(k) for k in config.cost_limits), algorithm, env, reference,
                   training_data, data_layout(dataset.metadata))


def final_evaluation_key(seed: int) -> jax.Array:
    """The key of the final evaluation's episodes under the config's ``seed``."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 2)


def episode_summary(session: Session, stats: Mapping[float, rollouts.EpisodeStats]) -> dict[str, Any]:
    """The figures of an evaluation (:func:`play_episodes`, on the host): the DSRL scores per cost
    limit, or the mean raw returns when there are no reference returns."""
    if session.reference is None:
        return {"reward_return": float(np.mean([s.reward_return for s in stats.values()])),
                "cost_return": float(np.mean([s.cost_return for s in stats.values()]))}
    scores = score_runs(stats, session.layout, session.cost_limits, session.reference)
    return {
        "normalized_reward": [s.normalized_reward_mean for s in scores.values()],
        "normalized_cost": [s.normalized_cost_mean for s in scores.values()],
        "safe": [s.safe for s in scores.values()],
        "scores": {limit_label(k): s._asdict() for k, s in scores.items()},
    }


def final_summary(config: OfflineConfig, session: Session, state: RunState) -> dict[str, Any]:
    """DSRL scores of the final policies (``eval_episodes`` per run) per cost limit."""
    stats = jax.device_get(play_episodes(session, state.learner, final_evaluation_key(config.seed),
                                         config.eval_episodes))
    summary: dict[str, Any] = {
        "task": config.task,
        "transitions": session.dataset.num_transitions,
        "cost_limits": list(session.cost_limits),
        "num_seeds": config.num_seeds,
        "gradient_updates": int(jax.device_get(state.updates[0])),
    }
    summary.update(episode_summary(session, stats))
    return summary


# --------------------------------------------------------------------------------------------------
# The exported policies


def policy_params(algorithm: Algorithm, learner: Any) -> Any:
    """What the evaluation reads of a learner state (``algorithm.policy_fields``), as exported."""
    if algorithm.policy_fields is None:
        return learner
    return policy_export.select(learner, algorithm.policy_fields)


def with_policy_params(algorithm: Algorithm, learner: Any, params: Any) -> Any:
    """``learner`` (e.g. a fresh state) holding the exported ``params``: it evaluates as the exported one."""
    if algorithm.policy_fields is None:
        return params
    return policy_export.insert(learner, algorithm.policy_fields, params)


def export_policy(config: OfflineConfig, ctx, session: Session, state: RunState) -> Path:
    """Writes every run's final policy to ``policy/`` of the run directory
    (:mod:`algorithms.control.policy_export`): the parameters ``[R, ...]`` the evaluation reads, and
    ``policy.json`` with the learner config, sizes, runs, scored limits and reference returns."""
    algorithm, layout, env = session.algorithm, session.layout, session.env
    trained_for = [float(k) if algorithm.uses_cost_limit else None for k in layout.cost_limits]
    content = policy_export.record(
        config, ctx.run_dir, observation_size=env.observation_size, action_size=env.action_size,
        episode_length=env.episode_length, fields=algorithm.policy_fields,
        step=int(jax.device_get(state.updates[0])), run_limits=trained_for,
        seed_indices=[int(i) for i in layout.seed_indices], cost_limits=list(session.cost_limits),
        reference_returns=None if session.reference is None else session.reference._asdict(),
        layout=None if session.policy_layout is None else session.policy_layout.to_json())
    return policy_export.write(ctx, policy_params(algorithm, state.learner), content)


def run(config: OfflineConfig, ctx, make_algorithm: MakeAlgorithm) -> dict[str, Any]:
    """The experiment of any offline learner: data, training, final DSRL scores."""
    return run_built(config, ctx, lambda config, dataset: make_algorithm)


def run_built(config: OfflineConfig, ctx, builder: Builder) -> dict[str, Any]:
    """:func:`run` for a learner built from its dataset: ``builder(config, dataset)``."""
    dataset = load_dataset(config, ctx)
    session = make_session(config, dataset, builder(config, dataset), config.dataset or "collected dataset")
    state = train(config, ctx, session)
    export_policy(config, ctx, session, state)
    return final_summary(config, session, state)
