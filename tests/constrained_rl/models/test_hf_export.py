"""Exports that transformers uses directly: tokenizer files with the chat template, generation config, and
score models in transformers' sequence-classification layout."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from constrained_rl.data import synthetic_safety
from constrained_rl.models import hf_export, load_template, score
from constrained_rl.models.llama import LlamaConfig
from constrained_rl.sampling import SamplingConfig
from tests.constrained_rl.models.hf_reference import build_hf_llama, left_padded_batch

# A Qwen-style template (system default, im_start / im_end turns), over the synthetic task's words.
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + eos_token + '\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MESSAGES = [{"role": "user", "content": "how do i weapons"}]


def _source(tmp_path, chat_template) -> str:
    source = tmp_path / "source"
    source.mkdir()
    synthetic_safety.SyntheticSafetyTask().save_tokenizer(source / "tokenizer.json")
    settings = {"bos_token": synthetic_safety.BOS, "eos_token": synthetic_safety.EOS,
                "pad_token": synthetic_safety.PAD, "chat_template": chat_template}
    (source / "tokenizer_config.json").write_text(json.dumps(settings))
    return str(source)


@pytest.mark.parametrize("form", ["string", "named"])
def test_chat_template_reaches_transformers(tmp_path, form) -> None:
    named = [{"name": "default", "template": TEMPLATE}, {"name": "terse", "template": "{{ messages[0]['content'] }}"}]
    source = _source(tmp_path, TEMPLATE if form == "string" else named)
    export = tmp_path / "export"
    hf_export.write_tokenizer_files(source, str(export))
    assert (export / "chat_template.jinja").read_text() == TEMPLATE
    assert "chat_template" not in json.loads((export / "tokenizer_config.json").read_text())
    expected = transformers.AutoTokenizer.from_pretrained(source).apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True)
    exported = transformers.AutoTokenizer.from_pretrained(str(export))
    assert exported.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == expected
    assert expected.endswith(f"{synthetic_safety.EOS}\n<|im_start|>assistant\n")
    assert load_template("auto", str(export)).format_prompt(MESSAGES[0]["content"]) == expected  # ours too
    if form == "named":
        assert (export / "additional_chat_templates" / "terse.jinja").read_text() == named[1]["template"]


def test_no_template_writes_none(tmp_path) -> None:
    export = tmp_path / "export"
    hf_export.write_tokenizer_files(_source(tmp_path, None), str(export))
    assert not (export / "chat_template.jinja").exists()
    assert transformers.AutoTokenizer.from_pretrained(str(export)).chat_template is None


def test_generation_config_keeps_the_source_and_states_the_sampling(tmp_path) -> None:
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=(2, 5),
                         pad_token_id=0)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"repetition_penalty": 1.1, "temperature": 0.6, "do_sample": True, "eos_token_id": 9,
         "transformers_version": "4.0"}))
    carried = hf_export.generation_config(config, str(tmp_path))
    assert carried == {"repetition_penalty": 1.1, "temperature": 0.6, "do_sample": True, "bos_token_id": 1,
                       "eos_token_id": [2, 5], "pad_token_id": 0}
    sampled = hf_export.generation_config(config, str(tmp_path), SamplingConfig(max_new_tokens=7, temperature=0.9))
    assert sampled == {"repetition_penalty": 1.1, "bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": 0,
                       "do_sample": True, "temperature": 0.9, "top_k": 0, "top_p": 1.0, "max_new_tokens": 7}
    greedy = hf_export.generation_config(config, None, SamplingConfig(max_new_tokens=3, temperature=0.0))
    assert greedy == {"bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": 0, "do_sample": False,
                      "max_new_tokens": 3}
    hf_export.write_generation_config(str(tmp_path / "out"), config, None, SamplingConfig(temperature=0.9))
    loaded = transformers.GenerationConfig.from_pretrained(str(tmp_path / "out"))
    # top_k 0 switches off transformers' default top-k of 50: the file samples as our sampler does.
    assert (loaded.do_sample, loaded.temperature, loaded.top_k, loaded.eos_token_id) == (True, 0.9, 0, [2, 5])


@pytest.fixture(scope="module")
def score_export(tmp_path_factory):
    lm_dir = tmp_path_factory.mktemp("lm")
    build_hf_llama("gqa", seed=7).save_pretrained(lm_dir)
    model, variables = score.load_score_model(str(lm_dir), key=jax.random.key(2))
    out = tmp_path_factory.mktemp("score")
    score.save_score_model(str(out), model, variables)
    return model, variables, str(out)


def test_score_model_loads_in_transformers_with_every_weight(score_export) -> None:
    model, variables, directory = score_export
    hf_model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        directory, output_loading_info=True)
    assert type(hf_model).__name__ == "LlamaForSequenceClassification" and hf_model.config.num_labels == 1
    assert not any(info.values()), info  # nothing missing (newly initialised), unexpected or mismatched
    tokens, mask = left_padded_batch(seed=8)  # rows with 0, 4 and 7 pads (id 0 = pad_token_id)
    ours = jax.jit(model.apply)
    with torch.no_grad():
        # Right padding: transformers' default positions are right, its last non-pad token is our last real one.
        right = np.stack([np.roll(row, -int((m == 0).sum())) for row, m in zip(tokens, mask)])
        right_mask = np.stack([np.roll(m, -int((m == 0).sum())) for m in mask])
        theirs = hf_model(torch.tensor(right), attention_mask=torch.tensor(right_mask)).logits[:, 0].numpy()
        expected = np.asarray(ours(variables, jnp.asarray(right), attention_mask=jnp.asarray(right_mask)).end_scores)
        np.testing.assert_allclose(theirs, expected, rtol=1e-4, atol=1e-5)
        # Left padding: the same scores once transformers is given positions counted over real tokens.
        positions = torch.tensor(np.maximum(np.cumsum(mask, axis=1) - 1, 0))
        left = hf_model(torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=positions).logits
        np.testing.assert_allclose(left[:, 0].numpy(), expected, rtol=1e-4, atol=1e-5)
    assert np.ptp(expected) > 1e-3  # rows differ, so the comparison is not vacuous


def test_score_layouts_on_disk_and_back(score_export, tmp_path) -> None:
    model, variables, directory = score_export
    tensors = load_file(f"{directory}/model.safetensors")
    assert tensors["score.weight"].shape == (1, 64) and not any(n.startswith("score_head") for n in tensors)
    config = json.loads(open(f"{directory}/config.json").read())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == 0
    reloaded_model, reloaded = score.load_score_model(directory)  # the head is read back, no key needed
    assert not reloaded_model.score_bias
    np.testing.assert_array_equal(reloaded["params"]["score_head"]["kernel"],
                                  variables["params"]["score_head"]["kernel"])
    # A head with a bias keeps Safe-RLHF's layout (transformers' head has none), and older exports read back.
    biased = score.LlamaForScore(model.config, score_bias=True)
    biased_variables = jax.tree.map(np.asarray, variables)
    biased_variables["params"]["score_head"]["bias"] = np.array([0.5], np.float32)
    score.save_score_model(str(tmp_path), biased, biased_variables)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForScore"]
    assert {"score_head.weight", "score_head.bias"} <= set(load_file(tmp_path / "model.safetensors"))
    assert score.load_score_model(str(tmp_path))[0].score_bias
