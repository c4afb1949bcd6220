from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from constrained_rl.config import ConfigError
from constrained_rl.envs.wrappers import wrap
from constrained_rl.rollouts import HistoryPolicy, evaluate_episodes, evaluate_history_episodes, rollout
from tests.constrained_rl.envs.toy_env import CountingEnv


def constant_policy(params, obs, key):
    """Action = params everywhere; extras carry a per-step value to check they are stored."""
    action = jnp.broadcast_to(params, obs.shape[:-1] + (1,))
    return action, {"log_prob": jnp.sum(obs, axis=-1)}


class RolloutTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shapes_and_values_with_auto_reset(self):
        env = wrap(CountingEnv(episode_length=3, terminate_at=5), batch_size=2)
        state = env.reset(jax.random.PRNGKey(0))
        run = self.variant(rollout, static_argnums=(0, 1, 5))
        final, batch = run(env, constant_policy, jnp.array(0.5), jax.random.PRNGKey(1), state, 7)
        chex.assert_shape([batch.obs, batch.next_obs], (7, 2, 2))
        chex.assert_shape([batch.action], (7, 2, 1))
        chex.assert_shape([batch.reward, batch.cost, batch.termination, batch.truncation, batch.extras["log_prob"]], (7, 2))
        # t runs 1, 2, 3 | 1, 2, 3 | 1: reward t + 0.5; truncated at the 3rd and 6th step, never terminated.
        np.testing.assert_allclose(batch.reward[:, 0], [1.5, 2.5, 3.5, 1.5, 2.5, 3.5, 1.5])
        np.testing.assert_allclose(batch.truncation[:, 0], [0, 0, 1, 0, 0, 1, 0])
        np.testing.assert_allclose(batch.termination, 0.0)
        np.testing.assert_allclose(batch.cost[:, 1], [0, 1, 0, 0, 1, 0, 0])
        # next_obs keeps the true final observation; obs of the following step is the reset one.
        np.testing.assert_allclose(batch.next_obs[2, :, 1], 3.0)
        np.testing.assert_allclose(batch.obs[3, :, 1], 0.0)
        np.testing.assert_allclose(batch.next_obs[:2], batch.obs[1:3])
        np.testing.assert_allclose(batch.extras["log_prob"], batch.obs.sum(-1))
        np.testing.assert_allclose(final.obs, batch.next_obs[-1])

    def test_termination_sets_discount_zero(self):
        env = wrap(CountingEnv(episode_length=10, terminate_at=2))
        state = env.reset(jax.random.PRNGKey(0))
        _, batch = jax.jit(rollout, static_argnums=(0, 1, 5))(env, constant_policy, jnp.array(0.0), jax.random.PRNGKey(1), state, 4)
        np.testing.assert_allclose(batch.termination, [0, 1, 0, 1])
        np.testing.assert_allclose(batch.discount, [1, 0, 1, 0])
        np.testing.assert_allclose(batch.done, [0, 1, 0, 1])
        np.testing.assert_allclose(batch.truncation, 0.0)


class EvaluateTest(chex.TestCase):
    def test_returns_by_hand_with_early_termination(self):
        # Terminates at t = 3 within a limit of 5: return 1 + 2 + 3 (+ 3 * 0.25), cost 1 (t = 2), length 3.
        for auto_reset in (False, True):
            env = wrap(CountingEnv(episode_length=5, terminate_at=3), auto_reset=auto_reset)
            stats = evaluate_episodes(env, constant_policy, jnp.array(0.25), jax.random.PRNGKey(0), 4)
            np.testing.assert_allclose(stats.reward_return, 6.75)
            np.testing.assert_allclose(stats.cost_return, 1.0)
            np.testing.assert_allclose(stats.length, 3.0)

    def test_time_limit(self):
        env = wrap(CountingEnv(episode_length=4), auto_reset=False)
        stats = evaluate_episodes(env, constant_policy, jnp.array(0.0), jax.random.PRNGKey(0), 3)
        chex.assert_shape(stats.reward_return, (3,))
        np.testing.assert_allclose(stats.reward_return, 10.0)
        np.testing.assert_allclose(stats.cost_return, 2.0)
        np.testing.assert_allclose(stats.length, 4.0)

    def test_batched_env_refused(self):
        env = wrap(CountingEnv(), batch_size=2)
        with pytest.raises(ConfigError, match="env"):
            evaluate_episodes(env, constant_policy, jnp.array(0.0), jax.random.PRNGKey(0), 2)


def test_a_history_policy_plays_the_same_episodes_as_its_memoryless_twin():
    # A random policy acting on its memory, which is the latest observation: the same keys give the same
    # episodes as evaluate_episodes, early termination masked alike.
    env = wrap(CountingEnv(episode_length=6, terminate_at=4), auto_reset=False)

    def random_policy(params, obs, key):
        return params * jax.random.uniform(key, obs.shape[:-1] + (1,)), {}

    def act(params, memory, key):
        return random_policy(params, memory, key)[0], memory

    history = HistoryPolicy(start=lambda params, obs: obs, act=act,
                            remember=lambda params, memory, step: step.next_obs)
    memoryless = evaluate_episodes(env, random_policy, jnp.array(2.0), jax.random.PRNGKey(3), 5)
    remembered = evaluate_history_episodes(env, history, jnp.array(2.0), jax.random.PRNGKey(3), 5)
    chex.assert_trees_all_equal(remembered, memoryless)
    assert np.all(np.asarray(memoryless.length) == 4.0)
