"""The one rollout function of the project, and fixed-horizon episode evaluation.

A policy is a pure function ``policy_fn(params, obs, key) -> (action, extras)``: ``obs`` carries the
environment's batch axis (if any), ``action`` lies in [-1, 1], and ``extras`` is a dict of arrays
(log-probabilities, values...) that the rollout stores beside each transition, as Brax's PPO does
with ``extra_fields``. A deterministic evaluation policy simply ignores ``key``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from constrained_rl.config import require
from constrained_rl.envs.base import Env, EnvState
from constrained_rl.envs.wrappers import VmapBatch

PolicyFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class Transition(NamedTuple):
    """One step ``(s, a, r, c, s')``; after a rollout every leaf has a leading time axis [T, ...].

    ``next_obs`` is the true observation reached (not the reset one when an episode ended).
    ``termination`` = 1 at a terminal state (no bootstrap); ``truncation`` = 1 when the episode was
    cut by the time limit (bootstrap from ``next_obs``).
    """

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    cost: jax.Array
    termination: jax.Array
    truncation: jax.Array
    next_obs: jax.Array
    extras: dict[str, jax.Array]

    @property
    def discount(self) -> jax.Array:
        """``1 - termination``: multiply gamma by it when bootstrapping from ``next_obs``."""
        return 1.0 - self.termination

    @property
    def done(self) -> jax.Array:
        """1 where an episode ended, by termination or truncation (GAE stops there)."""
        return jnp.maximum(self.termination, self.truncation)


def env_step(env: Env, policy_fn: PolicyFn, policy_params: Any, state: EnvState,
             key: jax.Array) -> tuple[EnvState, Transition]:
    """Acts once from ``state`` and returns the next state and the transition."""
    action, extras = policy_fn(policy_params, state.obs, key)
    return _act(env, state, action, extras)


def _act(env: Env, state: EnvState, action: jax.Array, extras: dict[str, jax.Array]) -> tuple[EnvState, Transition]:
    next_state = env.step(state, action)
    transition = Transition(
        obs=state.obs,
        action=action,
        reward=next_state.reward,
        cost=next_state.cost,
        termination=next_state.done * (1.0 - next_state.truncation),
        truncation=next_state.truncation,
        next_obs=next_state.next_obs,
        extras=extras,
    )
    return next_state, transition


def rollout(env: Env, policy_fn: PolicyFn, policy_params: Any, key: jax.Array, state: EnvState,
            num_steps: int) -> tuple[EnvState, Transition]:
    """Runs ``num_steps`` steps with ``lax.scan``; returns the final state and a [T, ...] Transition.

    Generic over environments: unbatched or batched (``VmapBatch``), with or without auto-reset.
    Pure: jit it (``env``, ``policy_fn`` and ``num_steps`` static) or call it inside a jitted loop.
    """
    require(num_steps > 0, "num_steps", f"must be positive, got {num_steps}")

    def body(state, step_key):
        return env_step(env, policy_fn, policy_params, state, step_key)

    return jax.lax.scan(body, state, jax.random.split(key, num_steps))


class EpisodeStats(NamedTuple):
    """Per-episode totals, each of shape [num_episodes]."""

    reward_return: jax.Array
    cost_return: jax.Array
    length: jax.Array


class HistoryPolicy(NamedTuple):
    """A policy that acts on its own record of the episode (a decision transformer's context).

    ``start(params, first_obs) -> memory``; ``act(params, memory, key) -> (action, memory)``;
    ``remember(params, memory, transition) -> memory`` after each step. Batched over episodes.
    """

    start: Callable[[Any, jax.Array], Any]
    act: Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]
    remember: Callable[[Any, Any, Transition], Any]


@functools.partial(jax.jit, static_argnames=("env", "policy_fn", "num_episodes"))
def evaluate_episodes(env: Env, policy_fn: PolicyFn, policy_params: Any, key: jax.Array,
                      num_episodes: int) -> EpisodeStats:
    """Plays ``num_episodes`` episodes in parallel, fully jitted, and returns their undiscounted totals.

    ``env`` is unbatched (it is vmapped here over ``num_episodes`` reset keys) and is stepped
    exactly ``env.episode_length`` times; steps after an episode's first ``done`` are masked out,
    so early termination is respected whether or not ``env`` auto-resets.
    Returns ``R = sum_t m_t r_t``, ``C = sum_t m_t c_t``, ``L = sum_t m_t`` with
    ``m_t = prod_{k<t} (1 - done_k)``.
    """

    def step(batched: Env, state: EnvState, memory: None, step_key: jax.Array):
        return (*env_step(batched, policy_fn, policy_params, state, step_key), None)

    return _masked_totals(env, key, num_episodes, lambda state: None, step)


@functools.partial(jax.jit, static_argnames=("env", "policy", "num_episodes"))
def evaluate_history_episodes(env: Env, policy: HistoryPolicy, policy_params: Any, key: jax.Array,
                              num_episodes: int) -> EpisodeStats:
    """:func:`evaluate_episodes` for a :class:`HistoryPolicy`: the same episodes, masking and totals."""

    def step(batched: Env, state: EnvState, memory: Any, step_key: jax.Array):
        action, memory = policy.act(policy_params, memory, step_key)
        next_state, transition = _act(batched, state, action, {})
        return next_state, transition, policy.remember(policy_params, memory, transition)

    return _masked_totals(env, key, num_episodes, lambda state: policy.start(policy_params, state.obs), step)


def _masked_totals(env: Env, key: jax.Array, num_episodes: int, start: Callable[[EnvState], Any],
                   step: Callable[..., tuple[EnvState, Transition, Any]]) -> EpisodeStats:
    require(env.batch_size is None, "env", "evaluate_episodes vmaps an unbatched environment; pass one without batch_size")
    require(num_episodes > 0, "num_episodes", f"must be positive, got {num_episodes}")
    reset_key, policy_key = jax.random.split(key)
    batched = VmapBatch(env, num_episodes)
    state = batched.reset(reset_key)

    def body(carry, step_key):
        state, memory, alive = carry
        state, transition, memory = step(batched, state, memory, step_key)
        totals = (alive * transition.reward, alive * transition.cost, alive)
        return (state, memory, alive * (1.0 - transition.done)), totals

    alive = jnp.ones((num_episodes,), jnp.float32)
    keys = jax.random.split(policy_key, env.episode_length)
    _, (rewards, costs, steps) = jax.lax.scan(body, (state, start(state), alive), keys)
    chex.assert_shape(rewards, (env.episode_length, num_episodes))
    return EpisodeStats(reward_return=rewards.sum(0), cost_return=costs.sum(0), length=steps.sum(0))
