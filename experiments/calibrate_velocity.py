"""Calibrate a Brax velocity-task speed threshold by Safety-Gymnasium's rule, with the project's own PPO.

Safety-Gymnasium (Ji et al. 2023) sets each velocity threshold at 50% of the top speed reached by a
PPO policy trained for 1e7 steps. This script trains plain PPO (``algorithms.control.ppo_lag`` with the
multiplier held at 0, so the cost never enters the policy loss) on the velocity task with an infinite
threshold, rolls out the deterministic policy (``tanh`` of the mean) and prints, as one JSON line,

    top_speed = mean over evaluation episodes of the episode's average per-frame forward speed
                (x-velocity; planar speed ||(vx, vy)|| for Ant), over the steps before termination,
    threshold = 0.5 * top_speed.

The speed is the per-frame torso speed of ``constrained_rl.envs.velocity`` (``metrics['mean_frame_speed']``
averaged over the episode). Training progress goes to stderr, one line per chunk.

    python -m experiments.calibrate_velocity HalfCheetahVelocity --num-timesteps 10000000

PPO settings (defaults below) follow Brax's published locomotion PPO settings where our PPO has the
corresponding knob: discount 0.97, an unroll of 20 steps, many parallel environments, a small entropy
bonus and 4 passes per batch. Our PPO standardises the reward advantage over each rollout, so a reward
scale would only change the critic's target scale, and it has no observation normalisation. The
per-task commands behind the default thresholds (some with another ``--discount``) are in
docs/environments.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

from algorithms.control.ppo_lag import ppo
from algorithms.control.ppo_lag import train as ppo_train
from constrained_rl.config import require
from constrained_rl.envs import velocity
from constrained_rl.envs.velocity import VelocityEnv

PPO_DEFAULTS = {  # plain PPO for Brax locomotion on a CPU
    "num_envs": 128, "unroll_length": 20, "num_epochs": 4, "num_minibatches": 8, "learning_rate": 3e-4,
    "discount": 0.97, "gae_lambda": 0.95, "entropy_coef": 1e-3, "hidden": 64, "iterations_per_chunk": 20,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("env", help="velocity task (HalfCheetahVelocity, ...) or Brax name (halfcheetah, ...)")
    parser.add_argument("--backend", default=None, help="Brax physics backend (default: the task's)")
    parser.add_argument("--num-timesteps", type=int, default=10_000_000, help="training environment steps")
    parser.add_argument("--num-envs", type=int, default=PPO_DEFAULTS["num_envs"])
    parser.add_argument("--unroll-length", type=int, default=PPO_DEFAULTS["unroll_length"])
    parser.add_argument("--num-epochs", type=int, default=PPO_DEFAULTS["num_epochs"])
    parser.add_argument("--num-minibatches", type=int, default=PPO_DEFAULTS["num_minibatches"])
    parser.add_argument("--learning-rate", type=float, default=PPO_DEFAULTS["learning_rate"])
    parser.add_argument("--discount", type=float, default=PPO_DEFAULTS["discount"])
    parser.add_argument("--gae-lambda", type=float, default=PPO_DEFAULTS["gae_lambda"])
    parser.add_argument("--entropy-coef", type=float, default=PPO_DEFAULTS["entropy_coef"])
    parser.add_argument("--hidden", type=int, default=PPO_DEFAULTS["hidden"], help="width of both MLP layers")
    parser.add_argument("--iterations-per-chunk", type=int, default=PPO_DEFAULTS["iterations_per_chunk"])
    parser.add_argument("--episode-length", type=int, default=1000)
    parser.add_argument("--eval-episodes", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _registry_name(env: str) -> str:
    found = velocity.find_task(env)
    require(found is not None, "env", f"unknown velocity task {env!r}; known: {sorted(velocity.VELOCITY_TASKS)}")
    return found[0]


def make_config(args: argparse.Namespace) -> ppo.Config:
    """Plain PPO (multiplier fixed at 0) with the command line's settings."""
    hidden = (args.hidden, args.hidden)
    return ppo.Config(
        task=_registry_name(args.env), seed=args.seed, num_seeds=1, total_env_steps=args.num_timesteps,
        num_envs=args.num_envs, unroll_length=args.unroll_length, num_epochs=args.num_epochs,
        num_minibatches=args.num_minibatches, learning_rate=args.learning_rate, discount=args.discount,
        gae_lambda=args.gae_lambda, entropy_coef=args.entropy_coef, actor_hidden_sizes=hidden,
        critic_hidden_sizes=hidden, iterations_per_chunk=args.iterations_per_chunk, eval_episodes=0)


