"""Safe-RLHF's PPO-Lagrangian on the shared LM-PPO machinery: token signals, a step by hand, the multiplier."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.llm import rlhf_ppo, safe_rlhf
from constrained_rl import lagrangian, objectives, preference_losses
from constrained_rl.config import ConfigError


def hand_rollout(reward_scores, cost_scores, log_probs, reference_log_probs, mask, reward_values, cost_values,
                 group_ids) -> rlhf_ppo.Rollout:
    """A rollout from given arrays (the sequences are not read by the target computation)."""
    n, r = np.shape(mask)
    empty = jnp.zeros((n, 1), jnp.int32)
    sequences = rlhf_ppo.Sequences(empty, empty, jnp.zeros((n, r), jnp.int32), jnp.asarray(mask, jnp.int32))
    as_array = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return rlhf_ppo.Rollout(sequences, as_array(mask), jnp.asarray(group_ids, jnp.int32), as_array(reward_scores),
                            as_array(cost_scores), as_array(log_probs), as_array(reference_log_probs),
                            as_array(reward_values), as_array(cost_values))


# One response of two tokens and one of a single token (padded). Values are chosen so GAE is easy by hand.
ROLLOUT = hand_rollout(
    reward_scores=[1.0, 2.0], cost_scores=[2.0, -1.0],
    log_probs=[[-1.0, -2.0], [-0.5, 0.0]], reference_log_probs=[[-1.5, -2.0], [-1.0, 0.0]],
    mask=[[1, 1], [1, 0]], reward_values=[[0.2, 0.5], [1.0, 9.0]], cost_values=[[0.1, 1.0], [0.0, 9.0]],
    group_ids=[0, 1])
PPO = rlhf_ppo.PPOConfig(kl_coeff=0.1)


class TokenSignalsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_by_hand(self):
        signals = self.variant(lambda *a: rlhf_ppo.token_level_signals(*a, kl_coeff=0.1, clip_range=50.0))
        rewards, costs = signals(ROLLOUT.reward_scores, ROLLOUT.cost_scores, ROLLOUT.log_probs,
                                 ROLLOUT.reference_log_probs, ROLLOUT.mask)
        # KL_t = [[0.5, 0], [0.5, -]]: -0.1 KL on every token, the score at the last one.
        np.testing.assert_allclose(rewards, [[-0.05, 1.0], [-0.05 + 2.0, 0.0]], rtol=1e-6)
        np.testing.assert_allclose(costs, [[0.05, 2.0], [0.05 - 1.0, 0.0]], rtol=1e-6)

    def test_scores_are_clipped(self):
        rewards, costs = rlhf_ppo.token_level_signals(
            jnp.array([80.0]), jnp.array([-70.0]), jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)), 0.01, 50.0)
        np.testing.assert_allclose(rewards, [[0.0, 50.0]])
        np.testing.assert_allclose(costs, [[0.0, -50.0]])


class PPOLagStepTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_targets_by_hand(self):
        signal = safe_rlhf.cost_signal(safe_rlhf.SafeRLHFConfig(), 0.0)
        targets, gates = self.variant(
            lambda rollout, lam, costs: rlhf_ppo.compute_targets(PPO, signal, rollout, lam, costs))(
            ROLLOUT, jnp.float32(1.0), ROLLOUT.cost_scores)
        np.testing.assert_array_equal(gates, [1.0, 1.0])
        # Response 0, GAE with gamma 1, lambda 0.95:
        #   reward: delta = [-0.05 + 0.5 - 0.2, 1.0 - 0.5] = [0.25, 0.5] -> A_r = [0.725, 0.5]
        #   cost:   delta = [0.05 + 1.0 - 0.1, 2.0 - 1.0] = [0.95, 1.0]  -> A_c = [1.9, 1.0]
        # Response 1 (one token): A_r = 1.95 - 1.0 = 0.95, A_c = -0.95 - 0.0 = -0.95.
        expected = [[(0.725 - 1.9) / 2, (0.5 - 1.0) / 2], [(0.95 + 0.95) / 2, 0.0]]
        np.testing.assert_allclose(targets.actor_advantages, expected, rtol=1e-5)
        np.testing.assert_allclose(targets.reward_returns, [[0.925, 1.0], [1.95, 0.0]], rtol=1e-5)
        np.testing.assert_allclose(targets.cost_returns, [[2.0, 2.0], [-0.95, 0.0]], rtol=1e-5)

    def test_actor_gradient_by_hand(self):
        # At the rollout policy the ratio is 1: d loss / d log pi_t = -A_t / (number of response tokens).
        advantages = rlhf_ppo.actor_advantages(jnp.array([[1.0, 2.0]]), jnp.array([[3.0, -1.0]]), jnp.float32(3.0),
                                               jnp.ones(1))
        np.testing.assert_allclose(advantages, [[(1.0 - 9.0) / 4, (2.0 + 3.0) / 4]])
        old = jnp.array([[-1.0, -2.0]])
        loss = lambda lp: objectives.ppo_clipped_surrogate(lp, old, advantages, 0.2, mask=jnp.ones((1, 2)))  # noqa: E731
        grad = jax.grad(loss)(old)
        np.testing.assert_allclose(grad, -advantages / 2)

    def test_multiplier_is_held_constant_in_the_advantage(self):
        grad = jax.grad(lambda lam: jnp.sum(rlhf_ppo.actor_advantages(jnp.ones((1, 2)), jnp.ones((1, 2)), lam,
                                                                        jnp.ones(1))))(1.0)
        assert grad == 0.0


class TableLM:
    """A stand-in causal LM whose logits at each position are a row of a table: ``logits = table[token]``
    (what the actor loss needs of a model, at a fraction of a transformer's compile time)."""

    class Output(NamedTuple):
        logits: jax.Array

    def apply(self, params, tokens, attention_mask=None):
        del attention_mask
        return self.Output(params["table"][tokens])


class ActorLossTest(chex.TestCase):
    """The actor loss: per-response averaging, GRPO's KL term, Safe-RLHF's PTX halving."""

    def setUp(self):
        super().setUp()
        self.models = rlhf_ppo.RLHFModels(TableLM(), None, None, None, None)
        self.params = {"table": jax.random.normal(jax.random.PRNGKey(0), (9, 9))}
        # Two responses of different lengths (3 and 1 tokens) to two-token prompts.
        mask = jnp.array([[1, 1, 1], [1, 0, 0]], jnp.int32)
        sequences = rlhf_ppo.Sequences(jnp.array([[1, 2], [3, 4]]), jnp.ones((2, 2), jnp.int32),
                                       jnp.array([[5, 6, 7], [8, 0, 0]]), mask)
        log_probs = rlhf_ppo.response_log_probs(self.models.actor, self.params, sequences)
        self.reference = log_probs + jnp.array([[0.3, -0.2, 0.1], [0.5, 0.0, 0.0]])
        self.rollout = rlhf_ppo.Rollout(sequences, mask.astype(jnp.float32), jnp.array([0, 0]), jnp.zeros(2),
                                        jnp.zeros(2), log_probs, self.reference, None, None)
        self.targets = rlhf_ppo.Targets(jnp.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]), None, None)

    def loss(self, config, ptx=None):
        return rlhf_ppo.actor_loss(self.models, config, self.params, self.rollout, self.targets, ptx)

    def test_per_response_mean_kl_term_and_ptx(self):
        # At the rollout policy (ratio 1) the surrogate is -mean A per response, then over responses:
        # -((1 + 2 + 3) / 3 + 4) / 2 = -3 (the token mean would be -2.5).
        loss, _ = self.loss(rlhf_ppo.PPOConfig(kl_coeff=0.1))
        np.testing.assert_allclose(loss, -3.0, rtol=1e-6)
        # Critic-free: + beta * k3(pi, pi_ref), k3 = e^d - 1 - d with d = log pi_ref - log pi, per response first.
        k3 = lambda d: np.expm1(d) - d  # noqa: E731
        kl = (np.mean(k3(np.array([0.3, -0.2, 0.1]))) + k3(0.5)) / 2
        group_loss, aux = self.loss(rlhf_ppo.PPOConfig(kl_coeff=0.1, advantage="group"))
        np.testing.assert_allclose(aux["kl_loss"], kl, rtol=1e-5)
        np.testing.assert_allclose(group_loss, -3.0 + 0.1 * kl, rtol=1e-5)
        # PTX: Safe-RLHF's shared optimiser step averages the RL and the (ptx_coeff-weighted) SFT gradients.
        ptx = rlhf_ppo.PTXData(jnp.array([[1, 5, 6, 7]]), jnp.ones((1, 4), jnp.int32),
                               jnp.array([[0, 1, 1, 1]], jnp.int32))
        ptx_loss, aux = self.loss(rlhf_ppo.PPOConfig(ptx_coeff=16.0), ptx)
        logits = self.models.actor.apply(self.params, ptx.tokens, attention_mask=ptx.attention_mask).logits
        sft = preference_losses.sft_loss(logits, ptx.tokens, ptx.loss_mask)
        np.testing.assert_allclose(aux["ptx_loss"], sft, rtol=1e-6)
        np.testing.assert_allclose(ptx_loss, 0.5 * (-3.0 + 16.0 * sft), rtol=1e-5)


