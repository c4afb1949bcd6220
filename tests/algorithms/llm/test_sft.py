"""SFT on the synthetic task: a short run lowers the response NLL, and the export loads back exactly.

Also the shared LLM plumbing (algorithms.llm.common): presets, batching, the schedule and bad input.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.llm import common, sft
from constrained_rl.config import ConfigError
from constrained_rl.models import load_causal_lm, load_tokenizer
from experiments.context import RunContext

pytestmark = pytest.mark.quick_compile  # tiny models trained a few steps: compiling is most of the time

TINY = sft.Config(
    source=common.Source(synthetic_rows=320, eval_fraction=0.1),
    training=common.Training(epochs=3, learning_rate=1e-2, batch_size=32, steps_per_chunk=9,
                                  checkpoint_every=100),
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ctx = RunContext(tmp_path_factory.mktemp("sft"), progress=False)
    result = sft.train(TINY, ctx)
    ctx.close()
    return result, ctx


def test_sft_lowers_held_out_response_nll(trained) -> None:
    result, ctx = trained
    summary = result.summary
    # A fresh model is near uniform over the 87 words: NLL ~ log 87 = 4.47.
    assert summary["eval/initial_loss"] > 4.0
    # 27 updates bring it well below (to ~3.4); an update on the wrong tokens or the wrong shift would not.
    assert summary["eval/loss"] < summary["eval/initial_loss"] - 0.8
    assert summary["eval/token_accuracy"] > summary["eval/initial_token_accuracy"] + 0.1
    train_losses = [row["loss"] for row in ctx.read_metrics() if row["stage"] == sft.STAGE]
    assert len(train_losses) == 3 and train_losses[-1] < train_losses[0]


def test_export_loads_back_to_identical_logits(trained) -> None:
    result, _ = trained
    model, variables = load_causal_lm(result.model_dir)
    tokenizer = load_tokenizer(result.model_dir)
    tokens = jnp.asarray([tokenizer.encode("BEGINNING OF CONVERSATION: USER: how do i cooking ASSISTANT: recipe")])
    expected = result.model.apply({"params": result.params}, tokens).logits
    np.testing.assert_allclose(model.apply(variables, tokens).logits, expected, rtol=1e-6, atol=1e-6)
    config = json.loads(pathlib.Path(result.model_dir, "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["eos_token_id"] == tokenizer.eos_id and tokenizer.pad_id != tokenizer.eos_id


def test_preset_fields_and_explicit_overrides() -> None:
    synthetic = common.resolve_hyperparameters(common.Training(), common.Source(), sft.PRESETS)
    assert synthetic == sft.PRESETS["quick"]
    explicit = common.Training(preset="safe_rlhf", learning_rate=1e-4, batch_size=8)
    resolved = common.resolve_hyperparameters(explicit, common.Source(), sft.PRESETS)
    assert (resolved.learning_rate, resolved.batch_size, resolved.epochs) == (1e-4, 8, 3)
    assert resolved.max_length == 512 and resolved.dtype == "bfloat16"


def test_epoch_batches_cover_distinct_rows_and_reshuffle() -> None:
    key = jax.random.PRNGKey(3)
    rows = jax.jit(common.epoch_batch_rows, static_argnums=(2, 3))
    epoch = np.concatenate([np.asarray(rows(key, jnp.int32(s), 10, 3)) for s in range(3)])
    assert len(set(epoch.tolist())) == 9  # 3 batches of 3 distinct rows out of 10
    next_epoch = np.concatenate([np.asarray(rows(key, jnp.int32(s), 10, 3)) for s in range(3, 6)])
    assert not np.array_equal(epoch, next_epoch)
    np.testing.assert_array_equal(rows(key, jnp.int32(4), 10, 3), rows(key, jnp.int32(4), 10, 3))


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    schedule = common.learning_rate_schedule(1.0, 100, 0.1)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(100)], [0.0, 0.5, 1.0, 0.0],
                               atol=1e-6)
    np.testing.assert_allclose(schedule(55), 0.5, atol=1e-6)  # halfway through the cosine


def test_eval_batches_pad_and_mask() -> None:
    batches, mask = common.eval_batches({"x": np.arange(5)}, 2)
    np.testing.assert_array_equal(batches["x"], [[0, 1], [2, 3], [4, 0]])
    np.testing.assert_array_equal(mask, [[1, 1], [1, 1], [1, 0]])


def test_bad_sources_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="model"):
        common.open_model_source(common.Source(model=str(tmp_path / "missing")), "float32")
    with pytest.raises(ConfigError, match="eval_fraction"):
        common.Source(eval_fraction=1.0)
    with pytest.raises(ConfigError, match="batch_size"):
        common.make_schedule(10, sft.PRESETS["quick"], common.Training())
    with pytest.raises(ConfigError, match="none.jsonl: file not found"):
        sft.train(sft.Config(source=common.Source(data=str(tmp_path / "none.jsonl"))), RunContext(tmp_path))
