"""Score models: a Llama backbone and a linear head giving one scalar per token (Safe-RLHF).

Dai et al. 2023, "Safe RLHF: Safe Reinforcement Learning from Human Feedback": the reward model, the cost
model and both critics share one shape, an LM backbone whose final hidden states h_t feed a linear head,

  s_t = w^T h_t (+ b),   end score = s_{t_end},  t_end = the last real (mask = 1) token,

so a score model is read per token (critics: values ``[B, T]``) or at the end of the sequence (reward and
cost models: ``[B]``). Left or right padding both work: the end is the last position whose mask is 1.

Checkpoints are written in the layout of transformers' sequence-classification models, which
``AutoModelForSequenceClassification.from_pretrained`` loads as ``LlamaForSequenceClassification`` with one
label: the backbone's ``model.*`` tensors (see ``hf_checkpoint``) and the head as ``score.weight``
``[1, hidden_size]``; ``config.json`` says ``"architectures": ["LlamaForSequenceClassification"]``,
``num_labels`` 1 and ``pad_token_id``. transformers reads the score at the last position whose token is not
``pad_token_id``; this module reads it at the last position whose attention mask is 1. The two agree when the
padding is ``pad_token_id`` and that id never occurs as a real token, so a tokenizer whose pad token is its
eos token (common in instruct models) scores one token earlier in transformers when a response ends in eos.
transformers' head has no bias: a head with one (``score_bias``) is written in Safe-RLHF's layout
instead, ``score_head.weight`` and ``score_head.bias`` with ``"architectures": ["LlamaForScore"]``,
``"score_dim": 1`` and ``"bias": true``, which transformers cannot load. Both layouts are read, and so are
Safe-RLHF's own score models; a plain LM checkpoint loads as a backbone with a fresh head (its
``lm_head.weight`` is ignored).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from constrained_rl.config import ConfigError
from constrained_rl.models import hf_checkpoint
from constrained_rl.models.llama import LlamaConfig, LlamaModel

SCORE_ARCHITECTURE = "LlamaForScore"  # Safe-RLHF's layout: score_head.weight (and score_head.bias)
SEQUENCE_CLASSIFICATION_ARCHITECTURE = "LlamaForSequenceClassification"  # transformers' layout: score.weight


class ScoreOutput(NamedTuple):
    """scores ``[B, T]`` (float32), end_scores ``[B]`` at the last real token, hidden states ``[B, T, H]``."""

    scores: jax.Array
    end_scores: jax.Array
    hidden_states: jax.Array


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index ``[B]`` of the last position with mask 1 in each row of ``[B, T]`` (0 for an all-zero row)."""
    chex.assert_rank(attention_mask, 2)
    length = attention_mask.shape[1]
    reversed_first = jnp.argmax(jnp.flip(attention_mask.astype(bool), axis=1), axis=1)
    return jnp.where(jnp.any(attention_mask, axis=1), length - 1 - reversed_first, 0)


def end_scores(scores: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The score ``[B]`` at each row's last real token; batch axis 0, ``scores`` ``[B, T]``."""
    chex.assert_equal_shape([scores, attention_mask])
    index = last_token_index(attention_mask)
    return jnp.take_along_axis(scores, index[:, None], axis=1)[:, 0]


class LlamaForScore(nn.Module):
    """Llama backbone plus a linear score head: ``apply(variables, tokens, positions, mask) -> ScoreOutput``."""

    config: LlamaConfig
    score_bias: bool = False  # whether the head has a bias (Safe-RLHF's default: no)

    def setup(self) -> None:
        self.model = LlamaModel(self.config)
        self.score_head = score_head(self.config, self.score_bias)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 attention_mask: jax.Array | None = None) -> ScoreOutput:
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, jnp.int32)
        hidden, _ = self.model(tokens, positions, attention_mask)
        scores = self.score_head(hidden)[..., 0].astype(jnp.float32)
        return ScoreOutput(scores, end_scores(scores, attention_mask), hidden)


def score_head(config: LlamaConfig, use_bias: bool) -> nn.Dense:
    """The ``hidden_size -> 1`` head, initialised N(0, 0.02) like the backbone's linear layers."""
    return nn.Dense(1, use_bias=use_bias, dtype=config.compute_dtype, param_dtype=config.storage_dtype,
                    kernel_init=nn.initializers.normal(0.02), name="score_head")


