"""Training rollouts on a real task: auto-resetting host environments stepped in lock-step, for on-policy
learners (PPO-Lagrangian) on a task that has no JAX twin.

:class:`HostRollout` holds ``num_runs x num_envs`` environments of one host task in one
:class:`~constrained_rl.envs.host.HostPool` (slot ``run * num_envs + env``). A rollout of ``T`` steps
produces, per run, the time-major arrays the on-device rollout (:func:`constrained_rl.rollouts.rollout`
over an auto-resetting batch) produces, a :class:`~constrained_rl.rollouts.Transition` ``[T, num_envs,
...]`` with the policy's extras, plus the per-environment episode accumulators of
:class:`~constrained_rl.envs.wrappers.EpisodeMetrics` (``completed_episode_*``, ``completed_episodes``),
so the same learner update consumes either.

One step: one jitted call acts for every run at once (``vmap`` over runs of ``policy_fn(run_params, obs
[num_envs, obs], step_key)``, run ``r``'s step-``t`` key being ``split(rollout_key_r, T)[t]``, the key
the on-device rollout gives the policy at that step), one message per worker steps every environment,
and the environments whose episode ended (terminated, or at the task's time limit: truncated) start a
new one with a fresh seed, the next observation being the new episode's first while ``next_obs`` keeps
the true final one. Seeds: run ``r``'s episodes started during a rollout take the seeds
``randint(fold_in(rollout_key_r, T), [T + 1, num_envs])`` (row 0 for a run's very first episodes, row
``t + 1`` for those started after step ``t``), so a run depends only on its keys, whatever the number of
workers. The simulators' state is not checkpointed: a resumed run starts fresh episodes.
"""

from __future__ import annotations

import atexit
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from constrained_rl.envs import host
from constrained_rl.envs.wrappers import COMPLETED_KEYS, EPISODE_KEYS

SEED_BOUND = 2**31 - 1  # seeds in [0, 2^31 - 1), as host.episode_seeds draws them


def rollout_seeds(rollout_key: jax.Array, num_steps: int, num_envs: int) -> jax.Array:
    """``[T + 1, num_envs]`` simulator seeds of the episodes a run may start during one rollout:
    ``randint(fold_in(rollout_key, T), ...)`` (a key apart from the ``T`` step keys ``split(rollout_key, T)``)."""
    return jax.random.randint(jax.random.fold_in(rollout_key, num_steps), (num_steps + 1, num_envs), 0, SEED_BOUND)


