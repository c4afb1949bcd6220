"""The Llama model's parts on hand-checked inputs, cache consistency, partition rules and config checks."""

from __future__ import annotations

import functools
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from constrained_rl.config import ConfigError
from constrained_rl.models import llama
from constrained_rl.models.llama import LlamaConfig, LlamaForCausalLM, RopeScaling

CONFIG = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)


@functools.cache
def _scaled_model() -> tuple[LlamaForCausalLM, dict]:
    model = LlamaForCausalLM(CONFIG)
    variables = llama.init_params(model, jax.random.key(0))
    # Scale weights up so that attention is far from uniform and a wrong mask shows in the logits.
    return model, jax.tree.map(lambda x: x * 4.0, variables)


@pytest.fixture(scope="module")
def model_and_variables():
    return _scaled_model()


def test_positions_count_real_tokens_only() -> None:
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 1, 1]])
    expected = [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    np.testing.assert_array_equal(llama.positions_from_mask(mask), expected)
    np.testing.assert_array_equal(llama.positions_from_mask(mask[:, -1:], jnp.array([3, 5, 2])), [[3], [5], [2]])


def test_rms_norm_by_hand() -> None:
    norm = llama.RMSNorm(eps=0.5)
    x = jnp.array([[3.0, 4.0]])
    variables = {"params": {"weight": jnp.array([2.0, -1.0])}}
    # mean(x^2) = 12.5, sqrt(12.5 + 0.5) = sqrt(13)
    np.testing.assert_allclose(norm.apply(variables, x), [[6 / np.sqrt(13), -4 / np.sqrt(13)]], rtol=1e-6)


LONG = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 16.0, 16.0, 16.0, 16.0, 16.0, 16.0, 16.0)
SHORT = tuple(1.0 + 0.05 * i for i in range(16))
ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.7,
                    "mscale_all_dim": 0.5, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
    "longrope": {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                 "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("name", list(ROPES))
@pytest.mark.parametrize("seq_len", [None, 20, 100])
def test_rope_frequencies_match_transformers(name: str, seq_len: int | None) -> None:
    """Inverse frequencies and attention factors equal transformers' ROPE_INIT_FUNCTIONS at short and long
    lengths (dynamic and longrope change above max_position_embeddings = 64 / the original 32)."""
    rope = ROPES[name]
    scaling = None if rope is None else RopeScaling(**{k: v for k, v in rope.items()})
    config = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_theta=10000.0, rope_scaling=scaling,
                         max_position_embeddings=64)
    hf_rope = {"rope_type": "default", "rope_theta": 10000.0, **{k: (list(v) if isinstance(v, tuple) else v)
                                                                 for k, v in (rope or {}).items()}}
    hf_config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, rope_parameters=hf_rope,
                                         max_position_embeddings=64)
    if rope is None:
        reference, factor = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config).inv_freq, 1.0
    else:
        init = ROPE_INIT_FUNCTIONS[rope["rope_type"]]
        # transformers' forward switches longrope to its long factors above the original context.
        length = seq_len if rope["rope_type"] != "longrope" or (seq_len or 0) > 32 else None
        reference, factor = init(hf_config, torch.device("cpu"), seq_len=length)
    np.testing.assert_allclose(llama.rope_inverse_frequencies(config, seq_len), reference.numpy(), rtol=1e-6)
    np.testing.assert_allclose(llama.rope_attention_scaling(config), factor, rtol=1e-12)
    if seq_len is not None:  # the in-graph choice equals the host one
        np.testing.assert_allclose(llama.traced_inverse_frequencies(config, jnp.int32(seq_len)),
                                   reference.numpy(), rtol=1e-6)


