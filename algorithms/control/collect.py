"""Offline dataset collection by the DSRL recipe (Liu et al. 2023, "Datasets and Benchmarks for Offline
Safe Reinforcement Learning").

DSRL builds each dataset from constrained behaviour policies trained while their cost limit moves over
a range, keeping trajectories from throughout training, so the data covers the whole
(cost return, reward return) plane from reckless to over-cautious; a grid filter then thins the dense
regions. Here:

1. ``num_policies`` PPO-Lagrangian runs train at once (vmapped). Run ``k``'s cost limit moves linearly
   over training from ``start_k`` to ``end_k``, the starts evenly spaced over
   ``[cost_limit_min, cost_limit_max]`` and the ends the same list reversed, so every run sweeps the
   range (the middle run of an odd count holds its limit) and together they cover it both ways.
   The limit is updated at every chunk (``snapshot_every`` iterations).
2. After every chunk, each run's current stochastic policy plays ``episodes_per_snapshot`` fresh
   episodes; their transitions are written to the run directory (``snapshots/``), so an interrupted
   collection resumes with nothing lost.
3. The episodes are thinned by DSRL's grid filter over (cost return, reward return), and written as a
   DSRL HDF5 file with the task's normalization metadata (reference min / max episode reward and the
   largest episode cost of the kept data, the episode length, and these collection parameters).

On a real task (``--task SafetyBallCircle-v0``) the behaviour policies train on its JAX twin
(:func:`constrained_rl.envs.training_task`, which declares the real task's layout), or, for a real task
without one (the Safety-Gymnasium tasks), on the real simulator itself (PPO-Lagrangian's host rollouts,
:mod:`constrained_rl.envs.host_rollout`, in a pool of their own); every snapshot's episodes are played on
the real simulator by the host runner (:mod:`constrained_rl.envs.host`), so the file holds the real
simulator's transitions; its task is the real id, so loading it applies DSRL's
published references (:mod:`constrained_rl.data.dsrl_tasks`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from algorithms.control.ppo_lag import train as ppo_lag
from constrained_rl import envs, parallel, plotting, rollouts
from constrained_rl.envs import host
from constrained_rl.config import Experiment, require, require_positive_integers
from constrained_rl.data import dsrl, filters

SNAPSHOT_DIR = "snapshots"


def _quick_behaviour_config() -> ppo_lag.Config:
    # Small rollouts so that many snapshots are taken; the learning rate and clip are PPO's defaults.
    return ppo_lag.Config(num_envs=16, unroll_length=100, num_epochs=5, num_minibatches=4,
                          total_env_steps=400_000, multiplier=ppo_lag.MULTIPLIER)


@dataclasses.dataclass(frozen=True)
class Config:
    """DSRL-recipe collection; the defaults collect a small BallCircle dataset in a few minutes."""

    task: str = "BallCircle"  # played on: a JAX task, or a real task's id (trained on its twin or itself, played on it)
    seed: int = 0  # PRNG seed of training, snapshots and the grid filter
    num_policies: int = 4  # behaviour policies trained at once, each sweeping its own limit schedule
    cost_limit_min: float = 5.0  # lower end of the swept cost limits
    cost_limit_max: float = 80.0  # upper end of the swept cost limits
    snapshot_every: int = 5  # training iterations between trajectory snapshots
    episodes_per_snapshot: int = 4  # episodes each policy plays at each snapshot
    cost_bins: int = 60  # grid filter: cells over cost return (DSRL's default)
    reward_bins: int = 50  # grid filter: cells over reward return (DSRL's default)
    max_per_cell: int = 2  # grid filter: episodes kept per cell
    output: str = "dataset.hdf5"  # file name inside the run directory (or an absolute path)
    behaviour: ppo_lag.Config = dataclasses.field(default_factory=_quick_behaviour_config)  # PPO-Lag settings

    # What the collection sets in the behaviour learner's config itself (behaviour_config below).
    sets_in_sections: ClassVar[dict[str, dict[str, str]]] = {"behaviour": {
        "task": "collect's --task", "seed": "collect's --seed", "num_seeds": "collect's --num_policies",
        "iterations_per_chunk": "collect's --snapshot_every",
        "cost_limit": "collect's --cost_limit_min and --cost_limit_max (each policy sweeps its limit)",
        "eval_episodes": "nobody: collection scores no policy"}}

    def __post_init__(self) -> None:
        envs.require_task(self.task)
        require_positive_integers(self, "num_policies", "snapshot_every", "episodes_per_snapshot", "cost_bins",
                                  "reward_bins", "max_per_cell")
        require(self.cost_limit_min >= 0, "cost_limit_min", f"must be >= 0 (got {self.cost_limit_min})")
        require(self.cost_limit_max >= self.cost_limit_min, "cost_limit_max",
                f"must be >= cost_limit_min={self.cost_limit_min} (got {self.cost_limit_max})")
        require(self.output.endswith((".hdf5", ".h5")), "output", f"must end in .hdf5 or .h5 (got {self.output!r})")
        default_behaviour = _quick_behaviour_config()
        for name, setter in self.sets_in_sections["behaviour"].items():
            require(getattr(self.behaviour, name) == getattr(default_behaviour, name), f"behaviour.{name}",
                    f"is set by {setter}, not in the behaviour section")
        require(self.behaviour.num_iterations >= self.snapshot_every, "behaviour.total_env_steps",
                f"gives {self.behaviour.num_iterations} iterations, fewer than snapshot_every={self.snapshot_every}")

    def behaviour_config(self) -> ppo_lag.Config:
        """The PPO-Lag config of the vmapped behaviour runs (task, seed, run count and chunking set here)."""
        return dataclasses.replace(self.behaviour, task=self.task, seed=self.seed, num_seeds=self.num_policies,
                                   iterations_per_chunk=self.snapshot_every)


def limit_schedule(config: Config) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)`` of the runs' cost limits, each ``[num_policies]``."""
    starts = np.linspace(config.cost_limit_min, config.cost_limit_max, config.num_policies, dtype=np.float32)
    return starts, starts[::-1].copy()


