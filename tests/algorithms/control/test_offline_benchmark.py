from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from algorithms.control import offline, offline_benchmark as bench
from constrained_rl.config import ConfigError
from constrained_rl.data import dsrl
from experiments import cli, registry
from experiments import run as runner
from tests.algorithms.control.test_offline import random_ballcircle_file

pytestmark = pytest.mark.quick_compile  # four learners through the runner, quick preset: mostly compiling

LIMITS = (10.0, 20.0)
# One learner of each kind: limit-free (BC-All), safe rows (BC-Safe), dataset statistics (COptiDICE), three
# phases (SATAC). BCQ-Lag, BEAR-Lag, CPQ and ATAC build the same way and are left out to keep the test fast.
METHODS = ("bc_all", "bc_safe", "coptidice", "satac")


def mixed_cost_file(path) -> str:
    """Random BallCircle behaviour (4 episodes of 200 steps) with the costs of two episodes zeroed, so
    every limit has safe episodes for BC-Safe and SATAC's reference."""
    data = dsrl.load_dsrl(random_ballcircle_file(path))
    costs = np.asarray(data.costs).copy()
    costs[:400] = 0.0
    dsrl.save_dsrl(path, data.replace(costs=costs))
    return str(path)


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory) -> str:
    return mixed_cost_file(tmp_path_factory.mktemp("data") / "data.hdf5")


@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory, dataset_file):
    """Four methods through the runner, quick preset, 2 seeds x 2 limits, 3 episodes per run."""
    run_dir = tmp_path_factory.mktemp("offline_benchmark") / "run"
    code = runner.main(["offline_benchmark", "--dataset", dataset_file, "--preset", "quick",
                        "--cost_limits", "10,20", "--methods", ",".join(METHODS), "--num_seeds", "2", "--eval_episodes", "3", "--eval_every", "0",
                        "--run-dir", str(run_dir)])
    assert code == 0
    return run_dir


def read_csv(run_dir) -> list[dict[str, str]]:
    with (run_dir / bench.TABLE_CSV).open() as file:
        return list(csv.DictReader(file))


def test_runner_writes_table_plot_and_summary(benchmark_run):
    rows = read_csv(benchmark_run)
    labels = [bench.METHODS[name].label for name in METHODS]
    assert [(r["method"], r["cost_limit"]) for r in rows] == [
        (label, limit) for label in labels for limit in ("10", "20", bench.AVERAGE)]
    for row in rows:
        assert (row["safe"] == "True") == (float(row["normalized_cost"]) <= 1.0)
        assert math.isfinite(float(row["normalized_reward"]))
    assert (benchmark_run / "plots" / f"{bench.PLOT_NAME}.png").stat().st_size > 10_000
    markdown = (benchmark_run / bench.TABLE_MARKDOWN).read_text()
    assert all(f"| {label} |" in markdown for label in labels) and "κ=10 reward" in markdown
    summary = json.loads((benchmark_run / "summary.json").read_text())
    for name in METHODS:
        averaged = [r for r in rows if r["method"] == bench.METHODS[name].label and r["cost_limit"] == bench.AVERAGE]
        assert summary[f"{name}/normalized_reward"] == pytest.approx(float(averaged[0]["normalized_reward"]), abs=1e-4)
        assert summary[f"{name}/normalized_cost"] == pytest.approx(float(averaged[0]["normalized_cost"]), abs=1e-4)
    # Every phase of every method ran as its own stage; SATAC's three are the reference, warm start, training.
    stages = {r["stage"] for r in map(json.loads, (benchmark_run / "metrics.jsonl").read_text().splitlines())}
    assert stages == {"bc_all_train", "bc_safe_train", "coptidice_train", "satac_reference", "satac_warmup",
                      "satac_train"}


def test_table_rows_match_the_methods_scores(benchmark_run):
    rows = read_csv(benchmark_run)
    for name in METHODS:
        scores = json.loads((benchmark_run / bench.RESULTS_DIR / f"{name}.json").read_text())["scores"]
        label = bench.METHODS[name].label
        for limit in LIMITS:
            s = scores[offline.limit_label(limit)]
            row = next(r for r in rows if r["method"] == label and r["cost_limit"] == f"{limit:g}")
            assert float(row["normalized_cost"]) == pytest.approx(s["normalized_cost_mean"], abs=1e-4)
            assert float(row["normalized_reward_std"]) == pytest.approx(s["normalized_reward_std_seeds"], abs=1e-4)
            assert s["num_seeds"] == 2 and s["num_episodes"] == 6
    # BC-All ignores the limit: the same policies under both limits, half the cost at twice kappa.
    scores = json.loads((benchmark_run / bench.RESULTS_DIR / "bc_all.json").read_text())["scores"]
    assert scores["limit_10"]["normalized_cost_mean"] == pytest.approx(2 * scores["limit_20"]["normalized_cost_mean"],
                                                                        rel=1e-5)


