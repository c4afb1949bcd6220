from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.control import bc, offline
from constrained_rl.config import ConfigError
from constrained_rl.data import dsrl
from constrained_rl.models import mlp
from experiments import registry
from experiments.context import RunContext

SAFE_ACTION = np.array([0.5, -0.3], np.float32)  # what the cost-free episodes do
UNSAFE_ACTION = np.array([-0.5, 0.3], np.float32)  # what the costly episodes do
EPISODE_LENGTH = 10


def two_behaviour_dataset(num_episodes: int = 40) -> dsrl.OfflineDataset:
    """Alternating episodes: cost-free ones acting near SAFE_ACTION, ones of cost return 10 acting
    near UNSAFE_ACTION; the state says nothing about which."""
    rng = np.random.default_rng(0)
    size = num_episodes * EPISODE_LENGTH
    unsafe = (np.arange(size) // EPISODE_LENGTH) % 2 == 1
    actions = np.where(unsafe[:, None], UNSAFE_ACTION, SAFE_ACTION) + 0.05 * rng.normal(size=(size, 2))
    timeouts = (np.arange(size) % EPISODE_LENGTH) == EPISODE_LENGTH - 1
    return dsrl.offline_dataset_from_arrays({
        "observations": rng.normal(size=(size, 5)).astype(np.float32),
        "next_observations": rng.normal(size=(size, 5)).astype(np.float32),
        "actions": actions.astype(np.float32), "rewards": np.zeros(size, np.float32),
        "costs": unsafe.astype(np.float32), "terminals": np.zeros(size, bool), "timeouts": timeouts,
    })


def test_log_likelihood_by_hand():
    # Zero weights and a chosen output bias make the actor output (mean, log_std) = (m, l) everywhere.
    actor = mlp.state_dependent_actor(1, (4,))
    params = mlp.init_actor(actor, jax.random.PRNGKey(0), 3)
    params = jax.tree.map(jnp.zeros_like, params)
    params["params"]["MLP_0"]["Dense_1"]["bias"] = jnp.array([0.2, -0.5])
    action = 0.6
    u, sigma = math.atanh(action), math.exp(-0.5)
    expected = (-0.5 * ((u - 0.2) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
                - math.log(1 - action ** 2))
    value = mlp.actor_log_likelihood(actor, params, jnp.ones((2, 3)), jnp.full((2, 1), action))
    np.testing.assert_allclose(value, [expected, expected], rtol=1e-5)


def test_bc_safe_config_and_registry():
    assert registry.load("bc_safe").config_cls().data == "safe"
    assert registry.load("bc_all").config_cls().data == "all"
    with pytest.raises(ConfigError, match="learning_rate"):
        bc.Config(learning_rate=0.0)


def test_bc_safe_clones_the_safe_episodes_of_each_limit(tmp_path):
    # Limit 5 keeps only the cost-free episodes; limit 20 keeps all of them (BC-All's data). Both
    # limits and two seeds train in one vmapped call.
    config = bc.SafeConfig(cost_limits=(5.0, 20.0), num_seeds=2, hidden_sizes=(32,), batch_size=64,
                           num_updates=300, updates_per_chunk=300, eval_every=0)
    dataset = two_behaviour_dataset()
    session = offline.make_session(config, dataset, bc.make_algorithm)
    initial = offline.init_runs(session.algorithm, offline.seed_keys(0, session.layout.seed_indices),
                                session.layout.cost_limits)
    state = offline.train(config, RunContext(tmp_path, progress=False), session)

    safe_rows = np.flatnonzero(np.asarray(dataset.costs) == 0)
    observations, actions = dataset.observations[safe_rows], dataset.actions[safe_rows]
    actor = session.algorithm.policy

    def mean_log_likelihood(learner):
        return jax.vmap(lambda p: jnp.mean(mlp.actor_log_likelihood(mlp.state_dependent_actor(2, (32,)), p, observations, actions)))(
            learner.actor.params)

    before, after = mean_log_likelihood(initial.learner), mean_log_likelihood(state.learner)
    assert np.all(after[:2] > before[:2] + 3.0), (before, after)  # limit 5: the safe data alone
    assert np.all(after[2:] > before[2:] + 0.5), (before, after)  # limit 20: a mixture fits it less
    modes = jax.vmap(lambda learner: jnp.mean(actor(learner, dataset.observations, None)[0], axis=0))(state.learner)
    np.testing.assert_allclose(modes[:2], np.broadcast_to(SAFE_ACTION, (2, 2)), atol=0.1)  # limit 5
    np.testing.assert_allclose(modes[2:], 0.0, atol=0.2)  # limit 20: between the two behaviours
    assert np.all(after[:2] > after[2:])  # the safe-only clone fits the safe data best
