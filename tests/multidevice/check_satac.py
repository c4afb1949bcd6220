"""SATAC on 8 faked devices matches one device.

Three SATAC updates (critics, alpha, actor, then the multiplier by projected ascent on the policy's
estimated cost value) with each minibatch split 8 ways and the learner state replicated, against the
same updates on one device. The cost estimate is a mean over the sharded batch, so GSPMD makes it the
global mean and every device moves lambda alike. (Runs split over devices, the runner's default
placement, are checked with PPO-Lag.)
"""

from __future__ import annotations

from tests.multidevice.harness import assert_trees_close, fake_devices

fake_devices()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from algorithms.control import offline, satac  # noqa: E402
from constrained_rl import lagrangian, parallel  # noqa: E402
from constrained_rl.data import dsrl  # noqa: E402

MULTIPLIER = lagrangian.MultiplierConfig(kind="projected_ascent", init=1.0, max=100.0, learning_rate=0.5)
CONFIG = satac.Config(hidden_sizes=(16, 16), batch_size=32, reference="behaviour", multiplier=MULTIPLIER,
                      actor_learning_rate=1e-3, cost_limits=(10.0,))
PROBLEM = offline.Problem(observation_size=4, action_size=2, episode_length=20)
RTOL, ATOL = 1e-4, 1e-5


def random_batch(key: jax.Array, size: int) -> dsrl.TransitionBatch:
    keys = jax.random.split(key, 5)
    obs = jax.random.normal(keys[0], (size, PROBLEM.observation_size))
    return dsrl.TransitionBatch(
        observations=obs,
        actions=jax.random.uniform(keys[1], (size, PROBLEM.action_size), minval=-0.9, maxval=0.9),
        rewards=jax.random.normal(keys[2], (size,)),
        costs=jax.random.bernoulli(keys[3], 0.3, (size,)).astype(jnp.float32),
        next_observations=obs + 0.1 * jax.random.normal(keys[4], obs.shape),
        terminals=jnp.zeros((size,)),
    )


def check_data_parallel_updates() -> None:
    learner = satac.make_learner(CONFIG, PROBLEM)
    update = jax.jit(lambda state, batch, key: satac.update(learner, state, batch, key))
    state = satac.init_state(learner, jax.random.PRNGKey(0), jnp.asarray(10.0))
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    batches = [random_batch(keys[i], CONFIG.batch_size) for i in range(3)]

    expected = state
    for batch, key in zip(batches, keys[3:]):
        expected, expected_metrics = update(expected, batch, key)
    moved = lagrangian.multiplier(expected.multiplier_state) - CONFIG.multiplier.init
    assert abs(float(moved)) > 1e-4, "the multiplier did not move"

    mesh = parallel.make_mesh()
    sharded = parallel.replicate(state, mesh)
    for batch, key in zip(batches, keys[3:]):
        placed = parallel.shard_batch(batch, mesh)
        assert {s.data.shape[0] for s in placed.rewards.addressable_shards} == {CONFIG.batch_size // 8}
        sharded, metrics = update(sharded, placed, key)
    assert sharded.multiplier_state.multiplier.sharding.is_fully_replicated
    assert_trees_close("satac_state", sharded, expected, rtol=RTOL, atol=ATOL)
    assert_trees_close("satac_metrics", metrics, expected_metrics, rtol=RTOL, atol=ATOL)


def main() -> None:
    assert jax.device_count() == 8
    check_data_parallel_updates()


if __name__ == "__main__":
    main()
