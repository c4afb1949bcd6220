"""PPO-Lagrangian against plain PPO on one task: both trained with the same settings, curves side by side.

    python -m experiments.ppo_lag_vs_ppo --task BallCircle --total_env_steps 1500000 --num_seeds 2 \\
        --out docs/results --runs runs/compare

Each learner runs through the project's runner machinery (its own run directory under ``--runs``);
the figure ``<out>/ppo_lag_vs_ppo_<task>.png`` shows episode reward and cost against environment steps
with the cost limit dashed, and ``<out>/ppo_lag_vs_ppo_<task>.json`` holds the summaries and wall times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

from algorithms.control.ppo_lag import ppo
from algorithms.control.ppo_lag import train as ppo_lag
from experiments.context import RunContext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="BallCircle")
    parser.add_argument("--total_env_steps", type=int, default=1_500_000)
    parser.add_argument("--num_seeds", type=int, default=2)
    parser.add_argument("--cost_limit", type=float, default=20.0)
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--runs", default="runs/compare")
    args = parser.parse_args()

    settings = dict(task=args.task, total_env_steps=args.total_env_steps, num_seeds=args.num_seeds,
                    cost_limit=args.cost_limit)
    learners = {"PPO-Lag": ppo_lag.Config(**settings), "PPO": ppo.Config(**settings)}
    curves, results = {}, {}
    for label, config in learners.items():
        ctx = RunContext(Path(args.runs) / f"{args.task}-{label}", progress=False)
        start = time.perf_counter()
        summary = ppo_lag.run(config, ctx)
        results[label] = {**summary, "wall_s": round(time.perf_counter() - start, 1),
                          "config": dataclasses.asdict(config)}
        curves[label] = [r for r in ctx.read_metrics() if r["stage"] == "train"]
        ctx.close()
        print(label, json.dumps({k: v for k, v in results[label].items() if k != "config"}), flush=True)

    out = Path(args.out)
    ppo_lag.plot_reward_cost_curves(curves, args.cost_limit, out / f"ppo_lag_vs_ppo_{args.task}.png",
                                    title=f"{args.task}: mean of {args.num_seeds} seeds, training episodes")
    machine = f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPU cores"
    (out / f"ppo_lag_vs_ppo_{args.task}.json").write_text(json.dumps({"machine": machine, **results}, indent=1))


if __name__ == "__main__":
    main()
