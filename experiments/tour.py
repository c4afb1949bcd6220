"""A quick tour of both halves of the framework, small enough for a laptop CPU in a few minutes.

1. Offline safe RL: behaviour policies of varied safety are trained with PPO-Lagrangian while their cost
   limit sweeps, their trajectories are thinned into a DSRL-format dataset, and SATAC is compared with
   BC-Safe and BC-All on it under the DSRL protocol's scoring (normalized reward and cost; safe iff
   cost <= 1).
2. Safe RLHF: on the synthetic safety-alignment task a tiny Llama is fine-tuned (SFT), then trained with
   Safe-RLHF's PPO-Lagrangian (average cost constraint) and with RePO (per-prompt rectified constraint),
   and both are scored per prompt: safe prompts, the worst category, safety interference.

Each half writes its own run directory inside the tour's (``offline/``, ``rlhf/``) with its tables and
plots. The tour's report (its summary's ``report``, which the runner prints in place of the figures; also
``tour.md``, with both halves' full tables) holds one short table per half, a line saying what each
shows and where it is too small to show a claim, and a legend of the columns. The sizes are a
demonstration, not the protocol: ``offline_benchmark`` and ``rlhf_pipeline`` run the full comparisons
(docs/results/offline_results.md, docs/results/rlhf_synthetic.md).

What holds at these sizes: SATAC stays within the cost limit, where BC-All, which clones the unsafe
episodes too, does not; but its critics are far from converged (a few thousand updates, where the protocol
uses hundreds of thousands), so it stays near its safe warm start, below BC-Safe's reward. RePO, trained
like Safe-RLHF against a margin below the limit, leaves fewer prompts unsafe than Safe-RLHF, which meets
its average cost constraint and still leaves prompts unsafe (safety interference).
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Any

from algorithms.control import bc, collect, offline_benchmark, satac
from algorithms.llm import repo, rlhf_pipeline, safe_rlhf
from constrained_rl import lagrangian
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
    # BC-All (a few seconds) shows what the data hold: cloning every episode, the unsafe ones too.
    small = dict(hidden_sizes=(64, 64), batch_size=256)
    return offline_benchmark.Config(
        task="BallCircle", methods=("bc_all", "bc_safe", "satac"), cost_limits=(20.0,), num_seeds=2,
        eval_episodes=10, eval_every=0, updates_per_chunk=500, collect=_tour_collection(),
        bc_all=bc.Config(**small, num_updates=3000), bc_safe=bc.SafeConfig(**small, num_updates=3000),
        satac=satac.Config(**small, warmup_data="safe", critic_warmup="returns",
                           multiplier=dataclasses.replace(satac.MULTIPLIER, init=10.0),
                           reward_scale=0.1, reference_updates=2000, warmup_updates=2000, num_updates=2000))


def _tour_rlhf() -> rlhf_pipeline.Config:
    # Both constrained learners train against a margin, cost <= -1, with a multiplier cap of 20, as in table 4
    # of docs/results/rlhf_synthetic.md (there a margin of 0.5 over 600 steps; in 80 steps lambda has little
    # time to rise, hence the wider margin). Prompts are still scored safe at cost <= 0 (cost_limit).
    def capped(multiplier: lagrangian.MultiplierConfig) -> lagrangian.MultiplierConfig:
        return dataclasses.replace(multiplier, max=20.0)

    return rlhf_pipeline.Config(
        methods=("safe_rlhf", "repo"), num_seeds=2, scorer="ground_truth", synthetic_rows=1024,
        synthetic_eval_prompts=100, num_steps=80, steps_per_chunk=10, checkpoint_every=2,
        train_cost_limit=-1.0, safe_rlhf=safe_rlhf.SafeRLHFConfig(multiplier=capped(safe_rlhf.MULTIPLIER)),
        repo=repo.RePOConfig(multiplier=capped(repo.MULTIPLIER)))


@dataclasses.dataclass(frozen=True)
class Config:
    offline: offline_benchmark.Config = dataclasses.field(default_factory=_tour_offline)  # SATAC vs BC-Safe, BC-All
    rlhf: rlhf_pipeline.Config = dataclasses.field(default_factory=_tour_rlhf)  # Safe-RLHF vs RePO


OFFLINE_PAGE = "docs/results/offline_results.md"
RLHF_PAGE = "docs/results/rlhf_synthetic.md"
WIDTH = 100  # the report's lines are wrapped at this width

# One line per column of the report's tables.
LEGEND = (
    ("normalized reward", "episode reward on the dataset's scale: 0 its lowest episode's, 1 its highest's"),
    ("normalized cost", "episode cost / cost limit; safe iff <= 1 (means over seeds and episodes)"),
    ("reward, cost", "mean exact reward and cost of the responses to held-out prompts; cost > 0 is unsafe"),
    ("safe prompts", "share of held-out prompts whose mean cost over their responses is <= 0"),
    ("worst category", "share of safe responses in the least safe prompt category (benign ... harmful)"),
    ("interference", "share of prompts unsafe while the average cost meets the limit (else 0)"),
)
# What a compared offline method is, where the report names it as unsafe.
_OFFLINE_GLOSS = {"bc_all": "which clones every episode, the unsafe ones too", "atac": "SATAC without its cost critic"}


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """A markdown table with padded columns, readable as text too."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"

    return [line(header), "|" + "|".join("-" * (width + 2) for width in widths) + "|", *map(line, rows)]


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, subsequent_indent="  ", break_on_hyphens=False)


