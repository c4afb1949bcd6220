"""PPO-Lagrangian throughput on 1, 2, 4, 8 devices, and seeds vmapped against one seed at a time.

Device scaling: one run's environments are split over a ``"data"`` mesh of the first N devices
(``parallel.shard_dims`` on the environment axis; parameters replicated); the unchanged jitted chunk
(rollout, GAE, multiplier, minibatch updates) is partitioned by XLA. Reported: environment steps per
second after compilation, and the ratio to one device.

Seeds: ``num_seeds`` runs vmapped in one jitted chunk, against the same runs one after another (one seed
per call), and against the vmapped runs split over the devices (``parallel.shard_runs``).

Without accelerators the devices are faked on the CPU (``--xla_force_host_platform_device_count``):
they share the same cores, so the figures check correctness and partitioning overhead, not speedup.
On a machine with N accelerators the same script measures real scaling.

    python -m benchmarks.device_scaling --envs 64 --unroll 32 --seeds 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "jax" not in sys.modules and "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Before JAX starts: 8 CPU devices when no accelerator provides them.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

from algorithms.control.ppo_lag import train as ppo_lag  # noqa: E402
from constrained_rl import parallel  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="BallCircle")
    parser.add_argument("--envs", type=int, default=64, help="environments per run (split over the devices)")
    parser.add_argument("--unroll", type=int, default=32, help="steps per environment per iteration")
    parser.add_argument("--iterations", type=int, default=2, help="iterations per jitted chunk")
    parser.add_argument("--seeds", type=int, default=8, help="runs in the seed comparison")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median reported)")
    return parser.parse_args()


def make_config(args: argparse.Namespace, num_seeds: int) -> ppo_lag.Config:
    return ppo_lag.Config(task=args.task, num_seeds=num_seeds, num_envs=args.envs, unroll_length=args.unroll,
                          num_epochs=2, num_minibatches=4, actor_hidden_sizes=(args.hidden, args.hidden),
                          critic_hidden_sizes=(args.hidden, args.hidden),
                          total_env_steps=args.envs * args.unroll * args.iterations)


def median_seconds(fn, state, repeats: int) -> float:
    """Median wall time of ``fn(state)`` after one compiling call; outputs are waited for."""
    jax.block_until_ready(fn(state))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(state))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_scaling(args: argparse.Namespace) -> None:
    learner = ppo_lag.make_learner(make_config(args, 1))
    chunk = ppo_lag.make_chunk(learner, args.iterations)
    state = ppo_lag.init_runs(learner)
    steps = args.envs * args.unroll * args.iterations
    print(f"PPO-Lag, 1 run, {args.envs} environments split over N devices, {steps} env steps per call")
    print(f"{'devices':>8} {'env steps/s':>12} {'vs 1 device':>12}")
    baseline = None
    for count in (1, 2, 4, 8):
        if count > len(jax.devices()) or args.envs % count:
            continue
        mesh = parallel.make_mesh(devices=jax.devices()[:count])
        placed = parallel.replicate(state, mesh).replace(
            env_state=parallel.shard_dims(state.env_state, mesh, {1: parallel.DATA_AXIS}))
        rate = steps / median_seconds(chunk, placed, args.repeats)
        baseline = baseline or rate
        print(f"{count:>8} {rate:>12.0f} {rate / baseline:>11.2f}x")


def seeds_vmapped(args: argparse.Namespace) -> None:
    single = ppo_lag.make_learner(make_config(args, 1))
    batched = ppo_lag.make_learner(make_config(args, args.seeds))
    single_chunk = ppo_lag.make_chunk(single, args.iterations)
    batched_chunk = ppo_lag.make_chunk(batched, args.iterations)
    batched_state = ppo_lag.init_runs(batched)
    one_seed = jax.tree.map(lambda x: x[:1], batched_state)
    steps = args.seeds * args.envs * args.unroll * args.iterations

    def one_at_a_time(state):
        return [single_chunk(state) for _ in range(args.seeds)]

    print(f"\nPPO-Lag, {args.seeds} seeds x {args.envs} environments, {steps} env steps per measurement")
    sequential = steps / median_seconds(one_at_a_time, one_seed, args.repeats)
    vmapped = steps / median_seconds(batched_chunk, batched_state, args.repeats)
    print(f"{'one seed per call':>28} {sequential:>12.0f} env steps/s")
    print(f"{'seeds vmapped, one call':>28} {vmapped:>12.0f} env steps/s  ({vmapped / sequential:.2f}x)")
    count = len(jax.devices())
    if args.seeds % count == 0:
        sharded_state = parallel.shard_runs(batched_state, parallel.make_mesh())
        sharded = steps / median_seconds(batched_chunk, sharded_state, args.repeats)
        print(f"{f'vmapped, split over {count} dev':>28} {sharded:>12.0f} env steps/s  ({sharded / sequential:.2f}x)")


def main() -> None:
    args = parse_args()
    devices = jax.devices()
    print(f"{len(devices)} {devices[0].platform} devices; {os.cpu_count()} CPU cores")
    if devices[0].platform == "cpu":
        print("note: faked CPU devices share the same cores: this measures correctness and partitioning "
              "overhead, not speedup")
    device_scaling(args)
    seeds_vmapped(args)


if __name__ == "__main__":
    main()
