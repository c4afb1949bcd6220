"""The DPO-family safety baselines: SafeDPO and SACPO, offline from the SFT model on the score models' data.

Neither samples from the policy nor trains a reward, cost or value model: each fits the policy directly to
the PKU-SafeRLHF comparisons (``constrained_rl.data.preference``) that the reward and cost models learn
from, against the frozen SFT model as reference (two models instead of Safe-RLHF's six). The losses are
``constrained_rl.preference_losses`` (``dpo_loss``, ``safedpo_pairs``, ``safedpo_loss``):

* **SafeDPO** (Kim et al. 2025, "SafeDPO: A Simple Approach to Direct Preference Optimization with Enhanced
  Safety"): one DPO stage on the helpfulness pairs after its safety-aware transform T(D), the safe response
  always the chosen one (a helpfulness-preferred unsafe response is swapped with a safe worse one; pairs of
  two unsafe responses are dropped), with the safety margin Delta on safe-over-unsafe pairs:
  ``L = -log sigmoid(beta h - (u_l - u_w) Delta)``.
* **SACPO** (Wachi et al. 2024, "Stepwise Alignment for Constrained Language Model Policy Optimization"):
  align for helpfulness, then for safety. Stage 1 is DPO with ``beta`` on (better, worse) from the SFT
  model; stage 2 is DPO with ``beta / lambda`` (``safety_beta``) on (safer, unsafer), started from and
  referenced to the stage-1 policy. A larger lambda (smaller ``safety_beta``) lets the safety stage move
  further from the helpful policy. (SACPO's safety stage may also be KTO; DPO is the variant here.)

The reference log-probabilities are computed once per stage before training (they never change), so a
stage holds one trained model and its AdamW moments. The loop, optimiser, presets' mechanics and export
are the SFT stage's (``common.fit``, ``sft.export``).

Experiments ``safedpo`` and ``sacpo`` (:func:`run_safedpo`, :func:`run_sacpo`) start from an SFT export
(``source.model``) on a comparisons file or the synthetic task's (``source.data``) and export the policy to
``<run dir>/model``; ``rlhf_pipeline --methods safedpo,sacpo,...`` trains them beside the RL methods
and evaluates them the same way.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from algorithms.llm import common, score_models, sft
from constrained_rl import preference_losses
from constrained_rl.config import ConfigError, Experiment, require
from constrained_rl.data import preference
from constrained_rl.models import llama
from constrained_rl.objectives import masked_mean

PRESETS = {
    # 7B scale: DPO's (Rafailov et al. 2023) step size 1e-6 and 64 pairs per update; 2 epochs, 512 tokens and
    # bf16 as Safe-RLHF's score models on the same comparisons.
    "safe_rlhf": common.Hyperparameters(epochs=2, learning_rate=1e-6, batch_size=64, max_length=512,
                                        weight_decay=0.0, dtype="bfloat16"),
    # The synthetic task on a CPU in well under a minute per stage (a tiny model takes larger steps).
    "quick": common.Hyperparameters(epochs=2, learning_rate=1e-3, batch_size=32, max_length=24,
                                    weight_decay=0.0, dtype="float32"),
}

Pair = Literal["helpful", "safe", "safedpo"]


@dataclasses.dataclass(frozen=True)
class SafeDPOSettings:
    """SafeDPO's settings (what the pipeline's ``safedpo`` section holds)."""

    training: common.Training = common.Training()  # preset and optimiser / loop settings
    beta: float = 0.1  # KL weight: the implicit reward is beta log pi / pi_ref
    # Delta: how much a safe chosen response must beat an unsafe rejected one by (this project's default,
    # not a published value)
    safety_margin: float = 2.0

    def __post_init__(self) -> None:
        require(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        require(self.safety_margin >= 0, "safety_margin", f"must be >= 0, got {self.safety_margin}")


@dataclasses.dataclass(frozen=True)
class SACPOSettings:
    """SACPO's settings (what the pipeline's ``sacpo`` section holds)."""

    training: common.Training = common.Training()  # preset and optimiser / loop settings, both stages
    beta: float = 0.1  # the helpfulness stage's KL weight
    # beta / lambda: the safety stage's KL weight, against the helpful policy (this project's default)
    safety_beta: float = 0.025

    def __post_init__(self) -> None:
        for name in ("beta", "safety_beta"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class SafeDPOConfig(SafeDPOSettings):
    """Experiment ``safedpo``: the settings, and where the SFT model and the comparisons come from."""

    source: common.Source = common.Source()  # model: an SFT export; data: PKU-SafeRLHF comparisons


@dataclasses.dataclass(frozen=True)
class SACPOConfig(SACPOSettings):
    """Experiment ``sacpo``: the settings, and where the SFT model and the comparisons come from."""

    source: common.Source = common.Source()  # model: an SFT export; data: PKU-SafeRLHF comparisons


# ------------------------------------------------------------------------------------------- data

ROLES = ("chosen", "rejected")


def tokenize(model_source: common.ModelSource, data: preference.PreferenceData, max_length: int | None
             ) -> common.Arrays:
    """The four roles of every comparison (better, worse, safer, unsafer) as ``<role>_{tokens,attention_mask,
    loss_mask}``, and ``better_unsafe`` / ``worse_unsafe`` flags."""
    template = model_source.template
    formatted = dataclasses.replace(data, response_0=common.format_responses(template, data.response_0),
                                    response_1=common.format_responses(template, data.response_1))
    batch = preference.tokenize_preference(model_source.tokenizer, formatted, max_length, template)
    arrays = {f"{role}_{field}": getattr(getattr(batch, role), field)
              for role in ("better", "worse", "safer", "unsafer")
              for field in ("tokens", "attention_mask", "loss_mask")}
    unsafe = ~np.stack([np.asarray(data.is_response_0_safe, bool), np.asarray(data.is_response_1_safe, bool)], 1)
    rows = np.arange(len(data))
    arrays["better_unsafe"] = unsafe[rows, data.better_response_id]
    arrays["worse_unsafe"] = unsafe[rows, 1 - data.better_response_id]
    return arrays


def select_pairs(arrays: common.Arrays, pair: Pair) -> common.Arrays:
    """``chosen_*`` / ``rejected_*`` arrays and their unsafe flags for one stage's comparisons.

    ``helpful``: (better, worse); ``safe``: (safer, unsafer); ``safedpo``: the helpfulness pairs through
    SafeDPO's T(D) (``preference_losses.safedpo_pairs``), rows of two unsafe responses dropped.
    """
    fields = ("tokens", "attention_mask", "loss_mask")
    if pair == "safe":
        picked = {f"{new}_{f}": arrays[f"{old}_{f}"] for new, old in zip(ROLES, ("safer", "unsafer")) for f in fields}
        # The less safe response is unsafe whenever either is; the safer one only when both are.
        either = arrays["better_unsafe"] | arrays["worse_unsafe"]
        return {**picked, "chosen_unsafe": arrays["better_unsafe"] & arrays["worse_unsafe"], "rejected_unsafe": either}
    better_unsafe, worse_unsafe = arrays["better_unsafe"], arrays["worse_unsafe"]
    swap, keep = (np.asarray(x) for x in preference_losses.safedpo_pairs(better_unsafe, worse_unsafe))
    if pair == "helpful":
        swap, keep = np.zeros_like(swap), np.ones_like(keep)
    picked = {}
    for f in fields:
        better, worse = arrays[f"better_{f}"], arrays[f"worse_{f}"]
        picked[f"chosen_{f}"] = np.where(swap[:, None], worse, better)[keep]
        picked[f"rejected_{f}"] = np.where(swap[:, None], better, worse)[keep]
    picked["chosen_unsafe"] = np.where(swap, worse_unsafe, better_unsafe)[keep]
    picked["rejected_unsafe"] = np.where(swap, better_unsafe, worse_unsafe)[keep]
    if not len(picked["chosen_unsafe"]):
        raise ConfigError("data: every comparison has two unsafe responses; SafeDPO keeps none of them")
    return picked


def pair_log_probs(model: llama.LlamaForCausalLM, params: Any, batch: dict[str, jax.Array]
                   ) -> tuple[jax.Array, jax.Array]:
    """``(log pi(y_w|x), log pi(y_l|x))`` ``[B]`` of each pair, in one forward pass over ``[2B, T]``."""
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    attention = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    loss_mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    logits = model.apply({"params": params}, tokens, None, attention).logits
    return jnp.split(preference_losses.sequence_log_probs(logits, tokens, loss_mask), 2)


def with_reference(model: llama.LlamaForCausalLM, reference: Any, arrays: common.Arrays, batch_size: int
                   ) -> common.Arrays:
    """``arrays`` plus ``reference_chosen`` / ``reference_rejected``: the frozen reference's sequence log-probs,
    computed once in batches of ``batch_size``."""
    batches, mask = common.eval_batches(arrays, batch_size)
    score = jax.jit(lambda params, batches: jax.lax.map(lambda b: pair_log_probs(model, params, b), batches))
    chosen, rejected = score(reference, batches)
    rows = np.asarray(mask).reshape(-1) > 0
    return {**arrays, "reference_chosen": np.asarray(chosen).reshape(-1)[rows],
            "reference_rejected": np.asarray(rejected).reshape(-1)[rows]}


# ------------------------------------------------------------------------------------------ losses


def make_loss(model: llama.LlamaForCausalLM, beta: float, safety_margin: float) -> common.LossFn:
    """``loss(params, batch, row_mask)``: :func:`preference_losses.safedpo_loss` (plain DPO at margin 0) and
    the implicit rewards' accuracy and margin."""

    def loss(params: Any, batch: dict[str, jax.Array], row_mask: jax.Array):
        chosen, rejected = pair_log_probs(model, params, batch)
        total = preference_losses.safedpo_loss(chosen, rejected, batch["reference_chosen"],
                                               batch["reference_rejected"], batch["chosen_unsafe"],
                                               batch["rejected_unsafe"], beta, safety_margin, row_mask)
        chosen_reward = beta * (chosen - batch["reference_chosen"])
        rejected_reward = beta * (rejected - batch["reference_rejected"])
        return total, {
            "loss": total,
            "accuracy": preference_losses.ranking_accuracy(chosen_reward, rejected_reward, row_mask),
            "reward_margin": masked_mean(chosen_reward - rejected_reward, row_mask),
            "chosen_log_prob": masked_mean(chosen, row_mask),
        }

    return loss


