"""RePO: Rectified Policy Optimization (Peng et al. 2024, "Enhancing Safety in Reinforcement Learning with
Human Feedback via Rectified Policy Optimization", arXiv 2410.19933), and the baselines built from it.

RePO replaces Safe-RLHF's average constraint with a constraint on *every* prompt, C(x) <= d, and
penalises the rectified violation:

    L(pi, lambda) = E_x E_y[R(x, y)] - beta KL(pi || pi_ref) - lambda E_x[{C(x) - d}^+]

The gradient of ``{C(x) - d}^+`` is that of ``C(x)`` on prompts over their limit and 0 elsewhere, so the
rectified policy gradient carries the cost signal only for violating prompts; prompts already safe are
optimised for helpfulness (and KL) alone. On the shared LM-PPO machinery (:mod:`algorithms.llm.rlhf_ppo`)
this is a per-response gate on the cost advantage,

    A_i = (A_r - lambda w_i A_c) / (1 + lambda w_i),    w_i = 1[C(x_i) > d]

(``penalties.rectified_penalty_weights``): a violating prompt's responses get exactly Safe-RLHF's
Lagrangian advantage, the others the reward advantage.

* ``C(x)``, the prompt's expected cost, is estimated from the step's ``K`` responses to it,
  ``C(x) ~ mean_k C(x, y_k)`` (``penalties.group_mean``). ``K = 1`` is the paper's setting: the gate is
  the sampled response's own cost. ``K > 1`` goes past the paper: it gates on an estimate of the
  prompt's expected cost, so a prompt's safe responses are rewarded (through ``-lambda A_c``) while its
  expected cost is over the limit.
* lambda: fixed (``repo.multiplier.kind fixed``), or dual ascent on the mean rectified violation
  ``E_x[{C(x) - d}^+]`` against 0 (``penalties.rectified_penalty``) with Safe-RLHF's log-space rule
  (``log_ascent``, ``lagrangian.log_space_ascent``), the same code and defaults as
  :mod:`algorithms.llm.safe_rlhf`. The paper does not pin its lambda rule down; both are offered.

Baselines from the same code (:func:`baseline_signal`): plain PPO (lambda = 0, the cost ignored) and fixed
reward shaping (a constant lambda on every response, i.e. ``r - lambda c`` up to the ``1 + lambda``
scale that keeps the KL weight at beta).
"""

from __future__ import annotations

import dataclasses

import jax

from algorithms.llm import rlhf_ppo
from constrained_rl import lagrangian, penalties
from constrained_rl.config import require

# Safe-RLHF's log-space rule and defaults on the mean rectified violation: step 0.1, lambda from 1, cap 5.
MULTIPLIER = lagrangian.MultiplierConfig(kind="log_ascent", init=1.0, max=5.0, learning_rate=0.1)
KINDS = ("log_ascent", "fixed")  # the lambda rules RePO offers


@dataclasses.dataclass(frozen=True)
class RePOConfig:
    """RePO's multiplier settings."""

    multiplier: lagrangian.MultiplierConfig = dataclasses.field(default_factory=lambda: MULTIPLIER)  # lambda's rule

    def __post_init__(self) -> None:
        require(self.multiplier.kind in KINDS, "multiplier.kind",
                f"must be {' or '.join(KINDS)} for RePO (got {self.multiplier.kind!r})")


def cost_signal(config: RePOConfig, cost_limit: float) -> rlhf_ppo.CostSignal:
    """The per-prompt constraint: gate on ``C(x) > d``; lambda fixed or ascending on ``E_x[{C(x) - d}^+]``."""
    rule = lagrangian.make_rule(config.multiplier)

    def mean_rectified_violation(window: lagrangian.CostWindow, group_costs: jax.Array) -> jax.Array:
        del window  # RePO's constraint is on this step's prompts, not on a running average
        return penalties.rectified_penalty(group_costs, cost_limit)

    def violating_prompts(group_costs: jax.Array, group_ids: jax.Array) -> jax.Array:
        return penalties.rectified_penalty_weights(group_costs, cost_limit, group_ids)

    # The rectified constraint reads E_x[{C(x) - d}^+] <= 0: its own limit is already inside.
    return rlhf_ppo.CostSignal(rule, mean_rectified_violation, 0.0, violating_prompts)


PPO_MULTIPLIER = lagrangian.MultiplierConfig(kind="fixed", init=0.0)  # plain PPO: the cost never reaches the actor
SHAPING_MULTIPLIER = lagrangian.MultiplierConfig(kind="fixed", init=2.0)  # the shaping baseline's lambda


def baseline_signal(multiplier: lagrangian.MultiplierConfig) -> rlhf_ppo.CostSignal:
    """Plain PPO (fixed at 0) or fixed reward shaping (fixed above 0), on every response."""
    require(multiplier.kind == "fixed", "shaping_multiplier.kind",
            f"must be fixed: a baseline's lambda is a constant (got {multiplier.kind!r})")
    return rlhf_ppo.CostSignal(lagrangian.make_rule(multiplier), rlhf_ppo.window_mean_cost, 0.0, rlhf_ppo.gate_all)
