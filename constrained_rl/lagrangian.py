"""Lagrange multipliers for constrained RL as ``(init, update)`` rules.

A constrained problem ``max_pi J_r(pi) s.t. J_c(pi) <= d`` is solved through its Lagrangian
``J_r(pi) - lambda * (J_c(pi) - d)`` with ``lambda >= 0``. The policy descends on it; the multiplier
ascends. Each rule here is a pair of pure functions in the manner of optax's gradient transformations:

    rule = log_space_ascent(learning_rate=0.1)
    state = rule.init()
    state = rule.update(state, constraint_value, limit)   # jittable, vmappable over limits
    lam = multiplier(state)

``constraint_value`` is the current estimate of ``J_c`` (a mean episodic cost, or a mean rectified
violation for RePO) and ``limit`` is ``d``. Both are scalars; vmap the update to run several cost limits
at once. Every state is a NamedTuple with a float32 scalar field ``multiplier`` that stays in
``[0, max_multiplier]``; no rule produces NaN at ``d = 0`` with zero cost (the failure reported in
OmniSafe issue #384) nor with ``max_multiplier = inf``.

A learner does not call the rules directly: its config holds one :class:`MultiplierConfig` (which kind,
and every number a kind reads) and builds the rule with :func:`make_rule`, so that every learner's
multiplier is set the same way (``--multiplier.kind pid --multiplier.init 10``).

Also here: :func:`combined_advantage` (Safe-RLHF's normalised actor advantage) and :class:`CostWindow`
(the on-device window of recent episode costs that Safe-RLHF averages into ``J_c``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Callable, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from constrained_rl.config import require, require_if_concrete

State = Any  # a NamedTuple with at least a float32 scalar field ``multiplier``

# exp(80) ~ 5.5e34 stays finite in float32 (max ~3.4e38), so a log-space multiplier capped here can never
# overflow to inf and turn ``lambda * 0`` into NaN when max_multiplier is inf.
_LOG_MULTIPLIER_CEILING = 80.0


class MultiplierRule(NamedTuple):
    """A multiplier update rule: ``init() -> state`` and ``update(state, J_c, d) -> state``."""

    init: Callable[[], State]
    update: Callable[[State, jax.Array, jax.Array], State]


def multiplier(state: State) -> jax.Array:
    """The current multiplier ``lambda >= 0`` of any rule's state (a float32 scalar)."""
    return state.multiplier


def _check(condition: Callable[[], bool], field: str, message: str, *values: Any) -> None:
    require_if_concrete(values, condition, field, message)


def _check_multiplier_bounds(rule: str, init_multiplier: float, max_multiplier: float) -> None:
    _check(lambda: max_multiplier > 0, f"{rule}.max_multiplier",
           f"must be > 0 (got {max_multiplier})", max_multiplier)
    _check(lambda: 0 <= init_multiplier <= max_multiplier, f"{rule}.init_multiplier",
           f"must be in [0, max_multiplier={max_multiplier}] (got {init_multiplier})",
           init_multiplier, max_multiplier)


def _as_scalar(value: Any) -> jax.Array:
    return jnp.asarray(value, dtype=jnp.float32)


def _constraint_gap(constraint_value: jax.Array, limit: jax.Array) -> jax.Array:
    """``J_c - d`` as a float32 scalar, after checking both are scalars."""
    constraint_value, limit = _as_scalar(constraint_value), _as_scalar(limit)
    chex.assert_rank([constraint_value, limit], 0)
    return constraint_value - limit


# --------------------------------------------------------------------------------------------------
# fixed


class FixedState(NamedTuple):
    multiplier: jax.Array


def fixed(value: float) -> MultiplierRule:
    """A constant multiplier: ``lambda_k = value`` for every k.

    Used where lambda is a hyperparameter rather than a dual variable, e.g. SATAC's aggression-limited
    actor objective (Wei et al. 2024) or RePO with a fixed penalty weight.
    """
    _check(lambda: value >= 0, "fixed.value", f"must be >= 0 (got {value})", value)

    def init() -> FixedState:
        return FixedState(multiplier=_as_scalar(value))

    def update(state: FixedState, constraint_value: jax.Array, limit: jax.Array) -> FixedState:
        _constraint_gap(constraint_value, limit)  # shape check only: every rule accepts the same input
        return state

    return MultiplierRule(init, update)


# --------------------------------------------------------------------------------------------------
# log-space gradient ascent (Safe-RLHF)


class LogSpaceState(NamedTuple):
    multiplier: jax.Array
    log_multiplier: jax.Array


