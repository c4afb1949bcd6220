"""PPO-Lagrangian training: config, train state, one jitted iteration, and the chunked loop.

One iteration (Ray, Achiam & Amodei 2019, with PPO's update of Schulman et al. 2017):

1. roll the stochastic policy out for ``unroll_length`` steps in ``num_envs`` environments;
2. GAE for the reward and the cost streams (terminations stop the bootstrap; truncations bootstrap from
   the true final observation; the recursion never crosses an episode boundary);
3. the multiplier rule sees the mean episodic cost of the episodes completed in this rollout and the
   cost limit (no completed episode: the multiplier state is held);
4. ``num_epochs`` passes over the rollout in ``num_minibatches`` shuffled minibatches, each an Adam
   step (after global-norm gradient clipping) on the PPO-Lagrangian loss of ``losses.py``.

Everything is pure: :func:`train_iteration` maps a :class:`PPOLagState` to the next one, a chunk of
iterations is one ``lax.scan`` (PureJaxRL / Brax style), and seeds are a leading ``vmap`` axis of the
state. The cost limit lives in the state, one scalar per run, so a vmapped batch of runs can hold
different limits (the dataset-collection sweep) and a host schedule can move it between chunks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training.train_state import TrainState

from algorithms.control import policy_export
from algorithms.control.ppo_lag import losses, networks as ppo_networks
from constrained_rl import envs, lagrangian, plotting, returns, rollouts
from constrained_rl.config import Experiment, require, require_positive_integers
from constrained_rl.envs.host_rollout import HostRollout
from constrained_rl.envs.wrappers import tree_select

# Ray, Achiam & Amodei's penalty learning rate 5e-2 by plain SGD on lambda, which starts at 0 and is capped at
# 100; the PID gains apply under --multiplier.kind pid (with the paper's smoothing, EMA 0.95 and delay 10).
MULTIPLIER = lagrangian.MultiplierConfig(kind="projected_ascent", init=0.0, max=100.0, learning_rate=0.05,
                                         kp=0.1, ki=0.01, kd=0.01)


@dataclasses.dataclass(frozen=True)
class Config:
    """PPO-Lagrangian hyperparameters; defaults are sized for a BallCircle benchmark run."""

    task: str = "BallCircle"  # a JAX task, or a real task's id: trained on its twin if it has one, else on the host
    seed: int = 0  # base PRNG seed; run i of num_seeds draws from fold_in(seed, i)
    num_seeds: int = 1  # independent runs trained at once (vmapped over a leading axis)
    total_env_steps: int = 2_000_000  # environment steps per run
    num_envs: int = 32  # parallel environments per run
    unroll_length: int = 100  # steps per environment per iteration (one rollout)
    num_epochs: int = 10  # passes over each rollout
    num_minibatches: int = 8  # minibatches per pass
    learning_rate: float = 3e-4  # Adam step size for actor and critics
    max_grad_norm: float = 0.5  # global gradient-norm clip before Adam
    discount: float = 0.99  # reward discount gamma
    gae_lambda: float = 0.95  # reward GAE lambda
    cost_discount: float = 0.99  # cost discount gamma_c
    cost_gae_lambda: float = 0.95  # cost GAE lambda_c
    clip_epsilon: float = 0.2  # PPO ratio clip range
    value_clip: float | None = None  # PPO2 value clip range; none for plain regression
    value_coef: float = 0.5  # weight of the reward + cost value losses
    entropy_coef: float = 0.0  # weight of the entropy bonus
    actor_hidden_sizes: tuple[int, ...] = (64, 64)  # actor MLP widths
    critic_hidden_sizes: tuple[int, ...] = (64, 64)  # widths of each critic MLP
    activation: str = "tanh"  # hidden activation: tanh, relu or swish
    init_log_std: float = -0.5  # initial state-independent log-std of the Gaussian before tanh
    cost_limit: float = 20.0  # episodic cost limit d
    multiplier: lagrangian.MultiplierConfig = dataclasses.field(default_factory=lambda: MULTIPLIER)  # lambda's rule
    iterations_per_chunk: int = 10  # training iterations per device call (one lax.scan)
    eval_episodes: int = 10  # episodes of the deterministic policy scored at the end, per run

    def __post_init__(self) -> None:
        envs.require_task(self.task)
        require(self.seed >= 0, "seed", f"must be >= 0 (got {self.seed})")
        require_positive_integers(self, "num_seeds", "total_env_steps", "num_envs", "unroll_length",
                                  "num_epochs", "num_minibatches", "iterations_per_chunk")
        require(self.eval_episodes >= 0, "eval_episodes", f"must be >= 0 (got {self.eval_episodes})")
        require((self.num_envs * self.unroll_length) % self.num_minibatches == 0, "num_minibatches",
                f"must divide num_envs * unroll_length = {self.num_envs * self.unroll_length}")
        require(self.total_env_steps >= self.steps_per_iteration, "total_env_steps",
                f"must cover at least one rollout of num_envs * unroll_length = {self.steps_per_iteration}")
        for name in ("learning_rate", "max_grad_norm", "clip_epsilon"):
            value = getattr(self, name)
            require(value > 0 and math.isfinite(value), name, f"must be finite and > 0 (got {value})")
        for name in ("discount", "gae_lambda", "cost_discount", "cost_gae_lambda"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, name, f"must be in [0, 1] (got {value})")
        require(self.value_clip is None or self.value_clip > 0, "value_clip", f"must be > 0 or none (got {self.value_clip})")
        for name in ("value_coef", "entropy_coef", "cost_limit"):
            value = getattr(self, name)
            require(value >= 0 and math.isfinite(value), name, f"must be finite and >= 0 (got {value})")
        require(self.activation in ppo_networks.activation_names(), "activation",
                f"must be one of {', '.join(ppo_networks.activation_names())} (got {self.activation!r})")
        for name in ("actor_hidden_sizes", "critic_hidden_sizes"):
            sizes = getattr(self, name)
            require(len(sizes) >= 1 and all(s >= 1 for s in sizes), name,
                    f"must be one or more positive widths (got {sizes})")

    @property
    def steps_per_iteration(self) -> int:
        return self.num_envs * self.unroll_length

    @property
    def trains_on_host(self) -> bool:
        """A real task without a JAX twin: the rollouts are played on its simulator (host_rollout)."""
        return envs.is_host_task(self.task) and not envs.has_twin(self.task)

    @property
    def train_task(self) -> str:
        """The task trained on: ``task``, or its JAX twin when ``task`` is a real task that has one."""
        return self.task if self.trains_on_host else envs.training_task(self.task)

    @property
    def num_iterations(self) -> int:
        return self.total_env_steps // self.steps_per_iteration


@struct.dataclass
class PPOLagState:
    """Everything one run carries between iterations (add a leading axis for several runs): a train state
    per network, each with the learner's optimizer."""

    actor: TrainState
    reward_critic: TrainState
    cost_critic: TrainState
    multiplier_state: Any
    env_state: envs.EnvState
    cost_limit: jax.Array  # float32 scalar, the limit d this run is held to
    key: jax.Array
    iteration: jax.Array  # int32
    env_steps: jax.Array  # float32 (exact below 2^24 per iteration count; counts of steps)


