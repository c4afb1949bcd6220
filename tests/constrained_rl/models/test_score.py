"""Score models: end-token reading by hand, a backbone checked against transformers, save/load of the head."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from constrained_rl.config import ConfigError
from constrained_rl.models import score
from tests.constrained_rl.models.hf_reference import build_hf_llama, left_padded_batch, relative_error


class EndScoreTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_reads_the_last_real_token(self) -> None:
        scores = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])
        # left padding, right padding, prompt-left-padded + response-right-padded
        mask = jnp.array([[0, 0, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0]])
        np.testing.assert_array_equal(self.variant(score.last_token_index)(mask), [3, 1, 2])
        np.testing.assert_array_equal(self.variant(score.end_scores)(scores, mask), [4.0, 6.0, 11.0])


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    hf_model = build_hf_llama("gqa", seed=3)
    directory = tmp_path_factory.mktemp("lm")
    hf_model.save_pretrained(directory)
    return hf_model, str(directory)


def test_score_model_from_lm_checkpoint_matches_torch_backbone(lm_checkpoint) -> None:
    hf_model, directory = lm_checkpoint
    model, variables = score.load_score_model(directory, key=jax.random.key(0))
    assert "lm_head" not in variables["params"] and "bias" not in variables["params"]["score_head"]
    tokens, mask = left_padded_batch(seed=4)
    out = jax.jit(model.apply)(variables, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    with torch.no_grad():
        hidden = hf_model.model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    expected = hidden @ np.asarray(variables["params"]["score_head"]["kernel"])[:, 0]
    real = mask.astype(bool)
    assert out.scores.shape == tokens.shape and out.end_scores.shape == (3,)
    assert relative_error(np.asarray(out.scores)[real], expected[real]) <= 1e-4
    np.testing.assert_allclose(out.end_scores, expected[:, -1], rtol=1e-4, atol=1e-6)


def test_save_and_load_keep_the_head(lm_checkpoint, tmp_path) -> None:
    _, directory = lm_checkpoint
    model, variables = score.load_score_model(directory, key=jax.random.key(1), score_bias=True)
    variables = jax.tree.map(np.asarray, variables)
    variables["params"]["score_head"]["bias"] = np.array([0.25], np.float32)
    score.save_score_model(str(tmp_path), model, variables)
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["score_head.weight"].shape == (1, 64) and "lm_head.weight" not in tensors
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config["architectures"] == ["LlamaForScore"] and saved_config["bias"] is True
    reloaded_model, reloaded = score.load_score_model(str(tmp_path))  # no key needed: the head is saved
    assert reloaded_model.score_bias and reloaded_model.config == model.config
    chex.assert_trees_all_close(reloaded, variables)
    tokens, mask = left_padded_batch(seed=5)
    apply = jax.jit(model.apply)  # same architecture: one compilation for both
    before = apply(variables, jnp.asarray(tokens), attention_mask=jnp.asarray(mask)).end_scores
    after = apply(reloaded, jnp.asarray(tokens), attention_mask=jnp.asarray(mask)).end_scores
    np.testing.assert_allclose(after, before, rtol=1e-6)


def test_fresh_heads_differ_by_key_and_need_one(lm_checkpoint) -> None:
    _, directory = lm_checkpoint
    first = score.load_score_model(directory, key=jax.random.key(0))[1]["params"]["score_head"]["kernel"]
    second = score.load_score_model(directory, key=jax.random.key(1))[1]["params"]["score_head"]["kernel"]
    assert not np.allclose(first, second)
    assert 0.01 < float(np.std(first)) < 0.04  # N(0, 0.02) initialisation
    with pytest.raises(ConfigError, match=r"no score head \(score.weight or score_head.weight\) .*pass a key"):
        score.load_score_model(directory)
