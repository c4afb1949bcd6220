from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.control import bcq_lag, offline, osrl
from constrained_rl import lagrangian
from constrained_rl.config import ConfigError
from constrained_rl.data import dsrl
from constrained_rl.models import vae

pytestmark = pytest.mark.quick_compile  # tiny learners, a few updates: mostly compiling

# --------------------------------------------------------------------------------------------------
# A one-step constrained bandit shared by the OSRL-baseline tests: every transition is terminal, the
# behaviour acts uniformly in [-1, 1], reward r = a and cost c = 3 (a + 1). With T = 1 the per-step
# threshold is the cost limit itself: a loose limit (10) never binds, a tight one (1.5) needs a < -0.5.

PROBLEM = offline.Problem(observation_size=2, action_size=1, episode_length=1)
LOOSE, TIGHT = 10.0, 1.5


def bandit_dataset(num_rows: int = 512, seed: int = 0) -> dsrl.OfflineDataset:
    rng = np.random.default_rng(seed)
    observations = rng.uniform(-1, 1, (num_rows, 2)).astype(np.float32)
    actions = rng.uniform(-1, 1, (num_rows, 1)).astype(np.float32)
    return dsrl.offline_dataset_from_arrays({
        "observations": observations,
        "next_observations": observations,
        "actions": actions,
        "rewards": actions[:, 0],
        "costs": 3.0 * (actions[:, 0] + 1.0),
        "terminals": np.ones(num_rows, bool),
        "timeouts": np.zeros(num_rows, bool),
    })


@functools.lru_cache(maxsize=None)
def chunk_of(update, num_updates: int):
    # One jitted chunk per learner: batches of one and of several runs then share its cache.
    return offline.make_chunk(update, 64, num_updates)


def train_runs(algorithm: offline.Algorithm, dataset: dsrl.OfflineDataset, cost_limits: tuple[float, ...],
               num_updates: int):
    """Trains one run per cost limit (seed 0 each) in one vmapped chunk; returns (state, metrics)."""
    layout = offline.run_layout(cost_limits, 1)
    state = offline.init_runs(algorithm, offline.seed_keys(0, layout.seed_indices), jnp.asarray(layout.cost_limits))
    chunk = chunk_of(algorithm.phases[0].update, num_updates)
    return chunk(state, offline.row_sets(dataset, "all", layout), dataset)


def assert_runs_match_alone(algorithm: offline.Algorithm, dataset: dsrl.OfflineDataset, batched_state,
                            cost_limits: tuple[float, ...], num_updates: int) -> None:
    """Each run of a vmapped batch ends where it ends when trained alone.

    Batched and unbatched float32 kernels round differently, and hundreds of updates amplify that
    to ~1e-3; mixing up two runs' keys, limits or data differs at the scale of the weights (~0.1).
    """
    for run, limit in enumerate(cost_limits):
        alone, _ = train_runs(algorithm, dataset, (limit,), num_updates)
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[run], batched_state),
                                    jax.tree.map(lambda x: x[0], alone), rtol=1e-2, atol=1e-2)


def tiny(config_cls, **overrides):
    sizes = dict(actor_hidden_sizes=(16, 16), critic_hidden_sizes=(16, 16))
    return config_cls(**{**sizes, "num_updates": 10, "updates_per_chunk": 10, **overrides})


# --------------------------------------------------------------------------------------------------
# Losses by hand


class LossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_bcq_target_mixes_min_and_max_then_maximises_over_candidates(self):
        # Two heads, two states, three candidates each.
        next_q = jnp.array([[[1.0, 4.0, 2.0], [0.0, -1.0, 3.0]],
                            [[3.0, 0.0, 2.0], [2.0, 1.0, -3.0]]])
        # 0.75 min + 0.25 max per candidate: [1.5, 1.0, 2.0] and [0.5, -0.5, -1.5]; then the max.
        value = self.variant(osrl.bcq_target_value)(next_q, 0.75)
        np.testing.assert_allclose(value, [2.0, 0.5], rtol=1e-6)
        # m = 1 is TD3's clipped double Q.
        np.testing.assert_allclose(self.variant(osrl.bcq_target_value)(next_q, 1.0), [2.0, 0.0], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_lagrangian_actor_loss(self):
        q_reward, q_cost = jnp.array([1.0, 3.0]), jnp.array([0.5, 2.5])
        loss = self.variant(bcq_lag.lagrangian_actor_loss)(q_reward, q_cost, 2.0, 1.0)
        np.testing.assert_allclose(loss, -2.0 + 2.0 * 0.5, rtol=1e-6)

    def test_actor_loss_does_not_move_the_multiplier(self):
        grad = jax.grad(bcq_lag.lagrangian_actor_loss, argnums=(1, 2))(
            jnp.array([1.0, 3.0]), jnp.array([0.5, 2.5]), 2.0, 1.0)
        np.testing.assert_allclose(grad[0], [1.0, 1.0])  # lambda / B per sample
        assert float(grad[1]) == 0.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_vae_kl_and_loss(self):
        mean, log_std = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, jnp.log(2.0)]])
        # Per dimension -0.5 (1 + 2 log s - m^2 - s^2): 0.5 and 1.5 - log 2; averaged.
        expected_kl = (0.5 + 1.5 - np.log(2.0)) / 2
        np.testing.assert_allclose(self.variant(vae.kl_to_standard_normal)(mean, log_std), [expected_kl], rtol=1e-5)
        output = vae.VAEOutput(jnp.array([[0.5, 0.0]]), mean, log_std)
        loss = self.variant(vae.vae_loss, static_argnums=2)(output, jnp.array([[0.0, 1.0]]), 0.5)
        np.testing.assert_allclose(loss, (0.25 + 1.0) / 2 + 0.5 * expected_kl, rtol=1e-5)

    def test_clipped_prior_latents_stay_in_half_unit_box(self):
        latents = vae.clipped_prior_latents(jax.random.PRNGKey(0), (1000, 3))
        assert float(jnp.max(jnp.abs(latents))) == 0.5


