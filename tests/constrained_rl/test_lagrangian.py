from __future__ import annotations

import dataclasses
import functools
import math

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

from constrained_rl import lagrangian
from constrained_rl.config import ConfigError
from constrained_rl.lagrangian import CostWindow, multiplier


def _run_updates(rule, state, costs, limits):
    """Applies ``rule.update`` along a sequence; returns the multiplier after each step."""

    def step(state, cost_and_limit):
        state = rule.update(state, *cost_and_limit)
        return state, multiplier(state)

    return jax.lax.scan(step, state, (costs, limits))[1]


class RulesByHandTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_fixed_never_moves(self):
        rule = lagrangian.fixed(0.7)
        state = self.variant(rule.update)(rule.init(), jnp.float32(10.0), jnp.float32(0.0))
        np.testing.assert_allclose(multiplier(state), 0.7, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_log_space_ascent(self):
        rule = lagrangian.log_space_ascent(learning_rate=0.1, init_multiplier=1.0, max_multiplier=5.0)
        update = self.variant(rule.update)
        state = rule.init()
        np.testing.assert_allclose(multiplier(state), 1.0)
        state = update(state, jnp.float32(1.0), jnp.float32(0.0))
        # log_lambda = 0 + 0.1 * 1 * (1 - 0)
        np.testing.assert_allclose(state.log_multiplier, 0.1, rtol=1e-6)
        np.testing.assert_allclose(multiplier(state), math.exp(0.1), rtol=1e-6)
        state = update(state, jnp.float32(3.0), jnp.float32(0.0))
        expected_log = 0.1 + 0.1 * math.exp(0.1) * 3.0
        np.testing.assert_allclose(state.log_multiplier, expected_log, rtol=1e-6)
        state = update(state, jnp.float32(100.0), jnp.float32(0.0))
        np.testing.assert_allclose(multiplier(state), 5.0, rtol=1e-6)  # clamped at log(max)
        state = update(state, jnp.float32(-1.0), jnp.float32(1.0))
        np.testing.assert_allclose(state.log_multiplier, math.log(5.0) - 0.1 * 5.0 * 2.0, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_log_space_ascent_floor(self):
        # BEAR's MMD multiplier: log alpha clipped to [-5, 5].
        rule = lagrangian.log_space_ascent(learning_rate=1.0, init_multiplier=1.0, max_multiplier=math.exp(5.0),
                                           min_multiplier=math.exp(-5.0))
        update = self.variant(rule.update)
        state = update(rule.init(), jnp.float32(-3.0), jnp.float32(0.0))
        np.testing.assert_allclose(state.log_multiplier, -3.0, rtol=1e-6)
        state = update(state, jnp.float32(-100.0), jnp.float32(0.0))  # -3 - e^-3 * 100 < -5
        np.testing.assert_allclose(state.log_multiplier, -5.0, rtol=1e-6)
        np.testing.assert_allclose(multiplier(state), math.exp(-5.0), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_projected_ascent_sgd(self):
        rule = lagrangian.projected_ascent(0.5, init_multiplier=0.0, max_multiplier=0.6)
        update = self.variant(rule.update)
        state = update(rule.init(), jnp.float32(1.0), jnp.float32(0.5))
        np.testing.assert_allclose(multiplier(state), 0.25, rtol=1e-6)
        state = update(state, jnp.float32(2.0), jnp.float32(0.5))
        np.testing.assert_allclose(multiplier(state), 0.6, rtol=1e-6)  # 1.0 projected onto max
        state = update(state, jnp.float32(0.0), jnp.float32(0.5))
        np.testing.assert_allclose(multiplier(state), 0.35, rtol=1e-6)
        state = update(state, jnp.float32(-2.0), jnp.float32(0.5))
        np.testing.assert_allclose(multiplier(state), 0.0)  # projected onto 0

    def test_projected_ascent_with_adam_takes_gap_independent_steps(self):
        rule = lagrangian.projected_ascent(None, init_multiplier=1.0, optimizer=optax.adam(0.01))
        small = rule.update(rule.init(), jnp.float32(0.001), jnp.float32(0.0))
        large = rule.update(rule.init(), jnp.float32(1000.0), jnp.float32(0.0))
        # Adam's first step is lr * sign(gradient): the pitfall the docstring warns about.
        np.testing.assert_allclose(multiplier(small), 1.01, rtol=1e-4)
        np.testing.assert_allclose(multiplier(large), 1.01, rtol=1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_pid(self):
        rule = lagrangian.pid(kp=1.0, ki=0.5, kd=2.0, proportional_ema_alpha=0.5,
                              derivative_ema_alpha=0.5, derivative_delay=2)
        update = self.variant(rule.update)
        state = rule.init()
        expected = [
            # J=2, d=1: I=.5, P=.5, C=1, D=1-C_{-2}=1 -> .5 + .5 + 2
            3.0,
            # J=4: I=2, P=1.75, C=2.5, D=2.5-C_{-1}=2.5
            1.75 + 2.0 + 2.0 * 2.5,
            # J=1: I=2, P=.875, C=1.75, D=1.75-C_0=.75
            0.875 + 2.0 + 2.0 * 0.75,
            # J=0: I=1.5, P=-.0625, C=.875, D=max(0, .875-C_1)=0
            -0.0625 + 1.5,
        ]
        for cost, want in zip([2.0, 4.0, 1.0, 0.0], expected):
            state = update(state, jnp.float32(cost), jnp.float32(1.0))
            np.testing.assert_allclose(multiplier(state), want, rtol=1e-6)
        np.testing.assert_allclose(state.integral, 1.5, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_pid_clamps_at_max_and_zero(self):
        rule = lagrangian.pid(kp=1.0, ki=0.5, kd=2.0, proportional_ema_alpha=0.5,
                              derivative_ema_alpha=0.5, derivative_delay=2, max_multiplier=4.0)
        update = self.variant(rule.update)
        state = update(update(rule.init(), jnp.float32(2.0), jnp.float32(1.0)),
                       jnp.float32(4.0), jnp.float32(1.0))
        np.testing.assert_allclose(multiplier(state), 4.0)
        state = update(rule.init(), jnp.float32(-5.0), jnp.float32(1.0))
        np.testing.assert_allclose(multiplier(state), 0.0)
        np.testing.assert_allclose(state.integral, 0.0)  # anti-windup


ALL_RULES = {
    "fixed": lagrangian.fixed(2.0),
    "log_space": lagrangian.log_space_ascent(learning_rate=0.5, max_multiplier=5.0),
    "log_space_unbounded": lagrangian.log_space_ascent(learning_rate=0.5, max_multiplier=math.inf),
    "projected": lagrangian.projected_ascent(0.5, max_multiplier=3.0),
    "projected_unbounded": lagrangian.projected_ascent(0.5),
    "projected_adam": lagrangian.projected_ascent(None, optimizer=optax.adam(0.1), max_multiplier=3.0),
    "pid": lagrangian.pid(kp=0.5, ki=0.3, kd=0.2, derivative_delay=3, max_multiplier=3.0),
    "pid_unbounded": lagrangian.pid(kp=0.5, ki=0.3, kd=0.2, derivative_delay=3),
}
MAX_MULTIPLIER = {"fixed": 2.0, "log_space": 5.0, "projected": 3.0, "projected_adam": 3.0, "pid": 3.0}
SEQUENCE_LENGTH = 12
RUN_ALL = {name: jax.jit(lambda c, d, rule=rule: _run_updates(rule, rule.init(), c, d))
           for name, rule in ALL_RULES.items()}


@settings(max_examples=20, deadline=None)
@given(
    costs=st.lists(st.floats(-50, 50, width=32), min_size=SEQUENCE_LENGTH, max_size=SEQUENCE_LENGTH),
    limits=st.lists(st.floats(0, 20, width=32), min_size=SEQUENCE_LENGTH, max_size=SEQUENCE_LENGTH),
)
def test_multiplier_stays_in_bounds(costs, limits):
    for name, run in RUN_ALL.items():
        lams = np.asarray(run(jnp.asarray(costs, jnp.float32), jnp.asarray(limits, jnp.float32)))
        assert np.all(np.isfinite(lams)), name
        assert np.all(lams >= 0), name
        assert np.all(lams <= MAX_MULTIPLIER.get(name, np.inf) * (1 + 1e-6)), name


@pytest.mark.parametrize("name", sorted(ALL_RULES))
def test_limit_zero_with_zero_cost_gives_no_nan(name):
    zeros = jnp.zeros((SEQUENCE_LENGTH,), jnp.float32)
    lams = np.asarray(RUN_ALL[name](zeros, zeros))
    assert np.all(np.isfinite(lams))


@pytest.mark.parametrize("name", ["log_space_unbounded", "projected_unbounded"])
def test_unbounded_multiplier_grows_without_overflow(name):
    lams = np.asarray(RUN_ALL[name](jnp.full((SEQUENCE_LENGTH,), 1e4), jnp.zeros((SEQUENCE_LENGTH,))))
    assert np.all(np.isfinite(lams)) and lams[-1] > 100.0


UPDATE_JIT = {name: jax.jit(rule.update) for name, rule in ALL_RULES.items()}


def _state_at(name: str, lam: float):
    """A state of rule ``name`` whose multiplier is ``lam`` (built directly, to reuse one compilation)."""
    lam = jnp.float32(lam)
    if name.startswith("log_space"):
        return lagrangian.LogSpaceState(multiplier=lam, log_multiplier=jnp.log(lam))
    return ALL_RULES[name].init()._replace(multiplier=lam)


@settings(max_examples=20, deadline=None)
@given(
    start=st.floats(0.1, 2.0),
    cost=st.floats(-10, 10).filter(lambda c: abs(c - 1.0) > 1e-2),
)
def test_direction_follows_constraint_gap(start, cost):
    for name in ("log_space", "projected", "projected_adam"):
        before = _state_at(name, start)
        after = multiplier(UPDATE_JIT[name](before, jnp.float32(cost), jnp.float32(1.0)))
        if cost > 1.0:
            assert after > multiplier(before), name
        else:
            assert after < multiplier(before) or after == 0.0, name


@functools.cache
def _pid_state_with_history():
    """A PID state after a few updates, so that every term (P, I, D) is active."""
    rule = ALL_RULES["pid_unbounded"]
    state = rule.init()
    for cost in (1.0, 2.0, 0.0, 3.0):
        state = UPDATE_JIT["pid_unbounded"](state, jnp.float32(cost), jnp.float32(0.5))
    return state


@settings(max_examples=20, deadline=None)
@given(low=st.floats(-5, 5, width=32), high=st.floats(-5, 5, width=32))
def test_pid_multiplier_is_monotone_in_cost(low, high):
    low, high = min(low, high), max(low, high)
    state = _pid_state_with_history()
    update = UPDATE_JIT["pid_unbounded"]
    lam_low = multiplier(update(state, jnp.float32(low), jnp.float32(0.5)))
    lam_high = multiplier(update(state, jnp.float32(high), jnp.float32(0.5)))
    assert lam_high >= lam_low


def test_pid_rises_under_sustained_violation_and_recovers():
    lams = np.asarray(RUN_ALL["pid_unbounded"](
        jnp.array([2.0] * 6 + [0.0] * 6, jnp.float32), jnp.ones((SEQUENCE_LENGTH,), jnp.float32)))
    assert np.all(np.diff(lams[:6]) > 0)
    assert lams[-1] < lams[5]


@pytest.mark.parametrize("name", sorted(ALL_RULES))
def test_vmap_over_limits_matches_one_by_one(name):
    rule = ALL_RULES[name]
    limits = jnp.array([0.0, 1.0, 3.0], jnp.float32)
    costs = jnp.array([2.0, 0.5, 1.5], jnp.float32)
    batched = jax.vmap(lambda d: _run_updates(rule, rule.init(), costs, jnp.full((3,), d)))(limits)
    for i, d in enumerate(limits):
        one = _run_updates(rule, rule.init(), costs, jnp.full((3,), d))
        np.testing.assert_allclose(batched[i], one, rtol=1e-6)
    assert batched.shape == (3, 3)


class CombinedAdvantageTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_value_and_stop_gradient(self):
        reward_advantage = jnp.array([1.0, -2.0, 0.5])
        cost_advantage = jnp.array([0.5, 1.0, -1.0])
        combined = self.variant(lagrangian.combined_advantage)
        np.testing.assert_allclose(combined(reward_advantage, cost_advantage, jnp.float32(3.0)),
                                   [(1 - 1.5) / 4, (-2 - 3) / 4, (0.5 + 3) / 4], rtol=1e-6)
        grad_multiplier = jax.grad(lambda lam: combined(reward_advantage, cost_advantage, lam).sum())
        assert grad_multiplier(jnp.float32(3.0)) == 0.0
        grad_reward = jax.grad(lambda a: combined(a, cost_advantage, jnp.float32(3.0)).sum())
        np.testing.assert_allclose(grad_reward(reward_advantage), [0.25] * 3)

    def test_shape_mismatch_is_refused(self):
        with pytest.raises(AssertionError):
            lagrangian.combined_advantage(jnp.zeros(3), jnp.zeros(4), 1.0)


class CostWindowTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_push_and_mean(self):
        push = self.variant(CostWindow.push)
        mean = self.variant(CostWindow.mean)
        window = CostWindow.init(4)
        assert mean(window) == 0.0  # empty, not NaN
        window = push(window, jnp.array([1.0, 50.0, 3.0]), jnp.array([True, False, True]))
        np.testing.assert_allclose(mean(window), 2.0)
        window = push(window, jnp.array([5.0, 7.0]), jnp.array([True, True]))
        np.testing.assert_allclose(mean(window), (1 + 3 + 5 + 7) / 4)
        window = push(window, jnp.array([9.0]), jnp.array([True]))  # evicts the oldest (1)
        np.testing.assert_allclose(mean(window), (3 + 5 + 7 + 9) / 4)
        window = push(window, jnp.arange(10.0), jnp.ones(10, bool))  # overflow keeps the last 4
        np.testing.assert_allclose(mean(window), (6 + 7 + 8 + 9) / 4)
        window = push(window, jnp.array([100.0]), jnp.array([False]))  # nothing valid: unchanged
        np.testing.assert_allclose(mean(window), 7.5)

    def test_matches_a_deque(self):
        from collections import deque

        rng = np.random.default_rng(0)
        reference = deque(maxlen=5)
        window = CostWindow.init(5)
        push = jax.jit(CostWindow.push)
        for _ in range(6):
            costs = rng.normal(size=3).astype(np.float32)
            mask = rng.random(3) < 0.7
            reference.extend(costs[mask])
            window = push(window, jnp.asarray(costs), jnp.asarray(mask))
            want = np.mean(reference) if reference else 0.0
            np.testing.assert_allclose(window.mean(), want, rtol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: lagrangian.fixed(-1.0),
    lambda: lagrangian.log_space_ascent(learning_rate=0.0),
    lambda: lagrangian.log_space_ascent(init_multiplier=0.0),
    lambda: lagrangian.log_space_ascent(init_multiplier=6.0, max_multiplier=5.0),
    lambda: lagrangian.log_space_ascent(init_multiplier=1.0, min_multiplier=2.0),
    lambda: lagrangian.projected_ascent(None),
    lambda: lagrangian.projected_ascent(0.1, optimizer=optax.sgd(0.1)),
    lambda: lagrangian.projected_ascent(0.1, init_multiplier=-1.0),
    lambda: lagrangian.pid(kp=-0.1),
    lambda: lagrangian.pid(proportional_ema_alpha=1.0),
    lambda: lagrangian.pid(derivative_delay=0),
    lambda: CostWindow.init(0),
])
def test_bad_hyperparameters_are_refused(make):
    with pytest.raises(ConfigError):
        make()


def test_constraint_value_must_be_scalar():
    rule = lagrangian.projected_ascent(0.1)
    with pytest.raises(AssertionError):
        rule.update(rule.init(), jnp.zeros(3), jnp.float32(0.0))


# --------------------------------------------------------------------------------------------------
# MultiplierConfig and make_rule


@pytest.mark.parametrize("field, settings", [
    ("kind", dict(kind="ascent")),
    ("init", dict(init=-1.0)),
    ("init", dict(init=6.0, max=5.0)),
    ("init", dict(kind="log_ascent", init=0.0)),
    ("init", dict(init=math.inf)),
    ("max", dict(max=0.0)),
    ("min", dict(min=2.0, init=1.0)),
    ("min", dict(min=-1.0)),
    ("learning_rate", dict(learning_rate=0.0)),
    ("learning_rate", dict(learning_rate=math.inf)),
    ("kp", dict(kp=-0.1)),
    ("ki", dict(ki=math.nan)),
    ("kd", dict(kd=-1.0)),
    ("proportional_ema_alpha", dict(proportional_ema_alpha=1.0)),
    ("derivative_ema_alpha", dict(derivative_ema_alpha=-0.1)),
    ("derivative_delay", dict(derivative_delay=0)),
    ("derivative_delay", dict(derivative_delay=2.5)),
])
def test_multiplier_config_refuses_a_bad_value_naming_the_field(field, settings):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        lagrangian.MultiplierConfig(**settings)


def test_multiplier_config_accepts_every_kind_and_an_unbounded_multiplier():
    for kind in ("fixed", "log_ascent", "projected_ascent", "pid"):
        config = lagrangian.MultiplierConfig(kind=kind, init=1.0, max=math.inf)
        assert float(multiplier(lagrangian.make_rule(config).init())) == 1.0


SETTINGS = dict(init=0.5, max=3.0, min=0.1, learning_rate=0.3, kp=0.4, ki=0.2, kd=0.1,
                proportional_ema_alpha=0.5, derivative_ema_alpha=0.25, derivative_delay=2)
DIRECT_RULES = {
    "fixed": lagrangian.fixed(0.5),
    "log_ascent": lagrangian.log_space_ascent(learning_rate=0.3, init_multiplier=0.5, max_multiplier=3.0,
                                              min_multiplier=0.1),
    "projected_ascent": lagrangian.projected_ascent(0.3, init_multiplier=0.5, max_multiplier=3.0),
    "pid": lagrangian.pid(kp=0.4, ki=0.2, kd=0.1, proportional_ema_alpha=0.5, derivative_ema_alpha=0.25,
                          derivative_delay=2, init_multiplier=0.5, max_multiplier=3.0),
}


@pytest.mark.parametrize("kind", sorted(DIRECT_RULES))
def test_make_rule_builds_the_rule_its_kind_names(kind):
    built = lagrangian.make_rule(lagrangian.MultiplierConfig(kind=kind, **SETTINGS))
    direct = DIRECT_RULES[kind]
    chex.assert_trees_all_equal(built.init(), direct.init())
    built_state, direct_state = built.init(), direct.init()
    for cost, limit in ((2.0, 1.0), (5.0, 1.0), (0.0, 1.0), (-3.0, 0.5), (1.5, 1.5), (4.0, 0.0)):
        built_state = built.update(built_state, jnp.float32(cost), jnp.float32(limit))
        direct_state = direct.update(direct_state, jnp.float32(cost), jnp.float32(limit))
        chex.assert_trees_all_equal(built_state, direct_state)
    assert kind == "fixed" or float(multiplier(built_state)) != 0.5  # the updates did move lambda


def test_a_multiplier_setting_its_kind_does_not_read_is_refused():
    from experiments import cli

    @dataclasses.dataclass(frozen=True)
    class Learner:
        multiplier: lagrangian.MultiplierConfig = dataclasses.field(
            default_factory=lambda: lagrangian.MultiplierConfig(kind="fixed", init=1.0))  # lambda's rule

    def build(*pairs):
        return cli.build_config(Learner, [cli.Override(k, v, f"--{k}", from_text=True) for k, v in pairs])

    fixed = lagrangian.MultiplierConfig(kind="fixed")
    assert set(fixed.unread_fields()) == {"max", "min", "learning_rate", "kp", "ki", "kd", "proportional_ema_alpha",
                                          "derivative_ema_alpha", "derivative_delay"}
    assert set(lagrangian.MultiplierConfig(kind="pid").unread_fields()) == {"min", "learning_rate"}
    assert build(("multiplier.init", "3")).multiplier.init == 3.0  # init is read by fixed
    with pytest.raises(ConfigError, match=r"--multiplier.kp: not read here \(kind 'fixed' does not read it; .*pid\)"):
        build(("multiplier.kp", "0.2"))
    assert build(("multiplier.kind", "pid"), ("multiplier.kp", "0.2")).multiplier.kp == 0.2  # read under pid
    with pytest.raises(ConfigError, match=r"--multiplier.learning_rate: .*log_ascent or projected_ascent"):
        build(("multiplier.kind", "pid"), ("multiplier.learning_rate", "0.5"))