def train(config: ppo.Config, task: VelocityEnv, log=None) -> tuple[ppo_train.Learner, ppo_train.PPOLagState]:
    """Trains one run of plain PPO on ``task``; ``log`` receives one dict per chunk."""
    learner = ppo_train.make_learner(config, env=task)
    num_chunks, per_chunk = ppo_train.completed_iterations(config)
    chunk = ppo_train.make_chunk(learner, per_chunk)
    state = ppo_train.init_runs(learner)
    start = time.time()
    for index in range(num_chunks):
        state, metrics = chunk(state)
        if log is not None:
            row = {k: float(v) for k, v in ppo_train.chunk_summary(metrics).items()}
            log({"chunk": index + 1, "of": num_chunks, "seconds": time.time() - start, **row})
    return learner, jax.tree.map(lambda x: x[0], state)  # the single run


def evaluate_speed(task: VelocityEnv, policy, actor_params, key: jax.Array,
                   num_episodes: int) -> tuple[jax.Array, jax.Array]:
    """Per-episode average of the per-frame speed over the steps before termination, and those steps' count.

    Both are ``[num_episodes]``.
    ``policy(actor_params, obs, key) -> (action, extras)``; the episode runs ``task.episode_length`` steps
    and steps after its first ``done`` are masked out.
    """

    def episode(key):
        reset_key, policy_key = jax.random.split(key)

        def body(carry, step_key):
            state, alive = carry
            action, _ = policy(actor_params, state.obs, step_key)
            state = task.step(state, action)
            return (state, alive * (1.0 - state.done)), (state.metrics["mean_frame_speed"] * alive, alive)

        keys = jax.random.split(policy_key, task.episode_length)
        _, (speeds, alive) = jax.lax.scan(body, (task.reset(reset_key), jnp.ones(())), keys)
        return speeds.sum() / jnp.maximum(alive.sum(), 1.0), alive.sum()

    return jax.jit(jax.vmap(episode))(jax.random.split(key, num_episodes))


def calibrate(args: argparse.Namespace, log=None) -> dict:
    """Trains, evaluates and returns the calibration record (what ``main`` prints)."""
    config = make_config(args)
    task = VelocityEnv(config.task, backend=args.backend, threshold=float("inf"),
                       episode_length=args.episode_length)
    start = time.time()
    learner, state = train(config, task, log)
    jax.block_until_ready(state)
    train_seconds = time.time() - start
    speeds, lengths = evaluate_speed(task, learner.eval_policy, state.actor.params,
                            jax.random.PRNGKey(args.seed + 1), args.eval_episodes)
    top_speed = float(jnp.mean(speeds))
    return {
        "task": config.task, "brax_env": task.task.brax_name, "backend": task.backend,
        "n_frames": task.n_frames, "frame_dt": task.frame_dt, "planar": task.task.planar,
        "env_steps": int(state.env_steps), "requested_steps": args.num_timesteps, "seed": args.seed,
        "eval_episodes": args.eval_episodes, "episode_length": args.episode_length,
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - start, 1),
        "episode_speeds": [round(float(s), 4) for s in speeds],
        "episode_lengths": [int(n) for n in lengths],
        "top_speed": round(top_speed, 4), "threshold": round(0.5 * top_speed, 4),
        "ppo": {**{k: getattr(config, k) for k in (
            "num_envs", "unroll_length", "num_epochs", "num_minibatches", "learning_rate", "discount",
            "gae_lambda", "entropy_coef", "actor_hidden_sizes", "activation", "init_log_std")},
            "multiplier_kind": config.multiplier.kind, "multiplier_init": config.multiplier.init},
    }


def _log_to_stderr(row: dict) -> None:
    keys = ("chunk", "of", "seconds", "env_steps", "episode_reward", "episode_length", "entropy")
    print(json.dumps({k: round(row[k], 3) for k in keys if k in row}), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(calibrate(parse_args(argv), _log_to_stderr)))


if __name__ == "__main__":
    main()