def network_params(state: PPOLagState) -> ppo_networks.PPOLagParams:
    """The three networks' parameters, as the losses take them."""
    return ppo_networks.PPOLagParams(state.actor.params, state.reward_critic.params, state.cost_critic.params)


class Learner(NamedTuple):
    """The static parts of a run: config, environment, networks, optimizer and multiplier rule."""

    config: Config
    env: envs.Env | envs.HostTaskEnv  # batched (num_envs), auto-resetting; a host task's description on the host
    networks: ppo_networks.PPOLagNetworks
    optimizer: optax.GradientTransformation  # each network's
    multiplier_rule: lagrangian.MultiplierRule
    policy: Callable  # stochastic behaviour policy (actor_params, obs, key) -> (action, extras)
    eval_policy: Callable  # deterministic policy (tanh of the mean)
    host_rollout: HostRollout | None = None  # the host environments of a run trained on the host


def make_learner(config: Config, env: envs.Env | None = None) -> Learner:
    """Builds the learner; ``env`` (an unbatched task) overrides ``envs.make(config.task)``. A task trained on the
    host gets the environments of all ``num_seeds`` runs in one pool (made at the first rollout)."""
    if env is None and config.trains_on_host:
        batched = envs.HostTaskEnv(config.task)
    elif env is None:
        batched = envs.make(config.train_task, batch_size=config.num_envs)
    else:
        batched = envs.wrap(env, batch_size=config.num_envs)
    nets = ppo_networks.make_networks(batched.action_size, config.actor_hidden_sizes,
                                      config.critic_hidden_sizes, config.activation, config.init_log_std)
    # Each network's train state clips its own gradient's global norm before Adam. A single clip over all
    # three networks (Brax's choice) would let a large cost-critic error shrink the actor's step; clipping
    # each network alone keeps plain PPO's actor exactly independent of the cost critic.
    optimizer = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(config.learning_rate))
    policy = ppo_networks.make_policy(nets)
    on_host = HostRollout(config.task, config.num_seeds, config.num_envs, policy) if env is None and \
        config.trains_on_host else None
    return Learner(config, batched, nets, optimizer, lagrangian.make_rule(config.multiplier),
                   policy, ppo_networks.make_policy(nets, deterministic=True), on_host)


