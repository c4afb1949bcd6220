"""The DSRL comparison of offline safe-RL learners (Liu et al. 2023, "Datasets and Benchmarks for Offline
Safe Reinforcement Learning"), as SATAC's experiments run it (Wei, Peng, Ghosh, Liu 2024).

One dataset, every method, one table::

    python -m experiments.run offline_benchmark --task BallCircle [--dataset FILE.hdf5]

1. **Data**: the given DSRL file, or one collected first by :mod:`algorithms.control.collect` (stage
   ``behaviour``: PPO-Lagrangian policies over a swept cost limit, grid-filtered).
2. **Methods** (``methods``; default BC-All, BC-Safe, BCQ-Lag, BEAR-Lag, CPQ, COptiDICE, CDT, ATAC, SATAC), one after
   the other. Each trains ``len(cost_limits) x num_seeds`` runs in one vmapped call of the offline
   scaffold (:mod:`algorithms.control.offline`); its phases are stages ``<method>_<phase>`` of ``ctx.loop``, so an
   interrupted benchmark resumes inside the method it was training. A finished method's scores are kept
   in ``methods/<method>.json`` and are not recomputed on resume.
3. **Scores**: ``eval_episodes`` episodes per run with the deterministic policy; DSRL normalized reward
   ``(R - R_min) / (R_max - R_min)`` and cost ``(C + eps) / (kappa + eps)``; mean and standard deviation
   over seeds per (method, limit); safe iff the mean normalized cost is <= 1
   (:mod:`constrained_rl.evaluation`).
4. **Outputs** in the run directory: ``results.csv`` (one row per method and limit, plus one ``average``
   row per method), ``results.md`` (methods x limits with an average-over-limits column, the layout of the
   DSRL / OSRL tables), and ``plots/reward_vs_cost.png`` (normalized cost against normalized reward, the
   limit 1 as a vertical line, one marker per method).

Sizes: ``preset = "protocol"`` keeps each learner's published sizes (OSRL's for the baselines, ATAC's for
ATAC and SATAC); ``"quick"`` shrinks networks, batches and update counts to a smoke test. ``num_updates``,
``warmup_updates`` and ``reference_updates``, when set, replace every method's counts (a reduced budget,
the same for all). A method's own hyperparameters are set in its section (``--satac.beta 16``); the
settings the methods share (task, data, limits, seeds, evaluation) are set once, at the top level.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, NamedTuple, Sequence

import numpy as np

from algorithms.control import bc, bcq_lag, bear_lag, cdt, collect, coptidice, cpq, offline, satac
from constrained_rl import plotting
from constrained_rl.config import ConfigError, Experiment, require
from constrained_rl.data import dsrl

Preset = Literal["protocol", "quick"]
# Aliases: the Config fields below are named like the modules, and a field's default would shadow them.
BCConfig, BCSafeConfig, BCQLagConfig, CPQConfig = bc.Config, bc.SafeConfig, bcq_lag.Config, cpq.Config
BEARLagConfig = bear_lag.Config
COptiDICEConfig, ATACConfig, SATACConfig = coptidice.Config, satac.ATACConfig, satac.Config
CDTConfig = cdt.Config

RESULTS_DIR = "methods"  # one JSON of final scores per finished method
TABLE_CSV = "results.csv"
TABLE_MARKDOWN = "results.md"
PLOT_NAME = "reward_vs_cost"
AVERAGE = "average"  # the cost-limit column of the rows averaged over limits


class Method(NamedTuple):
    """A compared learner: its table label, its config class and how its learner is built."""

    label: str
    config_cls: type
    # (method config, dataset) -> the scaffold's make_algorithm (COptiDICE and CDT need their data)
    builder: offline.Builder


def _fixed(make_algorithm: offline.MakeAlgorithm):
    return lambda config, dataset: make_algorithm


METHODS: dict[str, Method] = {
    "bc_all": Method("BC-All", bc.Config, _fixed(bc.make_algorithm)),
    "bc_safe": Method("BC-Safe", bc.SafeConfig, _fixed(bc.make_algorithm)),
    "bcq_lag": Method("BCQ-Lag", bcq_lag.Config, _fixed(bcq_lag.make_algorithm)),
    "bear_lag": Method("BEAR-Lag", bear_lag.Config, _fixed(bear_lag.make_algorithm)),
    "cpq": Method("CPQ", cpq.Config, _fixed(cpq.make_algorithm)),
    "coptidice": Method("COptiDICE", coptidice.Config, coptidice.builder),
    "cdt": Method("CDT", cdt.Config, cdt.builder),
    "atac": Method("ATAC", satac.ATACConfig, _fixed(satac.make_algorithm)),
    "satac": Method("SATAC", satac.Config, _fixed(satac.make_algorithm)),
}

# The settings every method takes from the benchmark's top level.
SHARED_FIELDS = ("task", "dataset", "reward_min", "reward_max", "cost_limits", "seed", "num_seeds",
                 "updates_per_chunk", "checkpoint_every", "eval_every", "eval_episodes_during",
                 "eval_episodes")
BUDGET_FIELDS = ("num_updates", "warmup_updates", "reference_updates")

# The quick preset: tiny networks, batches and update counts (only the fields a method has).
QUICK_SIZES: dict[str, Any] = {
    "hidden_sizes": (16, 16), "actor_hidden_sizes": (16, 16), "critic_hidden_sizes": (16, 16),
    "vae_hidden_sizes": (16, 16), "batch_size": 32, "num_updates": 4, "warmup_updates": 2,
    "reference_updates": 2, "num_sampled_actions": 2, "num_mmd_samples": 2, "embedding_dim": 16, "num_layers": 1,
}


@dataclasses.dataclass(frozen=True)
class Config:
    """The DSRL protocol: seeds x cost limits x methods on one dataset, 20 evaluation episodes."""

    task: str = "BallCircle"  # evaluated on: a JAX task or a real task's id (SafetyBallCircle-v0; envs.task_names)
    dataset: str = ""  # DSRL HDF5 file; empty: collect one first (stage "behaviour", see collect)
    reward_min: float | None = None  # reference return scored 0, overriding the file's (DSRL spec)
    reward_max: float | None = None  # reference return scored 1, overriding the file's (DSRL spec)
    cost_limits: tuple[float, ...] = (10.0, 20.0, 40.0)  # episodic cost limits kappa (Circle tasks)
    seed: int = 0  # base PRNG seed of data collection and of every method's runs
    num_seeds: int = 3  # training seeds per method and cost limit (DSRL protocol: 3)
    eval_episodes: int = 20  # final evaluation episodes per run (DSRL protocol: 20)
    eval_every: int = 10  # chunks between evaluations during training; 0 for none
    eval_episodes_during: int = 5  # episodes per run at each evaluation during training
    updates_per_chunk: int = 1_000  # updates per jitted device call (one lax.scan)
    checkpoint_every: int = 10  # chunks between checkpoints of a method's training state
    methods: tuple[str, ...] = tuple(METHODS)  # compared learners, in table order
    preset: Preset = "protocol"  # protocol: each learner's published sizes; quick: tiny smoke-test sizes
    num_updates: int | None = None  # main-phase updates of every method; none: the preset's
    warmup_updates: int | None = None  # ATAC / SATAC warm-start updates; none: the preset's
    reference_updates: int | None = None  # SATAC's BC-Safe reference updates; none: the preset's
    collect: collect.Config = dataclasses.field(default_factory=collect.Config)  # collection when dataset is empty
    bc_all: BCConfig | None = None  # BC-All hyperparameters; none: its defaults (OSRL)
    bc_safe: BCSafeConfig | None = None  # BC-Safe hyperparameters; none: its defaults (OSRL)
    bcq_lag: BCQLagConfig | None = None  # BCQ-Lag hyperparameters; none: its defaults (OSRL)
    bear_lag: BEARLagConfig | None = None  # BEAR-Lag hyperparameters; none: its defaults (OSRL)
    cpq: CPQConfig | None = None  # CPQ hyperparameters; none: its defaults (OSRL)
    coptidice: COptiDICEConfig | None = None  # COptiDICE hyperparameters; none: its defaults (OSRL)
    cdt: CDTConfig | None = None  # CDT hyperparameters; none: its defaults (OSRL)
    atac: ATACConfig | None = None  # ATAC hyperparameters; none: its defaults (ATAC)
    satac: SATACConfig | None = None  # SATAC hyperparameters; none: its defaults (docs/algorithms/satac.md)

    # The shared settings are set once, at the top level: not listed or accepted in a method's section.
    sets_in_sections: ClassVar[dict[str, dict[str, str]]] = {
        **{name: {field: f"the benchmark's --{field}" for field in SHARED_FIELDS} for name in METHODS},
        "collect": {"task": "the benchmark's --task", "seed": "the benchmark's --seed"}}

    def __post_init__(self) -> None:
        require(len(self.methods) >= 1, "methods", "needs at least one method")
        unknown = [m for m in self.methods if m not in METHODS]
        require(not unknown, "methods", f"unknown {', '.join(map(repr, unknown))}; known: {', '.join(METHODS)}")
        require(len(set(self.methods)) == len(self.methods), "methods", f"must be distinct (got {self.methods})")
        require(self.preset in ("protocol", "quick"), "preset", f"must be protocol or quick (got {self.preset!r})")
        for name in METHODS:
            _check_section(self, name)
            require(getattr(self, name) is None or name in self.methods, name,
                    f"settings for {name}, which is not among methods {self.methods}")
        for name in self.methods:
            method_config(self, name)  # every method's settings are validated at the door


    @property
    def inactive_sections(self) -> tuple[str, ...]:
        """The sections of the methods not chosen (refused when given; not listed by --help)."""
        return tuple(name for name in METHODS if name not in self.methods)


def _check_section(config: Config, name: str) -> None:
    """Refuses a shared setting given inside a method's section: it belongs at the top level."""
    section = getattr(config, name)
    if section is None:
        return
    defaults = METHODS[name].config_cls()
    for field in SHARED_FIELDS:
        value = getattr(section, field)
        if value != getattr(defaults, field) and value != getattr(config, field):
            raise ConfigError(f"{name}.{field}: shared by every method; set it at the top level (--{field})")
    for field in BUDGET_FIELDS:
        if getattr(config, field) is None or not hasattr(section, field):
            continue
        value = getattr(section, field)
        if value != getattr(defaults, field) and value != getattr(config, field):
            raise ConfigError(f"{name}.{field}: the top-level --{field} {getattr(config, field)} sets every "
                              f"method's; give one or the other")


