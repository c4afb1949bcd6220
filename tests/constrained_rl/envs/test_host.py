"""The host runner: exact episode counts, seeding independent of the worker count, layout refusal."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from constrained_rl import envs
from constrained_rl.config import ConfigError
from constrained_rl.envs import host
from constrained_rl.envs import layout as layouts

pytest.importorskip("gymnasium")

TOY = "ToyWalk-v0"
TOY_LAYOUT = layouts.Layout("toy", (layouts.ObservationDimension("x", "m"), layouts.ObservationDimension("t", "1")),
                            (layouts.ActionDimension("move", "2 m", -2.0, 2.0),))


@pytest.fixture(scope="module")
def toy_task():
    """Registers the toy (tests/.../toy_host_env.py) as a host task; its workers import it from PYTHONPATH.
    Its pools are shared by the module's tests and closed at the end."""
    patch = pytest.MonkeyPatch()
    patch.setenv("PYTHONPATH", str(Path(__file__).parent))
    patch.setitem(host.HOST_TASKS, TOY, host.HostTask(TOY, "toy_host_env", 8))
    patch.setitem(layouts.LAYOUTS, TOY, TOY_LAYOUT)
    yield TOY
    for key in [k for k in host._POOLS if k[0] == TOY]:
        host._POOLS.pop(key).close()
    patch.undo()


def constant(params, obs, key):
    return jnp.full((1,), params), {}


def noisy(params, obs, key):
    return jnp.tanh(params[:1] + 0.1 * obs[:1] + 0.5 * jax.random.normal(key, (1,))), {}


def test_exact_episode_counts_with_termination(toy_task):
    # Unit action 1 moves x by 2 from x0 in 0..9: terminates at x >= 15 or truncates after 8 steps.
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    stats = host.evaluate_runs(toy_task, constant, jnp.ones(3), keys, 5, policy_layout=TOY_LAYOUT, num_workers=2)
    assert stats.length.shape == (3, 5)
    seeds = host.plan_episodes(keys, 5).seeds
    starts = np.array([np.random.RandomState(s).randint(10) for s in seeds], float)  # what the worker drew
    expected_length = np.minimum(8, np.ceil((15 - starts) / 2))
    np.testing.assert_array_equal(stats.length.reshape(-1), expected_length)
    xs = [starts[e] + 2 * np.arange(1, expected_length[e] + 1) for e in range(15)]
    np.testing.assert_allclose(stats.reward_return.reshape(-1), [x.sum() for x in xs])
    np.testing.assert_allclose(stats.cost_return.reshape(-1), [(x > 12).sum() for x in xs])


def test_episodes_do_not_depend_on_the_worker_count(toy_task):
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    params = jnp.array([[0.2], [0.9]])
    played = [host.evaluate_runs(toy_task, noisy, params, keys, 3, policy_layout=TOY_LAYOUT, num_workers=w)
              for w in (1, 2)]
    rewards, costs, lengths, _ = host.play(host.shared_pool(toy_task, 1), noisy, params, host.plan_episodes(keys, 3),
                                           wave_size=4)  # two waves, the second of two
    for stats in played[1:]:
        np.testing.assert_array_equal(stats.reward_return, played[0].reward_return)
    np.testing.assert_array_equal(rewards, played[0].reward_return.reshape(-1))
    # and they do depend on the key
    other = host.evaluate_runs(toy_task, noisy, params, jax.random.split(jax.random.PRNGKey(4), 2), 3,
                               policy_layout=TOY_LAYOUT, num_workers=2)
    assert not np.array_equal(other.reward_return, played[0].reward_return)


def test_recorded_transitions_are_dsrl_rows(toy_task):
    episodes = host.plan_episodes(jax.random.PRNGKey(1)[None], 3)
    rewards, _, lengths, recorded = host.play(host.shared_pool(toy_task, 2), constant, jnp.ones(1), episodes,
                                              record=True)
    for episode, reward, length in zip(recorded, rewards, lengths):
        assert episode["observations"].shape == (length, 2) and episode["actions"].shape == (length, 1)
        np.testing.assert_allclose(episode["rewards"].sum(), reward)
        np.testing.assert_array_equal(episode["next_observations"][:-1], episode["observations"][1:])
        done = episode["terminals"] | episode["timeouts"]
        assert done[-1] and not done[:-1].any()


def test_refusals(toy_task):
    keys = jax.random.split(jax.random.PRNGKey(0), 1)
    project = envs.make("BallCircle").layout
    with pytest.raises(ConfigError, match="not trained for SafetyBallCircle-v0: observation dimension 4"):
        host.evaluate_runs("SafetyBallCircle-v0", constant, jnp.ones(1), keys, 1, policy_layout=project)
    with pytest.raises(ConfigError, match="records no observation/action layout"):
        host.evaluate_runs(toy_task, constant, jnp.ones(1), keys, 1, policy_layout=None)
    with pytest.raises(ConfigError, match="unknown host task 'SafetyBallCircle-v9'; known: SafetyBallCircle-v0"):
        host.host_task("SafetyBallCircle-v9")


def test_bullet_episode_seeded_whatever_the_worker_count():
    pytest.importorskip("bullet_safety_gym")
    task = "SafetyBallRun-v0"
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    declared = layouts.LAYOUTS[task]

    def policy(params, obs, key):  # elementwise only: no batch-size-dependent arithmetic
        return jnp.tanh(params + obs[:2] + jax.random.normal(key, (2,))), {}

    one = host.evaluate_runs(task, policy, jnp.ones((2, 2)), keys, 2, policy_layout=declared, num_workers=1)
    two = host.evaluate_runs(task, policy, jnp.ones((2, 2)), keys, 2, policy_layout=declared, num_workers=2)
    np.testing.assert_array_equal(one.reward_return, two.reward_return)
    np.testing.assert_array_equal(one.length, np.full((2, 2), 100))
    assert len(set(one.reward_return.reshape(-1).tolist())) == 4  # distinct starts and noise
