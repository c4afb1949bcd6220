"""The front door: `python -m experiments.run` with no experiment name runs the tour (here at toy sizes)."""

from __future__ import annotations

import json

from experiments import registry
from experiments import run as runner
from tests.algorithms.control.test_offline_benchmark import mixed_cost_file

TOY = [
    "--offline.preset", "quick", "--offline.num_seeds", "1", "--offline.eval_episodes", "2",
    "--offline.updates_per_chunk", "2",
    "--rlhf.num_seeds", "1", "--rlhf.synthetic_rows", "256", "--rlhf.synthetic_eval_prompts", "12",
    "--rlhf.num_steps", "2", "--rlhf.steps_per_chunk", "1", "--rlhf.checkpoint_every", "1",
    "--rlhf.prompts_per_step", "4", "--rlhf.responses_per_prompt", "2", "--rlhf.eval_responses_per_prompt", "1",
    "--rlhf.sft.epochs", "1", "--rlhf.ppo.max_new_tokens", "4",
]


def test_default_experiment_is_the_tour_and_reports_both_halves(tmp_path, capsys):
    assert registry.DEFAULT_EXPERIMENT == "tour"
    run_dir = tmp_path / "run"
    code = runner.main([*TOY, "--offline.dataset", mixed_cost_file(tmp_path / "data.hdf5"),
                        "--run-dir", str(run_dir)])
    assert code == 0
    report = (run_dir / "tour.md").read_text()
    assert "| satac |" in report and "| bc_safe |" in report
    assert "| repo |" in report and "| safe_rlhf |" in report and "| sft |" in report
    assert "n/a" not in report
    assert "Tour of the framework" in capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["rlhf/repo/safe_prompt_rate"] <= 1.0
    assert "offline/satac/normalized_cost" in summary
    assert (run_dir / "offline" / "results.csv").exists() and (run_dir / "rlhf" / "results.csv").exists()
    # Every stage of the multi-stage run has its learning curves in its own run directory.
    for stage_dir in (run_dir / "offline", run_dir / "rlhf", run_dir / "rlhf" / "sft"):
        rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
        metrics = {key for row in rows for key in row} - {"stage", "step"}
        plots = {p.name for p in (stage_dir / "plots").iterdir()}
        assert {f"{name.replace('/', '_')}.png" for name in metrics} <= plots, stage_dir
