"""Training throughput: our PPO-Lagrangian against Brax's own PPO on the same Brax environment.

    python -m benchmarks.ppo_lag_vs_brax_ppo [--env halfcheetah] [--num_envs 64] [--iterations 10]

Both learners train on Brax's halfcheetah (spring backend, 1000-step episodes): Brax PPO on
``brax.envs.get_environment`` wrapped by its own trainer, ours on the same Brax system behind
``constrained_rl.envs`` (``HalfCheetahVelocity``, which adds the speed cost). Matched settings: the
environment batch, the rollout (Brax's ``batch_size * num_minibatches`` unrolls of ``unroll_length``
steps = our ``num_envs * unroll_length`` steps per iteration), minibatches per pass, passes per batch,
hidden sizes and activation of the policy and value networks, no observation normalisation.
PPO-Lagrangian does strictly more work per step: a second (cost) critic, the cost stream's GAE and
the multiplier update.

Timing excludes compilation on both sides: ours times a second call of the compiled chunk, Brax's
``training/sps`` of its second training epoch (its first epoch compiles). Environment steps per
second are printed side by side with their ratio (ours / Brax).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time

import jax
from brax.training.agents.ppo import networks as brax_ppo_networks
from brax.training.agents.ppo import train as brax_ppo

from algorithms.control.ppo_lag import train as ppo_lag

ENV_NAMES = {"halfcheetah": "HalfCheetahVelocity", "ant": "AntVelocity"}


def ours_steps_per_second(args) -> float:
    rollout_steps = args.unroll_length * args.num_minibatches * args.batch_size // args.num_envs
    config = ppo_lag.Config(
        task=ENV_NAMES[args.env], num_envs=args.num_envs, unroll_length=rollout_steps,
        num_epochs=args.updates_per_batch, num_minibatches=args.num_minibatches,
        actor_hidden_sizes=args.hidden, critic_hidden_sizes=args.hidden, activation="swish",
        total_env_steps=args.num_envs * rollout_steps * args.iterations, cost_limit=25.0)
    learner = ppo_lag.make_learner(config)
    chunk = ppo_lag.make_chunk(learner, args.iterations)
    state = ppo_lag.init_runs(learner)
    state, metrics = chunk(state)  # compiles
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    state, metrics = chunk(state)
    jax.block_until_ready(metrics)
    return args.iterations * config.steps_per_iteration / (time.perf_counter() - start)


def _restore_device_put_replicated() -> None:
    """Brax 0.14's PPO trainer still calls ``jax.device_put_replicated``, which newer JAX removed.

    The replacement follows JAX's pmap migration guide: stack one copy per device along a new leading
    axis and place it with ``jax.device_put`` (with one CPU device, as here, it is that device).
    """
    try:
        jax.device_put_replicated  # noqa: B018 - present in the JAX Brax was written against
    except AttributeError:
        def device_put_replicated(value, devices):
            stacked = jax.tree_util.tree_map(lambda x: jax.numpy.stack([x] * len(devices)), value)
            return jax.device_put(stacked, devices[0]) if len(devices) == 1 else stacked

        jax.device_put_replicated = device_put_replicated


def brax_steps_per_second(args) -> float:
    _restore_device_put_replicated()
    learner_env = ppo_lag.make_learner(ppo_lag.Config(task=ENV_NAMES[args.env], num_envs=args.num_envs,
                                                      unroll_length=args.unroll_length, num_minibatches=1,
                                                      total_env_steps=args.num_envs * args.unroll_length))
    brax_env = learner_env.env.unwrapped.brax_env  # the very Brax environment our task wraps
    steps_per_training_step = args.batch_size * args.num_minibatches * args.unroll_length
    sps = []
    brax_ppo.train(
        environment=brax_env,
        num_timesteps=2 * args.iterations * steps_per_training_step,
        num_evals=3,  # an initial evaluation, then two training epochs of `iterations` steps each
        episode_length=learner_env.env.episode_length,
        num_envs=args.num_envs,
        unroll_length=args.unroll_length,
        batch_size=args.batch_size,
        num_minibatches=args.num_minibatches,
        num_updates_per_batch=args.updates_per_batch,
        normalize_observations=False,
        learning_rate=3e-4,
        entropy_cost=0.0,
        discounting=0.99,
        max_grad_norm=0.5,
        num_eval_envs=1,
        network_factory=functools.partial(
            brax_ppo_networks.make_ppo_networks, policy_hidden_layer_sizes=args.hidden,
            value_hidden_layer_sizes=args.hidden),
        progress_fn=lambda step, metrics: sps.append(metrics["training/sps"]) if "training/sps" in metrics else None,
        seed=0,
    )
    return float(sps[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="halfcheetah", choices=sorted(ENV_NAMES))
    parser.add_argument("--num_envs", type=int, default=64)
    parser.add_argument("--unroll_length", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_minibatches", type=int, default=4)
    parser.add_argument("--updates_per_batch", type=int, default=2)
    parser.add_argument("--hidden", type=lambda s: tuple(int(x) for x in s.split(",")), default=(64, 64))
    parser.add_argument("--iterations", type=int, default=8, help="training iterations timed per side")
    args = parser.parse_args()
    if (args.batch_size * args.num_minibatches) % args.num_envs:
        parser.error("batch_size * num_minibatches must be a multiple of num_envs (Brax's constraint)")

    brax = brax_steps_per_second(args)
    ours = ours_steps_per_second(args)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} on "
          f"{jax.devices()[0].platform}")
    print(f"env {args.env}: num_envs {args.num_envs}, unroll {args.unroll_length}, batch {args.batch_size}, "
          f"minibatches {args.num_minibatches}, updates/batch {args.updates_per_batch}, hidden {args.hidden}")
    print(f"{'learner':<22}{'env steps/s':>14}")
    print(f"{'brax ppo':<22}{brax:>14,.0f}")
    print(f"{'ours ppo_lag':<22}{ours:>14,.0f}")
    print(f"ratio ours / brax: {ours / brax:.2f}x")


if __name__ == "__main__":
    main()
