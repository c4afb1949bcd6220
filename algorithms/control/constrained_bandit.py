"""Safety interference on a constrained contextual bandit: average vs per-context constraints.

The smallest setting that shows the idea behind RePO (Peng et al. 2024, "Enhancing Safety in
Reinforcement Learning with Human Feedback via Rectified Policy Optimization"). ``G`` contexts play
the role of prompts, ``A`` actions the role of responses, with known reward ``r[g, a]`` and cost
``c[g, a]`` tables:

* action 0 refuses: zero cost and a low reward, in every context;
* in *hard* contexts every answering action is unsafe (cost in [0.5, 1]): only refusal is safe;
* in *easy* contexts only the most rewarding action is unsafe; a nearly as good safe one exists.

A softmax policy per context (a ``[G, A]`` logit table) is trained by two learners:

* **average** (Safe-RLHF's PPO-Lagrangian constraint): ``max E_g E_a[r] s.t. E_g E_a[c] <= d``,
  Lagrangian ``E[r] - lambda (E[c] - d)`` with a multiplier rule from ``constrained_rl.lagrangian``;
* **rectified** (RePO): a constraint ``E_a[c(g, .)] <= d`` for every context, penalised through the
  rectified violation ``lambda * E_g[{C_g - d}^+]`` (``constrained_rl.penalties``): the cost gradient
  reaches only contexts over their limit, and lambda rises by dual ascent on the mean violation.

Expected outcome: the average learner meets the average constraint by driving easy contexts to zero
cost and spending that slack on hard contexts, which stay unsafe (safety interference); the rectified
learner leaves (nearly) no context over its limit.

Gradients are either exact (autodiff of the expected objective) or REINFORCE estimates from sampled
actions with a leave-one-out baseline per context. Each learner is one stage of ``ctx.loop``: chunks
of ``lax.scan`` steps, with the multiplier updated every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training.train_state import TrainState

from constrained_rl import lagrangian, penalties
from constrained_rl.config import Experiment, require

Learner = Literal["average", "rectified"]
LEARNERS: tuple[Learner, ...] = ("average", "rectified")
# Projected dual ascent on lambda from 0, step 20, projected onto [0, 100].
MULTIPLIER = lagrangian.MultiplierConfig(kind="projected_ascent", init=0.0, max=100.0, learning_rate=20.0)


@dataclasses.dataclass(frozen=True)
class Config:
    num_contexts: int = 64  # G: contexts (prompts)
    num_actions: int = 6  # A: actions per context; action 0 is the zero-cost refusal
    hard_fraction: float = 0.25  # share of contexts in which every answering action is unsafe
    refusal_reward: float = 0.1  # reward of refusing (the over-refusal action)
    cost_limit: float = 0.1  # d: limit on a context's expected cost (and on the average cost)
    average_tolerance: float = 0.01  # the average counts as met within d + this (it oscillates around d)
    num_steps: int = 3000  # policy updates per learner
    steps_per_chunk: int = 100  # updates inside one jitted lax.scan between host visits
    checkpoint_every: int = 10  # chunks between checkpoints
    learning_rate: float = 1.0  # SGD step size on each context's logits
    entropy_coef: float = 0.005  # weight of the mean policy entropy bonus
    multiplier: lagrangian.MultiplierConfig = dataclasses.field(default_factory=lambda: MULTIPLIER)  # lambda's rule
    gradient: Literal["exact", "sampled"] = "exact"  # autodiff of E[.] or REINFORCE from samples
    samples_per_context: int = 16  # K actions sampled per context per step ("sampled" only)
    seed: int = 0  # builds the tables and seeds the sampling

    def __post_init__(self) -> None:
        require(self.num_contexts >= 1, "num_contexts", f"must be >= 1, got {self.num_contexts}")
        require(self.num_actions >= 3, "num_actions", f"must be >= 3, got {self.num_actions}")
        require(0.0 <= self.hard_fraction <= 1.0, "hard_fraction",
                f"must be in [0, 1], got {self.hard_fraction}")
        require(0.0 <= self.refusal_reward < 0.2, "refusal_reward",
                f"must be in [0, 0.2) (below every answer's reward), got {self.refusal_reward}")
        require(self.cost_limit >= 0.0, "cost_limit", f"must be >= 0, got {self.cost_limit}")
        require(self.average_tolerance >= 0.0, "average_tolerance",
                f"must be >= 0, got {self.average_tolerance}")
        require(self.num_steps >= 1, "num_steps", f"must be >= 1, got {self.num_steps}")
        require(self.steps_per_chunk >= 1, "steps_per_chunk",
                f"must be >= 1, got {self.steps_per_chunk}")
        require(self.num_steps % self.steps_per_chunk == 0, "num_steps",
                f"must be a multiple of steps_per_chunk={self.steps_per_chunk}, got {self.num_steps}")
        require(self.checkpoint_every >= 1, "checkpoint_every",
                f"must be >= 1, got {self.checkpoint_every}")
        require(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        require(self.entropy_coef >= 0, "entropy_coef", f"must be >= 0, got {self.entropy_coef}")
        require(self.samples_per_context >= 2, "samples_per_context",
                f"must be >= 2 (leave-one-out baseline), got {self.samples_per_context}")


class Bandit(NamedTuple):
    rewards: jax.Array  # [G, A]
    costs: jax.Array  # [G, A]
    hard: jax.Array  # [G] bool: no safe answering action


@struct.dataclass
class BanditState:
    policy: TrainState  # params {"logits": [G, A]}, the softmax policy's, with plain SGD
    multiplier_state: Any  # a constrained_rl.lagrangian rule state
    key: jax.Array  # PRNG key for sampled gradients

    @property
    def logits(self) -> jax.Array:
        return self.policy.params["logits"]


def action_probabilities(policy_params: dict[str, jax.Array]) -> jax.Array:
    """The softmax policy ``pi(a | g)`` ``[G, A]`` of the policy train state's parameters."""
    return jax.nn.softmax(policy_params["logits"], axis=-1)