def test_resume_reads_finished_methods_back(benchmark_run):
    before = (benchmark_run / bench.TABLE_CSV).read_text()
    (benchmark_run / bench.TABLE_CSV).unlink()
    assert runner.main(["--resume", str(benchmark_run)]) == 0
    assert (benchmark_run / bench.TABLE_CSV).read_text() == before


@pytest.mark.parametrize("method", ["coptidice", "satac"])
def test_evaluate_method_reproduces_the_method_s_scores(benchmark_run, method, tmp_path):
    # evaluate --method: one method of the benchmark re-scored as a run of its own, from its checkpoints.
    out = tmp_path / "evaluation"
    assert runner.main(["evaluate", "--run_dir", str(benchmark_run), "--method", method, "--episodes", "3",
                        "--run-dir", str(out)]) == 0
    scored = json.loads((out / "summary.json").read_text())
    own = json.loads((benchmark_run / bench.RESULTS_DIR / f"{method}.json").read_text())
    assert scored["method"] == method and scored["source"].startswith(f"checkpoints/{method}_")
    for key in ("cost_limits", "num_seeds", "gradient_updates", "normalized_reward", "normalized_cost", "safe"):
        assert scored[key] == own[key], key


@pytest.mark.parametrize("args, message", [
    ((), "method: required with an offline_benchmark run: one of the methods of"),
    (("--method", "cpq"), "method: 'cpq' is not among the methods of"),
])
def test_evaluate_needs_one_of_the_benchmark_s_methods(benchmark_run, tmp_path, capsys, args, message):
    out = tmp_path / "evaluation"
    assert runner.main(["evaluate", "--run_dir", str(benchmark_run), *args, "--run-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


def scores(reward: float, cost: float, std: float = 0.1) -> dict:
    return {"normalized_reward_mean": reward, "normalized_reward_std_seeds": std,
            "normalized_cost_mean": cost, "normalized_cost_std_seeds": std}


def test_table_by_hand(tmp_path):
    results = {
        "bc_all": {"cost_limits": [10.0, 20.0], "scores": {"limit_10": scores(0.9, 2.0), "limit_20": scores(0.9, 1.0)}},
        "satac": {"cost_limits": [10.0, 20.0], "scores": {"limit_10": scores(0.5, 0.8), "limit_20": scores(0.7, 0.6)}},
    }
    rows = bench.table_rows(results)
    assert [(r.method, r.cost_limit, r.safe) for r in rows] == [
        ("BC-All", "10", False), ("BC-All", "20", True), ("BC-All", "average", False),
        ("SATAC", "10", True), ("SATAC", "20", True), ("SATAC", "average", True)]
    assert rows[2].normalized_cost == pytest.approx(1.5) and rows[5].normalized_reward == pytest.approx(0.6)
    assert math.isnan(rows[5].normalized_reward_std)
    markdown = bench.markdown_table(rows)
    bc_line, satac_line = (line for line in markdown.splitlines() if line.startswith(("| BC-All", "| SATAC")))
    # kappa=10: BC-All is unsafe, SATAC is the best safe; kappa=20: a cost of exactly 1 is safe, 0.9 > 0.7.
    assert bc_line.split(" | ")[1:5] == ["0.90 ± 0.10", "2.00 ± 0.10 ✗", "**0.90 ± 0.10**", "1.00 ± 0.10"]
    assert satac_line.split(" | ")[1:3] == ["**0.50 ± 0.10**", "0.80 ± 0.10"]
    assert satac_line.split(" | ")[5:7] == ["**0.60**", "0.70 |"]
    path = tmp_path / "t.csv"
    bench.write_csv(rows, path)
    parsed = list(csv.DictReader(path.open()))
    assert parsed[1]["safe"] == "True" and parsed[1]["normalized_cost"] == "1.0000"


def test_method_configs_take_preset_budget_and_shared_settings():
    config = bench.Config(task="CarCircle", cost_limits=(5.0,), num_seeds=2, num_updates=2000, warmup_updates=1000,
                          satac=bench.SATACConfig(beta=16.0))
    satac = bench.method_config(config, "satac")
    assert (satac.task, satac.cost_limits, satac.num_seeds, satac.beta) == ("CarCircle", (5.0,), 2, 16.0)
    assert (satac.num_updates, satac.warmup_updates, satac.reference_updates) == (2000, 1000, 100_000)
    coptidice = bench.method_config(config, "coptidice")
    assert coptidice.num_updates == 2000 and coptidice.batch_size == 512  # its own batch, the shared budget
    quick = bench.method_config(bench.Config(preset="quick"), "bcq_lag")
    assert (quick.num_updates, quick.vae_hidden_sizes, quick.batch_size) == (4, (16, 16), 32)
    assert bench.method_config(bench.Config(), "bc_safe").data == "safe"


def test_the_cpu_tables_config_file_gives_the_documented_settings():
    # experiments/configs/offline_cpu_tables.toml is the one-flag form of the tables' commands
    # (docs/results/offline_results.md): 64 units wide, 4,000 updates, SATAC's short-budget settings,
    # CDT 64 wide on batches of 256 segments.
    path = str(Path(runner.__file__).parent / "configs" / "offline_cpu_tables.toml")
    overrides = runner._file_overrides(path, "offline_benchmark") + [
        cli.Override("task", "BallRun", "--task", from_text=True),
        cli.Override("satac.safe_fraction", "1", "--satac.safe_fraction", from_text=True)]
    config = cli.build_config(bench.Config, overrides)
    assert (config.num_updates, config.warmup_updates, config.reference_updates, config.eval_every) == (
        4000, 2000, 1000, 0)
    widths = {name: {field: getattr(bench.method_config(config, name), field)
                     for field in ("hidden_sizes", "actor_hidden_sizes", "critic_hidden_sizes", "vae_hidden_sizes")
                     if hasattr(bench.method_config(config, name), field)} for name in bench.METHODS if name != "cdt"}
    for name, fields in widths.items():
        expected = (64, 64, 64) if name in ("atac", "satac") else (64, 64)
        assert fields and set(fields.values()) == {expected}, (name, fields)
    satac = bench.method_config(config, "satac")
    assert (satac.task, satac.warmup_data, satac.critic_warmup, satac.reward_scale, satac.multiplier.init) == (
        "BallRun", "safe", "returns", 0.1, 10.0)
    assert satac.safe_fraction == 1.0  # the command line wins over the file
    assert satac.num_updates == 4000 and bench.method_config(config, "bear_lag").num_updates == 4000
    transformer = bench.method_config(config, "cdt")
    assert (transformer.embedding_dim, transformer.num_layers, transformer.batch_size, transformer.num_updates) == (
        64, 3, 256, 4000)
    assert transformer.learning_rate_warmup == 500  # not the ATAC / SATAC warm start


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="methods: unknown 'sac'"):
        bench.Config(methods=("bc_all", "sac"))
    with pytest.raises(ConfigError, match="methods: must be distinct"):
        bench.Config(methods=("cpq", "cpq"))
    with pytest.raises(ConfigError, match="satac.task: shared by every method"):
        bench.Config(satac=bench.SATACConfig(task="CarCircle"))
    with pytest.raises(ConfigError, match=r"^atac\.warmup_updates: must be a multiple"):
        bench.Config(warmup_updates=1500)
    assert runner.main(["offline_benchmark", "--methods", "bc_all,nope"]) == runner.EXIT_BAD_INPUT


def test_data_without_reference_returns_is_refused_before_training(dataset_file, tmp_path, capsys):
    data = dsrl.load_dsrl(dataset_file)
    bare = str(tmp_path / "bare.hdf5")
    dsrl.save_dsrl(bare, data, dsrl.DatasetMetadata(task="BallCircle", episode_length=200))
    code = runner.main(["offline_benchmark", "--dataset", bare, "--preset", "quick", "--run-dir", str(tmp_path / "run")])
    assert code == runner.EXIT_BAD_INPUT and "no reference returns" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_stage_prefix_and_registry():
    experiment = registry.load("offline_benchmark")
    assert experiment.config_cls is bench.Config and experiment.run is bench.run
    problem = offline.Problem(8, 2, 200)
    algorithm = bench.with_stage_prefix(bench.METHODS["satac"].builder(None, None), "satac")(
        bench.method_config(bench.Config(preset="quick"), "satac"), problem)
    assert [p.name for p in algorithm.phases] == ["satac_reference", "satac_warmup", "satac_hold", "satac_train"]
