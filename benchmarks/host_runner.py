"""Real-task throughput: the host runner's parallel workers against one process, and the JAX twin on the device.

Three figures on one task (default ``SafetyBallCircle-v0``), the same 2-layer tanh MLP policy (64 units)
with a leading run axis:

1. one process: the Gymnasium environment stepped in this process, one environment, the jitted
   policy called per step (what ``GymAdapter`` does);
2. the host runner (:mod:`constrained_rl.envs.host`): ``--runs`` policies x ``--episodes`` episodes in
   waves over ``--workers`` worker processes (the DSRL evaluation: 9 runs x 20 episodes);
3. the JAX twin (``envs.twin_of``) at ``--twin_envs`` environments vmapped, one jitted ``lax.scan``.

    python benchmarks/host_runner.py [--task SafetyBallCircle-v0] [--workers 2] [--runs 9] [--episodes 20]

Prints steps/s of each and the ratios. The host figures depend on the cores (2 here) and their load.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from constrained_rl import envs, rollouts
from constrained_rl.envs import host, host_worker
from constrained_rl.envs import layout as layouts


def mlp_policy(params, obs, key):
    return jnp.tanh(jnp.tanh(obs @ params["w1"]) @ params["w2"]), {}


def make_params(runs: int, obs_size: int, action_size: int):
    key1, key2 = jax.random.split(jax.random.PRNGKey(0))
    return {"w1": 0.3 * jax.random.normal(key1, (runs, obs_size, 64)),
            "w2": 0.3 * jax.random.normal(key2, (runs, 64, action_size))}


def one_process(task: str, params, steps: int) -> float:
    import gymnasium

    env = host_worker.make_env(host.host_task(task).package, task)
    act = jax.jit(lambda p, obs: mlp_policy(jax.tree.map(lambda leaf: leaf[0], p), obs, None)[0])
    obs = host_worker.seed_everything(env, 0)
    act(params, obs).block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        obs, _, _, terminated, truncated = host_worker.step_with_cost(env, np.asarray(act(params, obs)))
        if terminated or truncated:
            obs = host_worker.seed_everything(env, 1)
    del gymnasium
    return steps / (time.perf_counter() - start)


def host_runner(task: str, params, runs: int, episodes: int, workers: int) -> tuple[float, float, float]:
    start = time.perf_counter()
    pool = host.shared_pool(task, workers)
    keys = jax.random.split(jax.random.PRNGKey(1), runs)
    declared = layouts.LAYOUTS[task]
    host.evaluate_runs(task, mlp_policy, params, keys, episodes, policy_layout=declared, num_workers=workers)
    warm = time.perf_counter() - start  # the first call: workers started, environments made, policy compiled
    start = time.perf_counter()
    stats = host.evaluate_runs(task, mlp_policy, params, keys, episodes, policy_layout=declared, num_workers=workers)
    wall = time.perf_counter() - start
    return float(stats.length.sum()) / wall, wall, warm


def twin(task: str, num_envs: int) -> float:
    name = envs.twin_of(task)
    env = envs.make(name, batch_size=num_envs)
    params = jax.tree.map(lambda leaf: leaf[0], make_params(1, env.observation_size, env.action_size))
    steps = env.episode_length

    @jax.jit
    def play(key):
        state = env.reset(key)
        _, transitions = rollouts.rollout(env, mlp_policy, params, key, state, steps)
        return transitions.reward.sum()

    play(jax.random.PRNGKey(0)).block_until_ready()
    start = time.perf_counter()
    play(jax.random.PRNGKey(1)).block_until_ready()
    return num_envs * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="SafetyBallCircle-v0")
    parser.add_argument("--workers", type=int, default=host.default_num_workers())
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--single_steps", type=int, default=2000)
    parser.add_argument("--twin_envs", type=int, default=4096)
    args = parser.parse_args()
    declared = layouts.LAYOUTS[args.task]
    params = make_params(args.runs, declared.observation_size, declared.action_size)
    single = one_process(args.task, params, args.single_steps)
    print(f"{args.task}: one process, one environment: {single:,.0f} steps/s")
    parallel, wall, warm = host_runner(args.task, params, args.runs, args.episodes, args.workers)
    print(f"host runner, {args.workers} workers: {args.runs} runs x {args.episodes} episodes in {wall:.1f} s "
          f"({parallel:,.0f} steps/s; the first call, starting the workers, {warm:.1f} s); "
          f"{parallel / single:.2f} x one process")
    try:
        device = twin(args.task, args.twin_envs)
    except Exception as error:  # noqa: BLE001 - a task without a twin
        print(f"no twin figure: {error}")
        return
    print(f"twin {envs.twin_of(args.task)}, {args.twin_envs} environments: {device:,.0f} steps/s; "
          f"{device / parallel:,.0f} x the host runner")


if __name__ == "__main__":
    main()
