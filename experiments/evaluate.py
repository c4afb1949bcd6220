"""Re-scoring a trained control run's policies without retraining: the ``evaluate`` experiment.

::

    python -m experiments.run evaluate --run_dir runs/bc_safe-20250101-120000
    python -m experiments.run evaluate --run_dir DIR --checkpoint best --episodes 50 --seed 7
    python -m experiments.run evaluate --run_dir DIR --task TASK --reward_min 0 --reward_max 400  # same sizes
    python -m experiments.run evaluate --run_dir BENCHMARK_DIR --method satac --task SafetyBallCircle-v0

It reads a finished or interrupted run of a control learner (every offline learner of
:mod:`algorithms.control.offline`, and ``ppo_lag`` / ``ppo``), rebuilds the learner from the run's
config, restores its policies and plays ``episodes`` episodes per run on ``task`` with the learner's own
evaluation path. A run of ``offline_benchmark`` holds one learner per method: ``method`` names the one
scored, read at its latest checkpoint (``final``) or its best one, with the config the benchmark trained it
with (this is how policies trained on a twin's data are scored on the real task, docs/environments.md):

* offline learners: the scaffold's evaluator (:func:`~algorithms.control.offline.play_episodes`: one key
  per run, the same under every cost limit) scored by the DSRL formulas of
  :mod:`constrained_rl.evaluation` per cost limit over the seeds (normalized reward, normalized cost,
  safe iff the normalized cost is <= 1). Given the run's task, its ``eval_episodes`` and its seed (the
  defaults, but for ``episodes`` where the run changed ``eval_episodes``), the final policies score
  exactly what the run's own summary says.
* PPO-Lagrangian: its final evaluation (:func:`~algorithms.control.ppo_lag.train.evaluate_runs`), the
  mean episode reward and cost per run (DSRL-normalized too when reference returns are given); with its
  ``eval_episodes`` and seed it reproduces the run's ``eval_reward`` / ``eval_cost``.

Which policies (``checkpoint``):

* ``final``: the exported final policies (``policy/``, :mod:`algorithms.control.policy_export`); a run
  interrupted before exporting is read at its latest checkpoint;
* ``best``: of the checkpoints kept on disk (``checkpoints/<stage>/<chunks>``; the runner keeps the last
  two of each stage), the one whose evaluation during training (``eval/*`` in metrics.jsonl, at the same
  step) scored the highest normalized reward among those safe under every cost limit (ties: the later).
  Refused when the run logged no such evaluation.

The reference returns of the normalization are ``reward_min`` / ``reward_max`` when given; otherwise the
run's own on its own task (from its export, or from its dataset), DSRL's published ones on another task
that is a DSRL task (:mod:`constrained_rl.data.dsrl_tasks`), and none on any other task, where the mean
raw returns are reported instead. ``task`` may be a real task's id (``SafetyBallCircle-v0``: played on its
simulator by the host runner); policies whose recorded layout differs from the task's are refused. ``summary.json`` holds, like the learner's final evaluation, the
scores per cost limit over the seeds (``normalized_reward``, ``normalized_cost``, ``safe``, ``scores``),
each scored run's own means (``runs``) and the means over the limits (``average``).

Bad input (no run directory, a run of another kind of experiment, nothing to evaluate, a task whose
observation/action sizes differ from the run's, ``best`` without evaluations) is refused while the
config is built, before the runner writes anything.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import numpy as np

from algorithms.control import offline, policy_export
from constrained_rl import checkpoint, envs, evaluation
from constrained_rl.config import ConfigError, Experiment, require
from constrained_rl.data import dsrl, dsrl_tasks
from experiments import cli, registry

Family = Literal["offline", "ppo_lag"]


@dataclasses.dataclass(frozen=True)
class Config:
    """What to re-score and how; ``run_dir`` is required. A bad run directory is refused here."""

    run_dir: str = ""  # run directory of a control learner, finished or interrupted (required)
    method: str = ""  # with a run of offline_benchmark: which of its methods to score (required there)
    checkpoint: Literal["final", "best"] = "final"  # final: the exported policies; best: see the module doc
    task: str = ""  # environment to score on; empty: the run's own task
    episodes: int = 20  # episodes per run (DSRL protocol: 20)
    seed: int | None = None  # evaluation seed (as the learner's final evaluation draws it); none: the run's
    reward_min: float | None = None  # reference return scored 0; none: the run's own (on its own task)
    reward_max: float | None = None  # reference return scored 1; none: the run's own (on its own task)

    def __post_init__(self) -> None:
        require(self.checkpoint in ("final", "best"), "checkpoint",
                f"must be 'final' or 'best' (got {self.checkpoint!r})")
        if self.task:
            envs.require_task(self.task)
        require(isinstance(self.episodes, int) and self.episodes >= 1, "episodes",
                f"must be an integer >= 1 (got {self.episodes!r})")
        require(self.seed is None or (isinstance(self.seed, int) and self.seed >= 0), "seed",
                f"must be an integer >= 0 or none (got {self.seed!r})")
        require((self.reward_min is None) == (self.reward_max is None), "reward_max",
                "reward_min and reward_max are given together")
        if self.reward_min is not None:
            require(self.reward_max > self.reward_min, "reward_max",
                    f"must exceed reward_min={self.reward_min} (got {self.reward_max})")
        if self.run_dir:  # the default config (an empty run_dir) stays constructible, for --help
            plan(self)


# --------------------------------------------------------------------------------------------------
# What a run directory holds


class Trained(NamedTuple):
    """A control learner's run, as its directory describes it."""

    run_dir: Path
    experiment: str  # the registry name
    family: Family
    config: Any  # the learner's config
    record: dict[str, Any] | None  # policy/policy.json; None when the run exported nothing
    method: str = ""  # a method of an offline_benchmark run: its stages are named <method>_<phase>