def init_state(learner: Learner, key: jax.Array, cost_limit: jax.Array | float | None = None) -> PPOLagState:
    """A fresh run; ``cost_limit`` defaults to the config's."""
    params_key, env_key, run_key = jax.random.split(key, 3)
    params = ppo_networks.init_params(learner.networks, params_key, learner.env.observation_size)
    limit = learner.config.cost_limit if cost_limit is None else cost_limit
    trained = {name: TrainState.create(apply_fn=getattr(learner.networks, name).apply, params=getattr(params, name),
                                       tx=learner.optimizer) for name in ppo_networks.PPOLagParams._fields}
    return PPOLagState(
        **trained,
        multiplier_state=learner.multiplier_rule.init(),
        env_state=None if learner.host_rollout else learner.env.reset(env_key),  # host envs live in the pool
        cost_limit=jnp.asarray(limit, jnp.float32),
        key=run_key,
        iteration=jnp.zeros((), jnp.int32),
        env_steps=jnp.zeros((), jnp.float32),
    )


def seed_keys(config: Config) -> jax.Array:
    """One key per run: ``fold_in(PRNGKey(seed), i)``, so run i is the same alone or in a batch."""
    base = jax.random.PRNGKey(config.seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(config.num_seeds))


class RolloutTargets(NamedTuple):
    reward_advantage: jax.Array  # [T, N]
    reward_target: jax.Array
    reward_value: jax.Array
    cost_advantage: jax.Array
    cost_target: jax.Array
    cost_value: jax.Array


def compute_targets(learner: Learner, params: ppo_networks.PPOLagParams, transitions) -> RolloutTargets:
    """GAE advantages and value targets of both streams for a time-major rollout ``[T, N]``.

    ``discount_t = gamma * (1 - terminated_t)``: a truncated
    step still bootstraps from ``V(next_obs)``, the true final observation. ``episode_continues_t =
    1 - done_t`` stops the lambda-recursion at every episode end, so the advantage of the last step of
    an episode never mixes in the first step of the next one.
    """
    config, nets = learner.config, learner.networks
    terminated = transitions.termination
    continues = 1.0 - transitions.done

    def stream(critic, critic_params, signal, gamma, lam):
        values = critic.apply(critic_params, transitions.obs)
        next_values = critic.apply(critic_params, transitions.next_obs)
        advantages, targets = returns.gae(signal, values, next_values, gamma * (1.0 - terminated), lam,
                                          episode_continues=continues)
        return advantages, targets, values

    reward = stream(nets.reward_critic, params.reward_critic, transitions.reward, config.discount, config.gae_lambda)
    cost = stream(nets.cost_critic, params.cost_critic, transitions.cost, config.cost_discount,
                  config.cost_gae_lambda)
    return RolloutTargets(*reward, *cost)


