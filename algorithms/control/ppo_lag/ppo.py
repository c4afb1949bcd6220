"""Plain PPO (Schulman et al. 2017): PPO-Lagrangian with the multiplier held at 0.

With ``lambda = 0`` the actor advantage is the standardised reward advantage alone, so the policy
ignores cost; the cost critic still trains and its episodic cost is still reported, which is what a
comparison against PPO-Lagrangian needs. Everything else (networks, update, loop) is shared code.
"""

from __future__ import annotations

import dataclasses

from algorithms.control.ppo_lag.train import MULTIPLIER as PPO_LAG_MULTIPLIER
from algorithms.control.ppo_lag.train import Config as PPOLagConfig
from algorithms.control.ppo_lag.train import run
from constrained_rl import lagrangian
from constrained_rl.config import Experiment

__all__ = ["Config", "run"]

# lambda held at 0, so cost never enters the actor loss; PPO-Lagrangian's other multiplier settings are kept.
MULTIPLIER = dataclasses.replace(PPO_LAG_MULTIPLIER, kind="fixed", init=0.0)


@dataclasses.dataclass(frozen=True)
class Config(PPOLagConfig):
    """PPO-Lagrangian's config with the multiplier fixed at zero."""

    multiplier: lagrangian.MultiplierConfig = dataclasses.field(default_factory=lambda: MULTIPLIER)  # held at 0


PPO = Experiment(Config, run)