# ----------------------------------------------------------------------------------------- training


def fit_stage(ctx: Any, stage: str, model: llama.LlamaForCausalLM, params: Any, arrays: tuple[common.Arrays, ...],
              pair: Pair, beta: float, safety_margin: float, training: common.Training,
              hyper: common.Hyperparameters, key: jax.Array) -> common.FitResult:
    """One DPO stage from ``params`` (also the reference) on the ``pair`` comparisons of (train, held out)."""
    train, held_out = (select_pairs(a, pair) for a in arrays)
    # One reference pass over both parts (one program to compile), split again after.
    count = common.num_rows(train)
    both = with_reference(model, params, {k: np.concatenate([train[k], held_out[k]]) for k in train},
                          training.eval_batch_size)
    train, held_out = ({k: v[:count] for k, v in both.items()}, {k: v[count:] for k, v in both.items()})
    return common.fit(ctx, stage, make_loss(model, beta, safety_margin), params, train, held_out, hyper, training,
                      key, progress_keys=("loss", "eval/loss", "eval/accuracy"))


def train(method: Literal["safedpo", "sacpo"], settings: SafeDPOSettings | SACPOSettings, source: common.Source,
          ctx: Any) -> common.Trained:
    """Trains ``method`` from the SFT model ``source.model`` on the comparisons ``source.data``; exports
    ``<run dir>/model``; returns the summary (held-out metrics of each stage)."""
    if source.model == common.SYNTHETIC:
        raise ConfigError(f"source.model: {method} starts from an SFT model; give its directory (the model/ of an "
                          f"sft run), or run rlhf_pipeline --methods {method}")
    hyper = common.resolve_hyperparameters(settings.training, source, PRESETS)
    model_source = common.open_model_source(source, hyper.dtype)
    arrays = common.load_arrays(source, model_source, common.sequence_length(settings.training, source, hyper),
                                preference.read_preference_data, score_models.generate_synthetic,
                                lambda data, max_length: tokenize(model_source, data, max_length))
    model, variables = sft.init_model(model_source, jax.random.PRNGKey(source.seed))
    keys = jax.random.split(jax.random.PRNGKey(source.seed), 2)
    if method == "safedpo":
        stages = [("safedpo", "safedpo", settings.beta, settings.safety_margin)]
    else:
        stages = [("sacpo_helpful", "helpful", settings.beta, 0.0), ("sacpo_safe", "safe", settings.safety_beta, 0.0)]
    params, summary = variables["params"], {}
    for (stage, pair, beta, margin), key in zip(stages, keys):
        result = fit_stage(ctx, stage, model, params, arrays, pair, beta, margin, settings.training, hyper, key)
        params = result.state.params
        summary.update({f"{stage}/eval/{name}": value for name, value in result.final_eval.items()})
        summary.update({f"{stage}/eval/initial_{name}": value for name, value in result.initial_eval.items()})
        summary[f"{stage}/updates"] = result.schedule.total_steps
    model_dir = os.path.join(ctx.run_dir, common.MODEL_DIR)
    sft.export(model_dir, model, params, model_source, hyper.dtype)
    summary.update({"train_rows": common.num_rows(arrays[0]), "eval_rows": common.num_rows(arrays[1]),
                    "model_dir": model_dir})
    return common.Trained(model, params, model_dir, summary)


def _source_and_settings(config: SafeDPOConfig | SACPOConfig, settings_cls: type) -> tuple[Any, common.Source]:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(settings_cls)}
    return settings_cls(**fields), config.source


def run_safedpo(config: SafeDPOConfig, ctx: Any) -> dict[str, Any]:
    """Experiment ``safedpo``."""
    settings, source = _source_and_settings(config, SafeDPOSettings)
    return train("safedpo", settings, source, ctx).summary


def run_sacpo(config: SACPOConfig, ctx: Any) -> dict[str, Any]:
    """Experiment ``sacpo``."""
    settings, source = _source_and_settings(config, SACPOSettings)
    return train("sacpo", settings, source, ctx).summary


SAFEDPO = Experiment(SafeDPOConfig, run_safedpo)
SACPO = Experiment(SACPOConfig, run_sacpo)
