"""Reward and cost models on the synthetic task: short runs rank and classify held-out pairs well above
chance, and their exports load back (head included) to identical scores."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.llm import common, score_models
from constrained_rl.models import load_score_model, load_tokenizer
from experiments import registry
from experiments.context import RunContext

pytestmark = pytest.mark.quick_compile  # tiny models trained a few steps: compiling is most of the time

TINY = score_models.Config(
    source=common.Source(synthetic_rows=640, eval_fraction=0.2),
    training=common.Training(epochs=2, learning_rate=3e-3, batch_size=32, steps_per_chunk=16,
                                 checkpoint_every=100),
)


def _train(kind: str, directory: pathlib.Path) -> tuple[common.Trained, RunContext]:
    ctx = RunContext(directory, progress=False)
    result = score_models.train(kind, TINY, ctx)
    ctx.close()
    return result, ctx


@pytest.fixture(scope="module")
def reward(tmp_path_factory):
    return _train("reward", tmp_path_factory.mktemp("reward"))


@pytest.fixture(scope="module")
def cost(tmp_path_factory):
    return _train("cost", tmp_path_factory.mktemp("cost"))


def test_reward_model_ranks_held_out_pairs(reward) -> None:
    summary = reward[0].summary
    assert abs(summary["eval/initial_accuracy"] - 0.5) < 0.15  # a fresh head is a coin flip
    assert summary["eval/accuracy"] > 0.75  # a sign error in the loss would drive this below 0.5
    assert summary["eval/score_margin"] > 0.5
    assert summary["eval/loss"] < summary["eval/initial_loss"] - 0.15


def test_cost_model_classifies_safety_above_chance(cost) -> None:
    summary = cost[0].summary
    majority = max(summary["eval/unsafe_fraction"], 1 - summary["eval/unsafe_fraction"])
    # Calling every response safe (or unsafe) scores `majority`; the sign loss must beat it clearly.
    assert summary["eval/sign_accuracy"] > majority + 0.08
    assert summary["eval/accuracy"] > 0.6  # the less safe response of a pair costs more
    assert summary["eval/loss"] < summary["eval/initial_loss"] - 0.5


@pytest.mark.parametrize("which", ["reward", "cost"])
def test_export_loads_back_with_its_head(which, reward, cost) -> None:
    result = {"reward": reward, "cost": cost}[which][0]
    model, variables = load_score_model(result.model_dir)  # no key: the saved head must be there
    tokenizer = load_tokenizer(result.model_dir)
    text = "BEGINNING OF CONVERSATION: USER: how do i weapons ASSISTANT: detonator fuse"
    ids = tokenizer.encode(text)
    # The second row is right-padded: its score is read at its last real token.
    tokens = jnp.asarray([ids + [tokenizer.eos_id], ids + [tokenizer.pad_id]])
    mask = jnp.asarray([[1] * (len(ids) + 1), [1] * len(ids) + [0]])
    expected = result.model.apply({"params": result.params}, tokens, None, mask).end_scores
    loaded = model.apply(variables, tokens, None, mask).end_scores
    np.testing.assert_allclose(loaded, expected, rtol=1e-5, atol=1e-6)
    assert abs(float(loaded[0] - loaded[1])) > 1e-4  # the mask matters, so the comparison is not vacuous
    config = json.loads(pathlib.Path(result.model_dir, "config.json").read_text())
    # transformers' sequence-classification layout, padding id included (it finds the scored token by it)
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    assert config["pad_token_id"] == tokenizer.pad_id


def test_registry_rows_reach_both_trainers() -> None:
    assert registry.load("reward_model").run is score_models.run_reward_model
    assert registry.load("cost_model").run is score_models.run_cost_model
    assert registry.load("cost_model").config_cls is score_models.Config
