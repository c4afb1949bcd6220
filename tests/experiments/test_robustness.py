"""Runs that survive anything and fail cleanly: refusals leave nothing behind, Ctrl-C at any moment says
truly what was kept, every stage's checkpoints resume, one writer per run directory, one line per error."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from constrained_rl import checkpoint, interrupts
from constrained_rl.config import Experiment
from experiments import registry, run, rundir
from experiments.context import saved_checkpoints
from tests.experiments.test_run import ROOT, SMALL, summary_without_time

BANDIT = ["constrained_bandit", *SMALL]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The small bandit run, never interrupted: what every resumed run must end with."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert run.main([*BANDIT, "--run-dir", str(run_dir)]) == 0
    return run_dir


@pytest.fixture(scope="module")
def interrupted_template(tmp_path_factory) -> Path:
    """Stopped after 17 of 20 chunks: "average" finished, "rectified" checkpointed at chunk 5."""
    run_dir = tmp_path_factory.mktemp("template") / "run"
    assert run.main([*BANDIT, "--run-dir", str(run_dir), "--stop-after-chunks", "17"]) == run.EXIT_INTERRUPTED
    return run_dir


@pytest.fixture
def interrupted(interrupted_template, tmp_path) -> Path:
    copy = tmp_path / "interrupted"
    shutil.copytree(interrupted_template, copy)
    return copy


# Refusals leave the file system as they found it --------------------------------------------------


def malformed_hdf5(path: Path) -> str:
    with h5py.File(path, "w") as file:  # an HDF5 file, but not a DSRL dataset
        file["observations"] = np.zeros((4, 8), np.float32)
    return str(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from tests.algorithms.control.test_offline import random_ballcircle_file

    return random_ballcircle_file(tmp_path_factory.mktemp("data") / "data.hdf5")


BC_ALL = ["bc_all", "--cost_limits", "10", "--num_seeds", "1", "--batch_size", "16", "--num_updates", "20",
          "--updates_per_chunk", "10", "--eval_every", "0", "--eval_episodes", "1", "--hidden_sizes", "8"]


def test_a_refused_run_leaves_no_run_directory_and_the_corrected_command_works(tmp_path, monkeypatch, capsys,
                                                                               dataset):
    monkeypatch.chdir(tmp_path)
    bad = malformed_hdf5(tmp_path / "bad.hdf5")
    (tmp_path / "garbage.hdf5").write_text("not HDF5 at all")
    run_dir = tmp_path / "deep" / "run"
    for data, message in [(bad, "dataset 'next_observations' is missing"), ("garbage.hdf5", "not an HDF5 file"),
                          ("absent.hdf5", "no such file")]:
        assert run.main([*BC_ALL, "--dataset", data, "--run-dir", str(run_dir)]) == 2
        assert message in one_error_line(capsys)
        assert not (tmp_path / "deep").exists()  # the parent it created went too
    assert run.main([*BC_ALL, "--dataset", bad]) == 2  # default runs/NAME-<time>: no runs/ left behind
    capsys.readouterr()
    assert sorted(os.listdir(tmp_path)) == ["bad.hdf5", "garbage.hdf5"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run.main([*BC_ALL, "--dataset", bad, "--run-dir", str(empty)]) == 2
    capsys.readouterr()
    assert empty.is_dir() and not os.listdir(empty)  # an empty directory stays, empty
    # The corrected command, with the same run directory, runs.
    assert run.main([*BC_ALL, "--dataset", dataset, "--run-dir", str(run_dir)]) == 0
    assert (run_dir / "summary.json").is_file()


def test_a_diverging_run_stops_with_the_step_and_the_metric(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run.main([*BANDIT, "--learning_rate", "1e38", "--run-dir", str(run_dir)]) == 2
    error = one_error_line(capsys)
    assert re.search(r"stage 'average', step 1: metric '\w+' is (nan|inf|-inf)", error), error
    assert not run_dir.exists()  # no checkpoint before it diverged: nothing kept


@pytest.mark.parametrize("args, message", [
    (["--seed", "99999999999999999999"], "--seed: 99999999999999999999 does not fit in a 64-bit integer"),
    (["--seed", "4294967296"], "--seed: a seed must be in [0, 4294967295]"),
    (["--num_steps", "1e30"], "--num_steps: 1e30 does not fit in a 64-bit integer"),
    (["--cost_limit", "1e39"], "--cost_limit: '1e39' is too large for float32"),
    (["--cost_limit", "1e-60"], "--cost_limit: '1e-60' is too small for float32"),
    (["--cost_limit", "nan"], "--cost_limit: expected a number, got 'nan'"),
    (["--learning_rate", "inf"], "--learning_rate: a learning rate must be finite"),
    (["--learning_rate", "1e300"], "--learning_rate: '1e300' is too large for float32"),
])
def test_numbers_are_checked_in_the_precision_they_are_used_in(args, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run.main([*BANDIT, *args, "--run-dir", str(run_dir)]) == 2
    assert message in one_error_line(capsys)
    assert not run_dir.exists()


def test_float_lists_are_checked_too(tmp_path, capsys):
    assert run.main([*BC_ALL, "--cost_limits", "10,1e39", "--run-dir", str(tmp_path / "run")]) == 2
    assert "--cost_limits[1]: '1e39' is too large for float32" in one_error_line(capsys)


def test_run_directories_that_cannot_be_one_are_refused(tmp_path, capsys, interrupted):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for run_dir, message in [(afile, "is a file, not a directory"), (afile / "below", "cannot be created"),
                             (tmp_path, "not empty and holds no run")]:
        assert run.main([*BANDIT, "--run-dir", str(run_dir)]) == 2
        assert f"--run-dir {run_dir}: {message}" in one_error_line(capsys)
    # Checkpoints without their config.json are not this run's: never mixed into.
    (interrupted / "config.json").unlink()
    assert run.main([*BANDIT, "--run-dir", str(interrupted)]) == 2
    assert "not empty and holds no run" in one_error_line(capsys)


# Resume: every stage's checkpoints, no duplicated rows, the config it began with -----------------------


@dataclasses.dataclass(frozen=True)
class StagesConfig:
    num_chunks: int = 4  # chunks per stage
    checkpoint_every: int = 2  # chunks between checkpoints


@jax.jit
def _stage_chunk(state):
    key, noise = jax.random.split(state["key"])
    return {"count": state["count"] + 1, "key": key}, {"x": state["count"] + jax.random.uniform(noise)}


def _stage_init():
    return {"count": jnp.zeros(()), "key": jax.random.PRNGKey(0)}


def _run_stages(config, ctx):
    """Two stages, each a child run (as the RLHF pipeline's SFT and the tour's halves are)."""
    summary = {}
    for name in ("first", "second"):
        state = ctx.child(name).loop("train", _stage_init, _stage_chunk, config.num_chunks,
                                     checkpoint_every=config.checkpoint_every)
        summary[name] = float(state["count"])
    return summary


STAGES = Experiment(StagesConfig, _run_stages)


@pytest.fixture
def stages(monkeypatch):
    monkeypatch.setitem(registry.EXPERIMENTS, "child_stages", (f"{__name__}:STAGES", "two child runs"))
    return "child_stages"


def child_rows(run_dir: Path) -> dict[str, str]:
    return {name: (run_dir / name / "metrics.jsonl").read_text() for name in ("first", "second")}


@pytest.mark.parametrize("stop_after, checkpoint_every, message", [
    (3, 2, "first/train at chunk 2"),  # the first child run is checkpointed, then stopped mid-way
    (5, 4, "first/train at chunk 4"),  # the second child run logged a row before any checkpoint
])
def test_a_run_stopped_in_a_child_stage_resumes_to_the_same_result(stop_after, checkpoint_every, message,
                                                                   stages, tmp_path, capsys):
    settings = [stages, "--checkpoint_every", str(checkpoint_every)]
    reference = tmp_path / "reference"
    assert run.main([*settings, "--run-dir", str(reference)]) == 0
    run_dir = tmp_path / "run"
    assert run.main([*settings, "--run-dir", str(run_dir), "--stop-after-chunks", str(stop_after)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"keeps its checkpoints ({message})" in err and "--resume" in err, err
    assert not (run_dir / "checkpoints").exists()  # only the child runs checkpoint
    assert run.main(["--resume", str(run_dir)]) == 0
    assert summary_without_time(run_dir) == summary_without_time(reference)
    assert child_rows(run_dir) == child_rows(reference)  # rows after the last checkpoint logged once
    for name in ("first", "second"):
        assert len(os.listdir(run_dir / name / "tensorboard" / "train")) <= 2  # a resumed stage purges its old file
    assert len(os.listdir(run_dir / "second" / "tensorboard" / "train")) == 1  # one that had no checkpoint: its own


def test_resume_drops_a_cut_last_metrics_line(interrupted, uninterrupted):
    with (interrupted / "metrics.jsonl").open("a") as file:
        file.write('{"stage": "rectified", "step": 1')  # what a kill in the middle of a write leaves
    assert run.main(["--resume", str(interrupted)]) == 0
    assert (interrupted / "metrics.jsonl").read_text() == (uninterrupted / "metrics.jsonl").read_text()
    assert summary_without_time(interrupted) == summary_without_time(uninterrupted)


@pytest.mark.parametrize("record", [
    {"experiment": "constrained_bandit", "config_change": {"learning_rate": 0.5}},  # an edited value
    {"experiment": "ppo", "config": {}},  # another experiment's config beside these checkpoints
])
def test_resume_refuses_a_config_that_is_not_the_one_the_run_began_with(record, interrupted, capsys):
    config_path = interrupted / "config.json"
    if "config_change" in record:
        written = json.loads(config_path.read_text())
        written["config"].update(record["config_change"])
        record = written
    config_path.write_text(json.dumps(record, indent=2) + "\n")
    assert run.main(["--resume", str(interrupted)]) == 2
    assert "config.json was changed after the run began" in one_error_line(capsys)


def test_a_corrupt_checkpoint_is_one_error_line(interrupted):
    for data in (interrupted / "checkpoints" / "average" / "10" / "default").rglob("d/*"):
        data.write_bytes(b"garbage")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "experiments.run", "--resume", str(interrupted)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {interrupted / 'checkpoints' / 'average' / '10'}: cannot restore checkpoint")


# One writer per run directory --------------------------------------------------------------------------


def test_a_run_directory_in_use_is_refused(interrupted, tmp_path, capsys):
    lock_path = interrupted / rundir.LOCK_FILE
    with lock_path.open("w") as held:  # this process plays the run that holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"{os.getpid()}\n")
        held.flush()
        in_use = f"error: {interrupted} is in use by another run (pid {os.getpid()})"
        assert run.main(["--resume", str(interrupted)]) == 2
        assert one_error_line(capsys) == in_use
        assert run.main([*BANDIT, "--run-dir", str(interrupted)]) == 2
        assert one_error_line(capsys) == in_use
    assert run.main(["--resume", str(interrupted)]) == 0  # let go: it resumes


# Ctrl-C, for real ---------------------------------------------------------------------------------------


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def interrupt_when(process: subprocess.Popen, ready, times: int = 1) -> str:
    """Sends SIGINT (``times`` of them, 10 ms apart) once ``ready()`` holds; returns stderr."""
    deadline = time.monotonic() + 240
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    for i in range(times):
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            time.sleep(0.01)
    return process.communicate(timeout=240)[1]


def kept_in(message: str) -> dict[str, int] | None:
    match = re.search(r"keeps its checkpoints \(([^)]*)\)", message)
    if match is None:
        return None
    return {stage: int(step) for stage, step in re.findall(r"([\w/]+) at chunk (\d+)", match.group(1))}


def tmp_or_done(stage_dir: Path):
    return lambda: stage_dir.is_dir() and any("tmp" in p or p == "5" for p in os.listdir(stage_dir))


@pytest.mark.parametrize("moment", ["imports", "training", "checkpoint"])
def test_ctrl_c_at_any_moment_says_what_was_kept_and_the_run_resumes(moment, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    process = start([*BANDIT, "--run-dir", str(run_dir)], tmp_path)
    started = time.monotonic()
    ready = {
        "imports": lambda: time.monotonic() - started > 0.5,  # the runner is importing JAX
        "training": lambda: (run_dir / "checkpoints" / "average" / "5").is_dir(),
        "checkpoint": tmp_or_done(run_dir / "checkpoints" / "rectified"),  # orbax's temporary folder
    }[moment]
    err = interrupt_when(process, ready)
    assert process.returncode == 130 and "Traceback" not in err and err.count("\n") == 1, err
    kept = kept_in(err)
    if kept is None:  # nothing was kept, and the message says so
        assert "nothing written" in err or "nothing kept" in err, err
        assert not run_dir.exists()
        assert run.main([*BANDIT, "--run-dir", str(run_dir)]) == 0  # the same command starts afresh
    else:
        assert kept == saved_checkpoints(run_dir), err
        assert not list(run_dir.rglob("*orbax-checkpoint-tmp*"))  # the write in progress was finished
        assert run.main(["--resume", str(run_dir)]) == 0
    assert summary_without_time(run_dir) == summary_without_time(uninterrupted)


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    process = start([*BANDIT, "--run-dir", str(run_dir)], tmp_path)
    err = interrupt_when(process, lambda: (run_dir / "checkpoints" / "average" / "5").is_dir(), times=2)
    # 130 from the runner; killed by the signal itself when it came while the interpreter was shutting down
    assert process.returncode in (130, -signal.SIGINT) and "Traceback" not in err, err
    assert len(err.splitlines()) <= 2, err
    if saved_checkpoints(run_dir):
        assert run.main(["--resume", str(run_dir)]) == 0
        assert summary_without_time(run_dir) == summary_without_time(uninterrupted)


def test_a_ctrl_c_during_a_checkpoint_write_waits_for_the_write(tmp_path, monkeypatch):
    real_save = checkpoint.ocp.args.StandardSave

    def save_interrupted(tree):
        os.kill(os.getpid(), signal.SIGINT)  # delivered in the middle of checkpoint.save
        return real_save(tree)

    monkeypatch.setattr(checkpoint.ocp.args, "StandardSave", save_interrupted)
    previous = interrupts.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save(tmp_path, 3, {"a": jnp.ones(2)})
        assert interrupts.requested()
    finally:
        interrupts.uninstall(previous)
    assert signal.getsignal(signal.SIGINT) is previous and not interrupts.requested()  # given back as it was
    assert checkpoint.all_steps(tmp_path) == [3]  # committed before the interrupt was raised
    np.testing.assert_array_equal(checkpoint.restore(tmp_path, {"a": jnp.zeros(2)})["a"], np.ones(2))
