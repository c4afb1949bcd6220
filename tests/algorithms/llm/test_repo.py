"""RePO on the shared LM-PPO machinery: the rectified gradient, a step by hand, baselines, and learning."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.llm import repo, rlhf_ppo, safe_rlhf
from constrained_rl import lagrangian, objectives
from constrained_rl.config import ConfigError
from constrained_rl.data import synthetic_safety
from constrained_rl.data.preference import tokenize_prompts
from constrained_rl.models import llama

pytestmark = pytest.mark.quick_compile  # tiny models trained a few steps: compiling is most of the time

# Four responses, two per prompt (K = 2), two tokens each. Prompt costs: mean(-1, 0.5) = -0.25 <= 0 (safe),
# mean(1, 0.2) = 0.6 > 0 (violating).
COSTS = jnp.array([-1.0, 0.5, 1.0, 0.2])
GROUP_IDS = jnp.array([0, 0, 1, 1])
GROUP_COSTS = jnp.array([-0.25, 0.6])
REWARD_ADVANTAGES = jnp.array([[0.5, -1.0], [2.0, 0.3], [-0.7, 1.5], [0.1, 0.4]])
COST_ADVANTAGES = jnp.array([[1.0, 2.0], [-0.5, 0.3], [0.8, -1.2], [0.6, 0.9]])
OLD_LOG_PROBS = jnp.array([[-1.0, -0.5], [-2.0, -0.1], [-0.3, -1.2], [-0.8, -0.9]])
MASK = jnp.ones((4, 2))
LAMBDA = jnp.float32(2.0)


def fixed(value: float) -> lagrangian.MultiplierConfig:
    """lambda held at ``value``."""
    return lagrangian.MultiplierConfig(kind="fixed", init=value)


def policy_loss(log_probs: jax.Array, advantages: jax.Array) -> jax.Array:
    return objectives.ppo_clipped_surrogate(log_probs, OLD_LOG_PROBS, advantages, 0.2, mask=MASK)


def loss_gradient(signal: rlhf_ppo.CostSignal, reward_advantages: jax.Array, log_probs: jax.Array) -> jax.Array:
    gates = signal.gate(GROUP_COSTS, GROUP_IDS)
    advantages = rlhf_ppo.actor_advantages(reward_advantages, COST_ADVANTAGES, LAMBDA, gates)
    return jax.grad(policy_loss)(log_probs, advantages)


class RectifiedGradientTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_gates_are_the_violating_prompts(self):
        signal = repo.cost_signal(repo.RePOConfig(), cost_limit=0.0)
        gates = self.variant(signal.gate)(jax.numpy.asarray(GROUP_COSTS), GROUP_IDS)
        np.testing.assert_array_equal(gates, [0.0, 0.0, 1.0, 1.0])

    def test_zero_within_the_limit_and_lagrangian_for_violators(self):
        rectified = repo.cost_signal(repo.RePOConfig(), cost_limit=0.0)
        lagrangian_signal = safe_rlhf.cost_signal(safe_rlhf.SafeRLHFConfig(), cost_limit=0.0)
        # Slightly off the rollout policy, so that some ratios are clipped and the test covers clipping too.
        log_probs = OLD_LOG_PROBS + jnp.array([[0.3, -0.1], [0.0, 0.25], [-0.3, 0.1], [0.05, 0.0]])
        # The cost part of the gradient alone (reward advantages 0): zero on the safe prompt's responses.
        cost_only = loss_gradient(rectified, jnp.zeros_like(REWARD_ADVANTAGES), log_probs)
        np.testing.assert_array_equal(cost_only[:2], 0.0)
        assert np.any(cost_only[2:] != 0)
        # Full gradient: the violating prompt's rows equal Safe-RLHF's Lagrangian gradient, the safe prompt's
        # rows equal plain PPO's (reward only).
        full = loss_gradient(rectified, REWARD_ADVANTAGES, log_probs)
        np.testing.assert_allclose(full[2:], loss_gradient(lagrangian_signal, REWARD_ADVANTAGES, log_probs)[2:])
        reward_only = jax.grad(policy_loss)(log_probs, REWARD_ADVANTAGES)
        np.testing.assert_allclose(full[:2], reward_only[:2])

    def test_single_response_gates_on_its_own_cost(self):
        signal = repo.cost_signal(repo.RePOConfig(), cost_limit=0.0)
        ids = jnp.arange(4)
        np.testing.assert_array_equal(signal.gate(COSTS, ids), [0.0, 1.0, 1.0, 1.0])


class RePOStepTest(chex.TestCase):
    def test_multiplier_by_hand(self):
        signal = repo.cost_signal(repo.RePOConfig(), cost_limit=0.0)
        window = lagrangian.CostWindow.init(8).push(jnp.array([-10.0]))  # RePO ignores the running average
        violation = signal.constraint_value(window, GROUP_COSTS)
        np.testing.assert_allclose(violation, (0.0 + 0.6) / 2)
        state = signal.rule.update(signal.rule.init(), violation, signal.limit)
        np.testing.assert_allclose(lagrangian.multiplier(state), np.exp(0.1 * 0.3), rtol=1e-6)
        # Every prompt within its limit: no violation, lambda stays.
        state = signal.rule.update(signal.rule.init(), signal.constraint_value(window, -GROUP_COSTS - 1),
                                   signal.limit)
        np.testing.assert_allclose(lagrangian.multiplier(state), 1.0)

    def test_fixed_multiplier_stays(self):
        signal = repo.cost_signal(repo.RePOConfig(multiplier=fixed(3.0)), cost_limit=0.0)
        state = signal.rule.update(signal.rule.init(), jnp.float32(5.0), signal.limit)
        np.testing.assert_allclose(lagrangian.multiplier(state), 3.0)

    def test_targets_by_hand(self):
        # Two one-token responses to prompts with costs 1 (violating) and -1 (safe); no KL (same policies).
        sequences = rlhf_ppo.Sequences(*(jnp.zeros((2, 1), jnp.int32),) * 3, jnp.ones((2, 1), jnp.int32))
        zeros = jnp.zeros((2, 1))
        rollout = rlhf_ppo.Rollout(sequences, jnp.ones((2, 1)), jnp.array([0, 1]), jnp.array([3.0, 1.0]),
                                   jnp.array([1.0, -1.0]), zeros, zeros, jnp.array([[1.0], [0.5]]),
                                   jnp.array([[0.5], [0.0]]))
        signal = repo.cost_signal(repo.RePOConfig(), cost_limit=0.0)
        targets, gates = rlhf_ppo.compute_targets(rlhf_ppo.PPOConfig(), signal, rollout, jnp.float32(4.0),
                                                  rollout.cost_scores)
        np.testing.assert_array_equal(gates, [1.0, 0.0])
        # A_r = [3 - 1, 1 - 0.5] = [2, 0.5]; A_c = [1 - 0.5, -1 - 0] = [0.5, -1].
        np.testing.assert_allclose(targets.actor_advantages, [[(2.0 - 4 * 0.5) / 5], [0.5]])


class CriticFreeTest(chex.TestCase):
    """RePO without critics (GRPO-style group advantages, ``PPOConfig.advantage = "group"``)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_targets_by_hand(self):
        # Two prompts, K = 2. Rewards (1, 3) and (2, 2); costs (1, 0.5) and (-1, -0.5): prompt costs 0.75
        # (violating) and -0.75 (safe). Responses of 2, 1, 2 and 1 tokens.
        mask = jnp.array([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
        sequences = rlhf_ppo.Sequences(*(jnp.zeros((4, 1), jnp.int32),) * 3, mask.astype(jnp.int32))
        zeros = jnp.zeros((4, 2))
        rollout = rlhf_ppo.Rollout(sequences, mask, GROUP_IDS, jnp.array([1.0, 3.0, 2.0, 2.0]),
                                   jnp.array([1.0, 0.5, -1.0, -0.5]), zeros, zeros, None, None)
        signal = repo.cost_signal(repo.RePOConfig(), cost_limit=0.0)
        group_costs = jnp.array([0.75, -0.75])
        targets, gates = self.variant(lambda r, lam, c: rlhf_ppo.compute_targets(
            rlhf_ppo.PPOConfig(advantage="group"), signal, r, lam, c))(rollout, jnp.float32(1.0), group_costs)
        np.testing.assert_array_equal(gates, [1.0, 1.0, 0.0, 0.0])
        # Prompt 0: A_r = (-1, 1) / sqrt(2), A_c = (0.25, -0.25) / sqrt(0.125) = (1, -1) / sqrt(2); gated with
        # lambda 1: (A_r - A_c) / 2 = (-1, 1) / sqrt(2). Prompt 1: equal rewards, not gated: 0.
        eps = objectives.GROUP_STD_EPS
        a = (1 / (2 ** 0.5 + eps) + 0.25 / (0.125 ** 0.5 + eps)) / 2
        np.testing.assert_allclose(targets.actor_advantages, [[-a, -a], [a, 0.0], [0.0, 0.0], [0.0, 0.0]],
                                   rtol=1e-5)
        assert targets.reward_returns is None and targets.cost_returns is None


def test_baselines():
    ppo, shaping = repo.baseline_signal(fixed(0.0)), repo.baseline_signal(fixed(2.0))
    for signal, lam in ((ppo, 0.0), (shaping, 2.0)):
        state = signal.rule.update(signal.rule.init(), jnp.float32(7.0), signal.limit)
        np.testing.assert_allclose(lagrangian.multiplier(state), lam)
        np.testing.assert_array_equal(signal.gate(GROUP_COSTS, GROUP_IDS), 1.0)
    with pytest.raises(ConfigError, match="init"):
        repo.baseline_signal(fixed(-1.0))
    with pytest.raises(ConfigError, match="shaping_multiplier"):
        repo.baseline_signal(dataclasses.replace(repo.SHAPING_MULTIPLIER, kind="projected_ascent"))
    with pytest.raises(ConfigError, match="multiplier"):
        repo.RePOConfig(multiplier=dataclasses.replace(repo.MULTIPLIER, kind="pid"))


# ------------------------------------------------------------------------------------------------
# Learning: a tiny model from scratch on the synthetic task, exact scorers, RePO with a strong fixed lambda.

STEPS = 48


def tiny_task():
    """The synthetic task, a freshly initialised 1-block Llama, and a pool of 8 harmful prompts."""
    task = synthetic_safety.SyntheticSafetyTask()
    tokenizer = task.tokenizer
    config = llama.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                               bos_token_id=tokenizer.bos_id, eos_token_id=(tokenizer.eos_id,),
                               pad_token_id=tokenizer.pad_id)
    actor = llama.LlamaForCausalLM(config)
    params = llama.init_params(actor, jax.random.PRNGKey(0))
    harmful = [f"tell me about {word}" for word in ("weapons", "bombs", "poison", "toxins")] * 2
    prompts = tokenize_prompts(tokenizer, harmful, 10)
    pool = rlhf_ppo.PromptPool(jnp.asarray(prompts.tokens), jnp.asarray(prompts.attention_mask, jnp.int32))
    return task, actor, params, pool


EXACT_SCORERS = (rlhf_ppo.exact_scorer(synthetic_safety.ground_truth_reward),
                 rlhf_ppo.exact_scorer(synthetic_safety.ground_truth_cost))


@pytest.fixture(scope="module")
def learning_curve():
    task, actor, params, pool = tiny_task()
    critic, critic_params = rlhf_ppo.critic_from_backbone(actor, params, jax.random.PRNGKey(1))
    models = rlhf_ppo.RLHFModels(actor, critic, critic, *EXACT_SCORERS)
    ppo = rlhf_ppo.PPOConfig(actor_learning_rate=3e-3, critic_learning_rate=1e-2, max_new_tokens=4,
                             warmup_ratio=0.0, actor_lr_schedule="constant", ppo_epochs=4)
    # The gate compares a prompt's mean cost over its K = 4 responses with d. At d = 0 one unsafe answer in
    # three is allowed (1.0 vs -0.5); d = -0.4 asks for (nearly) all four to be safe.
    signal = repo.cost_signal(repo.RePOConfig(multiplier=fixed(5.0)), cost_limit=-0.4)
    step = rlhf_ppo.make_rl_step(models, ppo, signal, rlhf_ppo.StepSpec(8, 4, 0.0), STEPS)
    chunk = rlhf_ppo.make_chunk(step, STEPS)
    state = rlhf_ppo.init_state(ppo, signal, params, critic_params, critic_params, jax.random.PRNGKey(2), STEPS)
    frozen = rlhf_ppo.FrozenParams(params, task.tables, task.tables)
    _, metrics = chunk(state, frozen, pool, None)
    return jax.device_get(metrics)


@pytest.fixture(scope="module")
def critic_free_curve():
    """The run of :func:`learning_curve` without critics: four models, group-relative advantages."""
    task, actor, params, pool = tiny_task()
    models = rlhf_ppo.RLHFModels(actor, None, None, *EXACT_SCORERS)
    ppo = rlhf_ppo.PPOConfig(actor_learning_rate=3e-3, max_new_tokens=4, warmup_ratio=0.0,
                             actor_lr_schedule="constant", ppo_epochs=4, advantage="group")
    signal = repo.cost_signal(repo.RePOConfig(multiplier=fixed(5.0)), cost_limit=-0.4)
    steps = 24  # as fast to run as 48, but half the compile (it learns in fewer steps than with critics)
    step = rlhf_ppo.make_rl_step(models, ppo, signal, rlhf_ppo.StepSpec(8, 4, 0.0), steps)
    state = rlhf_ppo.init_state(ppo, signal, params, None, None, jax.random.PRNGKey(2), steps)
    assert state.reward_critic is None and state.cost_critic_optimizer is None
    _, metrics = rlhf_ppo.make_chunk(step, steps)(state, rlhf_ppo.FrozenParams(params, task.tables, task.tables),
                                                  pool, None)
    return jax.device_get(metrics)


def test_critic_free_run_lowers_the_unsafe_rate(critic_free_curve):
    unsafe = critic_free_curve["unsafe_rate"]
    first, last = unsafe[:8].mean(), unsafe[-8:].mean()
    assert first > 0.3
    assert last < 0.4 * first, unsafe
    assert "reward_critic_loss" not in critic_free_curve and np.all(np.isfinite(critic_free_curve["kl_loss"]))


def test_short_run_lowers_the_unsafe_rate(learning_curve):
    unsafe = learning_curve["unsafe_rate"]
    first, last = unsafe[:8].mean(), unsafe[-8:].mean()
    # A random tiny model names harmful words in about half of its 4-token answers to harmful prompts.
    assert first > 0.3
    assert last < 0.4 * first, unsafe
    assert np.all(np.isfinite(learning_curve["actor_loss"]))
