"""Multi-device and multi-process behaviour, each check in its own process on faked CPU devices.

* 8 devices vs 1: PPO-Lagrangian (runs x environments split), SATAC (minibatch split),
  a RePO step (fully sharded + tensor parallel), the RLHF pipeline's SFT and RL stages (every model
  fully sharded over the runner's "data" axis), and constrained_rl.parallel's own patterns;
* a checkpoint of arrays sharded over 8 devices restores on this process's single device;
* ``python -m experiments.run --distributed``: two processes of two devices each reach the
  single-process result, and only process 0 writes the run directory's logs and summary.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from constrained_rl import checkpoint
from tests.multidevice.harness import ROOT, TINY_LLAMA, device_env, ok_lines, run_check

# The multiplier and losses agree to float reassociation; states are compared leaf by leaf in the scripts.
MAX_DIFFERENCE = 2e-4


def test_parallel_patterns_and_a_sharded_checkpoint_restored_on_one_device(tmp_path):
    directory = tmp_path / "sharded"
    result = run_check("tests.multidevice.check_parallel", str(directory))
    checks = ok_lines(result)
    assert set(checks) == {"placement", "shard_map_lagrangian_step", "global_weighted_mean",
                           "unsynced_multiplier_refused", "fsdp_tp_forward", "checkpoint_roundtrip_8_devices"}
    assert max(checks.values()) < MAX_DIFFERENCE

    # Restore here, on one device, into a template that only knows shapes.
    from constrained_rl.models import llama

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    on_device = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)  # noqa: E731
    model = llama.LlamaForCausalLM(llama.LlamaConfig(**TINY_LLAMA))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 1), np.int32))
    template = {"params": jax.tree.map(on_device, params),
                "batch": on_device(jax.ShapeDtypeStruct((16, 3), np.float32)),
                "step": on_device(jax.ShapeDtypeStruct((), np.int32))}
    assert len(jax.devices()) == 1
    restored = checkpoint.restore(directory, template, 3)
    expected = np.load(directory / "expected.npz")
    leaves = jax.tree_util.tree_leaves_with_path(restored)
    assert {jax.tree_util.keystr(path) for path, _ in leaves} == set(expected.files)
    for path, leaf in leaves:
        assert leaf.sharding == device
        np.testing.assert_array_equal(np.asarray(leaf), expected[jax.tree_util.keystr(path)])


@pytest.mark.parametrize("check, names", [
    ("check_ppo_lag", {"ppo_lag_params", "ppo_lag_multiplier", "ppo_lag_env_state", "ppo_lag_metrics"}),
    ("check_satac", {"satac_state", "satac_metrics"}),
    ("check_repo", {"repo_state", "repo_metrics"}),
    ("check_rlhf_pipeline", {"sft_params", "sft_summary", "sft_metrics", "rl_state", "rl_metrics"}),
])
def test_trainer_on_8_devices_matches_1(check, names):
    checks = ok_lines(run_check(f"tests.multidevice.{check}", timeout=300))
    assert set(checks) == names
    assert max(checks.values()) < MAX_DIFFERENCE


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SMALL_BANDIT = ["constrained_bandit", "--num_contexts", "8", "--num_steps", "60", "--steps_per_chunk", "20",
                "--checkpoint_every", "2", "--gradient", "sampled"]


def _summary(run_dir) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("wall_time_s")
    return summary


def test_distributed_run_of_two_processes_matches_one_process(tmp_path):
    coordinator = f"127.0.0.1:{_free_port()}"
    run_dir = tmp_path / "distributed"
    command = [sys.executable, "-m", "experiments.run", *SMALL_BANDIT, "--run-dir", str(run_dir), "--distributed",
               "--coordinator-address", coordinator, "--num-processes", "2", "--process-id"]
    env = device_env(2)
    processes = [subprocess.Popen([*command, str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    # Process 0 reports; process 1 prints nothing of the run.
    assert "run directory" in outputs[0][0] and "run directory" not in outputs[1][0]

    single = tmp_path / "single"
    result = subprocess.run([sys.executable, "-m", "experiments.run", *SMALL_BANDIT, "--run-dir", str(single)],
                            cwd=ROOT, env=device_env(1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _summary(run_dir) == _summary(single)
    # Every row written once, by process 0 alone, exactly as the single-process run wrote them.
    assert (run_dir / "metrics.jsonl").read_text() == (single / "metrics.jsonl").read_text()
    assert checkpoint.all_steps(run_dir / "checkpoints" / "rectified") == [2, 3]
