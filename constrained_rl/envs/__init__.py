"""Constrained environments behind one functional interface, and the registry ``make``.

  base        EnvState, Env, Wrapper: ``reset(key) -> state``, ``step(state, action) -> state``
  wrappers    TimeLimit, EpisodeMetrics, AutoReset, VmapBatch and ``wrap`` (the standard stack)
  navigation  BallCircle, CarCircle, BallRun, CarRun (pure JAX, after Bullet-Safety-Gym)
  velocity    HalfCheetah/Hopper/Walker2d/Ant/Swimmer velocity tasks on Brax (after Safety-Gymnasium)
  bullet_twins JAX twins of the Bullet-Safety-Gym tasks (BallCircleTwin, BallRunTwin, ...): the real
              tasks' layouts, rewards, costs and starts, with dynamics fitted to PyBullet
  layout      what each observation and action dimension means; the check that a policy fits a task
  host        the real tasks (Bullet-Safety-Gym, Safety-Gymnasium) by their registered ids, stepped in
              parallel worker processes
  gym_adapter host adapter for one Gymnasium-API environment that reports ``info['cost']``

Task names: the JAX tasks by short names (``BallCircle``, ``AntVelocity``: ``names()``, built by
``make``), the real tasks by their registered ids (``SafetyBallCircle-v0``: ``host.HOST_TASKS``).
``task_names()`` lists both; ``evaluation_env`` and ``evaluate_runs`` are the one place that decides
whether a task is played on the device or on the host; ``training_task`` gives the JAX task an on-device
learner trains on for a real task (its twin); PPO-Lagrangian trains on the host a real task without one
(``has_twin``, :mod:`~constrained_rl.envs.host_rollout`).
"""

from __future__ import annotations

from constrained_rl.config import ConfigError
from typing import Any

import jax

from constrained_rl.envs.base import Env, EnvState, Wrapper
from constrained_rl.envs.bullet_twins import TWINS, make_twin
from constrained_rl.envs.host import HOST_TASKS, HostTaskEnv, is_host_task
from constrained_rl.envs.layout import Layout, check_layout
from constrained_rl.envs.navigation import TASKS as NAVIGATION_TASKS
from constrained_rl.envs.navigation import make_navigation
from constrained_rl.envs.wrappers import AutoReset, EpisodeMetrics, TimeLimit, VmapBatch, wrap

VELOCITY_NAMES = ("HalfCheetahVelocity", "HopperVelocity", "Walker2dVelocity", "AntVelocity", "SwimmerVelocity")


def names() -> list[str]:
    """Every name ``make`` accepts."""
    return sorted(NAVIGATION_TASKS) + sorted(TWINS) + sorted(VELOCITY_NAMES)


def make(
    name: str,
    *,
    batch_size: int | None = None,
    episode_length: int | None = None,
    auto_reset: bool = True,
    **task_kwargs,
) -> Env:
    """The named task wrapped with a time limit, episode metrics, auto-reset and an optional batch.

    Args:
      name: one of ``names()``.
      batch_size: number of environments vmapped together; ``None`` for a single one.
      episode_length: time limit in steps; ``None`` for the task's default.
      auto_reset: start a new episode automatically when one ends (training); evaluation can turn
        it off and mask steps after the end instead.
      **task_kwargs: task options (navigation: fields of ``NavigationConfig``; twins: fields of the
        agent's parameters, e.g. ``BallParameters``; velocity: ``backend``,
        ``threshold`` and Brax environment keyword arguments).

    Raises:
      ConfigError: for an unknown name or option.
    """
    if name in NAVIGATION_TASKS:
        raw = make_navigation(name, **task_kwargs)
    elif name in TWINS:
        raw = make_twin(name, **task_kwargs)
    elif name in VELOCITY_NAMES:
        from constrained_rl.envs.velocity import VelocityEnv  # Brax is imported only when needed

        raw = VelocityEnv(name, **task_kwargs)
    else:
        raise ConfigError(f"env: unknown environment {name!r}; known: {', '.join(names())}")
    return wrap(raw, episode_length=episode_length, batch_size=batch_size, auto_reset=auto_reset)


def task_names() -> list[str]:
    """Every task a learner can be evaluated on: the JAX tasks, then the real tasks' registered ids."""
    return names() + list(HOST_TASKS)


