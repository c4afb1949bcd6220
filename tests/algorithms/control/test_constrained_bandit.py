"""Tests for the constrained bandit: table structure, the rectified gradient, and the finding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.control import constrained_bandit as cb
from constrained_rl.config import ConfigError

SMALL = dict(num_contexts=16, num_steps=600, steps_per_chunk=100)


def final_figures(config: cb.Config, learner: str) -> dict[str, float]:
    init_state, chunk = cb.make_learner(config, learner)
    state = init_state()
    for _ in range(config.num_steps // config.steps_per_chunk):
        state, _ = chunk(state)
    figures = cb.evaluate(state, cb.make_bandit(config), config)
    return {name: float(value) for name, value in jax.device_get(figures).items()}


@pytest.fixture(scope="module")
def results():
    config = cb.Config(**SMALL)
    return config, {learner: final_figures(config, learner) for learner in cb.LEARNERS}


def test_tables_have_the_interference_structure():
    config = cb.Config(num_contexts=8, num_actions=5, hard_fraction=0.25)
    bandit = cb.make_bandit(config)
    rewards, costs, hard = map(np.asarray, bandit)
    assert hard.tolist() == [True, True] + [False] * 6
    np.testing.assert_array_equal(costs[:, 0], 0.0)  # refusal is always safe...
    np.testing.assert_allclose(rewards[:, 0], config.refusal_reward)  # ...and poorly rewarded
    assert (costs[hard, 1:] >= 0.5).all()  # hard: no safe answer
    easy = ~hard
    assert ((costs[easy, 1:] > 0).sum(axis=1) == 1).all()  # easy: exactly one unsafe answer...
    best = rewards[easy, 1:].argmax(axis=1)
    assert (costs[easy, 1:][np.arange(easy.sum()), best] >= 0.5).all()  # ...the best one
    np.testing.assert_array_equal(np.asarray(cb.make_bandit(config).rewards), rewards)


def test_rectified_cost_gradient_reaches_only_violating_contexts():
    config = cb.Config(num_contexts=2, num_actions=3, hard_fraction=0.5, entropy_coef=0.0)
    bandit = cb.Bandit(
        rewards=jnp.array([[0.1, 0.9, 0.5], [0.1, 0.9, 0.5]]),
        costs=jnp.array([[0.0, 1.0, 0.0], [0.0, 0.05, 0.0]]),
        hard=jnp.array([True, False]),
    )
    logits = jnp.zeros((2, 3))  # uniform: C_0 = 1/3 > 0.1 violates, C_1 = 1/60 does not
    reward_only = jax.grad(cb.exact_loss)(logits, 0.0, bandit, config, "rectified")
    rectified = jax.grad(cb.exact_loss)(logits, 2.0, bandit, config, "rectified")
    average = jax.grad(cb.exact_loss)(logits, 2.0, bandit, config, "average")
    np.testing.assert_allclose(rectified[1], reward_only[1], atol=1e-7)  # safe context untouched
    # Violating context: d/dtheta of (lambda / G) * C_0 = (lambda / G) * pi * (c - C_0).
    expected = reward_only[0] + (2.0 / 2) * (1 / 3) * (jnp.array([0.0, 1.0, 0.0]) - 1 / 3)
    np.testing.assert_allclose(rectified[0], expected, atol=1e-6)
    assert not np.allclose(average[1], reward_only[1])  # the average penalty reaches both


def test_sampled_gradient_is_unbiased_for_the_average_learner():
    config = cb.Config(num_contexts=3, num_actions=4, samples_per_context=4, entropy_coef=0.0)
    bandit = cb.make_bandit(config)
    logits = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
    exact = jax.grad(cb.exact_loss)(logits, 1.5, bandit, config, "average")

    def sampled(key):
        return jax.grad(cb.sampled_loss, has_aux=True)(logits, 1.5, bandit, config, "average", key)[0]

    estimates = jax.jit(jax.vmap(sampled))(jax.random.split(jax.random.PRNGKey(2), 8000))
    np.testing.assert_allclose(estimates.mean(axis=0), exact, atol=6e-3)


def test_average_learner_meets_the_average_limit_but_leaves_contexts_unsafe(results):
    config, figures = results
    assert figures["average"]["cost"] <= config.cost_limit + 0.01
    assert figures["average"]["violating_fraction"] >= 0.1  # the hard contexts stay unsafe


def test_rectified_learner_leaves_no_context_unsafe(results):
    config, figures = results
    assert figures["rectified"]["violating_fraction"] <= 0.02
    assert figures["rectified"]["violating_fraction"] < figures["average"]["violating_fraction"]
    # It still answers: refusing everything (reward 0.1) would also be safe.
    assert figures["rectified"]["reward"] > 0.4


def test_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="cost_limit"):
        cb.Config(cost_limit=-0.1)
    with pytest.raises(ConfigError, match="num_steps"):
        cb.Config(num_steps=150, steps_per_chunk=100)