class HostRollout:
    """``num_runs x num_envs`` auto-resetting environments of a host task, in one pool made on first use."""

    def __init__(self, task: str, num_runs: int, num_envs: int, policy_fn: Callable,
                 num_workers: int | None = None):
        self.task = host.host_task(task)
        self.num_runs, self.num_envs = int(num_runs), int(num_envs)
        self.policy_fn = policy_fn
        self.num_workers = min(host.default_num_workers() if num_workers is None else num_workers, self.size)
        self._pool: host.HostPool | None = None
        self._obs: np.ndarray | None = None  # [S, obs] what each slot acts on next; None before the first reset
        self._metrics: dict[str, np.ndarray] = {}  # EpisodeMetrics' accumulators, [S] each
        self._done = np.zeros(self.size, np.float32)  # whether each slot's last step ended its episode
        self._act = _run_batched_policy(policy_fn)
        atexit.register(self.close)  # the workers end with the process, if not closed before

    @property
    def size(self) -> int:
        return self.num_runs * self.num_envs

    @property
    def pool(self) -> host.HostPool:
        if self._pool is None:
            self._pool = host.HostPool(self.task.id, self.num_workers, envs_per_worker=-(-self.size // self.num_workers))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
            self._obs = None

    def _start(self, seeds: np.ndarray) -> None:
        """Every slot starts an episode (``seeds [S]``); the accumulators restart at 0."""
        self._obs = self.pool.reset(seeds)
        names = EPISODE_KEYS + COMPLETED_KEYS + ("completed_episodes",)
        self._metrics = {name: np.zeros(self.size, np.float32) for name in names}
        self._done = np.zeros(self.size, np.float32)

    def _account(self, reward: np.ndarray, cost: np.ndarray, terminated: np.ndarray, truncated: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """One step of TimeLimit and EpisodeMetrics (constrained_rl.envs.wrappers) over the slots.

        ``length = length * (1 - done_prev) + 1``; the time limit truncates an episode that has not
        terminated at ``length = episode_length``; the totals of an episode that ended become
        ``completed_episode_*``. Returns ``(terminated, truncated)`` as the learner reads them."""
        carry = 1.0 - self._done  # the previous step ended an episode: start from zero
        metrics = self._metrics
        totals = {name: metrics[name] * carry + np.asarray(increment, np.float32)
                  for name, increment in zip(EPISODE_KEYS, (reward, cost, 1.0))}
        terminated = np.asarray(terminated, bool)
        truncated = (np.asarray(truncated, bool) | (totals["episode_length"] >= self.pool.episode_length)) & ~terminated
        done = terminated | truncated
        for name in EPISODE_KEYS:
            metrics[f"completed_{name}"] = np.where(done, totals[name], metrics[f"completed_{name}"])
            metrics[name] = totals[name]
        metrics["completed_episodes"] = metrics["completed_episodes"] + done
        self._done = done.astype(np.float32)
        return terminated, truncated

    def rollout(self, params: Any, rollout_keys: jax.Array, num_steps: int
                ) -> tuple[Any, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``num_steps`` steps of every slot, run ``r`` acting by ``params[r]`` (a leading run axis) and
        ``rollout_keys[r]``.

        Returns ``(transitions, metrics_before, metrics_after)``: a ``Transition`` whose leaves are
        ``[R, T, num_envs, ...]`` (with the extras the policy returned), and the episode accumulators
        ``[R, num_envs]`` at the rollout's start and end.
        """
        from constrained_rl import rollouts  # rollouts imports this package (envs.base)

        pool = self.pool
        step_keys, seeds = _keys_and_seeds(rollout_keys, num_steps, self.num_envs)  # [R, T], [R, T + 1, N]
        seeds = np.asarray(seeds).transpose(1, 0, 2).reshape(num_steps + 1, self.size)  # [T + 1, S]
        if self._obs is None:
            self._start(seeds[0])
        runs = lambda x: x.reshape((self.num_runs, self.num_envs) + x.shape[1:])  # [S, ...] -> [R, N, ...]
        before = {name: runs(value.copy()) for name, value in self._metrics.items()}
        steps, extras = [], []
        everyone = np.ones(self.size, bool)
        for t in range(num_steps):
            obs = self._obs
            action, step_extras = self._act(params, runs(obs), step_keys[:, t])
            actions = np.asarray(action).reshape(self.size, -1)
            next_obs, reward, cost, terminated, truncated = pool.step(actions, everyone)
            terminated, truncated = self._account(reward, cost, terminated, truncated)
            steps.append((obs, actions, reward, cost, terminated, truncated, next_obs))
            extras.append(step_extras)
            ended = np.flatnonzero(terminated | truncated)
            self._obs = next_obs.copy()
            if len(ended):
                self._obs[ended] = pool.reset(seeds[t + 1][ended], slots=ended)
        # Each field: T arrays [S, ...] -> [T, R, N, ...] -> [R, T, N, ...], as a vmap over runs of the
        # on-device rollout lays them out.
        fields = [np.moveaxis(np.stack(column).reshape((num_steps, self.num_runs, self.num_envs)
                                                       + np.shape(column[0])[1:]), 0, 1) for column in zip(*steps)]
        obs, action, reward, cost, terminated, truncated, next_obs = (jnp.asarray(f, jnp.float32) for f in fields)
        transitions = rollouts.Transition(obs=obs, action=action, reward=reward, cost=cost, termination=terminated,
                                          truncation=truncated, next_obs=next_obs,
                                          extras=jax.tree.map(lambda *x: jnp.stack(x, axis=1), *extras))
        after = {name: runs(value.copy()) for name, value in self._metrics.items()}
        return transitions, before, after


@functools.partial(jax.jit, static_argnums=(1, 2))
def _keys_and_seeds(rollout_keys: jax.Array, num_steps: int, num_envs: int) -> tuple[jax.Array, jax.Array]:
    """Per run: the ``T`` step keys ``split(rollout_key, T)`` and :func:`rollout_seeds`."""
    return (jax.vmap(lambda k: jax.random.split(k, num_steps))(rollout_keys),
            jax.vmap(lambda k: rollout_seeds(k, num_steps, num_envs))(rollout_keys))


@functools.lru_cache(maxsize=16)
def _run_batched_policy(policy_fn: Callable):
    """Jitted ``(params [R, ...], obs [R, N, obs], keys [R]) -> (actions [R, N, act], extras [R, N, ...])``:
    each run's batched policy call on its own environments, as the on-device rollout makes it."""
    return jax.jit(jax.vmap(policy_fn))