def limits_at(starts: jax.Array, ends: jax.Array, progress: jax.Array) -> jax.Array:
    """Linear interpolation ``start + (end - start) * progress`` with ``progress`` in [0, 1]."""
    return starts + (ends - starts) * jnp.clip(progress, 0.0, 1.0)


def play_episodes(learner: ppo_lag.Learner, eval_env: envs.Env, actor_params, key: jax.Array):
    """One fresh episode per environment of ``eval_env`` with the stochastic behaviour policy.

    Returns a time-major transition batch ``[episode_length, episodes]`` and a mask of the steps up to
    and including each episode's first ``done`` (later steps would belong to no complete episode).
    """
    reset_key, rollout_key = jax.random.split(key)
    state = eval_env.reset(reset_key)
    _, transitions = rollouts.rollout(eval_env, learner.policy, actor_params, rollout_key, state,
                                      eval_env.episode_length)
    ended_before = jnp.cumsum(transitions.done, axis=0) - transitions.done
    return transitions, ended_before == 0


def make_snapshot_fn(learner: ppo_lag.Learner, episodes: int):
    """A jitted ``(actor_params [runs], key) -> DSRL-keyed arrays [runs, T, episodes, ...]`` plus mask."""
    eval_env = envs.wrap(learner.env.unwrapped, batch_size=episodes, auto_reset=False)

    def one_run(actor_params, key):
        transitions, mask = play_episodes(learner, eval_env, actor_params, key)
        return {
            "observations": transitions.obs,
            "next_observations": transitions.next_obs,
            "actions": transitions.action,
            "rewards": transitions.reward,
            "costs": transitions.cost,
            "terminals": transitions.termination,
            "timeouts": transitions.truncation,
            "mask": mask,
        }

    return jax.jit(lambda params, keys: jax.vmap(one_run)(params, keys))


def make_host_snapshot_fn(task: str, learner: ppo_lag.Learner, episodes: int):
    """``(actor_params [runs], keys [runs]) -> DSRL rows``: each run's stochastic policy plays ``episodes``
    episodes of the real ``task`` on the host runner; rows ordered run, episode, time, as
    :func:`flatten_snapshot` orders them."""
    envs.check_layout(learner.env.layout, envs.task_layout(task), task=task)

    def snapshot(actor_params, keys):
        # No more workers than a snapshot has episodes: an idle worker would still load its simulator.
        pool = host.shared_pool(task, min(host.default_num_workers(), len(keys) * episodes))
        *_, recorded = host.play(pool, learner.policy, actor_params, host.plan_episodes(keys, episodes), record=True)
        return {key: np.concatenate([episode[key] for episode in recorded]).astype(np.float32)
                for key in dsrl.DSRL_KEYS}

    return snapshot


def snapshot_fn(task: str, learner: ppo_lag.Learner, episodes: int):
    """``(actor_params [runs], keys [runs]) -> DSRL rows`` of fresh episodes: on the device for a JAX
    task, on the real simulator for a real one."""
    if envs.is_host_task(task):
        return make_host_snapshot_fn(task, learner, episodes)
    snapshot = make_snapshot_fn(learner, episodes)
    return lambda actor_params, keys: flatten_snapshot(jax.device_get(snapshot(actor_params, keys)))