def require_task(name: str, field: str = "task", host: bool = True) -> None:
    """``ConfigError`` naming ``field`` unless ``name`` is a known task (a JAX task only, if not ``host``)."""
    known = task_names() if host else names()
    if name not in known:
        raise ConfigError(f"{field}: unknown environment {name!r}; known: {', '.join(known)}")


def twin_of(name: str) -> str:
    """The JAX twin of a real task (its name in :func:`names`), which declares the real task's layout."""
    twins = [twin for twin, spec in TWINS.items() if spec.real_id == name]
    if not twins:
        with_twins = sorted(spec.real_id for spec in TWINS.values())
        raise ConfigError(f"task: {name} has no JAX twin to train on (tasks with one: {', '.join(with_twins)})")
    return twins[0]


def has_twin(name: str) -> bool:
    """Whether the real task ``name`` has a JAX twin (:func:`twin_of`); a learner that can play the host trains
    on the real simulator otherwise (PPO-Lagrangian, ``collect``)."""
    return any(spec.real_id == name for spec in TWINS.values())


def training_task(name: str) -> str:
    """The JAX task an on-device learner trains on for ``name``: itself, or a real task's twin (:func:`twin_of`)."""
    require_task(name)
    return twin_of(name) if is_host_task(name) else name


def evaluation_env(name: str) -> Env | HostTaskEnv:
    """The task as evaluation plays it: a JAX task without auto-reset (``evaluate_episodes`` masks the steps
    after an episode ends), or the description of a real task that :func:`evaluate_runs` plays on the host."""
    require_task(name)
    if is_host_task(name):
        return HostTaskEnv(name)
    return make(name, auto_reset=False)


def task_layout(name: str) -> Layout:
    """The declared layout of any task of :func:`task_names`."""
    require_task(name)
    return HostTaskEnv(name).layout if is_host_task(name) else make(name).layout


def evaluate_runs(env: Env | HostTaskEnv, policy: Any, policy_params: Any, keys: jax.Array, num_episodes: int,
                  policy_layout: Layout | None = None):
    """``num_episodes`` episodes per run, ``EpisodeStats [R, num_episodes]`` (params with a leading run axis).

    ``policy`` is memoryless (``policy_fn(params, obs, key)``) or a ``rollouts.HistoryPolicy``. A JAX task
    plays the episodes on the device, all runs at once (``vmap`` of ``rollouts.evaluate_episodes`` or
    ``rollouts.evaluate_history_episodes``); a real task on the host (:func:`host.evaluate_runs`), which
    demands ``policy_layout``. A given ``policy_layout`` is checked against the task's on either
    (``ConfigError`` at the first mismatch).
    """
    if isinstance(env, HostTaskEnv):
        from constrained_rl.envs import host

        return host.evaluate_runs(env.name, policy, policy_params, keys, num_episodes, policy_layout=policy_layout)
    if policy_layout is not None:
        check_layout(policy_layout, env.layout, task="this JAX task")
    return _device_evaluator(env, policy, num_episodes)(policy_params, keys)


_DEVICE_EVALUATORS: dict[tuple, Any] = {}


def _device_evaluator(env: Env, policy: Any, num_episodes: int):
    """``jit(vmap(evaluate_episodes))`` (``evaluate_history_episodes`` for a history policy) over runs,
    cached per (env, policy, episodes)."""
    from constrained_rl import rollouts  # rollouts imports this package's base module

    key = (env, policy, num_episodes)
    if key not in _DEVICE_EVALUATORS:
        evaluate = (rollouts.evaluate_history_episodes if isinstance(policy, rollouts.HistoryPolicy)
                    else rollouts.evaluate_episodes)
        one_run = lambda params, run_key: evaluate(env, policy, params, run_key, num_episodes)
        _DEVICE_EVALUATORS[key] = jax.jit(jax.vmap(one_run))
    return _DEVICE_EVALUATORS[key]


__all__ = [
    "AutoReset", "ConfigError", "Env", "EnvState", "EpisodeMetrics", "HostTaskEnv", "Layout", "TimeLimit", "check_layout",
    "VmapBatch", "Wrapper", "evaluate_runs", "evaluation_env", "has_twin", "is_host_task", "make", "names", "require_task",
    "task_layout", "task_names", "training_task", "twin_of", "wrap",
]
