"""Plain PPO (Schulman et al. 2017): PPO-Lagrangian with the multiplier held at 0.

With ``lambda = 0`` the actor advantage is the standardised reward advantage alone, so the policy
ignores cost; the cost critic still trains and its episodic cost is still reported, which is what a
comparison against PPO-Lagrangian needs. Everything else (networks, update, loop) is shared code.
"""

from __future__ import annotations

import dataclasses

from algorithms.control.ppo_lag.train import Config as PPOLagConfig
from algorithms.control.ppo_lag.train import MultiplierRuleName, run

__all__ = ["Config", "run"]


@dataclasses.dataclass(frozen=True)
class Config(PPOLagConfig):
    """PPO-Lagrangian's config with the multiplier fixed at zero."""

    multiplier_rule: MultiplierRuleName = "fixed"  # held constant: plain PPO never adapts lambda
    multiplier_init: float = 0.0  # lambda = 0: cost never enters the actor loss
