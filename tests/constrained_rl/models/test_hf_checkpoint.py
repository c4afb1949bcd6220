"""Checkpoint loading and saving, checked against Hugging Face transformers' LlamaForCausalLM."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from constrained_rl.config import ConfigError
from constrained_rl.models import hf_checkpoint
from constrained_rl.models.llama import LlamaConfig, RopeScaling
from tests.constrained_rl.models.hf_reference import (VARIANTS, build_hf_llama, hf_logits, left_padded_batch,
                                                      relative_error)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[transformers.LlamaForCausalLM, str]]:
    """Each reference variant, saved once as a single safetensors file."""
    out = {}
    for seed, variant in enumerate(VARIANTS):
        model = build_hf_llama(variant, seed)
        directory = str(tmp_path_factory.mktemp(variant))
        model.save_pretrained(directory)
        out[variant] = (model, directory)
    return out


def _our_logits(directory: str, tokens: np.ndarray, mask: np.ndarray, **dtypes: str) -> np.ndarray:
    model, variables = hf_checkpoint.load_causal_lm(directory, **dtypes)
    return np.asarray(model.apply(variables, jnp.asarray(tokens), attention_mask=jnp.asarray(mask)).logits)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_with_left_padding(checkpoints, variant: str) -> None:
    hf_model, directory = checkpoints[variant]
    tokens, mask = left_padded_batch()
    ours, reference = _our_logits(directory, tokens, mask), hf_logits(hf_model, tokens, mask)
    real = mask.astype(bool)
    assert relative_error(ours[real], reference[real]) <= 1e-4


def test_config_fields_are_read(checkpoints) -> None:
    config = hf_checkpoint.load_config(checkpoints["tied_linear_rope"][1])
    assert config.tie_word_embeddings and config.rope_theta == 500.0 and config.rms_norm_eps == 1e-5
    assert config.rope_scaling == RopeScaling("linear", factor=2.0)
    assert (config.num_key_value_heads, config.head_dim, config.eos_token_id) == (2, 16, (2,))
    llama3 = hf_checkpoint.load_config(checkpoints["llama3_rope"][1]).rope_scaling
    assert llama3 == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)


def test_legacy_rope_keys_are_read() -> None:
    legacy = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
              "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 123.0,
              "rope_scaling": {"type": "linear", "factor": 4.0}, "eos_token_id": [2, 7]}
    config = hf_checkpoint.config_from_hf_dict(legacy)
    assert config.rope_theta == 123.0 and config.rope_scaling == RopeScaling("linear", 4.0)
    assert config.eos_token_id == (2, 7) and config.num_key_value_heads == 2


def test_bfloat16_load_is_close_to_float32(checkpoints) -> None:
    hf_model, directory = checkpoints["gqa"]
    tokens, mask = left_padded_batch()
    ours = _our_logits(directory, tokens, mask, dtype="bfloat16", param_dtype="bfloat16")
    _, variables = hf_checkpoint.load_causal_lm(directory, param_dtype="bfloat16")
    assert variables["params"]["lm_head"]["kernel"].dtype == jnp.bfloat16
    real = mask.astype(bool)
    assert relative_error(ours[real], hf_logits(hf_model, tokens, mask)[real]) < 5e-2


def test_sharded_transformers_checkpoint_loads(checkpoints, tmp_path) -> None:
    hf_model, _ = checkpoints["gqa"]
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / hf_checkpoint.INDEX_FILE)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    tokens, mask = left_padded_batch()
    real = mask.astype(bool)
    ours = _our_logits(str(tmp_path), tokens, mask)
    assert relative_error(ours[real], hf_logits(hf_model, tokens, mask)[real]) <= 1e-4


@pytest.mark.parametrize("variant,max_shard_bytes", [("gqa", None), ("tied_linear_rope", 30_000),
                                                     ("llama3_rope", None)])
def test_saved_checkpoint_loads_in_transformers(checkpoints, tmp_path, variant: str, max_shard_bytes) -> None:
    hf_model, directory = checkpoints[variant]
    model, variables = hf_checkpoint.load_causal_lm(directory)
    hf_checkpoint.save_causal_lm(str(tmp_path), model, variables, max_shard_bytes=max_shard_bytes)
    assert os.path.isfile(tmp_path / hf_checkpoint.INDEX_FILE) == (max_shard_bytes is not None)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    assert reloaded.config.rope_parameters == hf_model.config.rope_parameters
    tokens, mask = left_padded_batch(seed=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(hf_logits(reloaded, tokens, mask)[real], hf_logits(hf_model, tokens, mask)[real],
                               rtol=0, atol=1e-6)


def test_saved_tensors_use_hf_names_and_layout(checkpoints, tmp_path) -> None:
    hf_model, directory = checkpoints["gqa"]
    model, variables = hf_checkpoint.load_causal_lm(directory)
    hf_checkpoint.save_causal_lm(str(tmp_path), model, variables, dtype="bfloat16")
    saved = load_file(tmp_path / hf_checkpoint.WEIGHTS_FILE)
    expected = {name: p.detach().numpy() for name, p in hf_model.state_dict().items()}
    assert set(saved) == set(expected)
    np.testing.assert_allclose(saved["model.layers.1.self_attn.k_proj.weight"].astype(np.float32),
                               expected["model.layers.1.self_attn.k_proj.weight"], rtol=1e-2, atol=1e-3)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_hf_tensor_name_table() -> None:
    assert hf_checkpoint.hf_tensor_name("model/layers_11/mlp/down_proj/kernel") == (
        "model.layers.11.mlp.down_proj.weight", True)
    assert hf_checkpoint.hf_tensor_name("model/layers_0/post_attention_layernorm/weight") == (
        "model.layers.0.post_attention_layernorm.weight", False)
    assert hf_checkpoint.hf_tensor_name("model/embed_tokens/embedding") == ("model.embed_tokens.weight", False)
    with pytest.raises(ValueError, match="no Hugging Face name"):
        hf_checkpoint.hf_tensor_name("model/layers_0/rotary/kernel")


# --------------------------------------------------------------------------------------------- errors


@pytest.fixture
def broken(checkpoints, tmp_path):
    """A fresh copy of the untied checkpoint that a test may damage."""
    target = tmp_path / "checkpoint"
    shutil.copytree(checkpoints["gqa"][1], target)
    return target


def _damage_tensors(directory, change) -> None:
    path = directory / hf_checkpoint.WEIGHTS_FILE
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(directory, **fields) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("damage,message", [
    (lambda d: os.remove(d / "config.json"), r"config\.json: not found"),
    (lambda d: (d / "config.json").write_text("{not json"), r"config\.json: not valid JSON"),
    (lambda d: _edit_config(d, model_type="gpt2"), r"config\.json: model_type 'gpt2' is not supported"),
    (lambda d: _edit_config(d, hidden_act="gelu"), r"config\.json: hidden_act 'gelu'"),
    (lambda d: _edit_config(d, rope_parameters={"rope_type": "proportional", "rope_theta": 1.0}),
     r"config\.json: rope_scaling\.rope_type: 'proportional' is not supported"),
    (lambda d: _edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 2.0, "partial_rotary_factor": 0.5}),
     r"config\.json: partial_rotary_factor 0\.5 is not supported"),
    (lambda d: _edit_config(d, model_type="mistral", layer_types=["full_attention", "sliding_attention"]),
     r"config\.json: layer_types is not supported for mistral"),
    (lambda d: _edit_config(d, model_type="qwen2", layer_types=["full_attention", "sliding_attention"]),
     r"config\.json: layer_types names sliding_attention layers but use_sliding_window is false"),
    (lambda d: _edit_config(d, num_key_value_heads=3), r"config\.json: num_key_value_heads: 3 must divide"),
    (lambda d: os.remove(d / "model.safetensors"), r"model\.safetensors: not found"),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), r"model\.safetensors: not a readable"),
    (lambda d: _damage_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
     r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' missing"),
    (lambda d: _damage_tensors(d, lambda t: t.update({"model.norm.weight": np.ones(3, np.float32)})),
     r"model\.safetensors: tensor 'model\.norm\.weight' has shape \(3,\), expected \(64,\)"),
    (lambda d: _damage_tensors(d, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.ones(64)})),
     r"model\.safetensors: unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"),
], ids=["no-config", "corrupt-config", "model-type", "activation", "rope-type", "partial-rotary",
        "mistral-layer-types", "qwen-layer-types-without-window", "kv-heads", "no-weights",
        "corrupt-weights", "missing-tensor", "wrong-shape", "unexpected-tensor"])
def test_bad_checkpoint_raises_config_error(broken, damage, message: str) -> None:
    damage(broken)
    with pytest.raises(ConfigError, match=message):
        hf_checkpoint.load_causal_lm(str(broken))


def test_bad_sharded_checkpoint_raises_config_error(checkpoints, tmp_path) -> None:
    checkpoints["gqa"][0].save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / hf_checkpoint.INDEX_FILE
    os.remove(tmp_path / json.loads(index.read_text())["weight_map"]["model.norm.weight"])
    with pytest.raises(ConfigError, match=r"model-\d+-of-\d+\.safetensors: not found \(listed in"):
        hf_checkpoint.load_causal_lm(str(tmp_path))
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ConfigError, match=r"model\.safetensors\.index\.json: no weight_map"):
        hf_checkpoint.load_causal_lm(str(tmp_path))


def test_saved_config_round_trips() -> None:
    config = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, rope_scaling=RopeScaling("llama3", 8.0),
                         eos_token_id=(2, 9), tie_word_embeddings=True)
    assert hf_checkpoint.config_from_hf_dict(hf_checkpoint.config_to_hf_dict(config)) == config


@pytest.mark.parametrize("fields", [
    dict(model_type="mistral", sliding_window=7),
    dict(model_type="qwen2", sliding_window=3, layer_types=("full_attention", "sliding_attention")),
    dict(model_type="qwen2", sliding_window=3),
    dict(model_type="qwen3", head_dim=6, attention_bias=True, rope_scaling=RopeScaling(
        "longrope", short_factor=(1.0, 1.5, 2.0), long_factor=(2.0, 3.0, 4.0), original_max_position_embeddings=16)),
    dict(rope_scaling=RopeScaling("yarn", 4.0, original_max_position_embeddings=512, mscale=1.0,
                                  mscale_all_dim=0.5, truncate=False)),
    dict(rope_scaling=RopeScaling("dynamic", 2.0)),
], ids=["mistral", "qwen2-layers", "qwen2-all-sliding", "qwen3-longrope", "yarn", "dynamic"])
def test_family_configs_round_trip(fields) -> None:
    config = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=1024, **fields)
    assert hf_checkpoint.config_from_hf_dict(hf_checkpoint.config_to_hf_dict(config)) == config


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_omitted_fields_take_transformers_family_defaults(model_type: str) -> None:
    """A config.json without head_dim / sliding_window / token ids / context reads as transformers'
    config class of the family fills them in."""
    minimal = {"model_type": model_type, "vocab_size": 16, "hidden_size": 8, "intermediate_size": 8,
               "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}
    ours = hf_checkpoint.config_from_hf_dict(minimal)
    reference = transformers.AutoConfig.for_model(**minimal)
    assert ours.head_dim == (getattr(reference, "head_dim", None) or 4)
    assert ours.sliding_window == reference.sliding_window
    assert ours.max_position_embeddings == reference.max_position_embeddings
    assert ours.bos_token_id == reference.bos_token_id
    assert ours.eos_token_id == (() if reference.eos_token_id is None else (reference.eos_token_id,))
    if model_type != "mistral":  # Qwen: a window only with use_sliding_window, on layers >= max_window_layers
        windowed = {**minimal, "use_sliding_window": True, "max_window_layers": 1}
        ours, reference = hf_checkpoint.config_from_hf_dict(windowed), transformers.AutoConfig.for_model(**windowed)
        assert [ours.layer_window(i) for i in range(2)] == [
            reference.sliding_window if kind == "sliding_attention" else None for kind in reference.layer_types]
        assert ours.layer_window(1) == 4096
