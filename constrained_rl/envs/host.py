"""The real benchmark tasks, stepped on the host in parallel worker processes.

Bullet-Safety-Gym (Gronauer 2022) and Safety-Gymnasium (Ji et al. 2023) simulate on the CPU, one
environment at a time. Their tasks are addressed here by their registered ids (``SafetyBallCircle-v0``,
``SafetyPointPush1-v0``, ...: :data:`HOST_TASKS`); each declares its observation and action layout
(:data:`constrained_rl.envs.layout.LAYOUTS`).

:class:`HostPool` holds ``num_workers`` worker processes (:mod:`constrained_rl.envs.host_worker`), each
with up to ``envs_per_worker`` environments (made when first needed). Episodes are played in *waves* of
up to ``num_workers x envs_per_worker``: each environment of the wave starts an episode, all are stepped
together (one batched, jitted policy call per step over all of them, one message per worker and step),
an environment that finished waits for the others, and the next wave starts when all are done. A wave
thus has the shape of the on-device evaluator (a batch of episodes from their first step), so a policy
batched over episodes runs unchanged, and evaluation plays exactly ``num_episodes`` complete episodes.

A policy with memory (:class:`~constrained_rl.rollouts.HistoryPolicy`, CDT's context window) plays in the
same loop: each slot keeps its own memory, started from its first observation and updated from each step's
transition (reward, cost, next observation, done), all slots at once by one jitted call vmapped over them
with each slot's run parameters (:func:`slot_actor`).

Seeding: episode ``i`` of a run gets the seed ``seeds[i]`` (drawn from the run's key) and the worker seeds
the global generators with it before the reset (see :mod:`~constrained_rl.envs.host_worker`); its policy
noise comes from ``fold_in(fold_in(key, i), t)``. An episode therefore depends on its run's key and its
index only, whatever the number of workers or the wave it falls in.

Which interpreter: Bullet-Safety-Gym runs in the project's own; Safety-Gymnasium 1.0.0 does not import
on Python 3.11 (its dataclasses hold NumPy arrays as defaults, which Python 3.11 refuses) and pins
``mujoco==2.3.3`` and ``pygame==2.1.0``, against Brax's ``mujoco>=3``, so its workers run in a side
interpreter with its exact pins (``python -m experiments.install_safety_gymnasium`` makes it;
docs/environments.md).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from constrained_rl.config import ConfigError, require
from constrained_rl.envs import host_worker
from constrained_rl.envs import layout as layouts
# A module import: rollouts imports this package (envs.base), so its names are read at call time.
from constrained_rl import rollouts

WORKER_SCRIPT = Path(__file__).with_name("host_worker.py")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The side interpreter for Safety-Gymnasium: this variable, or the venv the installer makes in the project.
SAFETY_GYMNASIUM_PYTHON_VARIABLE = "CONSTRAINED_RL_SAFETY_GYMNASIUM_PYTHON"
SAFETY_GYMNASIUM_VENV = PROJECT_ROOT / ".venv-safety-gymnasium"


@dataclasses.dataclass(frozen=True)
class HostTask:
    """A real task: its registered id, the package that registers it and its time limit."""

    id: str
    package: str  # "bullet_safety_gym" or "safety_gymnasium"
    episode_length: int  # the registered max_episode_steps

    @property
    def layout(self) -> layouts.Layout:
        return layouts.LAYOUTS[self.id]

    @property
    def simulator(self) -> str:
        return self.layout.source


HOST_TASKS: dict[str, HostTask] = {
    task.id: task for task in (
        HostTask("SafetyBallCircle-v0", "bullet_safety_gym", 200),
        HostTask("SafetyCarCircle-v0", "bullet_safety_gym", 300),
        HostTask("SafetyBallRun-v0", "bullet_safety_gym", 100),
        HostTask("SafetyCarRun-v0", "bullet_safety_gym", 200),
        HostTask("SafetyPointButton1-v0", "safety_gymnasium", 1000),
        HostTask("SafetyPointButton2-v0", "safety_gymnasium", 1000),
        HostTask("SafetyPointPush1-v0", "safety_gymnasium", 1000),
        HostTask("SafetyPointPush2-v0", "safety_gymnasium", 1000),
    )
}


def is_host_task(name: str) -> bool:
    return name in HOST_TASKS


def host_task(name: str) -> HostTask:
    """The :class:`HostTask` of a registered id; ``ConfigError`` listing the known ids otherwise."""
    if name not in HOST_TASKS:
        raise ConfigError(f"task: unknown host task {name!r}; known: {', '.join(HOST_TASKS)}")
    return HOST_TASKS[name]


def interpreter_for(task: HostTask) -> str:
    """The Python that runs ``task``'s workers (see the module doc); ``ConfigError`` when it is missing."""
    if task.package != "safety_gymnasium":
        return sys.executable
    python = os.environ.get(SAFETY_GYMNASIUM_PYTHON_VARIABLE) or str(SAFETY_GYMNASIUM_VENV / "bin" / "python")
    if not Path(python).exists():
        raise ConfigError(
            f"task: {task.id} runs on Safety-Gymnasium, whose interpreter {python} does not exist; make it with "
            f"`python -m experiments.install_safety_gymnasium` (or point {SAFETY_GYMNASIUM_PYTHON_VARIABLE} at one)")
    return python