def log_space_ascent(
    learning_rate: float = 0.1,
    init_multiplier: float = 1.0,
    max_multiplier: float = 5.0,
    min_multiplier: float = 0.0,
) -> MultiplierRule:
    """Gradient ascent on ``log lambda``, as in Safe-RLHF (Dai et al. 2023, "Safe RLHF").

    Safe-RLHF minimises ``-(J_c - d) * exp(log_lambda)`` with plain SGD and clamps the result, so

        log_lambda <- clip(log_lambda + lr * lambda * (J_c - d), log(min_multiplier), log(max_multiplier))
        lambda      = exp(log_lambda)

    where ``lambda`` on the right is the value before the step. Working in log space keeps lambda > 0
    and makes steps proportional to lambda. Defaults are Safe-RLHF's (lr 0.1, lambda_init 1,
    lambda_max 5, no floor); BEAR's MMD multiplier uses the same rule clipped to ``[e^-5, e^5]``.
    ``max_multiplier`` may be ``inf``; log_lambda is then still capped at 80 so that lambda stays
    finite in float32.
    """
    _check(lambda: learning_rate > 0, "log_space_ascent.learning_rate",
           f"must be > 0 (got {learning_rate})", learning_rate)
    _check(lambda: max_multiplier > 0, "log_space_ascent.max_multiplier",
           f"must be > 0 (got {max_multiplier})", max_multiplier)
    _check(lambda: 0 < init_multiplier <= max_multiplier, "log_space_ascent.init_multiplier",
           f"must be in (0, max_multiplier={max_multiplier}] because lambda lives in log space "
           f"(got {init_multiplier})", init_multiplier, max_multiplier)
    _check(lambda: 0 <= min_multiplier <= init_multiplier, "log_space_ascent.min_multiplier",
           f"must be in [0, init_multiplier={init_multiplier}] (got {min_multiplier})", min_multiplier,
           init_multiplier)

    log_ceiling = jnp.minimum(jnp.log(_as_scalar(max_multiplier)), _LOG_MULTIPLIER_CEILING)
    log_floor = jnp.log(_as_scalar(min_multiplier))  # -inf without a floor

    def init() -> LogSpaceState:
        log_multiplier = jnp.minimum(jnp.log(_as_scalar(init_multiplier)), log_ceiling)
        return LogSpaceState(multiplier=jnp.exp(log_multiplier), log_multiplier=log_multiplier)

    def update(state: LogSpaceState, constraint_value: jax.Array, limit: jax.Array) -> LogSpaceState:
        gap = _constraint_gap(constraint_value, limit)
        log_multiplier = state.log_multiplier + learning_rate * state.multiplier * gap
        log_multiplier = jnp.clip(log_multiplier, log_floor, log_ceiling)
        return LogSpaceState(multiplier=jnp.exp(log_multiplier), log_multiplier=log_multiplier)

    return MultiplierRule(init, update)


# --------------------------------------------------------------------------------------------------
# projected gradient ascent (OmniSafe)


class ProjectedState(NamedTuple):
    multiplier: jax.Array
    optimizer_state: optax.OptState


def projected_ascent(
    learning_rate: float | None,
    init_multiplier: float = 0.0,
    max_multiplier: float = math.inf,
    optimizer: optax.GradientTransformation | None = None,
) -> MultiplierRule:
    """Projected gradient ascent on lambda itself, as OmniSafe's ``Lagrange``.

    The multiplier loss is ``L(lambda) = -lambda * (J_c - d)``, whose gradient is ``-(J_c - d)``; one
    optimizer step on it is followed by projection onto ``[0, max_multiplier]``:

        lambda <- clip(lambda + step(-(J_c - d)), 0, max_multiplier)

    With the default optimizer (plain SGD) the step is ``lr * (J_c - d)``: lambda moves in proportion
    to the constraint gap. Pass ``optimizer`` (an optax transformation carrying its own learning rate,
    with ``learning_rate=None``) to use another one. Beware Adam on a single scalar, OmniSafe's default:
    Adam divides by the running RMS of the gradient, so its step is about ``lr`` in size whatever the
    gap, which makes lambda move at a constant speed, and its momentum keeps lambda rising for a while
    after the constraint is already met.
    """
    if optimizer is None:
        require(learning_rate is not None, "projected_ascent.learning_rate",
                "is required unless an optimizer is given")
        _check(lambda: learning_rate > 0, "projected_ascent.learning_rate",
               f"must be > 0 (got {learning_rate})", learning_rate)
        optimizer = optax.sgd(learning_rate)
    else:
        require(learning_rate is None, "projected_ascent.learning_rate",
                "must be None when an optimizer is given (the optimizer carries its own learning rate)")
    _check_multiplier_bounds("projected_ascent", init_multiplier, max_multiplier)

    def init() -> ProjectedState:
        lam = _as_scalar(init_multiplier)
        return ProjectedState(multiplier=lam, optimizer_state=optimizer.init(lam))

    def update(state: ProjectedState, constraint_value: jax.Array, limit: jax.Array) -> ProjectedState:
        gradient = -_constraint_gap(constraint_value, limit)
        step, optimizer_state = optimizer.update(gradient, state.optimizer_state, state.multiplier)
        lam = jnp.clip(state.multiplier + step, 0.0, max_multiplier).astype(jnp.float32)
        return ProjectedState(multiplier=lam, optimizer_state=optimizer_state)

    return MultiplierRule(init, update)


