"""The front door: `python -m experiments.run` with no experiment name runs the tour (here at toy sizes)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from experiments import registry, tour
from tests.algorithms.control.test_offline_benchmark import mixed_cost_file
from tests.multidevice.harness import device_env

TOY = [
    "--offline.preset", "quick", "--offline.num_seeds", "1", "--offline.eval_episodes", "2",
    "--offline.updates_per_chunk", "2",
    "--rlhf.num_seeds", "1", "--rlhf.synthetic_rows", "256", "--rlhf.synthetic_eval_prompts", "12",
    "--rlhf.num_steps", "2", "--rlhf.steps_per_chunk", "1", "--rlhf.checkpoint_every", "1",
    "--rlhf.prompts_per_step", "4", "--rlhf.responses_per_prompt", "2", "--rlhf.eval_responses_per_prompt", "1",
    "--rlhf.sft.epochs", "1", "--rlhf.ppo.max_new_tokens", "4",
]


def test_default_experiment_is_the_tour_and_reports_both_halves(tmp_path):
    assert registry.DEFAULT_EXPERIMENT == "tour"
    run_dir = tmp_path / "run"
    # `python -m experiments.run` with no experiment name, in a process of its own: one CPU device whose
    # XLA compiles at LLVM -O0 (device_env), since the toy tour is almost all compiling.
    result = subprocess.run([sys.executable, "-m", "experiments.run", *TOY,
                             "--offline.dataset", mixed_cost_file(tmp_path / "data.hdf5"), "--run-dir", str(run_dir)],
                            cwd=tmp_path, env=device_env(1), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    check_first_screen(out)
    report = (run_dir / "tour.md").read_text()
    assert "n/a" not in report
    assert first_screen_of(out) in report  # tour.md: the report, then both halves' full tables
    assert "## offline/results.md" in report and "## rlhf/results.md" in report
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "report" not in summary  # the report is printed; summary.json keeps the figures
    assert 0.0 <= summary["rlhf/repo/safe_prompt_rate"] <= 1.0
    assert "offline/satac/normalized_cost" in summary
    assert (run_dir / "offline" / "results.csv").exists() and (run_dir / "rlhf" / "results.csv").exists()
    # Every stage of the multi-stage run has its learning curves in its own run directory.
    for stage_dir in (run_dir / "offline", run_dir / "rlhf", run_dir / "rlhf" / "sft"):
        rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
        metrics = {key for row in rows for key in row} - {"stage", "step"}
        plots = {p.name for p in (stage_dir / "plots").iterdir()}
        assert {f"{name.replace('/', '_')}.png" for name in metrics} <= plots, stage_dir


OFFLINE_HEADER = ("method", "normalized reward", "normalized cost", "safe")
RLHF_HEADER = ("method", "reward", "cost", "safe prompts", "worst category", "interference")


def first_screen_of(out: str) -> str:
    """The report the runner printed: from its title to the line before the wall time."""
    start = out.index("Tour of the framework")
    return out[start:out.index("\nWall time", start)].rstrip()


def table_rows(lines: list[str], header: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The rows (first cells) of the markdown table whose header row holds ``header``."""
    cells = [tuple(cell.strip() for cell in line.strip("|").split("|")) for line in lines]
    (start,) = [i for i, row in enumerate(cells) if row == header]
    assert set(lines[start + 1]) <= set("|-")
    rows = []
    for line, row in zip(lines[start + 2:], cells[start + 2:]):
        if not line.startswith("|"):
            break
        assert len(row) == len(header)
        rows.append(row)
    return rows


def check_first_screen(out: str) -> None:
    """Short, labelled tables per half, a line saying what each shows, a legend; no raw figures."""
    lines = first_screen_of(out).splitlines()
    assert len(lines) <= 45
    assert max(map(len, lines)) <= tour.WIDTH + 10
    assert not [line for line in out.splitlines() if re.match(r"^(offline|rlhf)/\S+: ", line)]  # no raw dump
    assert "wall_time_s" not in out and "safe_prompt_rate" not in out
    offline = [row[0] for row in table_rows(lines, OFFLINE_HEADER)]
    assert offline == ["BC-All", "BC-Safe", "SATAC"]
    rlhf = [row[0] for row in table_rows(lines, RLHF_HEADER)]
    assert rlhf == ["SFT", "Safe-RLHF (PPO-Lag)", "RePO"]
    assert lines.index(next(line for line in lines if line.startswith("Offline safe RL"))) < lines.index(
        next(line for line in lines if line.startswith("Safe RLHF")))
    assert sum(line.startswith("Shows: ") for line in lines) == 2
    legend = lines[lines.index("Columns:") + 1:]
    for name, _ in tour.LEGEND:
        assert any(line.split("  ")[1:2] == [name] for line in legend), name
    for page in set(re.findall(r"docs/results/\S+\.md", "\n".join(lines))):
        assert (Path(__file__).parents[2] / page).is_file(), page


OFFLINE_FIGURES = {"bc_all/normalized_reward": 0.8, "bc_all/normalized_cost": 3.0, "bc_all/safe_limits": 0,
                   "bc_safe/normalized_reward": 0.5, "bc_safe/normalized_cost": 0.1, "bc_safe/safe_limits": 1,
                   "satac/normalized_reward": 0.2, "satac/normalized_cost": 0.0, "satac/safe_limits": 1}


def rlhf_figures(safe_prompts: dict[str, float]) -> dict[str, float]:
    figures = {}
    for method, rate in safe_prompts.items():
        figures.update({f"{method}/mean_reward": 1.0, f"{method}/mean_cost": -0.5, f"{method}/safe_prompt_rate": rate,
                        f"{method}/worst_category_safe_rate": 0.5, f"{method}/average_satisfied": 1.0,
                        f"{method}/interference": 1.0 - rate})
    return figures


def test_the_report_claims_only_what_its_figures_show():
    config = tour.Config()
    holds = tour.report(config, OFFLINE_FIGURES, rlhf_figures({"sft": 0.8, "safe_rlhf": 0.7, "repo": 0.9}))
    assert "SATAC stays within the cost limit" in holds and "BC-All" in holds.split("stays within")[1]
    assert "Too small for SATAC's claim: it earns less than BC-Safe (0.20 vs 0.50)" in holds
    assert "docs/results/offline_results.md" in holds
    assert "RePO's per-prompt constraint leaves fewer prompts unsafe" in holds and "30% of prompts unsafe" in holds
    fails = tour.report(config, {**OFFLINE_FIGURES, "satac/normalized_cost": 1.5, "satac/safe_limits": 0},
                        rlhf_figures({"sft": 0.8, "safe_rlhf": 0.9, "repo": 0.7}))
    assert "SATAC exceeds the cost limit here (normalized cost 1.50)" in fails and "it is not safe here" in fails
    assert "at this size RePO does not leave fewer prompts unsafe than Safe-RLHF" in fails
    assert "docs/results/rlhf_synthetic.md" in fails
    check_first_screen(fails + "\nWall time 1 s; every figure in summary.json.")