def completed_episode_stats(before: dict[str, jax.Array], after: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Mean reward, cost and length of episodes completed during a rollout, from the env's accumulators
    (``EpisodeMetrics``' ``state.metrics`` before and after it).

    An environment whose ``completed_episodes`` counter moved during the rollout contributes the totals
    of its most recent completed episode (exactly its one episode when ``unroll_length`` does not exceed
    the episode length). With no completed episode the means are 0 and ``episodes`` is 0.
    """
    completed = (after["completed_episodes"] > before["completed_episodes"]).astype(jnp.float32)
    count = jnp.sum(completed)
    safe_count = jnp.maximum(count, 1.0)
    stats = {name: jnp.sum(completed * after[f"completed_episode_{name}"]) / safe_count
             for name in ("reward", "cost", "length")}
    return {**stats, "episodes": count}


def _minibatch_updates(learner: Learner, state: PPOLagState, batch: losses.UpdateBatch, key):
    """``num_epochs`` shuffled passes of ``num_minibatches`` Adam steps over a flat batch; returns the
    state with the stepped networks, and the mean loss metrics."""
    config = learner.config
    hp = losses.LossHyperparameters(config.clip_epsilon, config.value_clip, config.value_coef,
                                    config.entropy_coef)
    grad_fn = jax.grad(losses.ppo_lag_loss, has_aux=True)

    def minibatch_step(state: PPOLagState, minibatch_and_key):
        minibatch, step_key = minibatch_and_key
        grads, metrics = grad_fn(network_params(state), learner.networks, minibatch, step_key, hp)
        return state.replace(actor=state.actor.apply_gradients(grads=grads.actor),
                             reward_critic=state.reward_critic.apply_gradients(grads=grads.reward_critic),
                             cost_critic=state.cost_critic.apply_gradients(grads=grads.cost_critic)), metrics

    def epoch(carry, epoch_key):
        permutation_key, loss_key = jax.random.split(epoch_key)
        size = batch.log_prob.shape[0]
        permutation = jax.random.permutation(permutation_key, size)
        minibatches = jax.tree_util.tree_map(
            lambda x: x[permutation].reshape((config.num_minibatches, -1) + x.shape[1:]), batch)
        step_keys = jax.random.split(loss_key, config.num_minibatches)
        return jax.lax.scan(minibatch_step, carry, (minibatches, step_keys))

    state, metrics = jax.lax.scan(epoch, state, jax.random.split(key, config.num_epochs))
    return state, jax.tree_util.tree_map(jnp.mean, metrics)


def train_iteration(learner: Learner, state: PPOLagState) -> tuple[PPOLagState, dict[str, jax.Array]]:
    """One rollout, one multiplier update and one PPO update of a single run (unbatched over seeds)."""
    config = learner.config
    rollout_key, update_key, next_key = jax.random.split(state.key, 3)
    env_state, transitions = rollouts.rollout(learner.env, learner.policy, state.actor.params, rollout_key,
                                              state.env_state, config.unroll_length)
    episodes = completed_episode_stats(state.env_state.metrics, env_state.metrics)
    state, metrics = learn_from_rollout(learner, state, transitions, episodes, update_key)
    return state.replace(env_state=env_state, key=next_key), metrics


def learn_from_rollout(learner: Learner, state: PPOLagState, transitions, episodes: dict[str, jax.Array],
                       update_key: jax.Array) -> tuple[PPOLagState, dict[str, jax.Array]]:
    """Everything of an iteration after its rollout (a ``[T, N]`` Transition with the policy's ``pre_squash``
    and ``log_prob`` extras, and :func:`completed_episode_stats`): the targets, the multiplier rule and the
    PPO update; counts the iteration. Whoever played the rollout (the device or the host) sets the
    environment state and the next key."""
    config = learner.config
    targets = compute_targets(learner, network_params(state), transitions)

    updated = learner.multiplier_rule.update(state.multiplier_state, episodes["cost"], state.cost_limit)
    multiplier_state = tree_select(episodes["episodes"] > 0, updated, state.multiplier_state)
    multiplier = lagrangian.multiplier(multiplier_state)

    advantage = losses.actor_advantage(targets.reward_advantage, targets.cost_advantage, multiplier)
    extras = transitions.extras
    flat = lambda x: x.reshape((-1,) + x.shape[2:])  # [T, N, ...] -> [T * N, ...]
    batch = losses.UpdateBatch(
        observation=flat(transitions.obs), pre_squash=flat(extras["pre_squash"]),
        log_prob=flat(extras["log_prob"]), advantage=flat(advantage),
        reward_value=flat(targets.reward_value), cost_value=flat(targets.cost_value),
        reward_target=flat(targets.reward_target), cost_target=flat(targets.cost_target))
    state, loss_metrics = _minibatch_updates(learner, state, batch, update_key)

    env_steps = state.env_steps + config.steps_per_iteration
    new_state = state.replace(multiplier_state=multiplier_state, iteration=state.iteration + 1, env_steps=env_steps)
    metrics = {
        "env_steps": env_steps,
        "episode_reward": episodes["reward"],
        "episode_cost": episodes["cost"],
        "episode_length": episodes["length"],
        "episodes": episodes["episodes"],
        "multiplier": multiplier,
        "cost_limit": state.cost_limit,
        "step_cost_rate": jnp.mean(transitions.cost),
        **loss_metrics,
    }
    return new_state, metrics


def make_host_iteration(learner: Learner) -> Callable[[PPOLagState], tuple[PPOLagState, dict, Any]]:
    """One iteration of every run of a seed-batched state trained on the host: the rollout of all runs'
    environments (:class:`~constrained_rl.envs.host_rollout.HostRollout`, one jitted policy call per step),
    then :func:`learn_from_rollout` of every run in one jitted call (vmapped over runs), with the keys of
    :func:`train_iteration`. Returns the state, the ``[runs]`` metrics and the ``[runs, T, N]`` rollout."""
    config = learner.config
    split_keys = jax.jit(jax.vmap(lambda key: jax.random.split(key, 3)))
    stats = jax.jit(jax.vmap(completed_episode_stats))
    learn = jax.jit(jax.vmap(lambda state, transitions, episodes, key: learn_from_rollout(
        learner, state, transitions, episodes, key)))

    def iteration(state: PPOLagState):
        keys = split_keys(state.key)  # [runs, 3, 2]: rollout, update, next
        transitions, before, after = learner.host_rollout.rollout(state.actor.params, keys[:, 0],
                                                                  config.unroll_length)
        state, metrics = learn(state, transitions, stats(before, after), keys[:, 1])
        return state.replace(key=keys[:, 2]), metrics, transitions

    return iteration


def make_chunk(learner: Learner, num_iterations: int) -> Callable[[PPOLagState], tuple[PPOLagState, dict]]:
    """``num_iterations`` iterations of every run in a seed-batched state, as one jitted call (on the host:
    one rollout and one jitted update per iteration, :func:`make_host_iteration`).

    Returns metrics with shape ``[num_seeds, num_iterations]``.
    """

    def one_run(state: PPOLagState):
        return jax.lax.scan(lambda s, _: train_iteration(learner, s), state, None, length=num_iterations)

    def all_runs(state: PPOLagState):
        if jax.tree.leaves(state)[0].shape[0] == 1:
            # A vmap, even of one run, turns the environments' batched auto-reset (a lax.cond that
            # skips the reset work on steps where no episode ends) into a select that pays it always.
            final, metrics = one_run(jax.tree.map(lambda x: x[0], state))
            return jax.tree.map(lambda x: x[None], (final, metrics))
        return jax.vmap(one_run)(state)

    if learner.host_rollout is not None:
        iteration = make_host_iteration(learner)

        def host_runs(state: PPOLagState):
            metrics = []
            for _ in range(num_iterations):
                state, step_metrics, _ = iteration(state)
                metrics.append(step_metrics)
            return state, jax.tree.map(lambda *x: jnp.stack(x, axis=1), *metrics)

        return host_runs
    return jax.jit(all_runs)


def init_runs(learner: Learner, cost_limits: jax.Array | None = None) -> PPOLagState:
    """The seed-batched initial state of ``config.num_seeds`` runs (optionally one cost limit each)."""
    keys = seed_keys(learner.config)
    if cost_limits is None:
        cost_limits = jnp.full((learner.config.num_seeds,), learner.config.cost_limit, jnp.float32)
    return jax.jit(jax.vmap(lambda k, d: init_state(learner, k, d)))(keys, cost_limits)


# --------------------------------------------------------------------------------------------------
# The experiment: chunked training through the project's loop, then a deterministic evaluation.

CURVE_METRICS = ("episode_reward", "episode_cost", "multiplier")


EPISODE_METRICS = ("episode_reward", "episode_cost", "episode_length")


def chunk_summary(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """``[runs, iterations]`` metrics of a chunk -> one scalar each (what the loop logs per chunk).

    Episode statistics are averaged over the episodes that completed in the chunk (an iteration with
    none would otherwise count as a zero-reward, zero-cost episode); ``env_steps``, ``multiplier`` and
    ``cost_limit`` are the values after the chunk's last iteration; the rest are means. With several
    runs, ``episode_reward/run{i}`` etc. keep each run's own value (the mean of a sweep over cost
    limits means little alone).
    """
    count = metrics["episodes"]

    def per_run(name: str) -> jax.Array:
        value = metrics[name]
        if name in EPISODE_METRICS:
            return jnp.sum(value * count, axis=1) / jnp.maximum(jnp.sum(count, axis=1), 1.0)
        if name in ("env_steps", "multiplier", "cost_limit"):
            return value[:, -1]
        if name == "episodes":
            return jnp.sum(value, axis=1)
        return jnp.mean(value, axis=1)

    runs = {name: per_run(name) for name in metrics}
    row = {name: jnp.mean(value) for name, value in runs.items()}
    num_runs = count.shape[0]
    if num_runs > 1:
        for name in CURVE_METRICS:
            for i in range(num_runs):
                row[f"{name}/run{i}"] = runs[name][i]
    return row


def completed_iterations(config: Config) -> tuple[int, int]:
    """``(num_chunks, iterations_per_chunk)``: whole chunks covering at most ``total_env_steps``."""
    per_chunk = min(config.iterations_per_chunk, config.num_iterations)
    return max(1, config.num_iterations // per_chunk), per_chunk


def train_runs(learner: Learner, ctx, stage: str, cost_limits: jax.Array | None = None) -> PPOLagState:
    """Trains ``num_seeds`` runs through ``ctx.loop``; logged steps are environment steps per run."""
    config = learner.config
    num_chunks, per_chunk = completed_iterations(config)
    chunk = make_chunk(learner, per_chunk)

    def chunk_fn(state):
        state, metrics = chunk(state)
        return state, chunk_summary(metrics)

    return ctx.loop(stage, lambda: init_runs(learner, cost_limits), chunk_fn, num_chunks,
                    steps_per_chunk=per_chunk * config.steps_per_iteration,
                    progress_keys=("episode_reward", "episode_cost", "multiplier"))


def evaluate_runs(learner: Learner, state: PPOLagState, num_episodes: int, key: jax.Array,
                  policy_layout: envs.Layout | None = None) -> dict[str, Any]:
    """Mean episodic reward and cost of each run's deterministic policy: ``[runs]`` arrays.

    On the training task on the device; for a real ``task`` on its simulator (the host runner), the
    policies' layout (``policy_layout``, by default the training task's) checked against the real task's."""
    keys = jax.random.split(key, state.cost_limit.shape[0])
    if envs.is_host_task(learner.config.task):
        stats = envs.evaluate_runs(envs.evaluation_env(learner.config.task), learner.eval_policy, state.actor.params,
                                   keys, num_episodes, policy_layout=policy_layout or learner.env.layout)
        return {"reward": np.mean(stats.reward_return, axis=1), "cost": np.mean(stats.cost_return, axis=1)}
    eval_env = envs.wrap(learner.env.unwrapped, episode_length=learner.env.episode_length, auto_reset=False)

    def one_run(actor_params, run_key):
        stats = rollouts.evaluate_episodes(eval_env, learner.eval_policy, actor_params, run_key, num_episodes)
        return jnp.mean(stats.reward_return), jnp.mean(stats.cost_return)

    reward, cost = jax.jit(jax.vmap(one_run))(state.actor.params, keys)
    return {"reward": reward, "cost": cost}