def test_pid_multiplier_rises_while_cost_value_exceeds_threshold():
    rule = lagrangian.make_rule(bcq_lag.Config().multiplier)
    state = rule.init()
    lambdas = []
    for _ in range(5):
        state = rule.update(state, 2.0, 1.0)
        lambdas.append(float(state.multiplier))
    # First step by hand: kp * 1 + ki * 1 + kd * (2 - 0) (OSRL's gains, no smoothing).
    np.testing.assert_allclose(lambdas[0], 0.1 + 0.003 + 0.002, rtol=1e-5)
    assert all(b > a for a, b in zip(lambdas, lambdas[1:]))
    state = rule.init()
    for _ in range(5):
        state = rule.update(state, 0.5, 1.0)
    assert float(state.multiplier) == 0.0


def test_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="max_perturbation"):
        bcq_lag.Config(max_perturbation=0.0)
    with pytest.raises(ConfigError, match="target_mix"):
        bcq_lag.Config(target_mix=1.5)
    with pytest.raises(ConfigError, match="vae_hidden_sizes"):
        bcq_lag.Config(vae_hidden_sizes=())


# --------------------------------------------------------------------------------------------------
# Learning


NUM_UPDATES = 300


@pytest.fixture(scope="module")
def trained():
    config = tiny(bcq_lag.Config, vae_hidden_sizes=(16, 16), max_perturbation=0.2)
    algorithm = bcq_lag.make_algorithm(config, PROBLEM)
    dataset = bandit_dataset()
    state, metrics = train_runs(algorithm, dataset, (LOOSE, TIGHT), NUM_UPDATES)
    return config, algorithm, dataset, state, metrics


def test_perturbation_follows_reward_when_loose_and_cost_when_tight(trained):
    config, _, dataset, state, metrics = trained
    networks = bcq_lag.make_networks(config, PROBLEM)
    observations = dataset.observations[:256]

    def mean_perturbation(run: int) -> float:
        learner = jax.tree.map(lambda x: x[run], state.learner)
        candidates = bcq_lag.decode_candidates(networks, learner.vae.params, observations, jax.random.PRNGKey(3))
        actions = networks.actor.apply({"params": learner.actor.params}, observations, candidates)
        return float(jnp.mean(actions - candidates))

    # Loose: lambda stays 0 and the actor pushes towards reward (+Phi); tight: the PID multiplier
    # rises (Q_c ~ 3 > 1.5) until cost outweighs reward and the actor pushes the other way.
    multiplier = np.asarray(metrics["multiplier"])
    assert multiplier[0, -1] == 0.0
    assert multiplier[1, -1] > 0.5
    assert mean_perturbation(0) > 0.5 * config.max_perturbation
    assert mean_perturbation(1) < -0.5 * config.max_perturbation


def test_critics_and_vae_learn(trained):
    *_, metrics = trained
    # Uniform behaviour actions leave the VAE an irreducible reconstruction error: a smaller drop.
    for name, ratio in (("critic_loss", 0.3), ("cost_critic_loss", 0.3), ("vae_loss", 0.8)):
        losses = np.asarray(metrics[name])
        assert losses[:, -20:].mean() < ratio * losses[:, :20].mean(), name


def test_vmapped_runs_match_runs_alone(trained):
    _, algorithm, dataset, state, _ = trained
    assert_runs_match_alone(algorithm, dataset, state, (LOOSE, TIGHT), NUM_UPDATES)