# --------------------------------------------------------------------------------------------------
# PID Lagrangian (Stooke, Achiam & Abbeel 2020)


class PIDState(NamedTuple):
    multiplier: jax.Array
    integral: jax.Array  # I, already scaled by ki
    proportional: jax.Array  # EMA of the gap J_c - d
    cost_average: jax.Array  # EMA of J_c
    cost_average_history: jax.Array  # [derivative_delay] ring buffer of past cost_average values
    step: jax.Array  # int32 number of updates so far; indexes the ring buffer


def pid(
    kp: float = 0.1,
    ki: float = 0.003,
    kd: float = 0.001,
    proportional_ema_alpha: float = 0.95,
    derivative_ema_alpha: float = 0.95,
    derivative_delay: int = 10,
    init_multiplier: float = 0.0,
    max_multiplier: float = math.inf,
) -> MultiplierRule:
    """PID-controlled multiplier, Stooke, Achiam & Abbeel 2020, "Responsive Safety in Reinforcement
    Learning by PID Lagrangian Methods".

    With ``delta_k = J_c,k - d`` and exponential moving averages ``EMA <- a * EMA + (1 - a) * x``
    started at 0 (the smoothing the paper recommends for noisy cost estimates):

        I_k      = max(0, I_{k-1} + ki * delta_k)              # integral, anti-windup at 0
        P_k      = EMA_{proportional_ema_alpha}(delta)_k
        C_k      = EMA_{derivative_ema_alpha}(J_c)_k
        D_k      = max(0, C_k - C_{k - derivative_delay})       # C_j = 0 for j < 0
        lambda_k = min(max(0, kp * P_k + I_k + kd * D_k), max_multiplier)

    The derivative only acts when cost is rising, damping overshoot. Defaults follow OSRL's BCQ-Lag
    (kp, ki, kd = 0.1, 0.003, 0.001) and the paper's code (EMA 0.95, delay 10). With both EMA alphas 0
    and delay 1 this is the paper's unsmoothed Algorithm 2. ``init_multiplier`` is lambda before the
    first update only: the PID output does not depend on the previous lambda.
    """
    for name, gain in (("kp", kp), ("ki", ki), ("kd", kd)):
        _check(lambda: gain >= 0, f"pid.{name}", f"must be >= 0 (got {gain})", gain)
    for name, alpha in (("proportional_ema_alpha", proportional_ema_alpha),
                        ("derivative_ema_alpha", derivative_ema_alpha)):
        _check(lambda: 0 <= alpha < 1, f"pid.{name}", f"must be in [0, 1) (got {alpha})", alpha)
    require(isinstance(derivative_delay, int) and derivative_delay >= 1, "pid.derivative_delay",
            f"must be an integer >= 1 (got {derivative_delay!r})")
    _check_multiplier_bounds("pid", init_multiplier, max_multiplier)

    def init() -> PIDState:
        zero = jnp.zeros((), jnp.float32)
        return PIDState(
            multiplier=_as_scalar(init_multiplier),
            integral=zero,
            proportional=zero,
            cost_average=zero,
            cost_average_history=jnp.zeros((derivative_delay,), jnp.float32),
            step=jnp.zeros((), jnp.int32),
        )

    def update(state: PIDState, constraint_value: jax.Array, limit: jax.Array) -> PIDState:
        gap = _constraint_gap(constraint_value, limit)
        cost = _as_scalar(constraint_value)
        integral = jnp.maximum(0.0, state.integral + ki * gap)
        proportional = proportional_ema_alpha * state.proportional + (1 - proportional_ema_alpha) * gap
        cost_average = derivative_ema_alpha * state.cost_average + (1 - derivative_ema_alpha) * cost
        # The oldest slot holds C_{k - delay}; it is overwritten by C_k for use delay steps later.
        slot = state.step % derivative_delay
        derivative = jnp.maximum(0.0, cost_average - state.cost_average_history[slot])
        lam = jnp.maximum(0.0, kp * proportional + integral + kd * derivative)
        return PIDState(
            multiplier=jnp.minimum(lam, max_multiplier).astype(jnp.float32),
            integral=integral,
            proportional=proportional,
            cost_average=cost_average,
            cost_average_history=state.cost_average_history.at[slot].set(cost_average),
            step=state.step + 1,
        )

    return MultiplierRule(init, update)


