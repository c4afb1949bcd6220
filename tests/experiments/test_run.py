"""The runner's command-line contract: default run, listing, typed overrides, errors, resume."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import pytest

from constrained_rl.config import ConfigError, require
from experiments import cli, registry, run

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--num_contexts", "8", "--num_steps", "200", "--steps_per_chunk", "20",
         "--checkpoint_every", "5"]
RUN_DIR_FILES = ["config.json", "metrics.jsonl", "summary.json", "tensorboard", "checkpoints",
                 "plots"]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def summary_without_time(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("wall_time_s")
    return summary


def test_bandit_run_writes_the_whole_run_directory(tmp_path):
    result = run_cli(["constrained_bandit"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("constrained_bandit-")
    for name in RUN_DIR_FILES:
        assert (run_dir / name).exists(), name
    summary = summary_without_time(run_dir)
    assert summary["rectified/violating_fraction"] < summary["average/violating_fraction"]
    assert list((run_dir / "tensorboard" / "average").iterdir())
    assert {"cost.png", "violating_fraction.png"} <= {p.name for p in (run_dir / "plots").iterdir()}
    assert set(os.listdir(run_dir / "checkpoints")) == {"average", "rectified"}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {row["stage"] for row in rows} == {"average", "rectified"}
    assert rows[-1]["step"] == 3000


def test_list_prints_one_line_per_experiment(tmp_path):
    result = run_cli(["--list"], cwd=tmp_path)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert len(lines) == len(registry.EXPERIMENTS)
    (default,) = [line for line in lines if line.endswith("(default)")]
    assert default.startswith(f"{registry.DEFAULT_EXPERIMENT} ")


def test_bad_input_in_a_real_process_is_one_line_without_traceback(tmp_path):
    result = run_cli(["constrained_bandit", "--cost_limt", "0.1"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: --cost_limt: unknown key 'cost_limt'; did you mean 'cost_limit'?"
    ]


@dataclasses.dataclass(frozen=True)
class Inner:
    learning_rate: float = 1e-3  # step size
    hidden: tuple[int, ...] = (4, 4)  # layer widths

    def __post_init__(self) -> None:
        require(self.learning_rate > 0, "learning_rate", "must be > 0")


@dataclasses.dataclass(frozen=True)
class Outer:
    steps: int = 10  # how many
    flag: bool = False  # a switch
    name: str = "x"  # a label
    mode: Literal["a", "b"] = "a"  # a choice
    limit: Optional[float] = None  # maybe a number
    pair: tuple[int, str] = (1, "q")  # fixed-length tuple
    actor: Inner = dataclasses.field(default_factory=lambda: Inner(learning_rate=0.5))  # nested


def text(key: str, value: str | None) -> cli.Override:
    return cli.Override(key, value, f"--{key}", from_text=True)


def test_overrides_are_typed():
    config = cli.build_config(Outer, [
        text("steps", "1e3"), text("flag", None), text("name", "7"), text("mode", "b"),
        text("limit", "0.25"), text("pair", "3,z"), text("actor.hidden", "8,16,32"),
    ])
    assert config == Outer(steps=1000, flag=True, name="7", mode="b", limit=0.25, pair=(3, "z"),
                           actor=Inner(learning_rate=0.5, hidden=(8, 16, 32)))
    assert cli.build_config(Outer, [text("limit", "none")]).limit is None
    # File values arrive typed: lists become tuples, nested tables become dotted keys.
    from_file = cli.build_config(Outer, cli.flatten({"actor": {"hidden": [2]}, "flag": True}, "f"))
    assert from_file.actor == Inner(learning_rate=0.5, hidden=(2,)) and from_file.flag is True
    assert cli.build_config(Outer, cli.flatten(cli.config_to_dict(config), "f")) == config


@pytest.mark.parametrize("override, message", [
    (text("steps", "2.5"), "--steps: expected an int, got '2.5'"),
    (text("flag", "maybe"), "--flag: expected a bool"),
    (text("mode", "c"), "--mode: expected one of 'a', 'b'"),
    (text("pair", "1,2,3"), "--pair: expected a list of 2 items"),
    (text("actor.learning_rate", "-1"), "actor.learning_rate: must be > 0"),
    (text("actor.learnig_rate", "1"), "did you mean 'actor.learning_rate'"),
    (cli.Override("steps", "3", "f.json: steps", from_text=False), "f.json: steps: expected an int"),
])
def test_ill_typed_and_refused_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        cli.build_config(Outer, [override])


@pytest.mark.parametrize("args, message", [
    (["no_such_experiment"], "experiment 'no_such_experiment': unknown"),
    (["constrained_bandit", "--cost_limit", "-1"], "cost_limit: must be >= 0"),
    (["constrained_bandit", "--num_contexts", "many"], "--num_contexts: expected an int"),
    (["constrained_bandit", "--config", "missing.toml"], "missing.toml: no such file"),
    (["constrained_bandit", "--config", "broken.json"], "broken.json: cannot parse"),
    (["--resume", "empty_run"], "--resume empty_run: no checkpoint to resume from"),
    (["--resume", "not_a_run"], "--resume not_a_run: no config.json"),
    (["constrained_bandit", "stray"], "argument 'stray': unexpected"),
])
def test_bad_input_exits_2_with_one_line(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.json").write_text(
        json.dumps({"experiment": "constrained_bandit", "config": {}}))
    assert run.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_config_file_is_read_and_the_command_line_wins(tmp_path, capsys):
    config_file = tmp_path / "bandit.toml"
    config_file.write_text('num_contexts = 4\ncost_limit = 0.2\ngradient = "sampled"\n')
    run_dir = tmp_path / "run"
    assert run.main(["constrained_bandit", "--config", str(config_file), *SMALL,
                     "--num_steps", "40", "--cost_limit", "0.15", "--run-dir", str(run_dir)]) == 0
    record = json.loads((run_dir / "config.json").read_text())
    assert record["experiment"] == "constrained_bandit"
    assert record["config"]["cost_limit"] == 0.15  # command line beats the file
    assert record["config"]["gradient"] == "sampled"  # from the file
    assert record["config"]["num_contexts"] == 8  # SMALL comes after the file too
    # The same run directory cannot be reused for a new run.
    assert run.main(["constrained_bandit", "--run-dir", str(run_dir)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    args = ["constrained_bandit", *SMALL, "--gradient", "sampled"]
    # 10 chunks per learner, a checkpoint every 5: stopping after 17 chunks leaves the "average"
    # stage finished and "rectified" checkpointed at chunk 5, with chunks 6-7 to be redone.
    interrupted = tmp_path / "interrupted"
    result = run_cli([*args, "--run-dir", str(interrupted), "--stop-after-chunks", "17"], tmp_path)
    assert result.returncode == 130
    assert len(result.stderr.splitlines()) == 1 and "--resume" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (interrupted / "summary.json").exists()

    assert run.main(["--resume", str(interrupted)]) == 0
    uninterrupted = tmp_path / "uninterrupted"
    assert run.main([*args, "--run-dir", str(uninterrupted)]) == 0
    assert summary_without_time(interrupted) == summary_without_time(uninterrupted)
    # The redone chunk is logged once, as in the uninterrupted run.
    assert ((interrupted / "metrics.jsonl").read_text()
            == (uninterrupted / "metrics.jsonl").read_text())


def test_console_command_is_the_runner(capsys):
    import importlib
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    module_name, _, attribute = project["scripts"]["constrained-rl"].partition(":")
    entry_point = getattr(importlib.import_module(module_name), attribute)
    assert callable(entry_point)
    assert entry_point(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(registry.EXPERIMENTS)
    assert {line.split()[0] for line in lines} == set(registry.EXPERIMENTS)
    assert project["optional-dependencies"]["wandb"] == ["wandb>=0.17"]



@dataclasses.dataclass(frozen=True)
class ReportingConfig:
    seed: int = 0  # PRNG seed


def test_a_summary_report_is_printed_in_place_of_the_figures(tmp_path, monkeypatch, capsys):
    def reporting_run(config, ctx):
        return {"score": 0.5, "report": "Scores\n| a | 0.50 |"}

    experiment = types.SimpleNamespace(name="reporting", config_cls=ReportingConfig, run=reporting_run)
    monkeypatch.setattr(registry, "load", lambda name: experiment)
    assert run.main(["reporting", "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "Scores\n| a | 0.50 |\n" in out
    assert "score:" not in out and "wall_time_s" not in out and "summary.json" in out.splitlines()[-1]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["score"] == 0.5 and "report" not in summary

def test_keep_checkpoints_bounds_a_stage(tmp_path, monkeypatch, capsys):
    def chunked_run(config, ctx):
        ctx.loop("main", lambda: {"x": jnp.zeros(())}, lambda s: ({"x": s["x"] + 1}, {"x": s["x"]}), 3,
                 checkpoint_every=1)
        return {}

    experiment = types.SimpleNamespace(name="chunked", config_cls=ReportingConfig, run=chunked_run)
    monkeypatch.setattr(registry, "load", lambda name: experiment)
    for flags, kept in (([], ["2", "3"]), (["--keep-checkpoints", "1"], ["3"])):
        run_dir = tmp_path / f"run{len(flags)}"
        assert run.main(["chunked", "--run-dir", str(run_dir), *flags]) == 0
        assert sorted(p.name for p in (run_dir / "checkpoints" / "main").iterdir()) == kept
    assert run.main(["chunked", "--run-dir", str(tmp_path / "none"), "--keep-checkpoints", "0"]) == 2
    assert "error: --keep-checkpoints: must be >= 1" in capsys.readouterr().err


def test_run_directory_records_the_environment_and_resume_rewrites_it(tmp_path, monkeypatch):
    from experiments import provenance

    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it would fail: W&B is not touched unless asked
    run_dir = tmp_path / "run"
    args = ["constrained_bandit", *SMALL, "--num_steps", "100", "--run-dir", str(run_dir)]
    assert run.main([*args, "--stop-after-chunks", "7"]) == 130  # "average" done, "rectified" at chunk 2 of 5
    record = json.loads((run_dir / provenance.ENVIRONMENT_FILE).read_text())
    assert set(record["packages"]) == {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "brax",
                                       "numpy", "constrained-rl"}
    assert all(isinstance(v, str) for v in record["packages"].values())
    assert record["python"] == ".".join(map(str, sys.version_info[:3]))
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert record["git"]["commit"] == head.stdout.strip() and isinstance(record["git"]["dirty"], bool)
    config_bytes = (run_dir / "config.json").read_bytes()
    (run_dir / provenance.ENVIRONMENT_FILE).write_text('{"stale": true}\n')
    assert run.main(["--resume", str(run_dir)]) == 0
    assert json.loads((run_dir / provenance.ENVIRONMENT_FILE).read_text())["packages"] == record["packages"]
    assert (run_dir / "config.json").read_bytes() == config_bytes


def test_git_state_is_none_outside_a_checkout_or_without_git(tmp_path, monkeypatch):
    from experiments import provenance

    assert provenance.git_state(tmp_path) is None  # not a git checkout
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable anywhere
    assert provenance.git_state(ROOT) is None
    assert provenance.environment()["git"] is None


def test_wandb_gets_every_logged_row_the_config_and_the_summary(tmp_path, monkeypatch):
    from tests.experiments import fake_wandb

    wandb = fake_wandb.install(monkeypatch)
    run_dir = tmp_path / "run"
    assert run.main(["constrained_bandit", *SMALL, "--num_steps", "40", "--run-dir", str(run_dir),
                     "--wandb.project", "safe-rl", "--wandb.name", "bandit-test"]) == 0
    ((init,),) = fake_wandb.calls_named(wandb, "init")
    record = json.loads((run_dir / "config.json").read_text())
    assert "wandb" not in json.dumps(record)  # runner settings, not the experiment's
    assert init["project"] == "safe-rl" and init["name"] == "bandit-test" and init["entity"] is None
    assert init["mode"] == "offline" and init["config"] == record and init["dir"] == str(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [data for (data,) in fake_wandb.calls_named(wandb, "log")]
    assert logged == [{f"{r['stage']}/step": r["step"],
                       **{f"{r['stage']}/{k}": v for k, v in r.items() if k not in ("stage", "step")}}
                      for r in rows]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert wandb.runs[0].summary == summary
    assert wandb.calls[-1] == ("finish", 0)
    assert (run_dir / "wandb" / "run_id").read_text().strip() == "fake-run-1"


def test_wandb_continues_its_run_on_resume(tmp_path, monkeypatch):
    from tests.experiments import fake_wandb

    wandb = fake_wandb.install(monkeypatch)
    run_dir = tmp_path / "run"
    flags = ["--wandb.project", "p", "--wandb.mode", "disabled"]
    assert run.main(["constrained_bandit", *SMALL, "--num_steps", "100", "--run-dir", str(run_dir), *flags,
                     "--stop-after-chunks", "7"]) == 130
    assert wandb.calls[-1] == ("finish", 130)
    assert run.main(["--resume", str(run_dir), *flags]) == 0
    first, second = (kwargs for (kwargs,) in fake_wandb.calls_named(wandb, "init"))
    assert first["id"] is None and second["id"] == "fake-run-1" and second["resume"] == "allow"
    assert second["mode"] == "disabled"


@pytest.mark.parametrize("flags, message", [
    (["--wandb.project", "p"], "the wandb package is not installed (pip install wandb)"),
    (["--wandb.entity", "me"], "--wandb.entity: need --wandb.project"),
    (["--wandb.project", "p", "--wandb.mode", "sometimes"], "--wandb.mode: expected one of offline, online"),
    (["--wandb.project"], "--wandb.project: needs a value"),
])
def test_wandb_refusals_are_one_line_before_anything_runs(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: importing it raises ImportError
    run_dir = tmp_path / "run"
    assert run.main(["constrained_bandit", "--run-dir", str(run_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not run_dir.exists()


def test_a_real_task_is_refused_across_processes(monkeypatch):
    from algorithms.control import offline_benchmark

    real = cli.build_config(offline_benchmark.Config, [cli.Override("task", "SafetyBallCircle-v0", "--task", True)])
    assert "SafetyBallCircle-v0" in run.config_tasks(real)  # the top level's and each method section's
    run.refuse_real_tasks_across_processes(real)  # one process: fine
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ConfigError, match="--distributed: SafetyBallCircle-v0 is a real task"):
        run.refuse_real_tasks_across_processes(real)
    run.refuse_real_tasks_across_processes(offline_benchmark.Config())  # a JAX task: fine across processes
