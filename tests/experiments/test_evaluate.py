"""The evaluate experiment: a trained run's policies re-scored without retraining."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from experiments import run
from tests.algorithms.control.test_offline import random_ballcircle_file

pytestmark = pytest.mark.quick_compile  # tiny runs through the runner: compiling is most of their time

OFFLINE = ["--cost_limits", "10,40", "--num_seeds", "2", "--batch_size", "16", "--num_updates", "20",
           "--updates_per_chunk", "10", "--eval_every", "1", "--eval_episodes_during", "2", "--eval_episodes", "3",
           "--checkpoint_every", "1"]
LEARNERS = {
    # The likelihood BC-Safe: on this data both of its checkpoints are safe and the first scores higher,
    # which test_best needs; OSRL's regression BC (the default) is unsafe at both. The default's export
    # is re-scored in test_policy_export (load_policy) and test_offline_host (evaluate on a real task).
    "bc_safe": ["--hidden_sizes", "8", "--loss", "likelihood"],
    "satac": ["--hidden_sizes", "8,8", "--warmup_updates", "10", "--reference_updates", "10"],
    "coptidice": ["--actor_hidden_sizes", "8", "--critic_hidden_sizes", "8"],
}
PPO_LAG = ["--num_envs", "4", "--unroll_length", "10", "--num_epochs", "1", "--num_minibatches", "1",
           "--actor_hidden_sizes", "8", "--critic_hidden_sizes", "8", "--total_env_steps", "80",
           "--iterations_per_chunk", "1", "--num_seeds", "2", "--eval_episodes", "2"]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return random_ballcircle_file(tmp_path_factory.mktemp("data") / "data.hdf5")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> dict[str, Path]:
    """Tiny finished runs through the runner, one per learner."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, sizes in LEARNERS.items():
        assert run.main([name, "--dataset", data, *OFFLINE, *sizes, "--run-dir", str(root / name)]) == 0
        runs[name] = root / name
    return runs


def evaluate(tmp_path: Path, *args: str, name: str = "evaluation") -> Path:
    out = tmp_path / name
    assert run.main(["evaluate", *args, "--run-dir", str(out)]) == 0
    return out


@pytest.mark.parametrize("learner", list(LEARNERS))
def test_final_policies_reproduce_the_run_s_own_final_scores(trained, learner, tmp_path):
    # Same task, episodes and seed as the run's final evaluation: the same numbers, exactly.
    scored = summary(evaluate(tmp_path, "--run_dir", str(trained[learner]), "--episodes", "3"))
    own = summary(trained[learner])
    assert scored["source"] == "policy" and scored["experiment"] == learner
    for key in ("cost_limits", "num_seeds", "gradient_updates", "normalized_reward", "normalized_cost", "safe",
                "scores"):
        assert scored[key] == own[key], key
    assert [(r["cost_limit"], r["seed_index"]) for r in scored["runs"]] == [(10.0, 0), (10.0, 1), (40.0, 0), (40.0, 1)]
    assert scored["average"]["normalized_reward"] == pytest.approx(sum(own["normalized_reward"]) / 2)


def test_other_episodes_and_seed_are_other_episodes(trained, tmp_path):
    scored = summary(evaluate(tmp_path, "--run_dir", str(trained["bc_safe"]), "--episodes", "2", "--seed", "5"))
    own = summary(trained["bc_safe"])
    assert scored["seed"] == 5 and scored["scores"]["limit_10"]["num_episodes"] == 2 * 2
    assert scored["normalized_reward"] != own["normalized_reward"]