# --------------------------------------------------------------------------------------------------
# one config for every rule

MultiplierKind = Literal["fixed", "log_ascent", "projected_ascent", "pid"]


@dataclasses.dataclass(frozen=True)
class MultiplierConfig:
    """A learner's multiplier: which rule, and its numbers. :func:`make_rule` builds the rule.

    The kinds (each rule's docstring above gives its formula):

    * ``fixed``: lambda held at ``init`` (:func:`fixed`);
    * ``log_ascent``: SGD on ``log lambda`` by ``learning_rate * lambda * (J_c - d)``, lambda kept in
      ``[min, max]`` (Safe-RLHF's rule, :func:`log_space_ascent`);
    * ``projected_ascent``: SGD on lambda by ``learning_rate * (J_c - d)``, projected onto ``[0, max]``
      (OmniSafe's ``Lagrange`` with plain SGD, :func:`projected_ascent`);
    * ``pid``: ``lambda = min(max(0, kp * P + I + kd * D), max)`` on the gap ``J_c - d`` (Stooke, Achiam &
      Abbeel 2020, :func:`pid`), ``init`` being lambda before the first update.

    Every field is checked whatever the kind, so a value that another kind would read is never left
    invalid. A refused value raises :class:`~constrained_rl.config.ConfigError` naming the field; the
    command line puts the section in front (``multiplier.init``, ``repo.multiplier.init``). The defaults
    here are the rules' own (PID: OSRL's gains, the paper's smoothing); each learner's config sets its own.
    """

    kind: MultiplierKind = "projected_ascent"  # fixed, log_ascent (log-space SGD), projected_ascent (on lambda), pid
    init: float = 0.0  # lambda before the first update; the held value for fixed
    max: float = math.inf  # cap on lambda (inf: none)
    min: float = 0.0  # floor on lambda under log_ascent (the other kinds floor at 0)
    learning_rate: float = 0.1  # SGD step of log_ascent (on log lambda) and projected_ascent (on lambda)
    kp: float = 0.1  # PID proportional gain
    ki: float = 0.003  # PID integral gain
    kd: float = 0.001  # PID derivative gain
    proportional_ema_alpha: float = 0.95  # PID: EMA weight smoothing the gap in the proportional term (0: none)
    derivative_ema_alpha: float = 0.95  # PID: EMA weight smoothing J_c in the derivative term (0: none)
    derivative_delay: int = 10  # PID: the derivative compares the smoothed J_c with its value this many updates ago

    def __post_init__(self) -> None:
        kinds = typing.get_args(MultiplierKind)
        require(self.kind in kinds, "kind", f"must be one of {', '.join(kinds)} (got {self.kind!r})")
        require(self.max > 0, "max", f"must be > 0 (inf for no cap) (got {self.max})")
        require(0 <= self.init <= self.max and math.isfinite(self.init), "init",
                f"must be finite and in [0, max={self.max}] (got {self.init})")
        require(self.kind != "log_ascent" or self.init > 0, "init",
                f"must be > 0 for log_ascent, where lambda lives in log space (got {self.init})")
        require(0 <= self.min <= self.init, "min", f"must be in [0, init={self.init}] (got {self.min})")
        require(self.learning_rate > 0 and math.isfinite(self.learning_rate), "learning_rate",
                f"must be finite and > 0 (got {self.learning_rate})")
        for name in ("kp", "ki", "kd"):
            value = getattr(self, name)
            require(value >= 0 and math.isfinite(value), name, f"must be finite and >= 0 (got {value})")
        for name in ("proportional_ema_alpha", "derivative_ema_alpha"):
            value = getattr(self, name)
            require(0 <= value < 1, name, f"must be in [0, 1) (got {value})")
        require(isinstance(self.derivative_delay, int) and self.derivative_delay >= 1, "derivative_delay",
                f"must be an integer >= 1 (got {self.derivative_delay!r})")

    def unread_fields(self) -> dict[str, str]:
        """The fields this kind does not read (they hold a learner's numbers for the other kinds), each with
        why: the command line refuses a setting of one of them (``--multiplier.kp`` under a fixed lambda)."""
        return {name: f"kind {self.kind!r} does not read it; it applies under "
                      + " or ".join(k for k, fields in KIND_FIELDS.items() if name in fields)
                for name in (f.name for f in dataclasses.fields(self))
                if name != "kind" and name not in KIND_FIELDS[self.kind]}


