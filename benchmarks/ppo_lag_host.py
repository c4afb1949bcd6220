"""PPO-Lagrangian trained on a host task (a real task without a JAX twin): environment steps per second.

Times whole training iterations (the host rollout of ``--runs x --envs`` environments, one jitted policy
call per step, then the jitted update of every run) after one warm-up iteration that compiles, and
separately the rollout and the update, at PPO-Lag's default networks (64-64 tanh):

    python -m benchmarks.ppo_lag_host [--task SafetyPointButton1-v0] [--runs 1] [--envs 8] [--unroll 100]
                                           [--iterations 10] [--workers N]

Iterations that cross an episode end pay that task's resets (Safety-Gymnasium rebuilds its world at
each, seconds), so ``--iterations x --unroll`` past the episode length (1000) includes them. The figures
depend on the cores and their load.
"""

from __future__ import annotations

import argparse
import time

import jax

from algorithms.control.ppo_lag import train as ppo_lag
from constrained_rl.envs.host_rollout import HostRollout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="SafetyPointButton1-v0")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--envs", type=int, default=8)
    parser.add_argument("--unroll", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    config = ppo_lag.Config(task=args.task, num_seeds=args.runs, num_envs=args.envs, unroll_length=args.unroll,
                            num_minibatches=4, total_env_steps=args.envs * args.unroll * (args.iterations + 1))
    if not config.trains_on_host:
        raise SystemExit(f"error: {args.task} trains on its JAX twin, not on the host")
    learner = ppo_lag.make_learner(config)
    learner = learner._replace(host_rollout=HostRollout(args.task, args.runs, args.envs, learner.policy,
                                                        num_workers=args.workers))
    iteration = ppo_lag.make_host_iteration(learner)
    state = ppo_lag.init_runs(learner)
    started = time.perf_counter()
    learner.host_rollout.pool  # the workers start
    state, metrics, _ = iteration(state)  # compiles; the first episodes start
    jax.block_until_ready(state)
    print(f"start + first iteration (compiles, first resets): {time.perf_counter() - started:.1f} s")
    rollout_time = update_time = 0.0
    keys = jax.random.split(jax.random.PRNGKey(1), args.runs)
    for i in range(args.iterations):
        t0 = time.perf_counter()
        learner.host_rollout.rollout(state.actor.params, keys, args.unroll)
        rollout_time += time.perf_counter() - t0
        t0 = time.perf_counter()
        state, metrics, _ = iteration(state)
        jax.block_until_ready(state)
        update_time += time.perf_counter() - t0
    learner.host_rollout.close()
    steps = args.iterations * args.runs * args.envs * args.unroll
    # Each pass times a rollout alone and a whole iteration; under load the two are equal within noise
    # when the update is a small share.
    print(f"{args.task}: {args.runs} run(s) x {args.envs} envs, {args.workers or 'one per core'} workers")
    print(f"  rollout alone: {steps / rollout_time:,.0f} env steps/s")
    print(f"  whole iterations (rollout + update): {steps / update_time:,.0f} env steps/s")


if __name__ == "__main__":
    main()