def method_config(config: Config, name: str) -> offline.OfflineConfig:
    """Method ``name``'s config: its section (or defaults), the preset, the budget, the shared settings."""
    method = METHODS[name]
    section = getattr(config, name) or method.config_cls()
    fields = {f.name for f in dataclasses.fields(section)}
    changes: dict[str, Any] = {}
    if config.preset == "quick":
        changes.update({k: v for k, v in QUICK_SIZES.items() if k in fields})
    for budget in BUDGET_FIELDS:
        if getattr(config, budget) is not None and budget in fields:
            changes[budget] = getattr(config, budget)
    changes.update({field: getattr(config, field) for field in SHARED_FIELDS})
    try:
        return dataclasses.replace(section, **changes)
    except ConfigError as error:
        raise ConfigError(f"{name}.{error}") from None


# --------------------------------------------------------------------------------------------------
# Training one method


def with_stage_prefix(make_algorithm: offline.MakeAlgorithm, prefix: str) -> offline.MakeAlgorithm:
    """The learner with its phases renamed ``<prefix>_<phase>``: stage names stay unique in one run."""

    def make(config: Any, problem: offline.Problem) -> offline.Algorithm:
        algorithm = make_algorithm(config, problem)
        phases = tuple(p._replace(name=f"{prefix}_{p.name}") for p in algorithm.phases)
        return algorithm._replace(phases=phases)

    return make