def make_bandit(config: Config) -> Bandit:
    """The reward and cost tables, a deterministic function of ``config.seed``."""
    g, a = config.num_contexts, config.num_actions
    reward_key, cost_key = jax.random.split(jax.random.PRNGKey(config.seed))
    rewards = jax.random.uniform(reward_key, (g, a), minval=0.2, maxval=1.0)
    rewards = rewards.at[:, 0].set(config.refusal_reward)
    hard = jnp.arange(g) < round(config.hard_fraction * g)
    best_answer = jnp.argmax(rewards[:, 1:], axis=1) + 1
    answering = jnp.arange(a) > 0
    risky = answering & (hard[:, None] | (jnp.arange(a) == best_answer[:, None]))
    costs = jnp.where(risky, jax.random.uniform(cost_key, (g, a), minval=0.5, maxval=1.0), 0.0)
    return Bandit(rewards=rewards, costs=costs, hard=hard)


def expected_reward_and_cost(logits: jax.Array, bandit: Bandit) -> tuple[jax.Array, jax.Array]:
    """Per-context ``E_a[r(g, a)]`` and ``E_a[c(g, a)]`` under the softmax policy, each [G]."""
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.sum(probs * bandit.rewards, -1), jnp.sum(probs * bandit.costs, -1)


def mean_entropy(logits: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.sum(jnp.exp(log_probs) * log_probs, -1))


def constraint_value(learner: Learner, context_costs: jax.Array, limit: float) -> jax.Array:
    """What the learner's multiplier ascends on: mean cost, or the mean rectified violation."""
    if learner == "average":
        return jnp.mean(context_costs)
    return penalties.rectified_penalty(context_costs, limit)


def multiplier_limit(learner: Learner, limit: float) -> float:
    # The rectified constraint is E_g[{C_g - d}^+] <= 0: its own limit is already inside.
    return limit if learner == "average" else 0.0


def exact_loss(
    logits: jax.Array, multiplier: jax.Array, bandit: Bandit, config: Config, learner: Learner
) -> jax.Array:
    """``-E_g[R_g] + lambda * penalty - entropy_coef * H``, penalty per learner.

    For "average" the penalty is ``E_g[C_g] - d``; for "rectified" it is ``E_g[{C_g - d}^+]``, whose
    gradient is the average one gated to violating contexts.
    """
    context_rewards, context_costs = expected_reward_and_cost(logits, bandit)
    if learner == "average":
        penalty = penalties.average_violation(context_costs, config.cost_limit)
    else:
        penalty = penalties.rectified_penalty(context_costs, config.cost_limit)
    return (
        -jnp.mean(context_rewards)
        + multiplier * penalty
        - config.entropy_coef * mean_entropy(logits)
    )


def _leave_one_out(values: jax.Array, group_ids: jax.Array, num_groups: int, k: int) -> jax.Array:
    group_totals = penalties.group_mean(values, group_ids, num_groups)[group_ids] * k
    return (group_totals - values) / (k - 1)


