"""Behaviour cloning baselines of offline safe RL: BC-All and BC-Safe (OSRL, Liu et al. 2023).

* **BC-All** imitates every transition of the dataset: it reproduces the average behaviour, safe and
  unsafe alike.
* **BC-Safe** imitates only the episodes whose cost return is within the cost limit,
  ``C = sum_t c_t <= kappa``: a different dataset, hence a different policy, per cost limit. Under the
  offline scaffold each limit's runs sample from their own safe episodes, all in one vmapped call.

By default the policy is OSRL's (``osrl/algorithms/bc.py``): a deterministic actor
``mu(s) = tanh(f(s))`` regressed on the data's actions by the mean squared error,

    L(theta) = mean_{b,i} (mu_theta(s_b)_i - a_b,i)^2,

and evaluation acts with ``mu(s)``. ``loss = "likelihood"`` fits a tanh-squashed diagonal Gaussian
(state-dependent std) by maximum likelihood instead, ``L = -mean_b log pi_theta(a_b | s_b)``, and acts
with ``tanh(mean)``: the loss of SATAC's BC-Safe reference policy and of ATAC/SATAC's warm start (the
same functions, :mod:`algorithms.control.cloning`), so that SATAC's reference can be scored on its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import optax

from algorithms.control import cloning, offline
from constrained_rl.config import Experiment, require
from constrained_rl.models import mlp

Loss = Literal["mse", "likelihood"]

@dataclasses.dataclass(frozen=True)
class Config(offline.OfflineConfig):
    """BC-All by default; ``data = "safe"`` gives BC-Safe. Defaults follow OSRL's BC (``bc_configs.py``)."""

    data: Literal["all", "safe"] = "all"  # imitate all transitions, or episodes with cost return <= kappa
    loss: Loss = "mse"  # mse: OSRL's deterministic actor regressed on actions; likelihood: tanh-Gaussian (SATAC's reference)
    hidden_sizes: tuple[int, ...] = (256, 256)  # actor MLP widths (OSRL: 2 x 256)
    learning_rate: float = 1e-3  # Adam step size (OSRL BC: 1e-3)
    batch_size: int = 512  # transitions per update (OSRL: 512)
    num_updates: int = 100_000  # gradient updates (OSRL: 100k)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.data in ("all", "safe"), "data", f"must be 'all' or 'safe' (got {self.data!r})")
        require(self.loss in ("mse", "likelihood"), "loss", f"must be 'mse' or 'likelihood' (got {self.loss!r})")
        require(len(self.hidden_sizes) >= 1 and all(w >= 1 for w in self.hidden_sizes), "hidden_sizes",
                f"must be one or more positive widths (got {self.hidden_sizes})")
        require(self.learning_rate > 0, "learning_rate", f"must be > 0 (got {self.learning_rate})")


@dataclasses.dataclass(frozen=True)
class SafeConfig(Config):
    """BC-Safe: behaviour cloning on the episodes within each cost limit."""

    data: Literal["all", "safe"] = "safe"  # imitate all transitions, or episodes with cost return <= kappa


def make_algorithm(config: Config, problem: offline.Problem) -> offline.Algorithm:
    if config.loss == "mse":
        actor = cloning.deterministic_actor(problem.action_size, config.hidden_sizes)
        step, policy = cloning.regression_update(actor), cloning.deterministic_policy(actor)
    else:
        actor = mlp.state_dependent_actor(problem.action_size, config.hidden_sizes)
        step, policy = cloning.bc_update(actor), mlp.mode_policy(actor)
    optimizer = optax.adam(config.learning_rate)

    def init(key: jax.Array, cost_limit: jax.Array) -> cloning.BCState:
        del cost_limit  # it chooses the data (the rows sampled), not the state
        return cloning.init_bc_state(actor, optimizer, key, problem.observation_size)

    phase = offline.Phase("train", step, config.num_updates, rows=config.data)
    return offline.Algorithm(init, (phase,), policy, uses_cost_limit=config.data == "safe",
                             policy_fields=("actor.params",))


def run(config: Config, ctx) -> dict[str, Any]:
    """Trains BC-All or BC-Safe for every cost limit and seed; returns the DSRL scores."""
    return offline.run(config, ctx, make_algorithm)


BC_ALL = Experiment(Config, run)
BC_SAFE = Experiment(SafeConfig, run)