ENVS_PER_WORKER = 16  # at most, per worker: environments are made when a wave first needs them


def default_num_workers() -> int:
    """One worker per CPU core (at least 1)."""
    return max(1, os.cpu_count() or 1)


class HostTaskEnv:
    """What the learners need to know of a host task (sizes, time limit, layout); it is played by a pool.

    Stands where a JAX :class:`~constrained_rl.envs.base.Env` would, for evaluation: see
    :func:`constrained_rl.envs.evaluation_env` and :func:`evaluate_runs`.
    """

    batch_size = None

    def __init__(self, name: str):
        self.task = host_task(name)
        self.name = name

    @property
    def layout(self) -> layouts.Layout:
        return self.task.layout

    @property
    def observation_size(self) -> int:
        return self.layout.observation_size

    @property
    def action_size(self) -> int:
        return self.layout.action_size

    @property
    def episode_length(self) -> int:
        return self.task.episode_length

    def __repr__(self) -> str:
        return f"HostTaskEnv({self.name!r})"


class HostPool:
    """``num_workers`` processes with ``envs_per_worker`` environments of one host task each.

    ``reset(seeds)`` starts one episode per given seed on the first ``len(seeds)`` environments;
    ``step(actions, active)`` steps the active ones. Use it as a context manager or call ``close``.
    """

    def __init__(self, task: str, num_workers: int | None = None, envs_per_worker: int = ENVS_PER_WORKER):
        self.task = host_task(task)
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        require(self.num_workers >= 1, "num_workers", f"must be >= 1 (got {num_workers})")
        require(envs_per_worker >= 1, "envs_per_worker", f"must be >= 1 (got {envs_per_worker})")
        self.envs_per_worker = int(envs_per_worker)
        python = interpreter_for(self.task)
        self._processes, self._readers, self._writers, self._sockets = [], [], [], []
        for _ in range(self.num_workers):
            parent, child = socket.socketpair()
            process = subprocess.Popen(
                [python, str(WORKER_SCRIPT), str(child.fileno()), self.task.package, self.task.id],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
            child.close()
            self._processes.append(process)
            self._sockets.append(parent)
            self._readers.append(parent.makefile("rb"))
            self._writers.append(parent.makefile("wb"))
        specs = self._ask_all([("spec",)] * self.num_workers)
        spec = specs[0]
        declared = self.task.layout
        if spec["observation_size"] != declared.observation_size or len(spec["low"]) != declared.action_size:
            self.close()
            raise ConfigError(f"task: {task} has observation/action sizes ({spec['observation_size']}, "
                              f"{len(spec['low'])}) but its declared layout has ({declared.observation_size}, "
                              f"{declared.action_size})")
        self.observation_size = spec["observation_size"]
        self.episode_length = spec["episode_length"] or self.task.episode_length
        self.spec = spec  # as the worker read it off the environment (bounds, observation blocks)

    @property
    def size(self) -> int:
        """Environments in the pool: the episodes of one wave."""
        return self.num_workers * self.envs_per_worker

    def _send(self, worker: int, message: Any) -> None:
        pickle.dump(message, self._writers[worker], protocol=4)
        self._writers[worker].flush()

    def _receive(self, worker: int) -> Any:
        try:
            status, payload = pickle.load(self._readers[worker])
        except EOFError:
            raise RuntimeError(f"host worker {worker} of {self.task.id} exited "
                               f"(code {self._processes[worker].poll()})") from None
        if status == "error":
            raise RuntimeError(f"host worker {worker} of {self.task.id} failed:\n{payload}")
        return payload

    def _ask_all(self, messages: Sequence[Any | None]) -> list[Any]:
        """Sends each worker its message (``None``: none) and collects the answers, in parallel."""
        for worker, message in enumerate(messages):
            if message is not None:
                self._send(worker, message)
        return [self._receive(worker) if message is not None else None for worker, message in enumerate(messages)]

    def _split(self, slots: Sequence[int]) -> list[list[int]]:
        """Slot ``s`` is environment ``s // num_workers`` of worker ``s % num_workers`` (spread evenly)."""
        per_worker: list[list[int]] = [[] for _ in range(self.num_workers)]
        for slot in slots:
            per_worker[int(slot) % self.num_workers].append(int(slot))
        return per_worker

    def reset(self, seeds: Sequence[int], slots: Sequence[int] | None = None) -> np.ndarray:
        """Starts one episode per seed: on environments ``0 .. len(seeds) - 1``, or on the given ``slots``
        (distinct, in ``[0, size)``), seed ``i`` on slot ``slots[i]``; observations ``[len(seeds), obs]``
        in the seeds' order."""
        require(0 < len(seeds) <= self.size, "seeds", f"needs 1 to {self.size} seeds (got {len(seeds)})")
        slots = list(range(len(seeds))) if slots is None else [int(s) for s in slots]
        require(len(slots) == len(seeds) and len(set(slots)) == len(slots)
                and all(0 <= s < self.size for s in slots), "slots",
                f"must be {len(seeds)} distinct environments in [0, {self.size})")
        seed_of = {slot: int(seed) for slot, seed in zip(slots, seeds)}
        row_of = {slot: row for row, slot in enumerate(slots)}
        per_worker = self._split(slots)
        answers = self._ask_all([("reset", [(s // self.num_workers, seed_of[s]) for s in chosen])
                                 if chosen else None for chosen in per_worker])
        obs = np.zeros((len(seeds), self.observation_size), np.float32)
        for chosen, answer in zip(per_worker, answers):
            if chosen:
                obs[[row_of[s] for s in chosen]] = host_worker.unpack(answer)
        return obs

    def step(self, actions: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, ...]:
        """Steps the environments where ``active`` (a bool mask over the first ``len(actions)``).

        Returns ``(obs, reward, cost, terminated, truncated)``, each over all ``len(actions)``
        environments, zeros where inactive.
        """
        count = len(actions)
        slots = np.flatnonzero(active)
        per_worker = self._split(slots)
        answers = self._ask_all([("step", [s // self.num_workers for s in chosen],
                                  host_worker.pack(np.asarray(actions[chosen], np.float64)))
                                 if chosen else None for chosen in per_worker])
        obs = np.zeros((count, self.observation_size), np.float32)
        reward, cost = np.zeros(count), np.zeros(count)
        terminated, truncated = np.zeros(count, bool), np.zeros(count, bool)
        for chosen, answer in zip(per_worker, answers):
            if chosen:
                columns = [host_worker.unpack(packed) for packed in answer]
                obs[chosen], reward[chosen], cost[chosen], terminated[chosen], truncated[chosen] = columns
        return obs, reward, cost, terminated, truncated

    def close(self) -> None:
        for worker, process in enumerate(self._processes):
            if process.poll() is None:
                try:
                    self._send(worker, ("close",))
                except (BrokenPipeError, OSError):
                    pass
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        for handle in (*self._readers, *self._writers, *self._sockets):
            handle.close()
        self._processes = []

    def __enter__(self) -> HostPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_POOLS: dict[tuple[str, int, int], HostPool] = {}


def shared_pool(task: str, num_workers: int | None = None) -> HostPool:
    """A pool kept open for the process (evaluations during training reuse it), closed at exit."""
    workers = default_num_workers() if num_workers is None else num_workers
    key = (task, workers)
    if key not in _POOLS:
        _POOLS[key] = HostPool(task, workers)
    return _POOLS[key]


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


def episode_seeds(key: jax.Array, num_episodes: int) -> np.ndarray:
    """The simulator seeds of a run's episodes, drawn from its key: ``randint(key, [E], 0, 2^31 - 1)``."""
    return np.asarray(jax.random.randint(key, (num_episodes,), 0, 2**31 - 1))


def _own(params: Any, run: jax.Array) -> Any:
    """One run's parameters out of parameters with a leading run axis ``[R, ...]``."""
    return jax.tree.map(lambda leaf: leaf[run], params)


@functools.lru_cache(maxsize=16)
def batched_actor(policy_fn: rollouts.PolicyFn):
    """Jitted ``(params [R, ...], run_index [S], obs [S, obs], episode_keys [S], t) -> actions [S, act]``.

    Slot ``s`` acts with run ``run_index[s]``'s parameters and the key ``fold_in(episode_keys[s], t)``.
    """

    def one(params: Any, run: jax.Array, obs: jax.Array, episode_key: jax.Array, t: jax.Array) -> jax.Array:
        return policy_fn(_own(params, run), obs, jax.random.fold_in(episode_key, t))[0]

    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0, None)))


class SlotActor(NamedTuple):
    """A policy as :func:`play` plays it over a wave's ``S`` slots (slot ``s``: run ``runs[s]``'s parameters,
    its episode's key ``keys[s]``); ``memory`` is per slot (``None`` for a memoryless policy).

    ``start(params, runs, obs) -> memory``; ``act(params, runs, memory, obs, keys, t) -> (actions [S, act],
    memory)``; ``remember(params, runs, memory, transition [S, ...]) -> memory``.
    """

    start: Callable[..., Any]
    act: Callable[..., tuple[jax.Array, Any]]
    remember: Callable[..., Any]


@functools.lru_cache(maxsize=16)
def slot_actor(policy: rollouts.PolicyFn | rollouts.HistoryPolicy) -> SlotActor:
    """The :class:`SlotActor` of a memoryless policy (:func:`batched_actor`, no memory) or of a
    :class:`~constrained_rl.rollouts.HistoryPolicy`.

    A history policy is batched over episodes; here every slot is a batch of one episode with its own
    run's parameters, vmapped over the slots: slot ``s`` starts its memory from its first observation,
    acts with the key ``fold_in(keys[s], t)`` (the memoryless policy's key, so both play the same
    episodes) and remembers each step's transition.
    """
    if not isinstance(policy, rollouts.HistoryPolicy):
        act = batched_actor(policy)
        return SlotActor(start=lambda params, runs, obs: None,
                         act=lambda params, runs, memory, obs, keys, t: (act(params, runs, obs, keys, t), None),
                         remember=lambda params, runs, memory, transition: None)

    def start(params: Any, run: jax.Array, obs: jax.Array) -> Any:
        return policy.start(_own(params, run), obs[None])

    def act(params: Any, run: jax.Array, memory: Any, episode_key: jax.Array, t: jax.Array) -> tuple[jax.Array, Any]:
        action, memory = policy.act(_own(params, run), memory, jax.random.fold_in(episode_key, t))
        return action[0], memory

    def remember(params: Any, run: jax.Array, memory: Any, transition: rollouts.Transition) -> Any:
        return policy.remember(_own(params, run), memory, jax.tree.map(lambda leaf: leaf[None], transition))

    batched_act = jax.jit(jax.vmap(act, in_axes=(None, 0, 0, 0, None)))
    return SlotActor(start=jax.jit(jax.vmap(start, in_axes=(None, 0, 0))),
                     act=lambda params, runs, memory, obs, keys, t: batched_act(params, runs, memory, keys, t),
                     remember=jax.jit(jax.vmap(remember, in_axes=(None, 0, 0, 0))))


class Episodes(NamedTuple):
    """Which run each episode belongs to, its index within the run, its simulator seed and policy key."""

    runs: np.ndarray  # [N] int
    indices: np.ndarray  # [N] int
    seeds: np.ndarray  # [N] int
    keys: jax.Array  # [N] policy keys


def plan_episodes(keys: jax.Array, num_episodes: int) -> Episodes:
    """``num_episodes`` episodes per run key, run-major. A run's key splits into its seeds' key and its
    policy key; episode ``i`` acts with ``fold_in(policy_key, i)`` and starts from seed ``seeds[i]``."""
    require(num_episodes > 0, "num_episodes", f"must be positive, got {num_episodes}")
    num_runs = keys.shape[0]
    seed_keys, policy_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    seeds = np.concatenate([episode_seeds(k, num_episodes) for k in seed_keys])
    episode_index = jnp.arange(num_episodes)
    episode_keys = jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(episode_index))(policy_keys)
    return Episodes(np.repeat(np.arange(num_runs), num_episodes), np.tile(np.arange(num_episodes), num_runs),
                    seeds, episode_keys.reshape((num_runs * num_episodes,) + episode_keys.shape[2:]))


def play(pool: HostPool, policy: rollouts.PolicyFn | rollouts.HistoryPolicy, params: Any, episodes: Episodes,
         record: bool = False, wave_size: int | None = None
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, np.ndarray]] | None]:
    """Plays every planned episode to its end in waves of up to ``wave_size`` (default ``pool.size``) episodes.

    ``policy`` is memoryless (``policy_fn(params, obs, key)``) or a
    :class:`~constrained_rl.rollouts.HistoryPolicy` (:func:`slot_actor`); ``params`` carry a leading run
    axis. Returns per-episode reward returns, cost returns and lengths ``[N]``, and with ``record`` each
    episode's transitions in DSRL's keys (``observations``, ``next_observations``, ``actions``,
    ``rewards``, ``costs``, ``terminals``, ``timeouts``), ``[length, ...]`` each.
    """
    actor = slot_actor(policy)
    count = len(episodes.runs)
    totals = np.zeros((3, count))
    recorded: list[dict[str, np.ndarray]] | None = [] if record else None
    wave_size = min(count, pool.size, wave_size or pool.size)
    for start in range(0, count, wave_size):
        wave = np.arange(start, min(start + wave_size, count))
        n = len(wave)
        padded = np.concatenate([wave, np.full(wave_size - n, wave[0])])  # a fixed batch: one compile

        def full(values: np.ndarray, dtype=np.float32) -> np.ndarray:
            """``values`` of the wave's ``n`` episodes, zero-padded to the fixed batch."""
            return np.concatenate([values, np.zeros((wave_size - n,) + values.shape[1:], values.dtype)]).astype(dtype)

        runs, keys = jnp.asarray(episodes.runs[padded]), episodes.keys[padded]
        obs = pool.reset(episodes.seeds[wave])
        memory = actor.start(params, runs, full(obs))
        alive = np.ones(n, bool)
        steps: list[tuple[np.ndarray, ...]] = []
        for t in range(pool.episode_length):
            wave_actions, memory = actor.act(params, runs, memory, full(obs), keys, t)
            actions = np.asarray(wave_actions)[:n]
            next_obs, reward, cost, terminated, truncated = pool.step(actions, alive)
            truncated = truncated | (alive & (t + 1 == pool.episode_length) & ~terminated)
            memory = actor.remember(params, runs, memory, rollouts.Transition(
                obs=full(obs), action=np.asarray(wave_actions), reward=full(reward), cost=full(cost),
                termination=full(terminated), truncation=full(truncated), next_obs=full(next_obs), extras={}))
            totals[:, wave] += np.stack([reward, cost, alive.astype(float)])
            if record:
                steps.append((obs, next_obs, actions, reward, cost, terminated, truncated, alive.copy()))
            obs = np.where(alive[:, None], next_obs, obs)
            alive &= ~(terminated | truncated)
            if not alive.any():
                break
        if record:
            recorded.extend(_episode_transitions(steps, n))
    return totals[0], totals[1], totals[2], recorded