def make_rule(config: MultiplierConfig) -> MultiplierRule:
    """The rule ``config.kind`` names, built with the config's numbers (the fields its kind reads)."""
    if config.kind == "fixed":
        return fixed(config.init)
    if config.kind == "log_ascent":
        return log_space_ascent(config.learning_rate, config.init, config.max, config.min)
    if config.kind == "projected_ascent":
        return projected_ascent(config.learning_rate, config.init, config.max)
    return pid(config.kp, config.ki, config.kd, config.proportional_ema_alpha, config.derivative_ema_alpha,
               config.derivative_delay, config.init, config.max)



# The fields each kind's rule reads (make_rule); the others only hold a learner's numbers for other kinds.
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "fixed": ("init",),
    "log_ascent": ("init", "max", "min", "learning_rate"),
    "projected_ascent": ("init", "max", "learning_rate"),
    "pid": ("init", "max", "kp", "ki", "kd", "proportional_ema_alpha", "derivative_ema_alpha", "derivative_delay"),
}


# --------------------------------------------------------------------------------------------------
# using the multiplier


def combined_advantage(
    reward_advantage: jax.Array, cost_advantage: jax.Array, multiplier: jax.Array
) -> jax.Array:
    """Safe-RLHF's actor advantage ``(A_r - lambda * A_c) / (1 + lambda)``, elementwise.

    Dividing by ``1 + lambda`` keeps the advantage's scale bounded as lambda grows (Dai et al. 2023).
    lambda is held under ``stop_gradient``: the policy loss must not move the multiplier. Any shape;
    ``multiplier`` is a scalar or broadcasts against the advantages.
    """
    chex.assert_equal_shape([reward_advantage, cost_advantage])
    lam = jax.lax.stop_gradient(multiplier)
    return (reward_advantage - lam * cost_advantage) / (1.0 + lam)


class CostWindow(NamedTuple):
    """A fixed-size on-device ring buffer of recent episode costs; its mean is the ``J_c`` estimate.

    Safe-RLHF estimates ``J_c`` as the mean cost of the last 128 episodes (responses), so that one
    noisy batch does not jerk the multiplier. All methods are pure and jittable:

        window = CostWindow.init(128)
        window = window.push(episode_costs, valid_mask)   # costs [N], mask [N]
        j_c = window.mean()
    """

    costs: jax.Array  # [size] float32
    filled: jax.Array  # [size] bool, slot holds a real cost
    position: jax.Array  # int32 next slot to write

    @staticmethod
    def init(size: int) -> CostWindow:
        require(isinstance(size, int) and size >= 1, "CostWindow.size",
                f"must be an integer >= 1 (got {size!r})")
        return CostWindow(
            costs=jnp.zeros((size,), jnp.float32),
            filled=jnp.zeros((size,), bool),
            position=jnp.zeros((), jnp.int32),
        )

    def push(self, costs: jax.Array, valid_mask: jax.Array | None = None) -> CostWindow:
        """Appends the entries of ``costs`` [N] where ``valid_mask`` [N] is true, in order.

        When more than ``size`` valid costs arrive at once, only the last ``size`` are kept, as a deque
        would after appending them one by one.
        """
        chex.assert_rank(costs, 1)
        if valid_mask is None:
            valid_mask = jnp.ones(costs.shape, bool)
        chex.assert_equal_shape([costs, valid_mask])
        size = self.costs.shape[0]
        valid = valid_mask.astype(bool)
        rank = jnp.cumsum(valid) - 1  # order among the valid entries
        num_valid = rank[-1] + 1 if costs.shape[0] else jnp.zeros((), jnp.int32)
        # Keeping only the last `size` valid entries makes the target slots distinct, so the scatter
        # below has no write conflicts (whose winner XLA leaves unspecified).
        kept = valid & (rank >= num_valid - size)
        slots = jnp.where(kept, (self.position + rank) % size, size)  # `size` is out of bounds: dropped
        return CostWindow(
            costs=self.costs.at[slots].set(costs.astype(jnp.float32), mode="drop"),
            filled=self.filled.at[slots].set(True, mode="drop"),
            position=((self.position + num_valid) % size).astype(jnp.int32),
        )

    def mean(self) -> jax.Array:
        """Mean of the costs held; 0 while the window is empty."""
        count = jnp.sum(self.filled)
        total = jnp.sum(jnp.where(self.filled, self.costs, 0.0))
        return total / jnp.maximum(count, 1)