def fresh_score_head(config: LlamaConfig, use_bias: bool, key: jax.Array) -> dict[str, np.ndarray]:
    """Flat parameters ("score_head/kernel", ...) of a newly initialised head, for ``load_params(fresh=)``."""
    head = score_head(config, use_bias).init(key, jnp.zeros((1, config.hidden_size), config.compute_dtype))
    return {f"score_head/{name}": np.asarray(value) for name, value in head["params"].items()}


def sequence_classification_name(path: str) -> tuple[str, bool]:
    """Tensor names of transformers' sequence-classification layout: the head is ``score.weight``."""
    if path == "score_head/kernel":
        return "score.weight", True
    return hf_checkpoint.hf_tensor_name(path)


def _saved_head(directory: str, raw: Mapping[str, Any]) -> tuple[bool, hf_checkpoint.TensorName] | None:
    """(bias?, tensor names) of the head saved in ``directory``, or None when it holds none."""
    names = hf_checkpoint.tensor_files(directory)
    config_path = os.path.join(directory, hf_checkpoint.CONFIG_FILE)
    if "score.weight" in names:
        labels = raw.get("num_labels", len(raw.get("id2label") or {0: ""}))
        if labels != 1:
            raise ConfigError(f"{config_path}: {labels} labels; a score model has one (num_labels 1)")
        return False, sequence_classification_name
    if "score_head.weight" in names:
        if raw.get("score_dim", 1) != 1:
            raise ConfigError(f"{config_path}: score_dim {raw['score_dim']} is not supported (only 1)")
        return bool(raw.get("bias", "score_head.bias" in names)), hf_checkpoint.hf_tensor_name
    return None


def load_score_model(directory: str, *, key: jax.Array | None = None, score_bias: bool = False,
                     dtype: str = "float32", param_dtype: str = "float32"
                     ) -> tuple[LlamaForScore, dict[str, Any]]:
    """A score model from a checkpoint: the saved head if there is one, else a fresh head drawn with ``key``.

    The head is read from either layout (``score.weight``, transformers'; ``score_head.*``, Safe-RLHF's).
    Loading a language-model checkpoint (no head) is how the reward and cost models start; ``score_bias``
    then chooses the fresh head's shape. With a saved head, the checkpoint decides.
    """
    raw = hf_checkpoint.read_config_json(directory)
    config = hf_checkpoint.config_from_hf_dict(raw, os.path.join(directory, hf_checkpoint.CONFIG_FILE),
                                               dtype=dtype, param_dtype=param_dtype)
    head = _saved_head(directory, raw)
    if head is not None:
        bias, names = head
        model = LlamaForScore(config, score_bias=bias)
        return model, hf_checkpoint.load_params(directory, model, tensor_name=names)
    if key is None:
        raise ConfigError(f"{directory}: no score head (score.weight or score_head.weight) in the checkpoint; "
                          "pass a key to initialise a fresh score head")
    model = LlamaForScore(config, score_bias=score_bias)
    return model, hf_checkpoint.load_params(directory, model, fresh=fresh_score_head(config, score_bias, key))


def save_score_model(directory: str, model: LlamaForScore, variables: Mapping[str, Any], *,
                     dtype: str | None = None, max_shard_bytes: int | None = None,
                     pad_token_id: int | None = None) -> None:
    """Saves backbone and head: transformers' sequence-classification layout, or with a bias Safe-RLHF's.

    ``pad_token_id`` (the tokenizer's) is written when the model config has none: transformers finds the
    scored token by it, and refuses batches of more than one row without it.
    """
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else pad_token_id
    if model.score_bias:
        hf_checkpoint.save_params(directory, model, variables, architecture=SCORE_ARCHITECTURE,
                                  extra_config={"score_dim": 1, "bias": True, "pad_token_id": pad},
                                  dtype=dtype, max_shard_bytes=max_shard_bytes)
        return
    labels = {"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "pad_token_id": pad}
    hf_checkpoint.save_params(directory, model, variables, architecture=SEQUENCE_CLASSIFICATION_ARCHITECTURE,
                              extra_config=labels, dtype=dtype, max_shard_bytes=max_shard_bytes,
                              tensor_name=sequence_classification_name)
