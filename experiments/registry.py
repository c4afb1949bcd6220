"""The table of experiments the runner knows: name -> ("module:ENTRY", one-line description).

Every row names one :class:`constrained_rl.config.Experiment` object inside a module: the experiment's
``Config`` (a frozen dataclass; every field has a default and a one-line ``# comment``, and
``__post_init__`` validates values with ``constrained_rl.config.require``), its ``run(config, ctx) ->
dict`` (trains / evaluates using the :class:`experiments.context.RunContext` ``ctx`` and returns the
summary figures) and, for an experiment composed of others, ``stage_configs``.

Modules are imported only when an experiment is chosen, so ``--list`` stays fast and running one
algorithm never imports another's dependencies. Registering an experiment is one row below.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from types import ModuleType
from typing import Any, Callable

from constrained_rl.config import ConfigError
from constrained_rl.config import Experiment as Entry

EXPERIMENTS: dict[str, tuple[str, str]] = {
    "tour": ("experiments.tour:TOUR", "quick tour: SATAC vs BC-Safe on fresh BallCircle data, Safe-RLHF vs RePO on the synthetic LLM task"),
    "constrained_bandit": (
        "algorithms.control.constrained_bandit:CONSTRAINED_BANDIT",
        "contextual bandit: average-cost Lagrangian vs per-context rectified penalty (safety interference)",
    ),
    "ppo_lag": ("algorithms.control.ppo_lag.train:PPO_LAG", "online PPO-Lagrangian: tanh-Gaussian actor, reward and cost critics, multiplier rule"),
    "ppo": ("algorithms.control.ppo_lag.ppo:PPO", "online PPO: PPO-Lagrangian with the multiplier held at 0 (ignores cost)"),
    "collect": ("algorithms.control.collect:COLLECT", "DSRL-recipe dataset: PPO-Lag behaviour policies over a cost-limit sweep, grid-filtered"),
    "satac": ("algorithms.control.satac:SATAC", "offline SATAC (published as WSAC): adversarial reward and cost critics, aggression-limited actor"),
    "wsac": ("algorithms.control.satac:WSAC", "offline WSAC (NeurIPS 2024), SATAC's published name: the same learner, config and options"),
    "atac": ("algorithms.control.satac:ATAC", "offline ATAC: SATAC with the cost critic switched off (ignores cost)"),
    "bc_all": ("algorithms.control.bc:BC_ALL", "offline behaviour cloning on all transitions"),
    "bc_safe": ("algorithms.control.bc:BC_SAFE", "offline behaviour cloning on the episodes within the cost limit"),
    "bcq_lag": ("algorithms.control.bcq_lag:BCQ_LAG", "offline BCQ-Lag: VAE + perturbation actor, reward and cost twin critics, PID multiplier"),
    "bear_lag": ("algorithms.control.bear_lag:BEAR_LAG", "offline BEAR-Lag: policy held to the data's support by an MMD constraint, cost critic, PID multiplier"),
    "cpq": ("algorithms.control.cpq:CPQ", "offline CPQ: cost critic pushed up on OOD actions, reward backup masked where Q_c > threshold"),
    "coptidice": ("algorithms.control.coptidice:COPTIDICE", "offline COptiDICE: stationary-distribution ratios with a cost upper bound, weighted BC"),
    "cdt": ("algorithms.control.cdt:CDT", "offline CDT: decision transformer conditioned on reward- and cost-to-go, return relabelling"),
    "offline_benchmark": ("algorithms.control.offline_benchmark:OFFLINE_BENCHMARK", "offline safe RL, DSRL protocol: every method x seeds x cost limits on one dataset; table and plot"),
    "evaluate": ("experiments.evaluate:EVALUATE", "re-score a control run's exported (or checkpointed) policies on a task, DSRL scores, no retraining"),
    "sft": ("algorithms.llm.sft:SFT", "LLM supervised fine-tuning on (prompt, response) demonstrations; Hugging Face export"),
    "reward_model": ("algorithms.llm.score_models:REWARD_MODEL", "LLM reward model: Bradley-Terry on (better, worse) pairs; Hugging Face export"),
    "cost_model": ("algorithms.llm.score_models:COST_MODEL", "LLM cost model: Safe-RLHF ranking + sign loss on (safer, unsafer) pairs"),
    "safe_rlhf": ("algorithms.llm.rlhf_pipeline:SAFE_RLHF", "LLM Safe-RLHF PPO-Lagrangian (average cost constraint), after SFT and score models"),
    "repo": ("algorithms.llm.rlhf_pipeline:REPO", "LLM RePO: per-prompt rectified cost penalty, after SFT and score models"),
    "rlhf_ppo": ("algorithms.llm.rlhf_pipeline:PPO", "LLM PPO on reward only (cost ignored), after SFT and score models"),
    "rlhf_shaping": ("algorithms.llm.rlhf_pipeline:SHAPING", "LLM PPO on r - lambda*c with a fixed lambda, after SFT and score models"),
    "safedpo": ("algorithms.llm.dpo:SAFEDPO", "LLM SafeDPO from an SFT model: DPO on safety-transformed helpfulness pairs with a safety margin; no reward, cost or value models"),
    "sacpo": ("algorithms.llm.dpo:SACPO", "LLM SACPO from an SFT model: DPO for helpfulness, then DPO for safety with beta/lambda"),
    "rlhf_pipeline": ("algorithms.llm.rlhf_pipeline:RLHF_PIPELINE", "LLM safe RLHF end to end: SFT, score models, Safe-RLHF vs RePO vs PPO vs shaping vs SafeDPO vs SACPO, table"),
}

# What `python -m experiments.run` runs when no experiment is named.
DEFAULT_EXPERIMENT = "tour"


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A loaded experiment: its config class and its run function."""

    name: str  # the registry name
    module: ModuleType  # the imported module
    config_cls: type  # the entry's Config dataclass
    run: Callable[[Any, Any], dict]  # the entry's run(config, ctx) -> summary
    stage_configs: Callable[[Any], dict[str, Any]]  # config -> the configs its stages run with


def _itself(config: Any) -> dict[str, Any]:
    """The stage configs of an experiment that composes no other: its own config."""
    return {"": config}


def describe() -> list[str]:
    """One ``name  description`` line per registered experiment, default marked."""
    width = max(len(name) for name in EXPERIMENTS)
    lines = []
    for name, (_, description) in EXPERIMENTS.items():
        marker = " (default)" if name == DEFAULT_EXPERIMENT else ""
        lines.append(f"{name:<{width}}  {description}{marker}")
    return lines


def load(name: str) -> Experiment:
    """Imports the module registered as ``name``; unknown names suggest close matches."""
    if name not in EXPERIMENTS:
        close = difflib.get_close_matches(name, list(EXPERIMENTS), n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"experiment '{name}': unknown{hint} (see --list)")
    module_path, attribute = EXPERIMENTS[name][0].split(":")
    module = importlib.import_module(module_path)
    entry = getattr(module, attribute, None)
    if not isinstance(entry, Entry):
        raise ConfigError(f"experiment '{name}': {module_path}.{attribute} is not a constrained_rl.config.Experiment")
    config_cls, run = entry.Config, entry.run
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        raise ConfigError(f"experiment '{name}': {module_path}.{attribute}.Config is not a dataclass")
    return Experiment(name, module, config_cls, run, entry.stage_configs or _itself)
