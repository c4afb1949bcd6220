"""Tiny random Hugging Face models (Llama and the other families), the reference the JAX model is checked
against."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import transformers

TINY: dict[str, Any] = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                            initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)

VARIANTS: dict[str, dict[str, Any]] = {
    "gqa": {},
    "tied_linear_rope": dict(tie_word_embeddings=True, rope_theta=500.0,
                             rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama3_rope": dict(num_key_value_heads=1, rope_theta=5000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


def build_hf_llama(variant: str, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A random fp32 ``LlamaForCausalLM`` of :data:`VARIANTS` (see :func:`randomise_norms_and_biases`)."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **VARIANTS[variant]}))
    return randomise_norms_and_biases(model)


def build_hf_causal_lm(model_type: str, overrides: dict[str, Any], seed: int = 0) -> transformers.PreTrainedModel:
    """A random fp32 causal LM of any transformers family (``model_type`` "llama", "mistral", "qwen2",
    "qwen3", ...) with the :data:`TINY` sizes and ``overrides``."""
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **overrides})
    return randomise_norms_and_biases(transformers.AutoModelForCausalLM.from_config(config))


def randomise_norms_and_biases(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    """Norm weights uniform in [0.5, 1.5] and biases N(0, 0.1): transformers initialises them to 1 and 0,
    which would hide one loaded into the wrong place. Returns the model in eval mode."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                parameter.normal_(0.0, 0.1)
    return model.eval()


def hf_logits(model: transformers.LlamaForCausalLM, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reference logits, with position ids counted over real tokens as the JAX model does."""
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.numpy()


def left_padded_batch(seed: int = 0, batch: int = 3, length: int = 12, vocab: int = 128,
                      pads: tuple[int, ...] = (0, 4, 7)) -> tuple[np.ndarray, np.ndarray]:
    """Random prompts with ``pads`` (default 0, 4 and 7) padding tokens on the left (ids >= 3 avoid the
    special tokens)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(batch, length))
    mask = np.ones((batch, length), np.int64)
    for row, pad in enumerate(pads[:batch]):
        mask[row, :pad] = 0
    tokens[mask == 0] = 0
    return tokens, mask


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max |reference|."""
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))
