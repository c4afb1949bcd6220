"""A quick tour of both halves of the framework, small enough for a laptop CPU in a few minutes.

1. Offline safe RL: behaviour policies of varied safety are trained with PPO-Lagrangian while their cost
   limit sweeps, their trajectories are thinned into a DSRL-format dataset, and SATAC is compared with
   BC-Safe on it under the DSRL protocol's scoring (normalized reward and cost; safe iff cost <= 1).
2. Safe RLHF: on the synthetic safety-alignment task a tiny Llama is fine-tuned (SFT), then trained with
   Safe-RLHF's PPO-Lagrangian (average cost constraint) and with RePO (per-prompt rectified constraint),
   and both are scored per prompt: safe prompts, the worst category, safety interference.

Each half writes its own run directory inside the tour's (``offline/``, ``rlhf/``) with its tables and
plots; the tour prints and writes (``tour.md``) the headline figures side by side. The sizes are a
demonstration, not the protocol: ``offline_benchmark`` and ``rlhf_pipeline`` run the full comparisons.
At tour sizes SATAC's critics are far from converged (a few thousand updates, where the protocol uses
hundreds of thousands): it stays safe by staying near its safe warm start, below BC-Safe's reward;
docs/results/ holds the comparisons at larger sizes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from algorithms.control import bc, collect, offline_benchmark, satac
from algorithms.llm import rlhf_pipeline
from constrained_rl.config import Experiment


def _tour_collection() -> collect.Config:
    # Two behaviour policies sweeping their limits, 150k steps each: a dataset in about a minute.
    behaviour = dataclasses.replace(collect.Config().behaviour, total_env_steps=150_000)
    return collect.Config(num_policies=2, behaviour=behaviour)


def _tour_offline() -> offline_benchmark.Config:
    # Demonstration sizes: 64-wide networks and a few thousand updates. SATAC takes the short-budget
    # settings of docs/results/offline_results.md: warm start on the safe episodes with critics fitted to
    # the data's returns, lambda 10, and rewards scaled by 0.1 so that the reward critic's values, in the
    # thousands here, do not drown lambda's penalty in the actor's objective.
    small = dict(hidden_sizes=(64, 64), batch_size=256)
    return offline_benchmark.Config(
        task="BallCircle", methods=("bc_safe", "satac"), cost_limits=(20.0,), num_seeds=2,
        eval_episodes=10, eval_every=0, updates_per_chunk=500, collect=_tour_collection(),
        bc_safe=bc.SafeConfig(**small, num_updates=3000),
        satac=satac.Config(**small, warmup_data="safe", critic_warmup="returns",
                           multiplier=dataclasses.replace(satac.MULTIPLIER, init=10.0),
                           reward_scale=0.1, reference_updates=2000, warmup_updates=2000, num_updates=2000))


def _tour_rlhf() -> rlhf_pipeline.Config:
    return rlhf_pipeline.Config(
        methods=("safe_rlhf", "repo"), num_seeds=2, scorer="ground_truth", synthetic_rows=1024,
        synthetic_eval_prompts=100, num_steps=80, steps_per_chunk=10, checkpoint_every=2)


@dataclasses.dataclass(frozen=True)
class Config:
    offline: offline_benchmark.Config = dataclasses.field(default_factory=_tour_offline)  # SATAC vs BC-Safe
    rlhf: rlhf_pipeline.Config = dataclasses.field(default_factory=_tour_rlhf)  # Safe-RLHF vs RePO


OFFLINE_COLUMNS = (("normalized_reward", "normalized reward"), ("normalized_cost", "normalized cost"),
                   ("safe_limits", "safe at limits"))
RLHF_COLUMNS = (("mean_reward", "reward"), ("mean_cost", "cost"), ("safe_prompt_rate", "safe prompts"),
                ("worst_category_safe_rate", "worst category"), ("interference", "interference"))


def headline_table(title: str, methods: tuple[str, ...], columns: tuple[tuple[str, str], ...],
                   summary: dict[str, Any]) -> str:
    """A markdown table of ``summary[f"{method}/{key}"]`` for each method and column."""
    lines = [f"### {title}", "", "| method | " + " | ".join(label for _, label in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for method in methods:
        cells = []
        for key, _ in columns:
            value = summary.get(f"{method}/{key}")
            cells.append("n/a" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(config: Config, ctx) -> dict[str, Any]:
    offline = offline_benchmark.run(config.offline, ctx.child("offline"))
    rlhf = rlhf_pipeline.run(config.rlhf, ctx.child("rlhf"))
    limits = ", ".join(f"{limit:g}" for limit in config.offline.cost_limits)
    report = "\n".join([
        "## Tour of the framework", "",
        headline_table(f"Offline safe RL on {config.offline.task} (cost limit {limits}; "
                       f"{config.offline.num_seeds} seeds; safe iff normalized cost <= 1)",
                       config.offline.methods, OFFLINE_COLUMNS, offline),
        headline_table(f"Safe RLHF on the synthetic task ({config.rlhf.num_seeds} seeds, "
                       f"{config.rlhf.num_steps} RL steps; a prompt is safe when its cost <= "
                       f"{config.rlhf.cost_limit:g})",
                       ("sft", *config.rlhf.methods), RLHF_COLUMNS, rlhf),
        "Details: offline/results.md and rlhf/results.md in this run directory, with their plots.",
    ])
    print(report)
    if ctx.is_main:
        (ctx.run_dir / "tour.md").write_text(report + "\n")
    return {**{f"offline/{k}": v for k, v in offline.items()}, **{f"rlhf/{k}": v for k, v in rlhf.items()}}


def stage_configs(config: Config) -> dict[str, Any]:
    """The configs of both halves' stages."""
    return {**{f"offline/{k}": v for k, v in offline_benchmark.stage_configs(config.offline).items()},
            "rlhf": config.rlhf}


TOUR = Experiment(Config, run, stage_configs)