class MultiplierTest(chex.TestCase):
    def test_moves_the_right_way(self):
        signal = safe_rlhf.cost_signal(safe_rlhf.SafeRLHFConfig(), cost_limit=0.0)
        window = lagrangian.CostWindow.init(128).push(jnp.array([1.0, 0.0, 0.5]))
        j_c = signal.constraint_value(window, jnp.zeros(3))
        np.testing.assert_allclose(j_c, 0.5)
        state = signal.rule.update(signal.rule.init(), j_c, signal.limit)
        # log lambda <- 0 + 0.1 * 1 * (0.5 - 0): the average is violated, lambda rises.
        np.testing.assert_allclose(lagrangian.multiplier(state), np.exp(0.05), rtol=1e-6)
        safe_window = lagrangian.CostWindow.init(128).push(jnp.array([-1.0, -2.0]))
        state = signal.rule.update(signal.rule.init(), signal.constraint_value(safe_window, jnp.zeros(2)),
                                   signal.limit)
        np.testing.assert_allclose(lagrangian.multiplier(state), np.exp(-0.15), rtol=1e-6)

    def test_capped_at_multiplier_max(self):
        signal = safe_rlhf.cost_signal(
            safe_rlhf.SafeRLHFConfig(multiplier=dataclasses.replace(safe_rlhf.MULTIPLIER, max=2.0)), cost_limit=0.0)
        state = signal.rule.init()
        for _ in range(50):
            state = signal.rule.update(state, jnp.float32(10.0), signal.limit)
        np.testing.assert_allclose(lagrangian.multiplier(state), 2.0, rtol=1e-6)

    def test_window_keeps_the_last_responses(self):
        window = lagrangian.CostWindow.init(4).push(jnp.array([9.0, 9.0, 1.0, 1.0, 1.0, 1.0]))
        np.testing.assert_allclose(rlhf_ppo.window_mean_cost(window, jnp.zeros(1)), 1.0)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="init"):
        safe_rlhf.SafeRLHFConfig(multiplier=dataclasses.replace(safe_rlhf.MULTIPLIER, init=6.0))
    with pytest.raises(ConfigError, match="clip_range_ratio"):
        rlhf_ppo.PPOConfig(clip_range_ratio=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        rlhf_ppo.PPOConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="advantage"):
        rlhf_ppo.PPOConfig(advantage="critic")
