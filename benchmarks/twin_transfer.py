"""Do policies trained on a twin's data keep their safety on the real task?

    python benchmarks/twin_transfer.py --out runs/transfer_BallCircle            # BallCircle, the docs' table
    python benchmarks/twin_transfer.py --task CarCircle --methods bc_safe,satac --out runs/transfer_CarCircle

1. ``collect --task <task>Twin``: a dataset by the DSRL recipe, every episode played in the JAX twin.
2. ``offline_benchmark`` on it, evaluated in the twin (``--config``: the CPU tables' sizes by default).
3. ``evaluate --method M`` of every method twice, on the twin and on the real task
   (``Safety<task>-v0``), 20 episodes per run, rewards normalized by the twin data's own reference returns
   in both, so that the two columns differ by the simulator only.

The check (docs/environments.md): a policy (one seed at one cost limit) whose mean twin cost is within
``margin`` x kappa (0.8: a 20% margin) should be safe on the real task (cost <= kappa). The script prints
one row per method and limit (means over the seeds) and the count of runs that pass. Each step is skipped
when its output exists, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DEFAULT_METHODS = ("bc_safe", "bcq_lag", "satac")


def run(*args: str, quiet: bool = False) -> None:
    command = [sys.executable, "-m", "experiments.run", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL if quiet else None)


def summary(directory: Path) -> dict:
    return json.loads((directory / "summary.json").read_text())


def mean(rows: list[dict], key: str) -> float:
    return sum(row[key] for row in rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="BallCircle", help="Bullet task: BallCircle, CarCircle, BallRun, CarRun")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--config", default="experiments/configs/offline_cpu_tables.toml")
    parser.add_argument("--margin", type=float, default=0.8)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--out", default="runs/twin_transfer")
    args = parser.parse_args()
    methods = args.methods.split(",")
    twin, real = f"{args.task}Twin", f"Safety{args.task}-v0"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = out / "collect"
    if not (data / "summary.json").is_file():
        run("collect", "--task", twin, "--run-dir", str(data))
    low, high = summary(data)["reward_return_range"]
    bench = out / "benchmark"
    if not (bench / "summary.json").is_file():
        if (bench / "config.json").is_file():
            run("--resume", str(bench))
        else:
            run("offline_benchmark", "--config", args.config,
                "--task", twin, "--dataset", str(data / "dataset.hdf5"), "--methods", ",".join(methods),
                "--run-dir", str(bench))
    scored: dict[tuple[str, str], list[dict]] = {}
    for method in methods:
        for where, task in (("twin", twin), ("real", real)):
            directory = out / f"{method}_on_{where}"
            if not (directory / "summary.json").is_file():
                run("evaluate", "--run_dir", str(bench), "--method", method, "--task", task,
                    "--episodes", str(args.episodes), "--reward_min", repr(low), "--reward_max", repr(high),
                    "--run-dir", str(directory), quiet=True)
            scored[method, where] = summary(directory)["runs"]

    print(f"\n{args.task}: trained on {twin} data, scored in the twin and on {real} "
          f"(rewards normalized by the twin data's [{low:.1f}, {high:.1f}])\n")
    print("| method | kappa | reward twin | reward real | cost/kappa twin | cost/kappa real | runs within the margin in the twin | of those safe on the real task |")
    print("|---|---|---|---|---|---|---|---|")
    passed = within = 0
    for method in methods:
        twin_runs, real_runs = scored[method, "twin"], scored[method, "real"]
        for kappa in sorted({r["cost_limit"] for r in twin_runs}):
            pairs = [(t, r) for t, r in zip(twin_runs, real_runs, strict=True) if t["cost_limit"] == kappa]
            if any((t["run"], t["cost_limit"]) != (r["run"], r["cost_limit"]) for t, r in pairs):
                sys.exit(f"error: {method}: the twin's and the real task's evaluations list other runs")
            twins, reals = [t for t, _ in pairs], [r for _, r in pairs]
            inside = [(t, r) for t, r in pairs if t["normalized_cost"] <= args.margin]
            safe = sum(r["normalized_cost"] <= 1.0 for _, r in inside)
            within, passed = within + len(inside), passed + safe
            print(f"| {method} | {kappa:g} | {mean(twins, 'normalized_reward'):.2f} | {mean(reals, 'normalized_reward'):.2f} "
                  f"| {mean(twins, 'normalized_cost'):.2f} | {mean(reals, 'normalized_cost'):.2f} "
                  f"| {len(inside)} of {len(pairs)} | {safe} |")
    print(f"\n{passed} of the {within} runs within {args.margin:g} x kappa in the twin are safe on {real}.")


if __name__ == "__main__":
    main()