def sampled_loss(
    logits: jax.Array,
    multiplier: jax.Array,
    bandit: Bandit,
    config: Config,
    learner: Learner,
    key: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """REINFORCE surrogate from K sampled actions per context; also returns the estimated ``C_g``.

    Sample i of context g(i) gets the advantage ``(r_i - b^r_i) - lambda * w_i * (c_i - b^c_i)``
    with leave-one-out baselines. ``w_i = 1`` for "average"; for "rectified" it is RePO's gate
    ``1[C_hat_{g(i)} > d]`` (``penalties.rectified_penalty_weights``).
    """
    g, k = config.num_contexts, config.samples_per_context
    actions = jax.random.categorical(key, logits, axis=-1, shape=(k, g)).T.reshape(-1)
    group_ids = penalties.dense_group_ids(g, k)
    sample_rewards = bandit.rewards[group_ids, actions]
    sample_costs = bandit.costs[group_ids, actions]
    estimated_costs = penalties.group_mean(sample_costs, group_ids, g)
    if learner == "average":
        gate = jnp.ones_like(sample_costs)
    else:
        gate = penalties.rectified_penalty_weights(estimated_costs, config.cost_limit, group_ids)
    advantage = (sample_rewards - _leave_one_out(sample_rewards, group_ids, g, k)) - multiplier * gate * (
        sample_costs - _leave_one_out(sample_costs, group_ids, g, k)
    )
    log_probs = jax.nn.log_softmax(logits, axis=-1)[group_ids, actions]
    surrogate = -jnp.mean(log_probs * jax.lax.stop_gradient(advantage))
    return surrogate - config.entropy_coef * mean_entropy(logits), estimated_costs


def make_learner(config: Config, learner: Learner):
    """``(init_state, chunk)`` for one learner: a fresh state, and a jitted scan of update steps."""
    bandit = make_bandit(config)
    # Plain SGD (logits -= learning_rate * gradient): the step grows with lambda, so a violating
    # context is pushed back decisively. (Adam would normalise the step to ~learning_rate whatever
    # lambda is, and contexts would chatter across their limit.)
    optimizer = optax.sgd(config.learning_rate)
    rule = lagrangian.make_rule(config.multiplier)
    limit = multiplier_limit(learner, config.cost_limit)

    def init_state() -> BanditState:
        logits = jnp.zeros((config.num_contexts, config.num_actions), jnp.float32)
        policy = TrainState.create(apply_fn=action_probabilities, params={"logits": logits}, tx=optimizer)
        return BanditState(
            policy=policy.replace(step=jnp.zeros((), jnp.int32)),
            multiplier_state=rule.init(),
            key=jax.random.fold_in(jax.random.PRNGKey(config.seed), LEARNERS.index(learner) + 1),
        )

    def step(state: BanditState, _: None) -> tuple[BanditState, dict[str, jax.Array]]:
        multiplier = lagrangian.multiplier(state.multiplier_state)
        key, sample_key = jax.random.split(state.key)
        if config.gradient == "exact":
            gradient = jax.grad(exact_loss)(state.logits, multiplier, bandit, config, learner)
            _, observed_costs = expected_reward_and_cost(state.logits, bandit)
        else:
            gradient, observed_costs = jax.grad(sampled_loss, has_aux=True)(
                state.logits, multiplier, bandit, config, learner, sample_key
            )
        # The losses average over contexts; scaling by G gives every context's logits the step
        # size learning_rate whatever the number of contexts.
        gradient = gradient * config.num_contexts
        multiplier_state = rule.update(
            state.multiplier_state, constraint_value(learner, observed_costs, config.cost_limit), limit
        )
        new_state = BanditState(
            policy=state.policy.apply_gradients(grads={"logits": gradient}),
            multiplier_state=multiplier_state,
            key=key,
        )
        return new_state, evaluate(new_state, bandit, config)

    @jax.jit
    def chunk(state: BanditState) -> tuple[BanditState, dict[str, jax.Array]]:
        return jax.lax.scan(step, state, None, length=config.steps_per_chunk)

    return init_state, chunk


def evaluate(state: BanditState, bandit: Bandit, config: Config) -> dict[str, jax.Array]:
    """Exact figures of the current policy: reward, cost, violations, interference, multiplier."""
    context_rewards, context_costs = expected_reward_and_cost(state.logits, bandit)
    statistics = penalties.interference_statistics(
        context_costs, config.cost_limit, config.average_tolerance)
    hard = bandit.hard.astype(jnp.float32)
    return {
        "reward": jnp.mean(context_rewards),
        "cost": statistics.average_cost,
        "violating_fraction": statistics.violating_fraction,
        "interference": statistics.interference,
        "hard_context_cost": jnp.sum(context_costs * hard) / jnp.maximum(jnp.sum(hard), 1.0),
        "refusal_rate": jnp.mean(jax.nn.softmax(state.logits, axis=-1)[:, 0]),
        "multiplier": lagrangian.multiplier(state.multiplier_state),
    }


def train(config: Config, learner: Learner, ctx) -> BanditState:
    """Trains one learner as stage ``learner`` of ``ctx.loop``; returns its final state."""
    init_state, chunk = make_learner(config, learner)
    return ctx.loop(
        learner,
        init_state,
        chunk,
        config.num_steps // config.steps_per_chunk,
        steps_per_chunk=config.steps_per_chunk,
        checkpoint_every=config.checkpoint_every,
        reduce="last",
        progress_keys=("reward", "cost", "violating_fraction", "multiplier"),
    )


def run(config: Config, ctx) -> dict[str, float]:
    """Trains both learners; the summary holds each one's final exact figures."""
    bandit = make_bandit(config)
    summary = {}
    for learner in LEARNERS:
        state = train(config, learner, ctx)
        figures = jax.device_get(evaluate(state, bandit, config))
        summary.update({f"{learner}/{name}": float(value) for name, value in figures.items()})
    return summary


CONSTRAINED_BANDIT = Experiment(Config, run)
