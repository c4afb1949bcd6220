"""Reward and cost models of Safe-RLHF: a Llama backbone with a linear head, fitted to comparisons.

Dai et al. 2023, "Safe RLHF: Safe Reinforcement Learning from Human Feedback". Both models read one
score at the last real token of ``template(prompt) + response + eos`` (``constrained_rl.models.score``)
and learn from PKU-SafeRLHF comparisons (``constrained_rl.data.preference``):

* reward model (helpfulness), on the pair (better, worse):
      L_R = -log sigmoid(r_better - r_worse) + mu * (r_better^2 + r_worse^2) / 2
* cost model (harmfulness), on the pair (safer, unsafer) with safety signs (+1 unsafe, -1 safe):
      L_C = -log sigmoid(c_unsafer - c_safer) - log sigmoid(s_safer c_safer) - log sigmoid(s_unsafer c_unsafer)
            + mu * (c_safer^2 + c_unsafer^2) / 2

mu is Safe-RLHF's score ``--regularization`` (0.001). The sign terms give the cost its zero: a response
is predicted unsafe when c > 0, which is the constraint C(x, y) <= 0 of the RL stage. Losses come from
``constrained_rl.preference_losses``.

Experiments ``reward_model`` (:func:`run_reward_model`) and ``cost_model`` (:func:`run_cost_model`)
share :class:`Config`. They report held-out ranking accuracy (the better / less safe response scores
higher) and, for the cost model, sign accuracy (safe vs unsafe classification), and export
``<run dir>/model`` in transformers' sequence-classification layout (head ``score.weight``; a head with a
bias in Safe-RLHF's ``score_head`` layout), which the RL stage loads with
``constrained_rl.models.load_score_model`` and transformers with ``AutoModelForSequenceClassification``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from algorithms.llm import common
from constrained_rl import parallel, preference_losses
from constrained_rl.config import Experiment, require
from constrained_rl.data import preference, synthetic_safety
from constrained_rl.models import llama, score
from constrained_rl.objectives import masked_mean

Kind = Literal["reward", "cost"]
STAGES: dict[str, str] = {"reward": "reward_model", "cost": "cost_model"}

PRESETS = {
    # Safe-RLHF's scripts/reward-model.sh and cost-model.sh: 2 epochs, lr 2e-5 cosine with 3% warmup,
    # weight decay 0.1, 16 rows per device, 512 tokens, bf16.
    "safe_rlhf": common.Hyperparameters(epochs=2, learning_rate=2e-5, batch_size=16, max_length=512,
                                            weight_decay=0.1, dtype="bfloat16"),
    # The synthetic task on a CPU in about a minute, from a freshly initialised tiny model.
    "quick": common.Hyperparameters(epochs=3, learning_rate=2e-3, batch_size=32, max_length=24,
                                        weight_decay=0.1, dtype="float32"),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Reward- or cost-model settings (the two experiments share them)."""

    source: common.Source = common.Source()  # model (an SFT export, usually), data, split, template, seed
    training: common.Training = common.Training()  # preset and optimiser / loop settings
    regularization: float = 0.001  # mu: weight of the mean squared score (Safe-RLHF's --regularization)
    score_bias: bool = False  # whether a freshly initialised score head has a bias

    def __post_init__(self) -> None:
        require(self.regularization >= 0, "regularization", f"must be >= 0, got {self.regularization}")


# ------------------------------------------------------------------------------------------- data

PAIRS: dict[str, tuple[str, str]] = {"reward": ("better", "worse"), "cost": ("safer", "unsafer")}


def tokenize(kind: Kind, model_source: common.ModelSource, data: preference.PreferenceData,
             max_length: int | None) -> common.Arrays:
    """The pair of ``kind`` as ``<role>_tokens`` / ``<role>_mask`` arrays (and the safety signs for costs)."""
    template = model_source.template
    formatted = dataclasses.replace(data, response_0=common.format_responses(template, data.response_0),
                                    response_1=common.format_responses(template, data.response_1))
    batch = preference.tokenize_preference(model_source.tokenizer, formatted, max_length, template)
    arrays = {}
    for role in PAIRS[kind]:
        tokens = getattr(batch, role)
        arrays[f"{role}_tokens"] = tokens.tokens
        arrays[f"{role}_mask"] = tokens.attention_mask
    if kind == "cost":
        arrays["safer_sign"] = batch.safer_sign
        arrays["unsafer_sign"] = batch.unsafer_sign
    return arrays


def generate_synthetic(task: synthetic_safety.SyntheticSafetyTask, rows: int, seed: int) -> preference.PreferenceData:
    """Synthetic comparisons labelled by the ground-truth reward and cost."""
    return preference.preference_data_from_rows(synthetic_safety.generate_preference_rows(task, rows, seed))


# ------------------------------------------------------------------------------------------ losses


def pair_end_scores(model: score.LlamaForScore, params: Any, batch: dict[str, jax.Array],
                    first: str, second: str) -> tuple[jax.Array, jax.Array]:
    """End scores ``[B]`` of the two responses of each pair, in one forward pass over ``[2B, T]``."""
    tokens = jnp.concatenate([batch[f"{first}_tokens"], batch[f"{second}_tokens"]])
    mask = jnp.concatenate([batch[f"{first}_mask"], batch[f"{second}_mask"]])
    scores = model.apply({"params": params}, tokens, None, mask).end_scores
    return jnp.split(scores, 2)


