"""PPO-Lagrangian on 8 faked devices matches one device.

The seed-batched train state goes on a 2 x 4 mesh: the 2 runs split over ``"runs"`` and each run's
8 environments over ``"data"`` (2 per device), parameters replicated. The unchanged jitted chunk
(rollout, GAE, multiplier update on the mean completed-episode cost, minibatch Adam steps) then runs
partitioned by GSPMD; two iterations must give the single-device parameters, multipliers and metrics
up to float reassociation in the cross-device sums.
"""

from __future__ import annotations

import dataclasses

from tests.multidevice.harness import assert_placed_on, assert_trees_close, fake_devices

fake_devices()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from algorithms.control.ppo_lag import train as ppo_lag  # noqa: E402
from constrained_rl import lagrangian, parallel  # noqa: E402
from constrained_rl.envs.navigation import make_navigation  # noqa: E402

CONFIG = ppo_lag.Config(task="BallCircle", num_seeds=2, num_envs=8, unroll_length=16, num_epochs=2,
                        num_minibatches=2, actor_hidden_sizes=(16,), critic_hidden_sizes=(16,),
                        total_env_steps=8 * 16 * 2, cost_limit=0.5,
                        multiplier=dataclasses.replace(ppo_lag.MULTIPLIER, init=1.0, learning_rate=0.05))
# Tolerances: 2 iterations x 4 Adam steps; only the order of float additions differs.
RTOL, ATOL = 1e-4, 1e-5


def place(state: ppo_lag.PPOLagState, mesh: jax.sharding.Mesh) -> ppo_lag.PPOLagState:
    """Runs over "runs", environments over "data": what a ``ctx.loop(placement=...)`` would do."""
    placed = parallel.shard_runs(state, mesh, axis_name="runs")
    return placed.replace(env_state=parallel.shard_dims(state.env_state, mesh, {0: "runs", 1: "data"}))


def main() -> None:
    assert jax.device_count() == 8
    # Episodes of 8 steps: every iteration completes episodes, so the multiplier moves.
    learner = ppo_lag.make_learner(CONFIG, make_navigation("BallCircle", episode_length=8))
    chunk = ppo_lag.make_chunk(learner, 2)
    state = ppo_lag.init_runs(learner)
    expected_state, expected_metrics = chunk(state)

    mesh = parallel.make_mesh(("runs", "data"), (2, 4))
    placed = place(state, mesh)
    assert_placed_on("ppo_lag_state", placed, 8)
    obs = placed.env_state.obs
    assert {s.data.shape[:2] for s in obs.addressable_shards} == {(1, 2)}, obs.sharding
    sharded_state, sharded_metrics = chunk(placed)

    assert float(jnp.sum(expected_metrics["episodes"])) > 0, "no episode completed: the multiplier never moved"
    moved = lagrangian.multiplier(expected_state.multiplier_state) - CONFIG.multiplier.init
    assert float(jnp.min(jnp.abs(moved))) > 1e-3, "the multiplier did not move"
    assert_trees_close("ppo_lag_params", ppo_lag.network_params(sharded_state), ppo_lag.network_params(expected_state),
                       rtol=RTOL, atol=ATOL)
    assert_trees_close("ppo_lag_multiplier", sharded_state.multiplier_state, expected_state.multiplier_state,
                       rtol=RTOL, atol=ATOL)
    assert_trees_close("ppo_lag_env_state", sharded_state.env_state, expected_state.env_state,
                       rtol=RTOL, atol=ATOL)
    assert_trees_close("ppo_lag_metrics", sharded_metrics, expected_metrics, rtol=RTOL, atol=ATOL)


if __name__ == "__main__":
    main()