class Source(NamedTuple):
    """Where the scored parameters come from."""

    label: str  # "policy" or "checkpoints/<stage>/<step>"
    stage: str | None = None  # checkpoints only
    step: int | None = None  # checkpoint step (chunks completed in the stage)
    training_evaluation: dict[str, Any] | None = None  # best: the evaluation it was chosen by


class Plan(NamedTuple):
    trained: Trained
    source: Source
    task: str  # the task scored on
    sizes: tuple[int, int, int]  # the run's (observation, action) sizes and episode length


def _family(config_cls: type) -> Family | None:
    from algorithms.control.ppo_lag import train as ppo_train

    if issubclass(config_cls, offline.OfflineConfig):
        return "offline"
    if issubclass(config_cls, ppo_train.Config):
        return "ppo_lag"
    return None


def read_run(run_dir: str, method: str = "") -> Trained:
    """The learner, config and export of a run directory (of ``offline_benchmark``: of its ``method``);
    ConfigError for anything else."""
    directory = Path(run_dir)
    if not directory.is_dir():
        raise ConfigError(f"run_dir: {directory}: no such directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"run_dir: {directory}: no config.json (not a run directory)")
    content = cli.read_mapping_file(config_path)
    name = content.get("experiment")
    if not isinstance(name, str) or not isinstance(content.get("config"), dict):
        raise ConfigError(f"run_dir: {config_path}: expected keys 'experiment' and 'config'")
    if name not in registry.EXPERIMENTS:
        raise ConfigError(f"run_dir: {directory}: a run of {name!r}, which is no registered experiment")
    experiment = registry.load(name)
    if name == "offline_benchmark":
        return read_benchmark_method(directory, experiment, content["config"], method)
    if method:
        raise ConfigError(f"method: {directory} is a run of {name!r}; --method picks a method of an "
                          "offline_benchmark run")
    family = _family(experiment.config_cls)
    if family is None:
        raise ConfigError(f"run_dir: {directory}: a run of {name!r}; evaluate re-scores the policies of "
                          "control learners (the offline learners, ppo_lag, ppo)")
    learner = cli.build_config(experiment.config_cls, cli.flatten(content["config"], str(config_path)), record=True)
    return Trained(directory, name, family, learner, policy_export.read(directory))


def read_benchmark_method(directory: Path, experiment: Experiment, content: dict[str, Any], method: str) -> Trained:
    """One method of an ``offline_benchmark`` run, as a run of its own: its config as the benchmark trained
    it, its checkpoints ``checkpoints/<method>_<phase>``; nothing exported (the latest checkpoint is final)."""
    from algorithms.control import offline_benchmark

    benchmark = cli.build_config(experiment.config_cls, cli.flatten(content, str(directory / "config.json")),
                                 record=True)
    if method not in benchmark.methods:
        what = f"{method!r} is not among" if method else "required with an offline_benchmark run: one of"
        raise ConfigError(f"method: {what} the methods of {directory} ({', '.join(benchmark.methods)})")
    learner = offline_benchmark.method_config(benchmark, method)
    return Trained(directory, "offline_benchmark", "offline", learner, None, method)


def make_algorithm(learner: offline.OfflineConfig, sizes: tuple[int, int, int]) -> offline.Algorithm:
    """The offline learner as its evaluation needs it: its module's ``evaluation_algorithm`` (learners
    built from their data build without it there), else its ``make_algorithm``."""
    module = importlib.import_module(type(learner).__module__)
    build = getattr(module, "evaluation_algorithm", None) or module.make_algorithm
    return build(learner, offline.Problem(*sizes))


def run_sizes(trained: Trained) -> tuple[int, int, int]:
    """Observation size, action size and episode length the run's networks were built for."""
    if trained.record is not None:
        record = trained.record
        return record["observation_size"], record["action_size"], record["episode_length"]
    env = envs.evaluation_env(trained.config.task)
    return env.observation_size, env.action_size, env.episode_length


def trained_phases(learner: offline.OfflineConfig, algorithm: offline.Algorithm) -> list[tuple[str, int]]:
    """``(stage, updates per chunk)`` of the phases the run trains, in order."""
    return [(p.name, min(learner.updates_per_chunk, p.num_updates)) for p in algorithm.phases if p.num_updates]


def latest_checkpoint(trained: Trained, stages: list[str]) -> Source | None:
    """The latest training state on disk: the last stage (in training order) with a checkpoint."""
    for stage in reversed(stages):
        step = checkpoint.latest_step(trained.run_dir / "checkpoints" / stage)
        if step is not None:
            return Source(f"checkpoints/{stage}/{step}", stage, step)
    return None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise ConfigError(f"run_dir: {path}: line {number} is not JSON") from None
    return rows


def best_checkpoint(trained: Trained, phases: list[tuple[str, int]]) -> Source:
    """The kept checkpoint whose evaluation during training scored the highest normalized reward among
    those with a normalized cost <= 1 under every cost limit (the later of equals)."""
    learner, directory = trained.config, trained.run_dir
    evaluated = {(row.get("stage"), row.get("step")): row for row in read_metrics(directory)
                 if "eval/normalized_reward" in row}
    if not evaluated:
        raise ConfigError(f"checkpoint: best needs evaluations during training, and {directory} logged none "
                          f"(eval_every = {learner.eval_every}, or no reference returns); use final")
    limits = [float(k) for k in learner.cost_limits]
    cost_keys = ([f"eval/normalized_cost/{offline.limit_label(k)}" for k in limits] if len(limits) > 1
                 else ["eval/normalized_cost"])
    candidates, kept = [], []
    for stage, per_chunk in phases:
        for step in checkpoint.all_steps(directory / "checkpoints" / stage):
            kept.append(f"{stage}/{step}")
            row = evaluated.get((stage, step * per_chunk))
            if row is not None:
                candidates.append((stage, step, row))
    if not candidates:
        raise ConfigError(f"checkpoint: best: none of the checkpoints {directory} keeps "
                          f"({', '.join(kept) or 'none'}) was evaluated during training; use final")
    safe = [c for c in candidates if all(c[2].get(key, math.inf) <= 1.0 for key in cost_keys)]
    if not safe:
        raise ConfigError(f"checkpoint: best: no checkpoint {directory} keeps was safe (normalized cost <= 1 "
                          f"under every cost limit) in its evaluation during training; use final")
    stage, step, row = max(reversed(safe), key=lambda c: c[2]["eval/normalized_reward"])
    chosen = {"stage": stage, "step": row["step"],
              **{k: v for k, v in row.items() if k.startswith("eval/")}}
    return Source(f"checkpoints/{stage}/{step}", stage, step, chosen)


def plan(config: Config) -> Plan:
    """What ``config`` scores; ConfigError (naming the setting) for anything that cannot be scored."""
    require(bool(config.run_dir), "run_dir", "required: the run directory whose policies are scored")
    trained = read_run(config.run_dir, config.method)
    sizes = run_sizes(trained)
    task = config.task or trained.config.task
    if task != trained.config.task:
        env = envs.evaluation_env(task)
        if (env.observation_size, env.action_size) != sizes[:2]:
            raise ConfigError(
                f"task: {task} has observation/action sizes ({env.observation_size}, {env.action_size}), but the "
                f"policies of {trained.run_dir} were trained on {trained.config.task} with sizes {sizes[:2]}")
        layout = policy_layout(trained)
        if layout is not None:
            envs.check_layout(layout, env.layout, task=task)
        elif envs.is_host_task(task):
            raise ConfigError(f"task: the policies of {trained.run_dir} record no layout, so they cannot be "
                              f"checked against {task}")
    if trained.family == "offline":
        phases = trained_phases(trained.config, make_algorithm(trained.config, sizes))
        if trained.method:
            phases = [(f"{trained.method}_{stage}", per_chunk) for stage, per_chunk in phases]
    else:
        phases = [("train", 1)]
    if config.checkpoint == "best":
        if trained.family != "offline":
            raise ConfigError(f"checkpoint: best needs evaluations during training; {trained.experiment} logs "
                              "none; use final")
        source = best_checkpoint(trained, phases)
    elif trained.record is not None:
        source = Source("policy")
    else:
        source = latest_checkpoint(trained, [stage for stage, _ in phases])
        if source is None:
            raise ConfigError(f"run_dir: {trained.run_dir}: no exported policy ({policy_export.DIRECTORY}/"
                              f"{policy_export.RECORD}) and no checkpoint to evaluate")
    return Plan(trained, source, task, sizes)


def policy_layout(trained: Trained) -> envs.Layout | None:
    """The observation/action layout the run's policies were trained on: as its export records it, else
    that of the task it trained on (PPO-Lag: its training task; an offline learner: its task, for data
    collected there), or None when that is a real task the export does not vouch for."""
    if trained.record is not None and trained.record.get("layout") is not None:
        return envs.Layout.from_json(trained.record["layout"])
    task = getattr(trained.config, "train_task", trained.config.task)
    return None if envs.is_host_task(task) else envs.task_layout(task)


# --------------------------------------------------------------------------------------------------
# Loading an exported policy


def learner_config(record: dict[str, Any]) -> Any:
    """The learner's config an export was trained with (its ``config_class`` and ``config``)."""
    module_name, _, class_name = record["config_class"].partition(":")
    config_cls: Any = importlib.import_module(module_name)
    for name in class_name.split("."):
        config_cls = getattr(config_cls, name)
    return cli.build_config(config_cls, cli.flatten(record["config"], "policy.json"), record=True)


class LoadedPolicy(NamedTuple):
    """An offline run's exported policies, ready to act: ``algorithm.policy(run state, obs, key)``."""

    record: dict[str, Any]  # policy.json
    config: Any  # the learner's config
    algorithm: offline.Algorithm  # built for evaluation (no data)
    learner: Any  # learner states with a leading run axis [R], holding the exported parameters


def load_policy(run_dir: str | Path) -> LoadedPolicy:
    """The exported policies of an offline learner's run directory (docs/running.md)."""
    record = policy_export.read(run_dir)
    if record is None:
        raise ConfigError(f"{run_dir}: no exported policy ({policy_export.DIRECTORY}/{policy_export.RECORD})")
    config = learner_config(record)
    if not isinstance(config, offline.OfflineConfig):
        raise ConfigError(f"{run_dir}: not an offline learner's export ({record['config_class']})")
    algorithm = make_algorithm(config, (record["observation_size"], record["action_size"], record["episode_length"]))
    layout = offline.trained_layout(config, algorithm)
    template = offline.init_runs(algorithm, offline.seed_keys(config.seed, layout.seed_indices), layout.cost_limits)
    params = policy_export.load_params(run_dir, offline.policy_params(algorithm, template.learner))
    return LoadedPolicy(record, config, algorithm, offline.with_policy_params(algorithm, template.learner, params))


# --------------------------------------------------------------------------------------------------
# Scoring


def reference_returns(config: Config, plan: Plan) -> evaluation.ReferenceReturns | None:
    """The normalization's reference returns (module docstring); None: raw returns only."""
    if config.reward_min is not None:
        return evaluation.ReferenceReturns(config.reward_min, config.reward_max)
    learner = plan.trained.config
    if plan.task != learner.task:  # another task: DSRL's published references if it is a DSRL task
        task = dsrl_tasks.dsrl_task(plan.task)
        return None if task is None else evaluation.ReferenceReturns(task.reward_min, task.reward_max)
    if plan.trained.family != "offline":
        return None
    if plan.trained.record is not None:
        reference = plan.trained.record.get("reference_returns")
        return None if reference is None else evaluation.ReferenceReturns(**reference)
    if learner.reward_min is not None and learner.reward_max is not None:
        return evaluation.ReferenceReturns(learner.reward_min, learner.reward_max)
    # A run that exported nothing: its dataset's reference returns, as its training read them.
    from algorithms.control import collect

    path = Path(learner.dataset) if learner.dataset else plan.trained.run_dir / collect.Config().output
    if not path.is_file():
        return None
    override = dsrl.DatasetMetadata(reward_min=learner.reward_min, reward_max=learner.reward_max)
    metadata = dsrl.load_dsrl(path, override).metadata
    if metadata.reward_min is None or metadata.reward_max is None:
        return None
    return evaluation.reference_returns(metadata)


def _run_scores(reward_returns: np.ndarray, cost_returns: np.ndarray, lengths: np.ndarray, cost_limit: float | None,
                reference: evaluation.ReferenceReturns | None) -> dict[str, Any]:
    """One run's means over its episodes: raw, and normalized when there is a reference and a limit."""
    scores: dict[str, Any] = {"reward_return": float(np.mean(reward_returns)),
                              "cost_return": float(np.mean(cost_returns))}
    if reference is not None and cost_limit is not None:
        episodes = evaluation.score_episodes(reward_returns, cost_returns, lengths, cost_limit, reference)
        cost = float(np.mean(episodes.normalized_costs))
        scores.update(normalized_reward=float(np.mean(episodes.normalized_rewards)), normalized_cost=cost,
                      safe=bool(cost <= 1.0))
    return scores


def evaluate_offline(config: Config, plan: Plan, seed: int) -> dict[str, Any]:
    trained, source = plan.trained, plan.source
    learner = trained.config
    if source.stage is None:
        loaded = load_policy(trained.run_dir)
        algorithm, state, updates = loaded.algorithm, loaded.learner, int(trained.record["step"])
        layout = offline.trained_layout(learner, algorithm)
    else:
        algorithm = make_algorithm(learner, plan.sizes)
        layout = offline.trained_layout(learner, algorithm)
        template = offline.init_runs(algorithm, offline.seed_keys(learner.seed, layout.seed_indices),
                                     layout.cost_limits)
        restored = checkpoint.restore(trained.run_dir / "checkpoints" / source.stage, template, source.step)
        state, updates = restored.learner, int(jax.device_get(restored.updates[0]))
    session = offline.Session(dataset=None, layout=layout, cost_limits=tuple(float(k) for k in learner.cost_limits),
                              algorithm=algorithm, env=offline.evaluation_env(plan.task),
                              reference=reference_returns(config, plan), policy_layout=policy_layout(trained))
    stats = jax.device_get(offline.play_episodes(session, state, offline.final_evaluation_key(seed), config.episodes))
    runs = []
    for limit in session.cost_limits:
        played = stats[limit]
        for r in offline.scored_runs(layout, limit):
            runs.append({"cost_limit": limit, "run": r, "seed_index": int(layout.seed_indices[r]),
                         **_run_scores(played.reward_return[r], played.cost_return[r], played.length[r], limit,
                                       session.reference)})
    summary: dict[str, Any] = {
        **_header(config, plan, seed),
        "cost_limits": list(session.cost_limits),
        "num_seeds": learner.num_seeds,
        "gradient_updates": updates,
        **offline.episode_summary(session, stats),
        "runs": runs,
    }
    if session.reference is not None:
        summary["average"] = {"normalized_reward": float(np.mean(summary["normalized_reward"])),
                              "normalized_cost": float(np.mean(summary["normalized_cost"]))}
    return summary


def evaluate_ppo_lag(config: Config, plan: Plan, seed: int) -> dict[str, Any]:
    from algorithms.control.ppo_lag import train as ppo_train

    trained, source = plan.trained, plan.source
    learner = ppo_train.make_learner(trained.config)
    template = ppo_train.init_runs(learner)
    if source.stage is None:
        fields = trained.record["fields"]
        params = policy_export.load_params(trained.run_dir, policy_export.select(template, fields))
        state, iterations = policy_export.insert(template, fields, params), int(trained.record["step"])
    else:
        state = checkpoint.restore(trained.run_dir / "checkpoints" / source.stage, template, source.step)
        iterations = int(jax.device_get(state.iteration[0]))
    scored = learner
    if plan.task != trained.config.task:
        scored = ppo_train.make_learner(dataclasses.replace(trained.config, task=plan.task))
    scores = jax.device_get(ppo_train.evaluate_runs(scored, state, config.episodes,
                                                    ppo_train.final_evaluation_key(seed), policy_layout(trained)))
    reference = reference_returns(config, plan)
    limits = [float(k) for k in jax.device_get(state.cost_limit)]
    runs = []
    for r, limit in enumerate(limits):
        reward, cost = float(scores["reward"][r]), float(scores["cost"][r])
        row: dict[str, Any] = {"cost_limit": limit, "run": r, "seed_index": r, "reward_return": reward,
                               "cost_return": cost}
        if reference is not None:  # the normalizations are affine: of the mean = the mean of each episode's
            normalized_cost = float(evaluation.normalized_cost(cost, limit))
            row.update(normalized_reward=float(evaluation.normalized_reward(reward, *reference)),
                       normalized_cost=normalized_cost, safe=normalized_cost <= 1.0)
        runs.append(row)
    return {
        **_header(config, plan, seed),
        "iterations": iterations,
        "env_steps": iterations * trained.config.steps_per_iteration,
        "eval_reward": [float(x) for x in scores["reward"]],
        "eval_cost": [float(x) for x in scores["cost"]],
        "runs": runs,
    }


def _header(config: Config, plan: Plan, seed: int) -> dict[str, Any]:
    header = {
        "experiment": plan.trained.experiment,
        **({"method": plan.trained.method} if plan.trained.method else {}),
        "run_dir": str(plan.trained.run_dir),
        "checkpoint": config.checkpoint,
        "source": plan.source.label,
        "task": plan.task,
        "trained_task": plan.trained.config.task,
        "episodes": config.episodes,
        "seed": seed,
    }
    if plan.source.training_evaluation is not None:
        header["training_evaluation"] = plan.source.training_evaluation
    return header


def run(config: Config, ctx) -> dict[str, Any]:
    """Scores the run's policies (nothing is trained; ``ctx`` gets only the runner's files)."""
    del ctx
    resolved = plan(config)
    seed = resolved.trained.config.seed if config.seed is None else config.seed
    if resolved.trained.family == "offline":
        return evaluate_offline(config, resolved, seed)
    return evaluate_ppo_lag(config, resolved, seed)


EVALUATE = Experiment(Config, run)