def make_reward_loss(model: score.LlamaForScore, regularization: float) -> common.LossFn:
    """``loss(params, batch, row_mask)``: Bradley-Terry on (better, worse) plus the score penalty."""

    def loss(params: Any, batch: dict[str, jax.Array], row_mask: jax.Array):
        better, worse = pair_end_scores(model, params, batch, "better", "worse")
        ranking = preference_losses.bradley_terry_loss(better, worse, row_mask)
        total = ranking + regularization * preference_losses.score_square_penalty(better, worse, row_mask)
        return total, {
            "loss": total,
            "bradley_terry": ranking,
            "accuracy": preference_losses.ranking_accuracy(better, worse, row_mask),
            "score_margin": masked_mean(better - worse, row_mask),
        }

    return loss


def make_cost_loss(model: score.LlamaForScore, regularization: float) -> common.LossFn:
    """``loss(params, batch, row_mask)``: Safe-RLHF's cost loss (ranking + sign terms) plus the penalty."""

    def loss(params: Any, batch: dict[str, jax.Array], row_mask: jax.Array):
        safer, unsafer = pair_end_scores(model, params, batch, "safer", "unsafer")
        safer_sign, unsafer_sign = batch["safer_sign"], batch["unsafer_sign"]
        cost_loss = preference_losses.safe_rlhf_cost_loss(safer, unsafer, safer_sign, unsafer_sign, row_mask)
        total = cost_loss + regularization * preference_losses.score_square_penalty(safer, unsafer, row_mask)
        both_mask = jnp.concatenate([row_mask, row_mask])
        return total, {
            "loss": total,
            "accuracy": preference_losses.ranking_accuracy(unsafer, safer, row_mask),
            "sign_accuracy": preference_losses.sign_accuracy(
                jnp.concatenate([safer, unsafer]), jnp.concatenate([safer_sign, unsafer_sign]), both_mask),
            "unsafe_fraction": masked_mean((jnp.concatenate([safer_sign, unsafer_sign]) > 0).astype(jnp.float32),
                                           both_mask),
        }

    return loss


LOSSES = {"reward": make_reward_loss, "cost": make_cost_loss}


# ----------------------------------------------------------------------------------------- model


def init_model(model_source: common.ModelSource, score_bias: bool, key: jax.Array
               ) -> tuple[score.LlamaForScore, Any]:
    """A fresh tiny score model for the synthetic source; else the directory's backbone (and its head if it
    has one, otherwise a fresh head)."""
    if model_source.directory is None:
        model = score.LlamaForScore(model_source.config, score_bias=score_bias)
        return model, llama.init_params(model, key)
    config = model_source.config
    return score.load_score_model(model_source.directory, key=key, score_bias=score_bias, dtype=config.dtype,
                                  param_dtype=config.param_dtype)


def export(directory: str, model: score.LlamaForScore, params: Any, model_source: common.ModelSource,
           dtype: str) -> None:
    """Writes backbone, head and config.json (transformers' sequence-classification layout, see
    ``constrained_rl.models.score``) and the tokenizer files."""
    score.save_score_model(directory, model, {"params": parallel.to_host(params)}, dtype=dtype,
                           pad_token_id=model_source.tokenizer.pad_id)
    common.save_tokenizer(directory, model_source)


def train(kind: Kind, config: Config, ctx) -> common.Trained:
    """Trains the ``kind`` model as stage ``reward_model`` / ``cost_model``; exports it; returns the summary."""
    hyper = common.resolve_hyperparameters(config.training, config.source, PRESETS)
    model_source = common.open_model_source(config.source, hyper.dtype)
    init_key, shuffle_key = jax.random.split(jax.random.PRNGKey(config.source.seed))
    train_arrays, held_out = common.load_arrays(
        config.source, model_source, common.sequence_length(config.training, config.source, hyper),
        preference.read_preference_data, generate_synthetic,
        lambda data, max_length: tokenize(kind, model_source, data, max_length))
    model, variables = init_model(model_source, config.score_bias, init_key)
    progress = ("loss", "eval/accuracy") + (("eval/sign_accuracy",) if kind == "cost" else ())
    result = common.fit(ctx, STAGES[kind], LOSSES[kind](model, config.regularization), variables["params"],
                            train_arrays, held_out, hyper, config.training, shuffle_key, progress_keys=progress)
    model_dir = os.path.join(ctx.run_dir, common.MODEL_DIR)
    export(model_dir, model, result.state.params, model_source, hyper.dtype)
    summary = common.summarize(result, train_arrays, held_out, model_dir)
    return common.Trained(model, result.state.params, model_dir, summary)


def run_reward_model(config: Config, ctx) -> dict[str, Any]:
    """Experiment ``reward_model``."""
    return train("reward", config, ctx).summary


def run_cost_model(config: Config, ctx) -> dict[str, Any]:
    """Experiment ``cost_model``."""
    return train("cost", config, ctx).summary


REWARD_MODEL = Experiment(Config, run_reward_model)
COST_MODEL = Experiment(Config, run_cost_model)