def safe_kept_checkpoints(run_dir: Path) -> tuple[list[int], list[int], dict[int, dict]]:
    """A run's kept train checkpoints, those whose evaluation during training was safe under both
    limits, and each checkpoint's evaluation row."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kept = sorted(int(p.name) for p in (run_dir / "checkpoints" / "train").iterdir() if p.name.isdigit())
    evaluated = {row["step"] // 10: row for row in rows if "eval/normalized_reward" in row}
    safe = [c for c in kept if max(evaluated[c]["eval/normalized_cost/limit_10"],
                                   evaluated[c]["eval/normalized_cost/limit_40"]) <= 1.0]
    return kept, safe, evaluated


def test_best_is_the_safe_kept_checkpoint_with_the_highest_reward(trained, tmp_path):
    run_dir = trained["bc_safe"]
    kept, safe, evaluated = safe_kept_checkpoints(run_dir)
    assert safe, "the test needs a safe kept checkpoint"
    best = max(reversed(safe), key=lambda c: evaluated[c]["eval/normalized_reward"])
    scored = summary(evaluate(tmp_path, "--run_dir", str(run_dir), "--checkpoint", "best", "--episodes", "3"))
    assert scored["source"] == f"checkpoints/train/{best}" and scored["gradient_updates"] == 10 * best
    assert scored["training_evaluation"]["eval/normalized_reward"] == evaluated[best]["eval/normalized_reward"]
    if best == kept[-1]:  # the last checkpoint is the final state
        assert scored["scores"] == summary(run_dir)["scores"]


def test_best_without_a_safe_kept_checkpoint_is_refused(trained, tmp_path, capsys):
    # The run's evaluations during training with every normalized cost above 1 (as OSRL's regression
    # BC-Safe scores on this data): best has nothing to choose and says so.
    unsafe = tmp_path / "unsafe"
    shutil.copytree(trained["bc_safe"], unsafe)
    rows = [json.loads(line) for line in (unsafe / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: 2.0 if k.startswith("eval/normalized_cost") else v for k, v in row.items()} for row in rows]
    (unsafe / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    kept, safe, _ = safe_kept_checkpoints(unsafe)
    assert kept and not safe
    error = refused(tmp_path, capsys, "--run_dir", str(unsafe), "--checkpoint", "best")
    assert "no checkpoint" in error and "was safe" in error and "use final" in error


def test_an_interrupted_run_is_scored_at_its_latest_checkpoint(data, tmp_path):
    # The first 10 of 40 updates, then Ctrl-C: no export, the latest checkpoint is scored.
    interrupted = tmp_path / "interrupted"
    args = ["bc_safe", "--dataset", data, *OFFLINE, "--num_updates", "40", "--hidden_sizes", "8"]
    assert run.main([*args, "--stop-after-chunks", "1", "--run-dir", str(interrupted)]) == run.EXIT_INTERRUPTED
    assert not (interrupted / "policy").exists()
    scored = summary(evaluate(tmp_path, "--run_dir", str(interrupted), "--episodes", "3"))
    assert scored["source"] == "checkpoints/train/1" and scored["gradient_updates"] == 10
    # Its scores under the run's reference returns (read from its dataset) are DSRL scores.
    assert set(scored["scores"]) == {"limit_10", "limit_40"}


def test_ppo_lag_final_evaluation_is_reproduced(tmp_path):
    trained = tmp_path / "ppo_lag"
    assert run.main(["ppo_lag", *PPO_LAG, "--run-dir", str(trained)]) == 0
    own = summary(trained)
    scored = summary(evaluate(tmp_path, "--run_dir", str(trained), "--episodes", "2"))
    assert scored["source"] == "policy" and scored["iterations"] == 2
    assert scored["eval_reward"] == own["eval_reward"] and scored["eval_cost"] == own["eval_cost"]
    assert [r["cost_limit"] for r in scored["runs"]] == [20.0, 20.0]
    # Reference returns given: each run's DSRL scores under its own limit.
    normalized = summary(evaluate(tmp_path, "--run_dir", str(trained), "--episodes", "2", "--reward_min", "0",
                                  "--reward_max", "10", name="normalized"))
    first = normalized["runs"][0]
    assert first["normalized_reward"] == pytest.approx(first["reward_return"] / 10)
    assert first["normalized_cost"] == pytest.approx(first["cost_return"] / 20)
    shutil.rmtree(trained / "policy")  # without an export: its last checkpoint, the same policies
    again = summary(evaluate(tmp_path, "--run_dir", str(trained), "--episodes", "2", name="again"))
    assert again["source"] == "checkpoints/train/2" and again["eval_reward"] == own["eval_reward"]


def refused(tmp_path: Path, capsys, *args: str) -> str:
    out = tmp_path / "refused"
    code = run.main(["evaluate", *args, "--run-dir", str(out)])
    error = capsys.readouterr().err.strip()
    assert code == run.EXIT_BAD_INPUT
    assert not out.exists()  # refused before the runner wrote anything
    assert len(error.splitlines()) == 1 and error.startswith("error: "), error
    return error


def test_bad_input_is_one_error_line_and_nothing_written(trained, tmp_path, capsys):
    assert "no such directory" in refused(tmp_path, capsys, "--run_dir", str(tmp_path / "absent"))
    assert "no config.json" in refused(tmp_path, capsys, "--run_dir", str(tmp_path))

    llm = tmp_path / "sft_run"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"experiment": "sft", "config": {}}))
    assert "a run of 'sft'" in refused(tmp_path, capsys, "--run_dir", str(llm))

    empty = tmp_path / "no_checkpoint"
    empty.mkdir()
    shutil.copy(trained["bc_safe"] / "config.json", empty / "config.json")
    assert "no exported policy" in refused(tmp_path, capsys, "--run_dir", str(empty))

    error = refused(tmp_path, capsys, "--run_dir", str(trained["bc_safe"]), "--task", "CarCircle")
    assert "CarCircle has observation/action sizes (8, 2)" in error and "BallCircle with sizes (5, 2)" in error

    no_evaluations = tmp_path / "no_evaluations"
    shutil.copytree(trained["bc_safe"], no_evaluations)
    (no_evaluations / "metrics.jsonl").write_text("")
    assert "best needs evaluations during training" in refused(
        tmp_path, capsys, "--run_dir", str(no_evaluations), "--checkpoint", "best")
