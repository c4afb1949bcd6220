"""The DPO-family baselines: the stages' pairs by hand, a refused start, and SafeDPO learning."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from algorithms.llm import common, dpo, sft
from constrained_rl.config import ConfigError
from experiments.context import RunContext


def four_roles() -> common.Arrays:
    """Four comparisons whose (better, worse) safety is (safe, safe), (unsafe, safe), (unsafe, unsafe),
    (safe, unsafe); each role's tokens are its row index plus an offset naming the role."""
    rows = np.arange(4)[:, None]
    arrays = {}
    for offset, role in enumerate(("better", "worse", "safer", "unsafer")):
        arrays[f"{role}_tokens"] = rows + 10 * offset
        arrays[f"{role}_attention_mask"] = np.ones((4, 1), bool)
        arrays[f"{role}_loss_mask"] = np.ones((4, 1), bool)
    arrays["better_unsafe"] = np.array([False, True, True, False])
    arrays["worse_unsafe"] = np.array([False, False, True, True])
    return arrays


def test_pairs_by_hand():
    safedpo = dpo.select_pairs(four_roles(), "safedpo")
    # Row 0 kept, row 1 swapped (the safe worse response is chosen), row 2 dropped (both unsafe), row 3 kept.
    np.testing.assert_array_equal(safedpo["chosen_tokens"][:, 0], [0, 11, 3])
    np.testing.assert_array_equal(safedpo["rejected_tokens"][:, 0], [10, 1, 13])
    np.testing.assert_array_equal(safedpo["chosen_unsafe"], [False, False, False])
    np.testing.assert_array_equal(safedpo["rejected_unsafe"], [False, True, True])
    helpful = dpo.select_pairs(four_roles(), "helpful")
    np.testing.assert_array_equal(helpful["chosen_tokens"][:, 0], [0, 1, 2, 3])
    safe = dpo.select_pairs(four_roles(), "safe")
    np.testing.assert_array_equal(safe["rejected_tokens"][:, 0], [30, 31, 32, 33])
    np.testing.assert_array_equal(safe["chosen_unsafe"], [False, False, True, False])
    all_unsafe = {**four_roles(), "better_unsafe": np.ones(4, bool), "worse_unsafe": np.ones(4, bool)}
    with pytest.raises(ConfigError, match="two unsafe"):
        dpo.select_pairs(all_unsafe, "safedpo")


def test_needs_an_sft_model(tmp_path):
    with pytest.raises(ConfigError, match="source.model"):
        dpo.train("safedpo", dpo.SafeDPOSettings(), common.Source(), RunContext(tmp_path, progress=False))
    with pytest.raises(ConfigError, match="safety_margin"):
        dpo.SafeDPOSettings(safety_margin=-1.0)


def test_safedpo_learns_its_comparisons(tmp_path):
    # A freshly initialised tiny model stands in for the SFT model; SafeDPO must rank its held-out pairs
    # (the safe chosen above the rejected, by the implicit reward and margin) better than chance after four epochs.
    model_source = common.open_model_source(common.Source(), "float32")
    tiny = dataclasses.replace(model_source.config, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2)
    model_source = model_source._replace(config=tiny)
    model, variables = sft.init_model(model_source, jax.random.PRNGKey(0))
    sft.export(str(tmp_path / "sft"), model, variables["params"], model_source, "float32")
    source = common.Source(model=str(tmp_path / "sft"), synthetic_rows=512, eval_fraction=0.2)
    settings = dpo.SafeDPOSettings(training=common.Training(preset="quick", epochs=4, steps_per_chunk=8))
    ctx = RunContext(tmp_path / "run", progress=False)
    summary = dpo.train("safedpo", settings, source, ctx).summary
    ctx.close()
    assert summary["safedpo/eval/initial_accuracy"] == 0.0  # the policy is its reference: no margins yet
    assert summary["safedpo/eval/accuracy"] > 0.6, summary
    assert summary["safedpo/eval/loss"] < summary["safedpo/eval/initial_loss"]
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
