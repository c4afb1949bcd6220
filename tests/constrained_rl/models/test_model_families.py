"""Mistral, Qwen2, Qwen3 and the length-dependent rope types (dynamic, yarn, longrope), each checked against
its transformers model on a tiny random checkpoint: logits with left padding, greedy generation, and a
saved checkpoint that transformers loads back.

Batches are 12 left-padded slots, with real lengths 12, 8 and 5 ("long") or 6, 4 and 3 ("short"), so that
every family's special part acts: Mistral's and Qwen2's windows (5) are shorter than the sequence, dynamic
NTK rescales above max_position_embeddings = 8 and longrope switches to its long factors above its original
8 positions (and the short batch stays below both). transformers' dynamic rope keeps the longest length seen
so far (it recomputes on growth and resets only below max_position_embeddings), so every reference comes
from a fresh model, long batch first, as a fresh model would see them.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from constrained_rl import sampling
from constrained_rl.models import hf_checkpoint
from tests.constrained_rl.models.hf_reference import build_hf_causal_lm, hf_logits, left_padded_batch, relative_error

LONG_FACTORS = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 16.0, 16.0, 16.0]  # head_dim 24: 12 frequencies
SHORT_FACTORS = [1.0 + 0.05 * i for i in range(12)]

# name -> (model_type, fields over hf_reference.TINY: 2 layers, hidden 64, 4 heads, 2 key/value heads). Each
# family carries one rope type, so that four compilations check four families and three rope types.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mistral_window_dynamic": ("mistral", dict(sliding_window=5, max_position_embeddings=8, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 100.0})),
    "qwen2_window_yarn": ("qwen2", dict(  # layer 0 full, layer 1 sliding; q/k/v biases; tied embeddings
        use_sliding_window=True, sliding_window=5, max_window_layers=1, tie_word_embeddings=True,
        max_position_embeddings=64, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 100.0,
                                                     "original_max_position_embeddings": 16})),
    "qwen3_longrope": ("qwen3", dict(head_dim=24, attention_bias=True, max_position_embeddings=32, rope_parameters={
        "rope_type": "longrope", "factor": 4.0, "short_factor": SHORT_FACTORS, "long_factor": LONG_FACTORS,
        "original_max_position_embeddings": 8, "rope_theta": 100.0})),
    "llama_yarn_mscale": ("llama", dict(max_position_embeddings=64, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8.0,
        "beta_slow": 0.5, "mscale": 0.8, "mscale_all_dim": 0.5, "truncate": False, "rope_theta": 100.0})),
}
PADS = {"long": (0, 4, 7), "short": (6, 8, 9)}  # in this order: transformers' dynamic rope resets at short
GENERATED = 5


def _batch(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """12 slots of left-padded prompts (:data:`PADS`): one shape, so one compilation per family."""
    return left_padded_batch(seed=len(kind), length=12, pads=PADS[kind])


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Per family: the saved transformers checkpoint, our model loaded from it, and the reference logits of
    a fresh transformers model at each length."""
    out = {}
    for seed, (name, (model_type, fields)) in enumerate(FAMILIES.items()):
        hf_model = build_hf_causal_lm(model_type, fields, seed)
        directory = str(tmp_path_factory.mktemp(name))
        hf_model.save_pretrained(directory)
        model, variables = hf_checkpoint.load_causal_lm(directory)
        references = {kind: hf_logits(hf_model, *_batch(kind)) for kind in PADS}
        out[name] = dict(directory=directory, model=model, variables=variables, references=references,
                         apply=jax.jit(model.apply))
    return out


def _our_logits(family: dict[str, Any], tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(family["apply"](family["variables"], jnp.asarray(tokens),
                                      attention_mask=jnp.asarray(mask)).logits)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers_with_left_padding(families, name: str) -> None:
    family = families[name]
    for kind in PADS:
        tokens, mask = _batch(kind)
        real = mask.astype(bool)
        error = relative_error(_our_logits(family, tokens, mask)[real], family["references"][kind][real])
        assert error <= 1e-4, f"{name}, {kind} batch: relative error {error:.2e}"


def test_loaded_configs_switch_the_family_parts(families) -> None:
    mistral = families["mistral_window_dynamic"]["model"].config
    assert (mistral.model_type, mistral.sliding_window, mistral.layer_window(1)) == ("mistral", 5, 5)
    assert mistral.rope_scaling.rope_type == "dynamic"
    qwen2 = families["qwen2_window_yarn"]
    assert qwen2["model"].config.qkv_bias and not qwen2["model"].config.attention_bias
    assert qwen2["model"].config.layer_types == ("full_attention", "sliding_attention")
    assert set(qwen2["variables"]["params"]["model"]["layers_0"]["self_attn"]["q_proj"]) == {"kernel", "bias"}
    qwen3 = families["qwen3_longrope"]["model"].config
    assert qwen3.qk_norm and qwen3.head_dim == 24 and qwen3.sliding_window is None
    yarn = families["llama_yarn_mscale"]["model"].config.rope_scaling
    assert (yarn.factor, yarn.original_max_position_embeddings, yarn.beta_fast, yarn.mscale, yarn.truncate) == (
        4.0, 16, 8.0, 0.8, False)


def test_greedy_generation_matches_transformers(families) -> None:
    """Mistral's window slides over the KV cache (prompt 12 plus 5 tokens, window 5) and dynamic NTK
    recomputes its frequencies at every step past 8 while the cached keys keep theirs: greedy tokens equal
    transformers' generate."""
    family = families["mistral_window_dynamic"]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(family["directory"]).eval()
    tokens, mask = _batch("long")
    reference = hf_model.generate(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                                  max_new_tokens=GENERATED, do_sample=False, eos_token_id=None, pad_token_id=0)
    config = sampling.SamplingConfig(max_new_tokens=GENERATED, temperature=0.0, eos_token_ids=(), pad_token_id=0)
    out = sampling.generate(family["model"], family["variables"], jnp.asarray(tokens), jnp.asarray(mask),
                            jax.random.key(0), config)
    np.testing.assert_array_equal(np.asarray(out.tokens), reference[:, tokens.shape[1]:].numpy())


def test_saved_checkpoints_load_in_transformers_with_the_same_logits(families, tmp_path) -> None:
    """Every family saved by us: transformers builds the same class and config and computes our logits."""
    tokens, mask = _batch("long")
    real = mask.astype(bool)
    for name, family in families.items():
        target = tmp_path / name
        hf_checkpoint.save_causal_lm(str(target), family["model"], family["variables"])
        original = transformers.AutoConfig.from_pretrained(family["directory"])
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(target).eval()
        assert type(reloaded).__name__ == json.loads((target / "config.json").read_text())["architectures"][0]
        assert type(reloaded).__name__ == original.architectures[0]
        for key in ("rope_parameters", "sliding_window", "layer_types", "head_dim", "tie_word_embeddings"):
            if hasattr(original, key):  # Qwen2Config has no head_dim (our config.json writes it; unused)
                assert getattr(reloaded.config, key) == getattr(original, key), (name, key)
        error = relative_error(hf_logits(reloaded, tokens, mask)[real], _our_logits(family, tokens, mask)[real])
        assert error <= 1e-4, f"{name}: relative error {error:.2e}"