def _names(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def offline_report(config: offline_benchmark.Config, summary: dict[str, Any]) -> list[str]:
    """The offline half: its title, table and what the figures show."""
    limits, label = config.cost_limits, lambda m: offline_benchmark.METHODS[m].label
    safe = {m: summary[f"{m}/safe_limits"] == len(limits) for m in config.methods}
    figure = lambda m, key: summary[f"{m}/{key}"]
    source = f"data from {config.dataset}" if config.dataset else (
        f"data of {config.collect.num_policies} PPO-Lag behaviour policies")
    lines = [*_wrap(f"Offline safe RL on {config.task} (cost limit {', '.join(f'{k:g}' for k in limits)}, "
                    f"{config.num_seeds} seeds x {config.eval_episodes} episodes, {source})"), ""]
    lines += _table(("method", "normalized reward", "normalized cost", "safe"), [
        (label(m), f"{figure(m, 'normalized_reward'):.2f}", f"{figure(m, 'normalized_cost'):.2f}",
         ("yes" if safe[m] else "no") if len(limits) == 1 else f"{figure(m, 'safe_limits')} of {len(limits)}")
        for m in config.methods])
    lines.append("")
    if "satac" not in config.methods:
        return lines + _wrap(f"SATAC is not among the methods; {OFFLINE_PAGE} compares every method.")
    others = [m for m in config.methods if m != "satac"]
    safe_others = [m for m in others if safe[m]]
    unsafe_others = [m for m in others if not safe[m]]
    if safe["satac"]:
        shows = "SATAC stays within the cost limit"
        if safe_others:
            shows += f", as {_names([label(m) for m in safe_others])} {'does' if len(safe_others) == 1 else 'do'}"
        if unsafe_others:
            glossed = [label(m) + (f", {_OFFLINE_GLOSS[m]}," if m in _OFFLINE_GLOSS and len(unsafe_others) == 1
                                   else "") for m in unsafe_others]
            shows += f"; {_names(glossed)} {'does' if len(unsafe_others) == 1 else 'do'} not"
    else:
        shows = f"SATAC exceeds the cost limit here (normalized cost {figure('satac', 'normalized_cost'):.2f})"
    lines += _wrap(f"Shows: {shows}.")
    best = max(safe_others, key=lambda m: figure(m, "normalized_reward"), default=None)
    satac_wins = safe["satac"] and (
        best is None or figure("satac", "normalized_reward") >= figure(best, "normalized_reward"))
    if satac_wins and best is not None:
        lines += _wrap(f"SATAC also earns the most reward of the safe methods "
                       f"({figure('satac', 'normalized_reward'):.2f} vs {label(best)}'s "
                       f"{figure(best, 'normalized_reward'):.2f}).")
    if not satac_wins:
        adversarial = offline_benchmark.method_config(config, "satac").num_updates
        behind = (f"it earns less than {label(best)} ({figure('satac', 'normalized_reward'):.2f} vs "
                  f"{figure(best, 'normalized_reward'):.2f})" if safe["satac"] and best else "it is not safe here")
        lines += _wrap(f"Too small for SATAC's claim: {behind}; its critics get {adversarial:,} adversarial "
                       f"updates here, {satac.Config().num_updates:,} in the protocol. At 4,000 on the real "
                       f"SafetyBallCircle-v0, {OFFLINE_PAGE} has SATAC safe at all three limits, with the "
                       f"best safe reward at one of them.")
    return lines


def rlhf_report(config: rlhf_pipeline.Config, summary: dict[str, Any]) -> list[str]:
    """The safe-RLHF half: its title, table and what the figures show."""
    methods = ("sft", *config.methods)
    figure = lambda m, key: summary[f"{m}/{key}"]
    trained = (f"trained to cost <= {config.training_cost_limit:g}, scored at <= {config.cost_limit:g}"
               if config.training_cost_limit != config.cost_limit else f"cost limit {config.cost_limit:g}")
    lines = [*_wrap(f"Safe RLHF on the synthetic task (tiny Llama, SFT on {config.synthetic_rows:,} rows, "
                    f"{config.num_steps} RL steps {trained}; {config.num_seeds} seeds, "
                    f"{config.synthetic_eval_prompts} held-out prompts)"), ""]
    lines += _table(("method", "reward", "cost", "safe prompts", "worst category", "interference"), [
        (rlhf_pipeline.METHOD_LABELS[m], *(f"{figure(m, key):.2f}" for key in (
            "mean_reward", "mean_cost", "safe_prompt_rate", "worst_category_safe_rate", "interference")))
        for m in methods])
    lines.append("")
    if not {"safe_rlhf", "repo"} <= set(config.methods):
        return lines + _wrap(f"Safe-RLHF and RePO are not both among the methods; {RLHF_PAGE} compares them.")
    safe_prompts = {m: figure(m, "safe_prompt_rate") for m in methods}
    if safe_prompts["repo"] > safe_prompts["safe_rlhf"]:
        reward, baseline = figure("repo", "mean_reward"), figure("safe_rlhf", "mean_reward")
        shows = (f"RePO's per-prompt constraint leaves fewer prompts unsafe than Safe-RLHF's average constraint "
                 f"(safe prompts {safe_prompts['repo']:.2f} vs {safe_prompts['safe_rlhf']:.2f}; SFT "
                 f"{safe_prompts['sft']:.2f}), at {'lower' if reward < baseline else 'no lower'} reward "
                 f"({reward:.2f} vs {baseline:.2f})")
        if figure("safe_rlhf", "average_satisfied") == 1 and figure("safe_rlhf", "interference") > 0:
            shows += (f"; Safe-RLHF meets its average constraint yet leaves "
                      f"{figure('safe_rlhf', 'interference'):.0%} of prompts unsafe (interference)")
    else:
        shows = (f"at this size RePO does not leave fewer prompts unsafe than Safe-RLHF (safe prompts "
                 f"{safe_prompts['repo']:.2f} vs {safe_prompts['safe_rlhf']:.2f})")
    lines += _wrap(f"Shows: {shows}.")
    lines += _wrap(f"Too small for the full trade-off: with 4,096 SFT rows and 600 steps, {RLHF_PAGE} (table 4) "
                   f"has RePO at 95% safe prompts and reward 2.76, Safe-RLHF at 63% and 4.29 (on this task "
                   f"per-prompt safety costs reward by design).")
    return lines


def report(config: Config, offline: dict[str, Any], rlhf: dict[str, Any]) -> str:
    """The tour's first screen: a table per half, what each shows, the columns' legend."""
    name_width = max(len(name) for name, _ in LEGEND)
    return "\n".join([
        "Tour of the framework, at demonstration sizes (the comparisons at full size: docs/results/)", "",
        *offline_report(config.offline, offline), "", *rlhf_report(config.rlhf, rlhf), "",
        "Columns:", *(f"  {name.ljust(name_width)}  {meaning}" for name, meaning in LEGEND), "",
        "Full tables and plots: offline/results.md, rlhf/results.md; this report with both tables: tour.md.",
    ])


def run(config: Config, ctx) -> dict[str, Any]:
    offline = offline_benchmark.run(config.offline, ctx.child("offline"))
    rlhf = rlhf_pipeline.run(config.rlhf, ctx.child("rlhf"))
    text = report(config, offline, rlhf)
    if ctx.is_main:
        tables = [(ctx.run_dir / half / "results.md") for half in ("offline", "rlhf")]
        full = [f"## {half}/results.md\n\n{path.read_text()}" for half, path in zip(("offline", "rlhf"), tables)
                if path.exists()]
        (ctx.run_dir / "tour.md").write_text("\n\n".join([text, *full]) + "\n")
    summary = {**{f"offline/{k}": v for k, v in offline.items()}, **{f"rlhf/{k}": v for k, v in rlhf.items()}}
    return {**summary, "report": text}  # the runner prints the report; summary.json keeps the figures


def stage_configs(config: Config) -> dict[str, Any]:
    """The configs of both halves' stages."""
    return {**{f"offline/{k}": v for k, v in offline_benchmark.stage_configs(config.offline).items()},
            "rlhf": config.rlhf}


TOUR = Experiment(Config, run, stage_configs)