# What the deterministic evaluation policy (tanh of the actor's mean) reads of a train state.
POLICY_FIELDS = ("actor.params",)


def final_evaluation_key(seed: int) -> jax.Array:
    """The key of the final evaluation's episodes under the config's ``seed``."""
    return jax.random.PRNGKey(seed + 1)


def export_policy(config: Config, ctx, learner: Learner, state: PPOLagState):
    """Writes every run's final actor to ``policy/`` of the run directory
    (:mod:`algorithms.control.policy_export`), with the config, sizes and each run's cost limit."""
    content = policy_export.record(
        config, ctx.run_dir, observation_size=learner.env.observation_size, action_size=learner.env.action_size,
        episode_length=learner.env.episode_length, fields=POLICY_FIELDS,
        step=int(jax.device_get(state.iteration[0])),
        run_limits=[float(k) for k in jax.device_get(state.cost_limit)], seed_indices=range(config.num_seeds),
        train_task=config.train_task, layout=learner.env.layout.to_json())
    return policy_export.write(ctx, policy_export.select(state, POLICY_FIELDS), content)


def run(config: Config, ctx) -> dict[str, Any]:
    """Trains, evaluates and plots; returns the summary the runner writes to summary.json."""
    learner = make_learner(config)
    state = train_runs(learner, ctx, "train")
    if learner.host_rollout is not None:
        learner.host_rollout.close()  # the training environments; evaluation plays in a pool of its own
    export_policy(config, ctx, learner, state)
    rows = [r for r in ctx.read_metrics() if r["stage"] == "train"]
    if ctx.is_main:  # one writer in a multi-process run
        plot_reward_cost_curves({"runs": rows}, config.cost_limit, ctx.run_dir / "plots" / "reward_cost.png",
                                title=f"{config.task}: {config.multiplier.kind} multiplier")
    ctx.plot_learning_curves()
    tail = rows[-max(1, len(rows) // 10):]  # the last tenth of training
    summary: dict[str, Any] = {
        "task": config.task,
        "train_task": config.train_task,
        "env_steps": rows[-1]["step"] if rows else 0,
        "cost_limit": config.cost_limit,
        "final_episode_reward": float(jnp.mean(jnp.array([r["episode_reward"] for r in tail]))),
        "final_episode_cost": float(jnp.mean(jnp.array([r["episode_cost"] for r in tail]))),
        "final_multiplier": float(jnp.mean(lagrangian.multiplier(state.multiplier_state))),
    }
    if config.eval_episodes:
        scores = evaluate_runs(learner, state, config.eval_episodes, final_evaluation_key(config.seed))
        summary["eval_reward"] = [float(x) for x in scores["reward"]]
        summary["eval_cost"] = [float(x) for x in scores["cost"]]
    return summary


def plot_reward_cost_curves(curves: dict[str, list[dict]], cost_limit: float, path, title: str = "") -> None:
    """Episode reward and cost against environment steps, one line per label, the limit dashed.

    ``curves`` maps a label to metrics rows (``{"step", "episode_reward", "episode_cost", ...}``).
    """
    figure, (reward_axes, cost_axes) = plotting.new_figure((10, 3.8), 1, 2)
    for axes, key, limit in ((reward_axes, "episode_reward", None), (cost_axes, "episode_cost", cost_limit)):
        series = {label: ([r["step"] for r in rows], [r[key] for r in rows]) for label, rows in curves.items()}
        plotting.plot_curves(axes, series, xlabel="environment steps per run", ylabel=key.replace("_", " "),
                             limit=limit, limit_label=f"cost limit {cost_limit:g}", legend=True)
    if title:
        figure.suptitle(title)
    plotting.save(figure, path)


PPO_LAG = Experiment(Config, run)