def flatten_snapshot(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``[runs, T, episodes, ...]`` -> rows ordered run, episode, time (episodes contiguous), masked."""
    mask = np.moveaxis(arrays["mask"], 1, 2).reshape(-1)
    out = {}
    for key in dsrl.DSRL_KEYS:
        value = np.moveaxis(arrays[key], 1, 2)  # [runs, episodes, T, ...]
        out[key] = value.reshape((-1,) + value.shape[3:])[mask]
    return out


def run(config: Config, ctx) -> dict[str, Any]:
    behaviour = config.behaviour_config()
    learner = ppo_lag.make_learner(behaviour)
    num_chunks, per_chunk = ppo_lag.completed_iterations(behaviour)
    total_iterations = num_chunks * per_chunk
    starts, ends = (jnp.asarray(x) for x in limit_schedule(config))
    chunk = ppo_lag.make_chunk(learner, per_chunk)
    snapshot = snapshot_fn(config.task, learner, config.episodes_per_snapshot)
    snapshot_dir = ctx.run_dir / SNAPSHOT_DIR
    snapshot_dir.mkdir(parents=True, exist_ok=True)

    def chunk_fn(state: ppo_lag.PPOLagState):
        iteration = int(jax.device_get(state.iteration[0]))
        state = state.replace(cost_limit=limits_at(starts, ends, iteration / total_iterations))
        state, metrics = chunk(state)
        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), iteration),
                                config.num_policies)
        # Named by the chunk's first iteration: a resumed run rewrites exactly the files it recomputes.
        np.savez(snapshot_dir / f"iteration_{iteration:07d}.npz", **snapshot(state.actor.params, keys))
        return state, ppo_lag.chunk_summary(metrics)

    ctx.loop("behaviour", lambda: ppo_lag.init_runs(learner, starts), chunk_fn, num_chunks,
             steps_per_chunk=per_chunk * behaviour.steps_per_iteration,
             progress_keys=("episode_reward", "episode_cost", "multiplier"))
    if learner.host_rollout is not None:
        learner.host_rollout.close()  # the behaviour runs' host environments

    collected = load_snapshots(snapshot_dir)
    dataset = dsrl.offline_dataset_from_arrays(collected, source="collected snapshots")
    episodes = dsrl.split_episodes(dataset)
    keep = filters.grid_filter_mask(episodes.cost_returns, episodes.reward_returns, cost_bins=config.cost_bins,
                                    reward_bins=config.reward_bins, max_per_cell=config.max_per_cell,
                                    seed=config.seed)
    kept = filters.select_episodes(dataset, keep, episodes)
    metadata = dsrl.DatasetMetadata(
        task=config.task,
        episode_length=int(learner.env.episode_length),
        reward_min=float(episodes.reward_returns[keep].min()),
        reward_max=float(max(episodes.reward_returns[keep].max(), episodes.reward_returns[keep].min() + 1e-6)),
        max_episode_cost=float(episodes.cost_returns[keep].max()),
        collection=json.dumps({"recipe": "DSRL: PPO-Lagrangian behaviour policies, swept cost limits, grid filter",
                               "limit_starts": starts.tolist(), "limit_ends": ends.tolist(),
                               **{k: v for k, v in dataclasses.asdict(config).items() if k != "behaviour"},
                               "behaviour": dataclasses.asdict(behaviour)}),
    )
    output = Path(config.output)
    path = output if output.is_absolute() else ctx.run_dir / output
    if ctx.is_main:  # every process holds the same data; one writes it, the others wait for the file
        dsrl.save_dsrl(path, kept, metadata)
        plot_scatter(episodes, keep, ctx.run_dir / "plots" / "dataset_scatter.png",
                     title=f"{config.task}: {int(keep.sum())} of {episodes.num_episodes} episodes kept")
    parallel.barrier("collect-dataset")
    return {
        "dataset": str(path),
        "episodes_collected": episodes.num_episodes,
        "episodes_kept": int(keep.sum()),
        "transitions": int(kept.num_transitions),
        "reward_return_range": [metadata.reward_min, metadata.reward_max],
        "cost_return_range": [float(episodes.cost_returns[keep].min()), metadata.max_episode_cost],
    }


def load_snapshots(snapshot_dir: Path) -> dict[str, np.ndarray]:
    """All snapshot files in iteration order, concatenated row-wise."""
    files = sorted(snapshot_dir.glob("iteration_*.npz"))
    require(bool(files), str(snapshot_dir), "holds no snapshot files")
    parts = [dict(np.load(f)) for f in files]
    return {key: np.concatenate([p[key] for p in parts]) for key in dsrl.DSRL_KEYS}


def plot_scatter(episodes: dsrl.Episodes, keep: np.ndarray, path: Path, title: str = "") -> None:
    """The collected episodes on the (cost return, reward return) plane; the kept ones highlighted."""
    figure, axes = plotting.new_figure((6, 4.5))
    axes.scatter(episodes.cost_returns[~keep], episodes.reward_returns[~keep], s=6, c="lightgray",
                 label="filtered out")
    axes.scatter(episodes.cost_returns[keep], episodes.reward_returns[keep], s=8, c="tab:blue", label="kept")
    axes.set_xlabel("cost return")
    axes.set_ylabel("reward return")
    axes.grid(alpha=0.3)
    axes.legend()
    if title:
        axes.set_title(title)
    plotting.save(figure, path)


def stage_configs(config: Config) -> dict[str, Any]:
    """The behaviour learner's config as the collection runs it, and the collection's own settings."""
    own = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "behaviour"}
    return {"behaviour": config.behaviour_config(), "collect": own}


COLLECT = Experiment(Config, run, stage_configs)