def method_result_path(ctx, name: str) -> Path:
    return ctx.run_dir / RESULTS_DIR / f"{name}.json"


def run_method(config: Config, ctx, name: str, dataset: dsrl.OfflineDataset) -> dict[str, Any]:
    """Trains and scores one method (or reads its scores back when a resumed run already has them)."""
    path = method_result_path(ctx, name)
    if path.is_file():
        return json.loads(path.read_text())
    started = time.perf_counter()
    settings = method_config(config, name)
    make = with_stage_prefix(METHODS[name].builder(settings, dataset), name)
    session = offline.make_session(settings, dataset, make, config.dataset or "collected dataset")
    state = offline.train(settings, ctx, session)
    summary = offline.final_summary(settings, session, state)
    summary["wall_time_s"] = time.perf_counter() - started
    if ctx.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, default=_json_scalar) + "\n")
    return json.loads(json.dumps(summary, default=_json_scalar))


def _json_scalar(value: Any) -> Any:
    return np.asarray(value).tolist()


# --------------------------------------------------------------------------------------------------
# The table


class Row(NamedTuple):
    """One line of the table: a method under one cost limit, or its average over the limits."""

    method: str  # table label, e.g. "SATAC"
    cost_limit: str  # "10", "20", ... or "average"
    normalized_reward: float  # mean over seeds (average row: mean over limits)
    normalized_reward_std: float  # standard deviation over seeds (average row: NaN)
    normalized_cost: float
    normalized_cost_std: float
    safe: bool  # normalized cost <= 1


