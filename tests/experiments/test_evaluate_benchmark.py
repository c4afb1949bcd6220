"""evaluate --method: one method of an offline_benchmark run re-scored as a run of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import run
from tests.algorithms.control.test_offline import random_ballcircle_file

METHODS = ("bc_safe", "satac")


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("benchmark")
    data = random_ballcircle_file(root / "data.hdf5")
    out = root / "run"
    assert run.main(["offline_benchmark", "--dataset", data, "--preset", "quick", "--methods", ",".join(METHODS),
                     "--cost_limits", "10,40", "--num_seeds", "2", "--eval_episodes", "3", "--eval_every", "0",
                     "--run-dir", str(out)]) == 0
    return out


@pytest.mark.parametrize("method", METHODS)
def test_a_method_s_final_policies_reproduce_its_benchmark_scores(benchmark, method, tmp_path):
    out = tmp_path / "evaluation"
    assert run.main(["evaluate", "--run_dir", str(benchmark), "--method", method, "--episodes", "3",
                     "--run-dir", str(out)]) == 0
    scored, own = read(out / "summary.json"), read(benchmark / "methods" / f"{method}.json")
    assert scored["method"] == method and scored["source"].startswith(f"checkpoints/{method}_")
    for key in ("cost_limits", "num_seeds", "gradient_updates", "normalized_reward", "normalized_cost", "safe"):
        assert scored[key] == own[key], key


@pytest.mark.parametrize("args, message", [
    ((), "method: required with an offline_benchmark run: one of the methods of"),
    (("--method", "cpq"), "method: 'cpq' is not among the methods of"),
])
def test_a_benchmark_run_needs_one_of_its_methods(benchmark, tmp_path, capsys, args, message):
    out = tmp_path / "evaluation"
    assert run.main(["evaluate", "--run_dir", str(benchmark), *args, "--run-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()
