"""The PPO machinery shared by the LLM safety fine-tuners: Safe-RLHF's PPO-Lagrangian, RePO and baselines.

Safe-RLHF (Dai et al. 2023, "Safe RLHF: Safe Reinforcement Learning from Human Feedback", PKU-Alignment)
and RePO (Peng et al. 2024, "Enhancing Safety in Reinforcement Learning with Human Feedback via Rectified
Policy Optimization", arXiv 2410.19933) run the same loop and differ only in how the cost reaches the
actor. One RL step here is

1. **rollout**: draw ``B`` prompts, sample ``K`` responses each from the actor (``constrained_rl.sampling``);
   score every response with the reward and cost models (learned score models, or the exact scorers of
   the synthetic task); recompute the actor's log-probs, the frozen reference's log-probs and both
   critics' values by teacher forcing;
2. **token-level signals** (:func:`token_level_signals`): the reward stream is ``-beta * KL_t`` on every
   token plus the reward score at the end token, the cost stream ``+beta * KL_t`` plus the cost score at
   the end, both clipped to ``+-50``;
3. **advantages**: token-level GAE (``gamma = 1``, ``lambda = 0.95``, no whitening) of each stream
   (``constrained_rl.returns.sequence_gae``);
4. **multiplier and gate** (:class:`CostSignal`, chosen by the algorithm): the multiplier rule is updated
   on the algorithm's constraint estimate, and per-response gates ``w_i`` say which responses receive
   the cost signal. The actor advantage is ``(A_r - lambda_i A_c) / (1 + lambda_i)`` with
   ``lambda_i = lambda * w_i`` held constant (``lagrangian.combined_advantage``):

   * Safe-RLHF: ``lambda`` by log-space ascent on ``J_c - d`` (J_c = mean cost of the last 128
     responses, ``lagrangian.CostWindow``), ``w_i = 1``;
   * RePO: ``w_i = 1[C(x_i) > d]``, prompt x_i's estimated cost over its limit
     (``penalties.rectified_penalty_weights``), ``lambda`` fixed or raised by ascent on the mean
     rectified violation (``penalties.rectified_penalty``);
   * plain PPO: ``lambda = 0``; fixed shaping: a constant ``lambda`` on every response.

   Because the KL term sits with opposite signs in the two streams, the actor always sees ``-beta KL_t``
   whatever ``lambda_i`` is: the gate changes the cost pressure, never the KL pressure.
5. **update**: PPO's clipped surrogate for the actor (clip 0.2, optional PTX loss), clipped value losses
   (clip 5.0) for both critics (``constrained_rl.objectives``); every loss is each response's token mean,
   then the mean over responses (``objectives.per_sequence_mean``, Safe-RLHF's ``masked_mean``).

**Critic-free** (``PPOConfig.advantage = "group"``, GRPO: Shao et al. 2024, "DeepSeekMath"): no critics
(four models: actor, reference, reward, cost). Steps 2-3 become :func:`group_advantages`: each response's
reward and cost against the mean and std of its prompt's ``K`` responses, on every token; the KL leaves
the reward and enters the actor loss as ``beta * k3``. Step 4 is unchanged, so RePO's gate still reads the
prompt's group mean cost and Safe-RLHF's multiplier the window mean.

Everything from prompt sampling to the optimiser steps is one pure, jittable function
(:func:`make_rl_step`), scanned in chunks by the experiment loop and vmapped over seeds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from constrained_rl import lagrangian, objectives, parallel, penalties, preference_losses, returns
from constrained_rl.config import require
from constrained_rl.models.llama import LlamaForCausalLM
from constrained_rl.models.score import LlamaForScore, last_token_index
from constrained_rl.sampling import Generation, SamplingConfig, generate, token_logprobs
from constrained_rl.schedules import learning_rate_schedule

Params = Any

# --------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters; the defaults are Safe-RLHF's for Alpaca-7B (scripts/ppo-lag.sh)."""

    kl_coeff: float = 0.01  # beta: per-token KL penalty against the reference model
    clip_range_ratio: float = 0.2  # PPO clip epsilon on the probability ratio
    clip_range_value: float = 5.0  # critic value clip around the rollout-time values
    clip_range_score: float = 50.0  # token-level rewards and costs are clipped to +-this
    gamma: float = 1.0  # discount of token-level GAE
    gae_lambda: float = 0.95  # lambda of token-level GAE
    actor_learning_rate: float = 1e-5  # peak Adam(W) step size of the actor
    actor_lr_schedule: Literal["cosine", "constant"] = "cosine"  # decay of the actor step size
    actor_weight_decay: float = 0.01  # AdamW decoupled weight decay of the actor
    critic_learning_rate: float = 5e-6  # Adam(W) step size of both critics (constant after warm-up)
    critic_weight_decay: float = 0.0  # AdamW weight decay of the critics
    warmup_ratio: float = 0.03  # share of the updates spent warming the step sizes up linearly
    max_grad_norm: float = 1.0  # global-norm gradient clipping of every network
    ppo_epochs: int = 1  # passes over each rollout batch
    num_minibatches: int = 1  # gradient steps per pass (the rollout is split evenly)
    ptx_coeff: float = 16.0  # weight of the SFT (PTX) loss mixed into the actor loss, when PTX data is given
    ptx_batch_size: int = 16  # SFT sequences per PTX loss evaluation
    temperature: float = 1.0  # sampling temperature of rollouts
    max_new_tokens: int = 512  # longest response generated
    # gae: reward and cost critics, token-level GAE (Safe-RLHF's six models); group: no critics, each response's
    # reward and cost against its prompt's K responses (GRPO), the KL as a loss term (four models)
    advantage: Literal["gae", "group"] = "gae"
    # storage and computation dtype of the frozen reference, reward and cost models (bfloat16: half their
    # memory, their log-probs and scores from bfloat16 weights); the actor and critics train in float32
    frozen_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        for name in ("kl_coeff", "actor_weight_decay", "critic_weight_decay", "ptx_coeff"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("clip_range_ratio", "clip_range_value", "clip_range_score", "actor_learning_rate",
                     "critic_learning_rate", "max_grad_norm"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        require(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        require(0 <= self.gae_lambda <= 1, "gae_lambda", f"must be in [0, 1], got {self.gae_lambda}")
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        for name in ("ppo_epochs", "num_minibatches", "ptx_batch_size", "max_new_tokens"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.advantage in ("gae", "group"), "advantage", f"must be gae or group, got {self.advantage!r}")
        require(self.frozen_dtype in ("float32", "bfloat16"), "frozen_dtype",
                f"must be float32 or bfloat16, got {self.frozen_dtype!r}")
        require(self.temperature > 0, "temperature", f"must be > 0 (PPO needs a stochastic policy), "
                f"got {self.temperature}")


# --------------------------------------------------------------------------------------------------
# Models: modules (static) and their parameters (a pytree)

# A scorer maps (params, tokens [N, T], attention_mask [N, T], response_mask [N, T]) to scores [N].
Scorer = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def score_model_scorer(model: LlamaForScore) -> Scorer:
    """A learned score model as a scorer: its head read at the last real token (Safe-RLHF's end score)."""

    def score(params: Any, tokens: jax.Array, attention_mask: jax.Array, response_mask: jax.Array) -> jax.Array:
        del response_mask  # a score model reads the whole dialogue
        return model.apply(params, tokens, attention_mask=attention_mask).end_scores

    return score


def exact_scorer(score_fn: Callable[[Any, jax.Array, jax.Array], jax.Array]) -> Scorer:
    """A scorer from ``score_fn(params, tokens, response_mask) -> [N]``, such as the synthetic task's exact
    ``ground_truth_reward`` / ``ground_truth_cost`` (their params are the scoring tables)."""

    def score(params: Any, tokens: jax.Array, attention_mask: jax.Array, response_mask: jax.Array) -> jax.Array:
        del attention_mask  # the exact scorers read the prompt from the tokens outside the response
        return score_fn(params, tokens, response_mask)

    return score


@dataclasses.dataclass(frozen=True)
class RLHFModels:
    """The modules of the six-model setup (four without critics); hashable, so jitted functions take it as a
    static argument."""

    actor: LlamaForCausalLM  # the policy (and, with other parameters, the frozen reference)
    reward_critic: LlamaForScore | None  # per-token values of the reward stream; None: critic-free (group)
    cost_critic: LlamaForScore | None  # per-token values of the cost stream; None: critic-free (group)
    reward_scorer: Scorer  # reward model R(x, y)
    cost_scorer: Scorer  # cost model C(x, y) (> 0 unsafe)
    reference: LlamaForCausalLM | None = None  # the frozen reference's module when its dtypes differ; None: actor's

    @property
    def reference_model(self) -> LlamaForCausalLM:
        return self.actor if self.reference is None else self.reference


class FrozenParams(NamedTuple):
    """Parameters that RL never changes: the reference actor and the two score models."""

    reference: Params
    reward_model: Params
    cost_model: Params


class PromptPool(NamedTuple):
    """Left-padded training prompts ``[P, L]`` on the device, from which each step draws a batch."""

    tokens: jax.Array
    mask: jax.Array


class PTXData(NamedTuple):
    """Right-padded SFT sequences ``[M, T]`` for the PTX loss (Ouyang et al. 2022; Safe-RLHF)."""

    tokens: jax.Array
    attention_mask: jax.Array
    loss_mask: jax.Array


# --------------------------------------------------------------------------------------------------
# How an algorithm lets the cost reach the actor


class CostSignal(NamedTuple):
    """An algorithm's cost handling: a multiplier rule, what it ascends on, and the per-response gate.

    * ``rule``: a ``constrained_rl.lagrangian`` rule, updated once per RL step by
      ``rule.update(state, constraint_value(window, group_costs), limit)``;
    * ``constraint_value(window, group_costs)``: the constraint estimate, from the window of recent
      response costs (already holding this step's) and this step's per-prompt mean costs ``[B]``;
    * ``gate(group_costs, group_ids)``: per-response weights ``[N]`` on the cost advantage.
    """

    rule: lagrangian.MultiplierRule
    constraint_value: Callable[[lagrangian.CostWindow, jax.Array], jax.Array]
    limit: float
    gate: Callable[[jax.Array, jax.Array], jax.Array]


def gate_all(group_costs: jax.Array, group_ids: jax.Array) -> jax.Array:
    """Every response gets the cost signal (Safe-RLHF, shaping)."""
    del group_costs
    return jnp.ones(group_ids.shape, jnp.float32)


def window_mean_cost(window: lagrangian.CostWindow, group_costs: jax.Array) -> jax.Array:
    """Safe-RLHF's ``J_c``: the mean cost of the responses in the window."""
    del group_costs
    return window.mean()


def actor_advantages(reward_advantages: jax.Array, cost_advantages: jax.Array, multiplier: jax.Array,
                     gates: jax.Array) -> jax.Array:
    """``(A_r - lambda w_i A_c) / (1 + lambda w_i)`` per token; advantages ``[N, T]``, gates ``[N]``.

    With ``w_i = 1`` this is Safe-RLHF's actor advantage; with RePO's gate ``w_i = 1[C(x_i) > d]`` a
    response to a prompt within its limit is optimised for reward (and KL) alone, and a response to a
    violating prompt gets exactly the Lagrangian advantage. lambda is held constant.
    """
    chex.assert_rank(gates, 1)
    chex.assert_equal_shape([reward_advantages, cost_advantages])
    per_response = jax.lax.stop_gradient(multiplier) * gates
    return lagrangian.combined_advantage(reward_advantages, cost_advantages, per_response[:, None])


# --------------------------------------------------------------------------------------------------
# Token-level signals


def token_level_signals(
    reward_scores: jax.Array,
    cost_scores: jax.Array,
    log_probs: jax.Array,
    reference_log_probs: jax.Array,
    mask: jax.Array,
    kl_coeff: float,
    clip_range: float,
) -> tuple[jax.Array, jax.Array]:
    """Per-token reward and cost streams of Safe-RLHF (Dai et al. 2023); batch axis 0.

        KL_t = log pi(y_t | .) - log pi_ref(y_t | .)            (the k1 estimator, per response token)
        r_t  = clip(-beta KL_t + 1[t = end] R(x, y), -c, c)
        c_t  = clip(+beta KL_t + 1[t = end] C(x, y), -c, c)

    where ``end`` is each row's last response token. Args: scores ``[N]``; log-probs and ``mask``
    ``[N, T]`` over response tokens. Returns ``(rewards, costs)``, each ``[N, T]``, 0 on padding.
    """
    chex.assert_rank([reward_scores, cost_scores, log_probs], [1, 1, 2])
    chex.assert_equal_shape([log_probs, reference_log_probs, mask])
    valid = mask.astype(jnp.float32)
    kl = objectives.kl_k1(log_probs, reference_log_probs) * valid
    end = jax.nn.one_hot(last_token_index(mask), mask.shape[1], dtype=jnp.float32) * valid
    rewards = -kl_coeff * kl + end * reward_scores[:, None]
    costs = kl_coeff * kl + end * cost_scores[:, None]
    return jnp.clip(rewards, -clip_range, clip_range) * valid, jnp.clip(costs, -clip_range, clip_range) * valid


# --------------------------------------------------------------------------------------------------
# Teacher-forced forward passes over prompt + response


class Sequences(NamedTuple):
    """Prompts (left-padded, ``[N, P]``) and their responses (``[N, R]``); read as one ``[N, P + R]`` batch."""

    prompt_tokens: jax.Array  # [N, P]
    prompt_mask: jax.Array  # [N, P] int32, 1 on real prompt tokens
    response_tokens: jax.Array  # [N, R], padding after the end
    response_mask: jax.Array  # [N, R] int32, 1 up to and including the end token

    @property
    def prompt_length(self) -> int:
        return self.prompt_tokens.shape[1]

    @property
    def tokens(self) -> jax.Array:
        return jnp.concatenate([self.prompt_tokens, self.response_tokens], axis=1)

    @property
    def attention_mask(self) -> jax.Array:
        return jnp.concatenate([self.prompt_mask, self.response_mask], axis=1)

    @property
    def dialogue_response_mask(self) -> jax.Array:
        """``[N, P + R]``: 1 on response tokens only (what the exact scorers read)."""
        return jnp.concatenate([jnp.zeros_like(self.prompt_mask), self.response_mask], axis=1)


def join(prompt_tokens: jax.Array, prompt_mask: jax.Array, generation: Generation) -> Sequences:
    """Pairs left-padded prompts with their generated responses."""
    return Sequences(prompt_tokens, prompt_mask.astype(jnp.int32), generation.tokens,
                     generation.mask.astype(jnp.int32))


def _response_slice(x: jax.Array, sequences: Sequences) -> jax.Array:
    """Columns ``P - 1 .. P + R - 2`` of a per-position array: the positions that predict (or value) the
    response tokens ``P .. P + R - 1``."""
    start = sequences.prompt_length - 1
    return x[:, start:start + sequences.response_tokens.shape[1]]


def response_log_probs(actor: LlamaForCausalLM, params: Params, sequences: Sequences) -> jax.Array:
    """``log pi(y_t | x, y_<t)`` of every response token, ``[N, R]`` (teacher forcing)."""
    logits = actor.apply(params, sequences.tokens, attention_mask=sequences.attention_mask).logits
    return token_logprobs(_response_slice(logits, sequences), sequences.response_tokens)


def response_values(critic: LlamaForScore, params: Params, sequences: Sequences) -> jax.Array:
    """``V(x, y_<t)`` before every response token, ``[N, R]``: the critic's score at the previous position."""
    scores = critic.apply(params, sequences.tokens, attention_mask=sequences.attention_mask).scores
    return _response_slice(scores, sequences)


# --------------------------------------------------------------------------------------------------
# Rollout


class Rollout(NamedTuple):
    """One RL step's experience; per-response arrays ``[N]``, per-token arrays ``[N, R]``."""

    sequences: Sequences
    mask: jax.Array  # [N, R] float32, 1 on response tokens
    group_ids: jax.Array  # [N] int32 prompt index within the step's batch
    reward_scores: jax.Array  # [N] R(x, y)
    cost_scores: jax.Array  # [N] C(x, y)
    log_probs: jax.Array  # [N, R] actor log-probs at rollout time
    reference_log_probs: jax.Array  # [N, R]
    reward_values: jax.Array | None  # [N, R]; None without critics
    cost_values: jax.Array | None  # [N, R]; None without critics


class TrainState(NamedTuple):
    actor: Params
    actor_optimizer: optax.OptState
    reward_critic: Params  # None without critics (advantage "group"), as are the next three
    reward_critic_optimizer: optax.OptState
    cost_critic: Params
    cost_critic_optimizer: optax.OptState
    multiplier: Any  # the CostSignal rule's state
    cost_window: lagrangian.CostWindow  # recent response costs (Safe-RLHF's J_c)
    key: jax.Array
    step: jax.Array  # int32 RL steps done


def sample_prompts(key: jax.Array, pool: PromptPool, num_prompts: int, responses_per_prompt: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``num_prompts`` distinct prompts from the pool, each repeated K times; returns tokens, mask, group ids."""
    indices = jax.random.choice(key, pool.tokens.shape[0], (num_prompts,), replace=False)
    group_ids = penalties.dense_group_ids(num_prompts, responses_per_prompt)
    rows = indices[group_ids]
    return pool.tokens[rows], pool.mask[rows], group_ids


def score_rollout(models: RLHFModels, state: TrainState, frozen: FrozenParams, sequences: Sequences,
                  group_ids: jax.Array) -> Rollout:
    """Scores the sampled responses and records the old log-probs and values (teacher forcing)."""
    scored = (sequences.tokens, sequences.attention_mask, sequences.dialogue_response_mask)

    def values(critic: LlamaForScore | None, params: Params) -> jax.Array | None:
        return None if critic is None else response_values(critic, params, sequences)

    rollout = Rollout(
        sequences=sequences,
        mask=sequences.response_mask.astype(jnp.float32),
        group_ids=group_ids,
        reward_scores=models.reward_scorer(frozen.reward_model, *scored),
        cost_scores=models.cost_scorer(frozen.cost_model, *scored),
        log_probs=response_log_probs(models.actor, state.actor, sequences),
        reference_log_probs=response_log_probs(models.reference_model, frozen.reference, sequences),
        reward_values=values(models.reward_critic, state.reward_critic),
        cost_values=values(models.cost_critic, state.cost_critic))
    return jax.lax.stop_gradient(rollout)


def collect_rollout(
    models: RLHFModels,
    sampling: SamplingConfig,
    state: TrainState,
    frozen: FrozenParams,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    group_ids: jax.Array,
    key: jax.Array,
) -> Rollout:
    """Generate, then score (step 1 of the module docstring)."""
    generation = generate(models.actor, state.actor, prompt_tokens, prompt_mask, key, sampling)
    return score_rollout(models, state, frozen, join(prompt_tokens, prompt_mask, generation), group_ids)


# --------------------------------------------------------------------------------------------------
# Losses


class Targets(NamedTuple):
    """What the PPO update regresses and ascends on, per token ``[N, R]``."""

    actor_advantages: jax.Array
    reward_returns: jax.Array | None  # None without critics
    cost_returns: jax.Array | None


def actor_loss(models: RLHFModels, config: PPOConfig, params: Params, rollout: Rollout, targets: Targets,
               ptx: PTXData | None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate on the actor advantages (each response's token mean, then the mean over
    responses, as Safe-RLHF's ``masked_mean``), plus, without critics, GRPO's KL term
    ``beta * per_sequence_mean(k3(pi, pi_ref))``, plus ``ptx_coeff`` times the SFT loss on ``ptx``:

        L = L_clip + 1[group] beta KL_k3                         without PTX
        L = (L_clip + 1[group] beta KL_k3 + ptx_coeff L_SFT) / 2   with PTX

    Halving with PTX is Safe-RLHF's after its April 2024 fix (PR #173): its actor's gradient accumulation
    doubles, so the RL and the PTX micro-batch share one optimiser step and their gradients are averaged.
    """
    log_probs = response_log_probs(models.actor, params, rollout.sequences)
    loss = objectives.ppo_clipped_surrogate(log_probs, rollout.log_probs, targets.actor_advantages,
                                            config.clip_range_ratio, mask=rollout.mask, per_sequence=True)
    aux = {"actor_loss": loss,
           "approx_kl": objectives.approx_kl(log_probs, rollout.log_probs, rollout.mask),
           "clip_fraction": objectives.clip_fraction(log_probs, rollout.log_probs, config.clip_range_ratio,
                                                     rollout.mask)}
    if config.advantage == "group":  # GRPO keeps the KL out of the reward and in the loss
        kl_loss = objectives.per_sequence_mean(objectives.kl_k3(log_probs, rollout.reference_log_probs),
                                               rollout.mask)
        aux["kl_loss"] = kl_loss
        loss = loss + config.kl_coeff * kl_loss
    if ptx is not None:
        logits = models.actor.apply(params, ptx.tokens, attention_mask=ptx.attention_mask).logits
        ptx_loss = preference_losses.sft_loss(logits, ptx.tokens, ptx.loss_mask)
        aux["ptx_loss"] = ptx_loss
        loss = 0.5 * (loss + config.ptx_coeff * ptx_loss)
    return loss, aux


def critic_loss(critic: LlamaForScore, config: PPOConfig, params: Params, sequences: Sequences,
                old_values: jax.Array, value_targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Clipped value regression (Safe-RLHF's critic loss, clip range 5.0): each response's token mean, then
    the mean over responses."""
    values = response_values(critic, params, sequences)
    return objectives.clipped_value_loss(values, old_values, value_targets, config.clip_range_value, mask,
                                         per_sequence=True)


# --------------------------------------------------------------------------------------------------
# Optimisers


def make_optimizers(config: PPOConfig, num_steps: int) -> tuple[optax.GradientTransformation,
                                                                optax.GradientTransformation]:
    """(actor, critic) AdamW optimisers with global-norm clipping: cosine actor, constant critics."""
    total_updates = num_steps * config.ppo_epochs * config.num_minibatches
    actor = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(learning_rate_schedule(config.actor_learning_rate, total_updates, config.warmup_ratio,
                                           config.actor_lr_schedule), weight_decay=config.actor_weight_decay))
    critic = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(learning_rate_schedule(config.critic_learning_rate, total_updates, config.warmup_ratio,
                                           "constant"),
                    weight_decay=config.critic_weight_decay))
    return actor, critic


# --------------------------------------------------------------------------------------------------
# The RL step


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static shape of one RL step."""

    prompts_per_step: int  # B: prompts drawn per step
    responses_per_prompt: int  # K: responses sampled per prompt
    cost_limit: float  # d: a response (or prompt) is safe when its cost is <= d

    def __post_init__(self) -> None:
        require(self.prompts_per_step >= 1, "prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        require(self.responses_per_prompt >= 1, "responses_per_prompt",
                f"must be >= 1, got {self.responses_per_prompt}")


def init_state(config: PPOConfig, signal: CostSignal, actor_params: Params, reward_critic_params: Params,
               cost_critic_params: Params, key: jax.Array, num_steps: int, window_size: int = 128) -> TrainState:
    """A fresh train state from initial parameters (the SFT actor and score-model-initialised critics; None
    critics for advantage "group")."""
    actor_optimizer, critic_optimizer = make_optimizers(config, num_steps)

    def critic_state(params: Params) -> optax.OptState:
        return None if params is None else critic_optimizer.init(params)

    return TrainState(
        actor=actor_params, actor_optimizer=actor_optimizer.init(actor_params),
        reward_critic=reward_critic_params, reward_critic_optimizer=critic_state(reward_critic_params),
        cost_critic=cost_critic_params, cost_critic_optimizer=critic_state(cost_critic_params),
        multiplier=signal.rule.init(), cost_window=lagrangian.CostWindow.init(window_size),
        key=key, step=jnp.zeros((), jnp.int32))


def compute_targets(config: PPOConfig, signal: CostSignal, rollout: Rollout, multiplier: jax.Array,
                    group_costs: jax.Array) -> tuple[Targets, jax.Array]:
    """The reward and cost advantages, their gated combination; also returns the gates ``[N]``.

    ``advantage = "gae"``: token signals and GAE of both streams (critic targets too). ``"group"``
    (:func:`group_advantages`): each response's scores against its prompt's, the same on every token.
    ``group_costs`` ``[B]``: each prompt's mean response cost, what the gate compares with the limit.
    """
    gates = signal.gate(group_costs, rollout.group_ids)
    if config.advantage == "group":
        reward_advantages, cost_advantages = group_advantages(rollout, group_costs.shape[0])
        advantages = actor_advantages(reward_advantages, cost_advantages, multiplier, gates)
        return Targets(advantages, None, None), gates
    rewards, costs = token_level_signals(rollout.reward_scores, rollout.cost_scores, rollout.log_probs,
                                         rollout.reference_log_probs, rollout.mask, config.kl_coeff,
                                         config.clip_range_score)
    reward_advantages, reward_returns = returns.sequence_gae(rewards, rollout.reward_values, rollout.mask,
                                                             config.gamma, config.gae_lambda)
    cost_advantages, cost_returns = returns.sequence_gae(costs, rollout.cost_values, rollout.mask,
                                                         config.gamma, config.gae_lambda)
    advantages = actor_advantages(reward_advantages, cost_advantages, multiplier, gates)
    return Targets(advantages, reward_returns, cost_returns), gates


def group_advantages(rollout: Rollout, num_prompts: int) -> tuple[jax.Array, jax.Array]:
    """Critic-free reward and cost advantages ``[N, R]`` (GRPO, Shao et al. 2024 "DeepSeekMath", outcome
    supervision): ``A_i = (s_i - mean_x s) / (std_x s + eps)`` over the K responses to prompt x
    (``objectives.group_relative_advantages``), on every response token.

    The KL stays out of these scores (it is a loss term, :func:`actor_loss`), so the two advantages are the
    reward model's and the cost model's alone. The prompt's mean cost, which the gate reads, is the same
    group mean the cost advantage subtracts.
    """

    def per_token(scores: jax.Array) -> jax.Array:
        advantages = objectives.group_relative_advantages(scores, rollout.group_ids, num_prompts)
        return advantages[:, None] * rollout.mask

    return per_token(rollout.reward_scores), per_token(rollout.cost_scores)


def _take(tree: Any, rows: jax.Array) -> Any:
    """The given rows of every leaf (all leaves have a leading batch axis)."""
    return jax.tree_util.tree_map(lambda x: x[rows], tree)


def ppo_update(models: RLHFModels, config: PPOConfig, optimizers: tuple[optax.GradientTransformation, ...],
               state: TrainState, rollout: Rollout, targets: Targets, ptx: PTXData | None, key: jax.Array
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """``ppo_epochs`` passes of ``num_minibatches`` shuffled minibatches over actor and both critics."""
    actor_optimizer, critic_optimizer = optimizers
    num_rows = rollout.mask.shape[0]
    minibatch = num_rows // config.num_minibatches

    def minibatch_step(carry: TrainState, inputs: tuple[jax.Array, jax.Array]) -> tuple[TrainState, dict]:
        rows, ptx_key = inputs
        batch, batch_targets = _take(rollout, rows), _take(targets, rows)
        ptx_batch = None
        if ptx is not None:
            ptx_rows = jax.random.choice(ptx_key, ptx.tokens.shape[0], (config.ptx_batch_size,), replace=False)
            ptx_batch = _take(ptx, ptx_rows)
        (_, aux), actor_grads = jax.value_and_grad(
            lambda p: actor_loss(models, config, p, batch, batch_targets, ptx_batch), has_aux=True)(carry.actor)
        actor, actor_state = _apply(actor_optimizer, actor_grads, carry.actor_optimizer, carry.actor)
        carry = carry._replace(actor=actor, actor_optimizer=actor_state)
        if models.reward_critic is None:  # critic-free: the actor is all there is to train
            return carry, aux
        reward_loss, reward_grads = jax.value_and_grad(
            lambda p: critic_loss(models.reward_critic, config, p, batch.sequences, batch.reward_values,
                                  batch_targets.reward_returns, batch.mask))(carry.reward_critic)
        cost_loss, cost_grads = jax.value_and_grad(
            lambda p: critic_loss(models.cost_critic, config, p, batch.sequences, batch.cost_values,
                                  batch_targets.cost_returns, batch.mask))(carry.cost_critic)
        reward_critic, reward_state = _apply(critic_optimizer, reward_grads, carry.reward_critic_optimizer,
                                             carry.reward_critic)
        cost_critic, cost_state = _apply(critic_optimizer, cost_grads, carry.cost_critic_optimizer,
                                         carry.cost_critic)
        carry = carry._replace(reward_critic=reward_critic, reward_critic_optimizer=reward_state,
                               cost_critic=cost_critic, cost_critic_optimizer=cost_state)
        return carry, {**aux, "reward_critic_loss": reward_loss, "cost_critic_loss": cost_loss}

    permutation_keys = jax.random.split(key, config.ppo_epochs + 1)
    orders = jax.vmap(lambda k: jax.random.permutation(k, num_rows))(permutation_keys[1:])
    rows = orders[:, :minibatch * config.num_minibatches].reshape(-1, minibatch)
    ptx_keys = jax.random.split(permutation_keys[0], rows.shape[0])
    state, metrics = jax.lax.scan(minibatch_step, state, (rows, ptx_keys))
    return state, jax.tree_util.tree_map(jnp.mean, metrics)


def _apply(optimizer: optax.GradientTransformation, grads: Params, opt_state: optax.OptState, params: Params
           ) -> tuple[Params, optax.OptState]:
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def rollout_metrics(rollout: Rollout, gates: jax.Array, group_costs: jax.Array, limit: float
                    ) -> dict[str, jax.Array]:
    """Per-step figures of the sampled responses (training prompts, the models' own scores)."""
    kl = jnp.sum(objectives.kl_k1(rollout.log_probs, rollout.reference_log_probs) * rollout.mask, axis=1)
    interference = penalties.interference_statistics(group_costs, limit)
    return {
        "reward": jnp.mean(rollout.reward_scores),
        "cost": jnp.mean(rollout.cost_scores),
        "unsafe_rate": jnp.mean((rollout.cost_scores > limit).astype(jnp.float32)),
        "violating_prompts": interference.violating_fraction,
        "interference": interference.interference,
        "gated_fraction": jnp.mean(gates),
        "kl": jnp.mean(kl),
        "response_length": jnp.mean(jnp.sum(rollout.mask, axis=1)),
    }


def sampling_config(models: RLHFModels, config: PPOConfig) -> SamplingConfig:
    """How rollouts sample: the PPO temperature and response length, the actor's end and padding tokens."""
    return SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                          eos_token_ids=models.actor.config.eos_token_id,
                          pad_token_id=models.actor.config.pad_token_id or 0)


def make_update(models: RLHFModels, config: PPOConfig, signal: CostSignal, spec: StepSpec, num_steps: int
                ) -> Callable[[TrainState, Rollout, PTXData | None], tuple[TrainState, dict[str, jax.Array]]]:
    """``(state, rollout, ptx) -> (state, metrics)``: multiplier, targets and the PPO update (steps 2-5)."""
    optimizers = make_optimizers(config, num_steps)

    def update(state: TrainState, rollout: Rollout, ptx: PTXData | None) -> tuple[TrainState, dict[str, jax.Array]]:
        key, update_key = jax.random.split(state.key)
        # Safe-RLHF's order: record this step's costs, move the multiplier, then use the new lambda.
        window = state.cost_window.push(rollout.cost_scores)
        group_costs = penalties.group_mean(rollout.cost_scores, rollout.group_ids, spec.prompts_per_step)
        multiplier_state = signal.rule.update(state.multiplier, signal.constraint_value(window, group_costs),
                                              signal.limit)
        multiplier = lagrangian.multiplier(multiplier_state)
        targets, gates = compute_targets(config, signal, rollout, multiplier, group_costs)
        state = state._replace(multiplier=multiplier_state, cost_window=window, key=key, step=state.step + 1)
        state, update_metrics = ppo_update(models, config, optimizers, state, rollout, targets, ptx, update_key)
        return state, {**rollout_metrics(rollout, gates, group_costs, spec.cost_limit), **update_metrics,
                       "multiplier": multiplier, "window_cost": window.mean()}

    return update


def make_rl_step(models: RLHFModels, config: PPOConfig, signal: CostSignal, spec: StepSpec, num_steps: int,
                 mesh: jax.sharding.Mesh | None = None
                 ) -> Callable[[TrainState, FrozenParams, PromptPool, PTXData | None],
                               tuple[TrainState, dict[str, jax.Array]]]:
    """The pure RL step ``(state, frozen, prompts, ptx) -> (state, metrics)``; jit, scan and vmap it.

    With ``mesh`` (the models fully sharded on it, ``parallel.shard_models``) the step's prompts are split
    over the mesh's batch axis, so each device generates and scores its share of the ``B K`` responses.
    """
    sampling = sampling_config(models, config)
    update = make_update(models, config, signal, spec, num_steps)

    def step(state: TrainState, frozen: FrozenParams, prompts: PromptPool, ptx: PTXData | None
             ) -> tuple[TrainState, dict[str, jax.Array]]:
        key, prompt_key, generate_key = jax.random.split(state.key, 3)
        prompt_tokens, prompt_mask, group_ids = sample_prompts(prompt_key, prompts, spec.prompts_per_step,
                                                               spec.responses_per_prompt)
        prompt_tokens, prompt_mask = parallel.constrain_rows((prompt_tokens, prompt_mask), mesh)
        rollout = collect_rollout(models, sampling, state, frozen, prompt_tokens, prompt_mask, group_ids,
                                  generate_key)
        return update(state._replace(key=key), rollout, ptx)

    return step


def make_chunk(step: Callable, steps_per_chunk: int, num_seeds: int | None = None) -> Callable:
    """Jitted ``(state, frozen, prompts, ptx) -> (state, metrics)`` running ``steps_per_chunk`` steps in
    ``lax.scan``; metrics are ``[steps_per_chunk]``.

    With ``num_seeds`` the state carries a leading seed axis, the steps are vmapped over it, and each
    metric is averaged over seeds (per-seed figures come from evaluating the final states).
    """

    def run_steps(state: TrainState, frozen: FrozenParams, prompts: PromptPool, ptx: PTXData | None):
        return jax.lax.scan(lambda s, _: step(s, frozen, prompts, ptx), state, None, length=steps_per_chunk)

    if num_seeds is None:
        return jax.jit(run_steps)
    over_seeds = jax.vmap(run_steps, in_axes=(0, None, None, None))

    def run_seeds(state: TrainState, frozen: FrozenParams, prompts: PromptPool, ptx: PTXData | None):
        state, metrics = over_seeds(state, frozen, prompts, ptx)
        return state, jax.tree_util.tree_map(lambda m: jnp.mean(m, axis=0), metrics)

    return jax.jit(run_seeds)


# --------------------------------------------------------------------------------------------------
# Initialising critics


def critic_from_backbone(model: nn.Module, lm_params: Params, key: jax.Array) -> tuple[LlamaForScore, Params]:
    """A score model whose backbone copies an LM's and whose head is fresh (N(0, 0.02)).

    Used for critics when the reward and cost models are the exact scorers of the synthetic task
    (no learned score model to start the critics from, as Safe-RLHF does).
    """
    critic = LlamaForScore(model.config)
    fresh = critic.init(key, jnp.zeros((1, 1), jnp.int32))
    params = {"params": {"model": lm_params["params"]["model"], "score_head": fresh["params"]["score_head"]}}
    return critic, params
