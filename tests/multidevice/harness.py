"""Runs multi-device checks in their own processes on faked CPU devices.

XLA reads ``--xla_force_host_platform_device_count`` once, when JAX starts its CPU backend, so a check
that needs 8 devices cannot share the test process (which has one). Each check is a script
(``python -m tests.multidevice.check_X``) that calls :func:`fake_devices` before importing JAX, prints
one ``OK <what> <max difference>`` line per comparison, and exits non-zero on the first mismatch.
This module imports no JAX at module level, so the pytest process stays single-device.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
NUM_DEVICES = 8
# A Llama small enough to compile in a second, wide enough to split 4 x 2 ("fsdp", "tp").
TINY_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32)


def device_env(num_devices: int = NUM_DEVICES) -> dict[str, str]:
    """The environment of a subprocess that sees ``num_devices`` CPU devices (and imports the project)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if "host_platform_device_count" not in f and "backend_optimization_level" not in f]
    # The checks run a few steps of tiny models: compiling dominates, and LLVM's optimisation passes are
    # most of it. Unoptimised machine code computes the same floats (no fast math either way), so the
    # 8-device and 1-device programs are compared as before, in about half the compile time.
    flags += [f"--xla_force_host_platform_device_count={num_devices}", "--xla_backend_optimization_level=0"]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "XLA_FLAGS": " ".join(flags), "PYTHONPATH": path, "JAX_PLATFORMS": "cpu"}


def fake_devices(num_devices: int = NUM_DEVICES) -> None:
    """Called by a check script before it imports JAX."""
    if "jax" in sys.modules:
        raise RuntimeError("fake_devices must run before jax is imported")
    os.environ.update(device_env(num_devices))


def run_check(module: str, *args: str, num_devices: int = NUM_DEVICES, timeout: float = 120
              ) -> subprocess.CompletedProcess:
    """Runs ``python -m module args`` on ``num_devices`` faked devices; fails with its output if it fails."""
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=device_env(num_devices),
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{module} exited with {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}")
    return result


def ok_lines(result: subprocess.CompletedProcess) -> dict[str, float]:
    """``{what: max difference}`` from a check's ``OK`` lines."""
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("OK ")]
    return {parts[1]: float(parts[2]) for parts in lines}


def assert_trees_close(name: str, actual: Any, expected: Any, *, rtol: float, atol: float) -> float:
    """Asserts two pytrees agree leaf by leaf (same structure); prints and returns the max abs difference."""
    import jax
    import numpy as np

    actual, expected = jax.device_get((actual, expected))
    structure_a, structure_e = jax.tree.structure(actual), jax.tree.structure(expected)
    if structure_a != structure_e:
        raise AssertionError(f"{name}: structures differ: {structure_a} vs {structure_e}")
    worst = 0.0
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        if not np.issubdtype(a.dtype, np.number):
            np.testing.assert_array_equal(a, e, err_msg=f"{name}{jax.tree_util.keystr(path)}")
            continue
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"{name}{jax.tree_util.keystr(path)}")
        if a.size:
            worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64)))))
    print(f"OK {name} {worst:.3e}", flush=True)
    return worst


def assert_placed_on(name: str, tree: Any, num_devices: int) -> None:
    """Asserts every array leaf of ``tree`` spans ``num_devices`` devices (it was really distributed)."""
    import jax

    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) != num_devices:
            raise AssertionError(f"{name}{jax.tree_util.keystr(path)} lives on "
                                 f"{len(leaf.sharding.device_set)} devices, expected {num_devices}")
