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


def test_regression_loss_is_osrl_s_mse():
    """OSRL's BC loss ``F.mse_loss(tanh(f(s)), a)``: the mean over the batch and the action dimensions,
    checked against PyTorch's on the same numbers."""
    torch = pytest.importorskip("torch")
    actor = bc.cloning.deterministic_actor(2, (4,))
    params = mlp.init_actor(actor, jax.random.PRNGKey(0), 3)
    observations = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)
    actions = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, size=(5, 2)), jnp.float32)
    pre_tanh = actor.apply(params, observations)
    predicted = bc.cloning.deterministic_action(actor, params, observations)
    np.testing.assert_allclose(predicted, np.tanh(pre_tanh), rtol=1e-6)
    expected = torch.nn.functional.mse_loss(torch.tanh(torch.tensor(np.asarray(pre_tanh))), torch.tensor(np.asarray(actions)))
    np.testing.assert_allclose(bc.cloning.regression_loss(predicted, actions), expected.item(), rtol=1e-6)
    np.testing.assert_allclose(bc.cloning.regression_loss(jnp.array([[0.5, -1.0]]), jnp.array([[0.0, 1.0]])),
                               (0.25 + 4.0) / 2, rtol=1e-6)
    assert bc.Config().loss == "mse" and bc.SafeConfig().loss == "mse"
    with pytest.raises(ConfigError, match="loss"):
        bc.Config(loss="huber")


def test_bc_safe_clones_the_safe_episodes_of_each_limit(tmp_path):
    # Limit 5 keeps only the cost-free episodes; limit 20 keeps all of them (BC-All's data). Both
    # limits and two seeds train in one vmapped call. OSRL's regression fits the data's mean action.
    config = bc.SafeConfig(cost_limits=(5.0, 20.0), num_seeds=2, hidden_sizes=(32,), batch_size=64,
                           num_updates=300, updates_per_chunk=300, eval_every=0)
    dataset = two_behaviour_dataset()
    session = offline.make_session(config, dataset, bc.make_algorithm)
    state = offline.train(config, RunContext(tmp_path, progress=False), session)
    modes = jax.vmap(lambda learner: jnp.mean(session.algorithm.policy(learner, dataset.observations, None)[0],
                                              axis=0))(state.learner)
    np.testing.assert_allclose(modes[:2], np.broadcast_to(SAFE_ACTION, (2, 2)), atol=0.1)  # limit 5
    np.testing.assert_allclose(modes[2:], 0.0, atol=0.15)  # limit 20: the mean of the two behaviours


def test_likelihood_bc_is_satac_s_reference_step():
    """``loss = likelihood``: the tanh-Gaussian actor, stepped by the maximum-likelihood step SATAC's
    BC-Safe reference takes, acting with ``tanh(mean)``."""
    problem = offline.Problem(observation_size=5, action_size=2, episode_length=EPISODE_LENGTH)
    algorithm = bc.make_algorithm(bc.Config(loss="likelihood", hidden_sizes=(8,)), problem)
    state = algorithm.init(jax.random.PRNGKey(0), jnp.float32(5.0))
    batch = dsrl.take_transitions(two_behaviour_dataset(4), jnp.arange(16))
    stepped, metrics = jax.jit(algorithm.phases[0].update)(state, batch, None)
    actor = mlp.state_dependent_actor(2, (8,))
    np.testing.assert_allclose(metrics["log_likelihood"], jnp.mean(
        mlp.actor_log_likelihood(actor, state.actor.params, batch.observations, batch.actions)), rtol=1e-5)
    mean, _ = actor.apply(stepped.actor.params, batch.observations)
    np.testing.assert_allclose(algorithm.policy(stepped, batch.observations, None)[0], jnp.tanh(mean), rtol=1e-6)
