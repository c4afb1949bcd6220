"""Environment throughput: a jitted ``lax.scan`` of batched steps, per navigation task (or twin, ``--tasks``).

Three figures per task, all with ``--num-envs`` environments:
  * raw: the bare task vmapped (no time limit, no auto-reset, no accumulators);
  * wrapped: the training stack of ``envs.make`` (time limit, episode metrics, and the batched
    auto-reset outside the vmap, which draws fresh initial states only on steps where some
    environment ended);
  * reset under vmap: the same stack with the auto-reset inside the vmap
    (``VmapBatch(wrap(task))``), where the reset is computed every step and selected; this is what any
    outer ``vmap`` (over seeds, say) turns the batched auto-reset into.
Actions are a fixed pseudo-random table so that the policy costs nothing. Use a number of steps that
spans several episodes (600 covers 2-6 episodes of every task) so the resets are counted.

    python -m benchmarks.env_throughput --num-envs 4096 --num-steps 600
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from constrained_rl import envs
from constrained_rl.envs.base import Env
from constrained_rl.envs.bullet_twins import TWINS, make_twin
from constrained_rl.envs.navigation import TASKS, make_navigation
from constrained_rl.envs.wrappers import VmapBatch


def steps_per_second(env: Env, num_envs: int, num_steps: int, repeats: int) -> float:
    """Environment steps per second of ``repeats`` jitted scans of ``num_steps`` steps, after a warm-up."""
    key = jax.random.PRNGKey(0)
    actions = jax.random.uniform(key, (16, num_envs, env.action_size), minval=-1.0, maxval=1.0)

    @jax.jit
    def run(state):
        def body(state, t):
            return env.step(state, actions[t % 16]), None

        state, _ = jax.lax.scan(body, state, jnp.arange(num_steps))
        return state

    state = jax.jit(env.reset)(key)
    state = jax.block_until_ready(run(state))  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        state = run(state)
    jax.block_until_ready(state)
    return num_envs * num_steps * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-envs", type=int, default=4096)
    parser.add_argument("--num-steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS),
                        help=f"navigation tasks or Bullet twins (default: the navigation tasks; twins: {', '.join(TWINS)})")
    args = parser.parse_args()
    print(f"{jax.devices()[0].platform} x{jax.device_count()}, {args.num_envs} envs, {args.num_steps} steps per scan, "
          f"{args.repeats} repeats; M env steps/s")
    print(f"{'task':14s} {'raw':>8s} {'wrapped':>8s} {'reset under vmap':>17s}")
    for name in args.tasks:
        raw = make_twin(name) if name in TWINS else make_navigation(name)
        stacks = (
            VmapBatch(raw, args.num_envs),
            envs.make(name, batch_size=args.num_envs),
            VmapBatch(envs.make(name), args.num_envs),
        )
        rates = [steps_per_second(env, args.num_envs, args.num_steps, args.repeats) / 1e6 for env in stacks]
        print(f"{name:14s} {rates[0]:8.2f} {rates[1]:8.2f} {rates[2]:17.2f}")


if __name__ == "__main__":
    main()