def test_rotary_by_hand() -> None:
    # head_dim 2: one frequency (1.0); position 1 rotates (x1, x2) by 1 radian.
    x = jnp.array([[[[1.0, 2.0]]]])
    config = LlamaConfig(hidden_size=2, num_attention_heads=1)
    cos, sin = llama.rotary_embedding(config, jnp.array([[1]]))
    rotated = llama.apply_rotary(x, cos, sin)
    c, s = np.cos(1.0), np.sin(1.0)
    np.testing.assert_allclose(rotated[0, 0, 0], [1 * c - 2 * s, 2 * c + 1 * s], rtol=1e-6)


class GroupedQueryAttentionTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_equals_repeated_heads(self) -> None:
        keys = jax.random.split(jax.random.key(1), 3)
        query = jax.random.normal(keys[0], (2, 3, 4, 8))
        key = jax.random.normal(keys[1], (2, 5, 2, 8))
        value = jax.random.normal(keys[2], (2, 5, 2, 8))
        mask = jnp.tril(jnp.ones((3, 5), bool), k=2)[None].repeat(2, 0).at[1, :, 0].set(False)
        out = self.variant(llama.grouped_query_attention)(query, key, value, mask)
        # Reference: every query head h uses key/value head h // 2, with an explicit -inf mask.
        key_full, value_full = jnp.repeat(key, 2, axis=2), jnp.repeat(value, 2, axis=2)
        scores = jnp.einsum("bthd,bshd->bhts", query, key_full) / np.sqrt(8)
        probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -jnp.inf), axis=-1)
        expected = jnp.einsum("bhts,bshd->bthd", probs, value_full).reshape(2, 3, 32)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_padding_tokens_do_not_change_real_logits(model_and_variables) -> None:
    model, variables = model_and_variables
    apply = jax.jit(model.apply)
    prompt = jnp.array([[5, 9, 14, 3]])
    padded = jnp.array([[0, 0, 5, 9, 14, 3]])
    mask = jnp.array([[0, 0, 1, 1, 1, 1]])
    plain = apply(variables, prompt).logits
    left = apply(variables, padded, attention_mask=mask).logits
    np.testing.assert_allclose(left[:, 2:], plain, rtol=1e-5, atol=1e-5)
    # Changing the padding ids changes nothing; dropping the mask does.
    other_pad = apply(variables, padded.at[0, :2].set(7), attention_mask=mask).logits
    np.testing.assert_allclose(other_pad[:, 2:], plain, rtol=1e-5, atol=1e-5)
    unmasked = apply(variables, padded, attention_mask=jnp.ones_like(mask)).logits
    assert np.max(np.abs(unmasked[:, 2:] - plain)) > 1e-2


class KVCacheTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_prefill_then_decode_equals_full_forward(self) -> None:
        model, variables = _scaled_model()
        tokens = jax.random.randint(jax.random.key(2), (2, 7), 1, CONFIG.vocab_size)
        mask = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])

        def prefill_and_decode(variables, tokens, mask):
            cache = llama.init_cache(CONFIG, 2, 9)
            first = model.apply(variables, tokens[:, :5], attention_mask=mask[:, :5], cache=cache)
            second = model.apply(variables, tokens[:, 5:6], attention_mask=mask[:, 5:6], cache=first.cache)
            third = model.apply(variables, tokens[:, 6:], attention_mask=mask[:, 6:], cache=second.cache)
            return jnp.concatenate([first.logits, second.logits, third.logits], axis=1), third.cache

        cached, cache = self.variant(prefill_and_decode)(variables, tokens, mask)
        full = jax.jit(model.apply)(variables, tokens, attention_mask=mask).logits
        real = np.asarray(mask, bool)
        np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], rtol=1e-4, atol=1e-4)
        assert int(cache.length) == 7
        np.testing.assert_array_equal(cache.mask, [[0, 0, 1, 1, 1, 1, 1, 0, 0], [1] * 7 + [0, 0]])


