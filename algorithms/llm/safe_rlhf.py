"""Safe-RLHF's PPO-Lagrangian (Dai et al. 2023, "Safe RLHF: Safe Reinforcement Learning from Human
Feedback", PKU-Alignment): reward maximisation under an *average* cost constraint.

    max_pi  E_x E_y[R(x, y)] - beta KL(pi || pi_ref)   s.t.   J_c = E_x E_y[C(x, y)] <= d

Everything but the cost handling is the shared LM-PPO machinery of :mod:`algorithms.llm.rlhf_ppo`. The cost
enters through:

* the multiplier: ``lambda = exp(log_lambda)``, updated once per RL step by plain SGD with step 0.1 on
  ``-(J_c - d) * lambda`` and capped at 5 (``log_ascent``, ``lagrangian.log_space_ascent``), where
  ``J_c`` is the mean cost of the last 128 sampled responses (``lagrangian.CostWindow``), lambda starting
  at 1, d = 0 (cost <= 0 means safe);
* the actor advantage ``(A_r - lambda A_c) / (1 + lambda)`` on *every* response (gate 1).

Because only the average is constrained, slack from prompts answered very safely (or refused) can pay for
unsafe answers elsewhere: the "safety interference" RePO (:mod:`algorithms.llm.repo`) removes.
"""

from __future__ import annotations

import dataclasses

from algorithms.llm import rlhf_ppo
from constrained_rl import lagrangian
from constrained_rl.config import require


# Safe-RLHF's: SGD with step 0.1 on log lambda, lambda starting at 1 and capped at 5.
MULTIPLIER = lagrangian.MultiplierConfig(kind="log_ascent", init=1.0, max=5.0, learning_rate=0.1)


@dataclasses.dataclass(frozen=True)
class SafeRLHFConfig:
    """Safe-RLHF's multiplier settings (its defaults)."""

    multiplier: lagrangian.MultiplierConfig = dataclasses.field(default_factory=lambda: MULTIPLIER)  # lambda's rule
    cost_window: int = 128  # J_c averages the costs of this many most recent responses

    def __post_init__(self) -> None:
        require(self.cost_window >= 1, "cost_window", f"must be >= 1, got {self.cost_window}")


def cost_signal(config: SafeRLHFConfig, cost_limit: float) -> rlhf_ppo.CostSignal:
    """The average constraint: lambda's rule (log-space ascent) on ``J_c - d`` (window mean), cost advantage on
    every response."""
    rule = lagrangian.make_rule(config.multiplier)
    return rlhf_ppo.CostSignal(rule, rlhf_ppo.window_mean_cost, cost_limit, rlhf_ppo.gate_all)
