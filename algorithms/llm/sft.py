"""Supervised fine-tuning (SFT): the first stage of RLHF, fitting a language model to demonstrations.

As in Stanford Alpaca (Taori et al. 2023) and Safe-RLHF's SFT stage (Dai et al. 2023), each row is a
(prompt, response) pair formatted with a conversation template; the loss is the token-level
cross-entropy of the response tokens (and the closing eos) given everything before them, the prompt
tokens being context only (``constrained_rl.preference_losses.sft_loss``).

Experiment ``sft``: trains a Llama-family model from ``source.model`` on ``source.data`` (PKU-style
``prompt`` / ``response`` rows, or the synthetic task's behaviour-policy demonstrations), reports the
held-out response NLL and next-token accuracy before and after, and exports the model in Hugging Face
format to ``<run dir>/model`` (config.json, model.safetensors, generation_config.json, tokenizer files and
chat template, ``constrained_rl.models.hf_export``): the actor and reference
model of the RL stage, and the backbone of the reward and cost models.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from algorithms.llm import common
from constrained_rl import parallel, preference_losses
from constrained_rl.data import preference, synthetic_safety
from constrained_rl.models import hf_checkpoint, hf_export, llama
from constrained_rl.config import Experiment
from constrained_rl.sampling import SamplingConfig

STAGE = "sft"

PRESETS = {
    # Safe-RLHF's scripts/sft.sh (Alpaca recipe): 3 epochs, lr 2e-5 cosine with 3% warmup, no weight decay,
    # 512 tokens, bf16; 32 rows per update (4 per device x 8 accumulation steps).
    "safe_rlhf": common.Hyperparameters(epochs=3, learning_rate=2e-5, batch_size=32, max_length=512,
                                            weight_decay=0.0, dtype="bfloat16"),
    # The synthetic task on a CPU in about a minute (a tiny model trained from scratch needs a larger step).
    "quick": common.Hyperparameters(epochs=3, learning_rate=3e-3, batch_size=32, max_length=24,
                                        weight_decay=0.0, dtype="float32"),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """SFT settings: the model and data sources, and the optimiser / loop settings."""

    source: common.Source = common.Source()  # model, data, held-out split, template, seed
    training: common.Training = common.Training()  # preset and optimiser / loop settings


def tokenize(model_source: common.ModelSource, data: preference.SFTData, max_length: int | None) -> common.Arrays:
    """Right-padded ``template(prompt) + response + eos`` rows: tokens, attention and loss masks."""
    responses = common.format_responses(model_source.template, data.response)
    batch = preference.tokenize_sft(model_source.tokenizer, data.prompt, responses, max_length,
                                    model_source.template)
    return {"tokens": batch.tokens, "attention_mask": batch.attention_mask, "loss_mask": batch.loss_mask}


def generate_synthetic(task: synthetic_safety.SyntheticSafetyTask, rows: int, seed: int) -> preference.SFTData:
    """Demonstrations of the synthetic task's behaviour policy."""
    records = synthetic_safety.generate_sft_rows(task, rows, seed)
    return preference.SFTData(prompt=[r["prompt"] for r in records], response=[r["response"] for r in records])


def make_loss(model: llama.LlamaForCausalLM) -> common.LossFn:
    """``loss(params, batch, row_mask)``: response NLL per token, and next-token accuracy."""

    def loss(params: Any, batch: dict[str, jax.Array], row_mask: jax.Array):
        logits = model.apply({"params": params}, batch["tokens"], None, batch["attention_mask"]).logits
        loss_mask = batch["loss_mask"] & (row_mask[:, None] > 0)
        nll = preference_losses.sft_loss(logits, batch["tokens"], loss_mask)
        accuracy = preference_losses.token_accuracy(logits, batch["tokens"], loss_mask)
        return nll, {"loss": nll, "token_accuracy": accuracy}

    return loss


def init_model(model_source: common.ModelSource, key: jax.Array) -> tuple[llama.LlamaForCausalLM, Any]:
    """A fresh tiny model for the synthetic source, else the directory's checkpoint."""
    model = llama.LlamaForCausalLM(model_source.config)
    if model_source.directory is None:
        return model, llama.init_params(model, key)
    return model, hf_checkpoint.load_params(model_source.directory, model)


def export(directory: str, model: llama.LlamaForCausalLM, params: Any, model_source: common.ModelSource,
           dtype: str, sampling: SamplingConfig | None = None) -> None:
    """Writes the Hugging Face checkpoint (weights in ``dtype``, gathered from every device), the tokenizer
    files and chat template, and ``generation_config.json``: the source's with this model's token ids, and
    with ``sampling`` (a policy trained on its samples) how it sampled."""
    hf_checkpoint.save_causal_lm(directory, model, {"params": parallel.to_host(params)}, dtype=dtype)
    common.save_tokenizer(directory, model_source)
    hf_export.write_generation_config(directory, model.config, model_source.directory, sampling)


def train(config: Config, ctx) -> common.Trained:
    """Trains, evaluates on the held-out split and exports ``<run dir>/model``."""
    hyper = common.resolve_hyperparameters(config.training, config.source, PRESETS)
    model_source = common.open_model_source(config.source, hyper.dtype)
    init_key, shuffle_key = jax.random.split(jax.random.PRNGKey(config.source.seed))
    train_arrays, held_out = common.load_arrays(
        config.source, model_source, common.sequence_length(config.training, config.source, hyper),
        preference.read_sft_data, generate_synthetic,
        lambda data, max_length: tokenize(model_source, data, max_length))
    model, variables = init_model(model_source, init_key)
    result = common.fit(ctx, STAGE, make_loss(model), variables["params"], train_arrays, held_out, hyper,
                            config.training, shuffle_key, progress_keys=("loss", "eval/loss", "eval/token_accuracy"))
    model_dir = os.path.join(ctx.run_dir, common.MODEL_DIR)
    export(model_dir, model, result.state.params, model_source, hyper.dtype)
    summary = common.summarize(result, train_arrays, held_out, model_dir)
    summary["eval_response_tokens"] = int(np.sum(held_out["loss_mask"][:, 1:]))
    return common.Trained(model, result.state.params, model_dir, summary)


def run(config: Config, ctx) -> dict[str, Any]:
    """Experiment ``sft``: the summary of :func:`train`."""
    return train(config, ctx).summary


SFT = Experiment(Config, run)