def test_bfloat16_forward_is_close_to_float32(model_and_variables) -> None:
    model, variables = model_and_variables
    half = LlamaForCausalLM(LlamaConfig(**{**CONFIG.__dict__, "dtype": "bfloat16", "param_dtype": "bfloat16"}))
    tokens = jnp.array([[3, 17, 22, 9, 41]])
    out = jax.jit(half.apply)(jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables), tokens)
    assert out.hidden_states.dtype == jnp.bfloat16 and out.logits.dtype == jnp.float32
    reference = jax.jit(model.apply)(variables, tokens).logits
    assert np.max(np.abs(out.logits - reference)) / np.max(np.abs(reference)) < 5e-2


def test_tied_embeddings_have_no_head_and_use_the_embedding() -> None:
    config = LlamaConfig(**{**CONFIG.__dict__, "tie_word_embeddings": True})
    model = LlamaForCausalLM(config)
    variables = llama.init_params(model, jax.random.key(3))
    assert "lm_head" not in variables["params"]
    apply = jax.jit(model.apply, static_argnames="logits_to_keep")
    out = apply(variables, jnp.array([[1, 2, 3]]))
    embedding = variables["params"]["model"]["embed_tokens"]["embedding"]
    np.testing.assert_allclose(out.logits, out.hidden_states @ embedding.T, rtol=1e-5, atol=1e-5)
    last = apply(variables, jnp.array([[1, 2, 3]]), logits_to_keep=1).logits
    assert last.shape == (1, 1, config.vocab_size)
    # Two compiled programs: equal up to float rounding, which near-zero logits see as a relative error.
    np.testing.assert_allclose(last, out.logits[:, -1:], rtol=1e-6, atol=1e-6)


def test_partition_specs_cover_every_parameter(model_and_variables) -> None:
    _, variables = model_and_variables
    specs = llama.partition_specs(variables)
    flat = dict(zip([jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(variables)],
                    jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))))
    params = "['params']['model']"
    assert flat[f"{params}['layers_0']['self_attn']['q_proj']['kernel']"] == PartitionSpec("fsdp", "tp")
    assert flat[f"{params}['layers_1']['mlp']['down_proj']['kernel']"] == PartitionSpec("tp", "fsdp")
    assert flat[f"{params}['embed_tokens']['embedding']"] == PartitionSpec("tp", "fsdp")
    assert flat[f"{params}['norm']['weight']"] == PartitionSpec()
    # Every spec is valid for its array: placing the parameters on a (1, 1) mesh works.
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    placed = jax.device_put(variables, jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                                    is_leaf=lambda x: isinstance(x, PartitionSpec)))
    chex.assert_trees_all_equal(placed, variables)
    with pytest.raises(ValueError, match="no partition rule"):
        llama.partition_spec_for("params/model/unknown/kernel")


@pytest.mark.parametrize("fields,message", [
    (dict(num_key_value_heads=3), "num_key_value_heads: 3 must divide"),
    (dict(head_dim=7), "head_dim: rotary embeddings need an even head_dim"),
    (dict(dtype="int8"), "dtype: 'int8' not in"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps: must be > 0"),
    (dict(rope_scaling=RopeScaling("linear", 2.0), rope_theta=-1.0), "rope_theta: must be > 0"),
])
def test_invalid_config_is_refused(fields, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LlamaConfig(**{**dict(hidden_size=32, num_attention_heads=4), **fields})


def test_invalid_rope_scaling_is_refused() -> None:
    with pytest.raises(ConfigError, match="rope_scaling.rope_type: 'ntk' is not supported"):
        RopeScaling("ntk", 2.0)
    with pytest.raises(ConfigError, match="rope_scaling.long_factor: longrope needs both"):
        RopeScaling("longrope", short_factor=(1.0,))
    with pytest.raises(ConfigError, match="rope_scaling.short_factor: needs head_dim / 2 = 16 entries, got 1"):
        LlamaConfig(hidden_size=64, num_attention_heads=2,
                    rope_scaling=RopeScaling("longrope", short_factor=(1.0,), long_factor=(1.0,)))
    with pytest.raises(ConfigError, match="rope_scaling.factor: must be > 0"):
        RopeScaling("linear", 0.0)
