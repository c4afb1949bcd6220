"""PPO-Lagrangian (Ray, Achiam & Amodei 2019) and plain PPO, composed from constrained_rl primitives.

Modules, as Brax's PPO agent keeps them apart:
  networks  tanh-Gaussian actor, reward critic and cost critic
  losses    actor advantage, clipped surrogate, value losses, entropy
  train     config, train state, the jitted iteration, chunked loop and the experiment's ``run``
  ppo       the same learner registered as plain PPO (multiplier held at 0)
"""

from algorithms.control.ppo_lag.train import (
    Config,
    Learner,
    PPOLagState,
    init_runs,
    init_state,
    make_chunk,
    make_learner,
    run,
    train_iteration,
)

__all__ = ["Config", "Learner", "PPOLagState", "init_runs", "init_state", "make_chunk", "make_learner",
           "run", "train_iteration"]
