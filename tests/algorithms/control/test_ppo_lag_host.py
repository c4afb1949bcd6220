"""PPO-Lagrangian trained on a host task (no JAX twin): the host rollout feeds the on-device learner's update.

The toy host task (tests/constrained_rl/envs/toy_host_env.py: 8-step episodes that also terminate) starts
in a fraction of a second; Safety-Gymnasium is used once, end to end through ``collect``.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.control import collect
from algorithms.control.ppo_lag import train as ppo_lag
from constrained_rl import envs
from constrained_rl.config import ConfigError
from constrained_rl.data import dsrl
from constrained_rl.envs import base, host
from constrained_rl.envs.wrappers import EpisodeMetrics
from tests.constrained_rl.envs.test_host import toy_task  # noqa: F401 (the fixture)

pytestmark = pytest.mark.quick_compile  # tiny runs: compiling is most of their time

TINY = dict(seed=3, num_seeds=2, num_envs=2, unroll_length=12, total_env_steps=48, num_epochs=2, num_minibatches=2,
            actor_hidden_sizes=(8,), critic_hidden_sizes=(8,), iterations_per_chunk=2, eval_episodes=0)


class Replay(base.Env):
    """A batch of environments that replays a recorded host rollout ``[T, N]`` (held in ``physics``) whatever
    the actions: step ``t`` reaches ``next_obs[t]`` with ``reward[t]``, ``cost[t]`` and the recorded flags,
    and the agent acts next on ``obs[t + 1]`` (the new episode's first observation after an end, as the host
    reset it)."""

    observation_size, action_size, episode_length = 2, 1, 8

    def reset(self, recorded):
        zeros = jnp.zeros(recorded.obs.shape[1], jnp.float32)
        return base.EnvState(obs=recorded.obs[0], reward=zeros, cost=zeros, done=zeros, truncation=zeros,
                             next_obs=recorded.obs[0], info={"t": jnp.zeros((), jnp.int32)}, physics=recorded)

    def step(self, state, action):
        t, rec = state.info["t"], state.physics
        following = jnp.minimum(t + 1, rec.obs.shape[0] - 1)
        return state.replace(obs=rec.obs[following], reward=rec.reward[t], cost=rec.cost[t],
                             done=jnp.maximum(rec.termination[t], rec.truncation[t]), truncation=rec.truncation[t],
                             next_obs=rec.next_obs[t], info={"t": t + 1})


def test_host_iteration_is_the_device_iteration_on_the_same_rollout_and_reproducible(toy_task):
    config = ppo_lag.Config(task=toy_task, **TINY)
    assert config.trains_on_host and config.train_task == toy_task
    learner = ppo_lag.make_learner(config)
    iteration = ppo_lag.make_host_iteration(learner)
    state = ppo_lag.init_runs(learner)
    # Run 0 pushes right (x += ~2 a step: terminates at x >= 15), run 1 wanders (truncated after 8 steps).
    params = state.actor.params
    bias = params["params"]["MLP_0"]["Dense_1"]["bias"]
    params["params"]["MLP_0"]["Dense_1"]["bias"] = bias.at[0].set(3.0)
    state = state.replace(actor=state.actor.replace(params=params))
    outcomes = []
    for attempt in range(2):  # each from fresh host environments
        try:
            outcomes.append(iteration(state))
        finally:
            learner.host_rollout.close()
    host_state, metrics, transitions = outcomes[0]
    for ours, theirs in zip(jax.tree.leaves(outcomes[0]), jax.tree.leaves(outcomes[1])):
        np.testing.assert_array_equal(ours, theirs)  # the same seed: the same episodes, the same update
    obs, done = np.asarray(transitions.obs), np.maximum(transitions.termination, transitions.truncation)
    assert obs.shape == (2, 12, 2, 2) and transitions.action.shape == (2, 12, 2, 1)
    assert transitions.termination[0].sum() > 0 and transitions.truncation[1].sum() > 0  # both ends occur
    continuing = done[:, :-1] == 0  # the next observation is the next step's, except where an episode ended
    np.testing.assert_array_equal(obs[:, 1:][continuing], np.asarray(transitions.next_obs)[:, :-1][continuing])
    np.testing.assert_array_equal(obs[:, 1:, :, 1][done[:, :-1] > 0], 0.0)  # a fresh episode starts at t = 0
    assert metrics["episodes"].min() > 0

    # The device path (rollouts.rollout through EpisodeMetrics, train_iteration with its keys, vmapped over
    # runs as make_chunk runs several) on a replay of the host rollout: it recomputes the actions,
    # log-probabilities and episode statistics from the same keys and observations.
    replay = EpisodeMetrics(Replay())

    def device_run(run_state, recorded):
        fresh = replay.reset(recorded)
        fresh = fresh.replace(metrics=jax.tree.map(lambda zero: jnp.zeros(2, jnp.float32), fresh.metrics))
        return ppo_lag.train_iteration(learner._replace(env=replay, host_rollout=None),
                                       run_state.replace(env_state=fresh))

    device_state, device_metrics = jax.jit(jax.vmap(device_run))(state, transitions._replace(extras={}))
    np.testing.assert_array_equal(device_state.env_state.info["t"], 12)
    for name, value in device_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    for ours, theirs in zip(jax.tree.leaves(ppo_lag.network_params(host_state)),
                            jax.tree.leaves(ppo_lag.network_params(device_state))):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(host_state.key, device_state.key)


def test_a_real_task_with_a_twin_still_trains_on_it():
    config = ppo_lag.Config(task="SafetyBallRun-v0")
    assert not config.trains_on_host and config.train_task == envs.twin_of("SafetyBallRun-v0")
    assert ppo_lag.make_learner(config).host_rollout is None
    with pytest.raises(ConfigError, match="task"):
        ppo_lag.Config(task="NoSuchTask-v0")


def test_collect_on_safety_gymnasium_writes_a_dsrl_file(tmp_path):
    try:
        host.interpreter_for(host.host_task("SafetyPointButton1-v0"))
    except ConfigError as missing:
        pytest.skip(f"{missing} (the README's test command makes it)")
    from experiments.context import RunContext

    behaviour = dataclasses.replace(collect._quick_behaviour_config(), num_envs=1, unroll_length=8,
                                    total_env_steps=16, num_epochs=1, num_minibatches=1,
                                    actor_hidden_sizes=(8,), critic_hidden_sizes=(8,))
    config = collect.Config(task="SafetyPointButton1-v0", num_policies=1, snapshot_every=2, episodes_per_snapshot=1,
                            cost_limit_min=10.0, cost_limit_max=20.0, behaviour=behaviour)
    ctx = RunContext(tmp_path / "run", progress=False)
    summary = collect.run(config, ctx)
    ctx.close()
    # 1 chunk x 1 policy x 1 episode of 1000 steps, on Safety-Gymnasium's 76 observation dimensions.
    assert summary["episodes_collected"] == 1 and summary["transitions"] == summary["episodes_kept"] * 1000
    dataset = dsrl.load_dsrl(summary["dataset"])
    assert dataset.observations.shape[1:] == (76,) and dataset.actions.shape[1:] == (2,)
    assert float(np.asarray(dataset.timeouts).sum()) == summary["episodes_kept"]
    assert dataset.metadata.task == "SafetyPointButton1-v0"
    assert json.loads(dataset.metadata.collection)["behaviour"]["task"] == "SafetyPointButton1-v0"
    np.testing.assert_array_equal(dataset.next_observations[:999], dataset.observations[1:1000])