def table_rows(results: Mapping[str, Mapping[str, Any]]) -> list[Row]:
    """Rows per method (in ``results`` order): each cost limit, then the average over limits.

    The average row is the mean of the limits' mean scores, as DSRL and OSRL tables report a task; it is
    safe iff that mean normalized cost is <= 1.
    """
    rows = []
    for name, summary in results.items():
        label = METHODS[name].label if name in METHODS else name
        per_limit = [summary["scores"][offline.limit_label(k)] for k in summary["cost_limits"]]
        for limit, s in zip(summary["cost_limits"], per_limit):
            rows.append(Row(label, f"{limit:g}", s["normalized_reward_mean"], s["normalized_reward_std_seeds"],
                            s["normalized_cost_mean"], s["normalized_cost_std_seeds"],
                            bool(s["normalized_cost_mean"] <= 1.0)))
        reward = float(np.mean([s["normalized_reward_mean"] for s in per_limit]))
        cost = float(np.mean([s["normalized_cost_mean"] for s in per_limit]))
        rows.append(Row(label, AVERAGE, reward, float("nan"), cost, float("nan"), cost <= 1.0))
    return rows


def write_csv(rows: Sequence[Row], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(Row._fields)
        for row in rows:
            # The average rows have no spread over seeds: their std cells stay empty.
            writer.writerow([row.method, row.cost_limit, *("" if np.isnan(x) else f"{x:.4f}" for x in row[2:6]),
                             row.safe])


def _score(mean: float, std: float) -> str:
    return f"{mean:.2f}" if np.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def markdown_table(rows: Sequence[Row], title: str = "") -> str:
    """Methods x (limits + average): ``reward | cost`` per column; unsafe costs marked, the best safe
    reward of each column in bold (DSRL's reading: among safe methods, the higher reward wins)."""
    columns = list(dict.fromkeys(r.cost_limit for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    cell = {(r.method, r.cost_limit): r for r in rows}
    best = {}
    for column in columns:
        safe = [cell[m, column] for m in methods if (m, column) in cell and cell[m, column].safe]
        if safe:
            best[column] = max(safe, key=lambda r: r.normalized_reward).method
    header = ["method"]
    for column in columns:
        name = "average" if column == AVERAGE else f"κ={column}"
        header += [f"{name} reward ↑", f"{name} cost ↓"]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        cells = [method]
        for column in columns:
            r = cell.get((method, column))
            if r is None:
                cells += ["", ""]
                continue
            reward = _score(r.normalized_reward, r.normalized_reward_std)
            cells.append(f"**{reward}**" if best.get(column) == method else reward)
            cells.append(_score(r.normalized_cost, r.normalized_cost_std) + ("" if r.safe else " ✗"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Normalized reward and cost (DSRL), mean ± standard deviation over seeds; ✗: unsafe "
              "(normalized cost > 1); bold: highest reward among the safe methods of the column. The "
              "average column is the mean over the cost limits."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The plot


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def plot_reward_vs_cost(rows: Sequence[Row], path: Path, title: str = "") -> None:
    """Normalized cost (x) against normalized reward (y): one marker per method, a small hollow one per
    cost limit and a large filled one for the average; the limit (normalized cost 1) as a vertical line."""
    figure, axes = plotting.new_figure((6.5, 4.5))
    methods = list(dict.fromkeys(r.method for r in rows))
    for i, method in enumerate(methods):
        color, marker = f"C{i % 10}", MARKERS[i % len(MARKERS)]
        limits = [r for r in rows if r.method == method and r.cost_limit != AVERAGE]
        axes.scatter([r.normalized_cost for r in limits], [r.normalized_reward for r in limits], s=30,
                     marker=marker, facecolors="none", edgecolors=color)
        average = [r for r in rows if r.method == method and r.cost_limit == AVERAGE]
        axes.scatter([r.normalized_cost for r in average], [r.normalized_reward for r in average], s=90,
                     marker=marker, color=color, edgecolors="black", label=method)
    axes.axvline(1.0, color="black", linestyle="--", linewidth=1, label="cost limit")
    axes.set_xlabel("normalized cost")
    axes.set_ylabel("normalized reward")
    axes.set_title(title or "reward vs cost")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    plotting.save(figure, path, dpi=110)


# --------------------------------------------------------------------------------------------------
# The experiment


def run(config: Config, ctx) -> dict[str, Any]:
    """Data, every method in turn, then the table and the plot; returns the summary figures."""
    dataset = offline.load_dataset(method_config(config, config.methods[0]), ctx, config.collect)
    if dataset.metadata.reward_min is None or dataset.metadata.reward_max is None:
        # Checked before any training: without reference returns nothing can be scored.
        raise ConfigError(f"{config.dataset or 'dataset'}: no reference returns to normalize rewards; "
                          "set --reward_min and --reward_max (DSRL keeps them in the task's spec)")
    results = {name: run_method(config, ctx, name, dataset) for name in config.methods}
    rows = table_rows(results)
    title = f"{config.task}: {dataset.num_transitions} transitions, {config.num_seeds} seeds, " \
            f"{config.eval_episodes} episodes"
    csv_path, md_path = ctx.run_dir / TABLE_CSV, ctx.run_dir / TABLE_MARKDOWN
    plot_path = ctx.run_dir / "plots" / f"{PLOT_NAME}.png"
    if ctx.is_main:
        write_csv(rows, csv_path)
        md_path.write_text(markdown_table(rows, title))
        plot_reward_vs_cost(rows, plot_path, title=config.task)
    summary: dict[str, Any] = {"task": config.task, "transitions": dataset.num_transitions,
                               "cost_limits": list(config.cost_limits), "table_csv": str(csv_path),
                               "table_markdown": str(md_path), "plot": str(plot_path)}
    for name in config.methods:
        *per_limit, average = [r for r in rows if r.method == METHODS[name].label]
        summary[f"{name}/normalized_reward"] = average.normalized_reward
        summary[f"{name}/normalized_cost"] = average.normalized_cost
        summary[f"{name}/safe_limits"] = sum(r.safe for r in per_limit)
        summary[f"{name}/wall_time_s"] = results[name]["wall_time_s"]
    return summary


def stage_configs(config: Config) -> dict[str, Any]:
    """Each chosen method's config as it trains, and the collection's (used when no dataset is given)."""
    stages: dict[str, Any] = {name: method_config(config, name) for name in config.methods}
    if not config.dataset:
        collection = dataclasses.replace(config.collect, task=config.task, seed=config.seed)
        stages.update({f"collect/{k}": v for k, v in collect.stage_configs(collection).items()})
    return stages


OFFLINE_BENCHMARK = Experiment(Config, run, stage_configs)