def _episode_transitions(steps: list[tuple[np.ndarray, ...]], n: int) -> list[dict[str, np.ndarray]]:
    names = ("observations", "next_observations", "actions", "rewards", "costs", "terminals", "timeouts")
    stacked = [np.stack(column) for column in zip(*steps)]  # each [T, n, ...]
    alive = stacked[-1]
    return [{name: column[alive[:, e], e] for name, column in zip(names, stacked[:-1])} for e in range(n)]


def evaluate_runs(task: str, policy: rollouts.PolicyFn | rollouts.HistoryPolicy, params: Any, keys: jax.Array,
                  num_episodes: int, *, policy_layout: layouts.Layout | None,
                  num_workers: int | None = None) -> rollouts.EpisodeStats:
    """``num_episodes`` episodes per run on the host task, ``EpisodeStats`` of shape ``[R, num_episodes]``.

    The counterpart of ``jax.vmap(rollouts.evaluate_episodes)`` over runs (of ``evaluate_history_episodes``
    for a :class:`~constrained_rl.rollouts.HistoryPolicy`): ``params`` carry a leading run axis ``[R]`` and
    ``keys`` are ``[R]``. ``policy_layout`` is the layout the policy was trained on; it must match the
    task's (``ConfigError`` naming the first differing dimension otherwise). ``None`` is refused too: a
    policy of unknown layout never runs on a real task.
    """
    pool_task = host_task(task)
    require(policy_layout is not None, "layout",
            f"the policy records no observation/action layout, so it cannot be checked against {task}")
    layouts.check_layout(policy_layout, pool_task.layout, task=task)
    episodes = plan_episodes(keys, num_episodes)
    pool = shared_pool(task, num_workers)
    rewards, costs, lengths, _ = play(pool, policy, params, episodes)
    shape = (keys.shape[0], num_episodes)
    return rollouts.EpisodeStats(rewards.reshape(shape), costs.reshape(shape), lengths.reshape(shape))
