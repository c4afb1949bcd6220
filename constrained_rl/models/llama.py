"""A Llama-family decoder-only language model in flax.linen, with an explicit KV cache.

The architecture follows Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models", and
its Hugging Face transformers implementation (``LlamaForCausalLM``), whose parameter layout it mirrors so
that checkpoints load by a name-mapping table (see ``hf_checkpoint``):

  h_0     = E[tokens]
  a_l     = h_{l-1} + Attention(RMSNorm(h_{l-1}))           (rotary positions, grouped-query attention)
  h_l     = a_l + W_down(silu(W_gate x) * W_up x),  x = RMSNorm(a_l)          (SwiGLU, Shazeer 2020)
  logits  = RMSNorm(h_L) W_lm     (W_lm = E^T when the embeddings are tied)

with RMSNorm(x) = w * x / sqrt(mean(x^2) + eps) (Zhang & Sennrich 2019) and rotary embeddings
(Su et al. 2021, "RoFormer") in the "rotate half" layout Hugging Face checkpoints are stored in.

The same module is Mistral (Jiang et al. 2023; sliding-window attention), Qwen2/Qwen2.5 (Yang et al. 2024;
biases on q/k/v) and Qwen3 (Yang et al. 2025; per-head RMSNorm on q and k): ``LlamaConfig.model_type``
switches these parts on, mirroring transformers' ``modeling_mistral`` / ``modeling_qwen2`` /
``modeling_qwen3``, and the rope types of ``modeling_rope_utils`` (linear, dynamic, yarn, longrope, llama3)
are computed as it computes them.

The KV cache is a plain pytree argument (:class:`KVCache`), not a flax mutable collection, so prefill and
decode are pure functions that jit, donate and scan. Every batch axis is axis 0; tokens are ``[B, T]``.
Padding is described by ``attention_mask`` (1 = real token); prompts are left-padded, and positions are
counted over real tokens only, so a left-padded prompt gets the same positions as an unpadded one.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from constrained_rl.config import require

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3")
# Model families (config.json ``model_type``) this one module implements, and what each switches on:
#   llama    biases on q/k/v/o when attention_bias, on the MLP when mlp_bias;
#   mistral  no biases; sliding-window attention on every layer when sliding_window is set;
#   qwen2    biases on q/k/v (never on o), sliding window on the layers layer_types names;
#   qwen3    RMSNorm over head_dim on every query and key head before the rotation (q_norm, k_norm),
#            biases on q/k/v/o when attention_bias, sliding window as qwen2.
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling, as transformers' ``rope_parameters`` (``modeling_rope_utils``).

    ``linear`` (Chen et al. 2023, position interpolation): every inverse frequency is divided by ``factor``.
    ``dynamic`` (dynamic NTK, bloc97/emozilla): the base grows with the sequence length ``L`` once it exceeds
    ``max_position_embeddings`` (see :func:`rope_inverse_frequencies`).
    ``yarn`` (Peng et al. 2023, "YaRN"): a ramp between interpolated and original frequencies over the
    dimensions, and cos/sin multiplied by an attention factor.
    ``longrope`` (Ding et al. 2024, "LongRoPE"; Phi-3): per-dimension factors, ``short_factor`` while the
    sequence fits ``original_max_position_embeddings`` and ``long_factor`` beyond, and an attention factor.
    ``llama3`` (Meta's Llama 3.1): long wavelengths are divided by ``factor``, short ones kept, and the
    band between is interpolated smoothly.
    """

    rope_type: str  # one of ROPE_TYPES
    factor: float | None = None  # scaling factor; None (yarn, longrope only) = max_position_embeddings / original
    low_freq_factor: float = 1.0  # llama3: wavelengths above original_max / low_freq_factor are scaled
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_max / high_freq_factor are kept
    original_max_position_embeddings: int | None = None  # llama3/yarn/longrope; None = max_position_embeddings
    attention_factor: float | None = None  # yarn/longrope: cos/sin multiplier; None = the paper's default
    beta_fast: float = 32.0  # yarn: rotations bounding the extrapolated (unchanged) dimensions
    beta_slow: float = 1.0  # yarn: rotations bounding the interpolated dimensions
    mscale: float | None = None  # yarn: with mscale_all_dim, the attention factor's numerator scale
    mscale_all_dim: float | None = None  # yarn: the attention factor's denominator scale
    truncate: bool = True  # yarn: round the ramp's bounds to whole dimensions
    short_factor: tuple[float, ...] | None = None  # longrope: per-frequency factors for short sequences
    long_factor: tuple[float, ...] | None = None  # longrope: per-frequency factors beyond original_max

    def __post_init__(self) -> None:
        require(self.rope_type in ROPE_TYPES, "rope_scaling.rope_type",
                f"{self.rope_type!r} is not supported; use one of {ROPE_TYPES} or no scaling")
        for name in ("short_factor", "long_factor"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.factor is None:
            require(self.rope_type in ("yarn", "longrope"), "rope_scaling.factor",
                    f"is required for {self.rope_type}")
        else:
            require(self.factor > 0, "rope_scaling.factor", f"must be > 0, got {self.factor}")
        if self.rope_type == "llama3":
            require(self.high_freq_factor > self.low_freq_factor, "rope_scaling.high_freq_factor",
                    "must exceed low_freq_factor")
        if self.original_max_position_embeddings is not None:
            require(self.original_max_position_embeddings > 0, "rope_scaling.original_max_position_embeddings",
                    "must be > 0")
        if self.rope_type == "longrope":
            require(self.short_factor is not None and self.long_factor is not None, "rope_scaling.long_factor",
                    "longrope needs both short_factor and long_factor")

    def resolved(self, max_position_embeddings: int) -> RopeScaling:
        """With the defaults transformers fills in: original_max_position_embeddings = the model's context
        (llama3, yarn, longrope), and for yarn/longrope a missing factor = context / original context."""
        if self.rope_type not in ("llama3", "yarn", "longrope"):
            return self
        original = self.original_max_position_embeddings or max_position_embeddings
        factor = max_position_embeddings / original if self.factor is None else self.factor
        return dataclasses.replace(self, original_max_position_embeddings=original, factor=factor)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family model; field names follow Hugging Face's ``config.json``."""

    vocab_size: int = 32000  # number of token embeddings
    hidden_size: int = 4096  # model width
    intermediate_size: int = 11008  # SwiGLU hidden width
    num_hidden_layers: int = 32  # decoder blocks
    num_attention_heads: int = 32  # query heads
    num_key_value_heads: int | None = None  # key/value heads (grouped-query attention); None = query heads
    head_dim: int | None = None  # per-head width; None = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6  # epsilon inside every RMSNorm
    rope_theta: float = 10000.0  # rotary base wavelength
    rope_scaling: RopeScaling | None = None  # rotary frequency scaling; None = plain RoPE
    max_position_embeddings: int = 2048  # longest sequence the model was trained for
    tie_word_embeddings: bool = False  # output projection shares the input embedding matrix
    attention_bias: bool = False  # biases on q/k/v/o projections (llama, qwen3)
    mlp_bias: bool = False  # biases on gate/up/down projections (llama)
    bos_token_id: int | None = 1  # beginning-of-sequence token
    eos_token_id: tuple[int, ...] = (2,)  # end-of-sequence token(s); any of them stops generation
    pad_token_id: int | None = None  # padding token; None = the tokenizer decides
    dtype: str = "float32"  # computation dtype: float32, bfloat16 or float16
    param_dtype: str = "float32"  # parameter storage dtype
    model_type: str = "llama"  # family (MODEL_TYPES): switches the qkv biases and the q/k norms
    sliding_window: int | None = None  # keys at most this many slots back are seen (mistral, qwen2, qwen3)
    layer_types: tuple[str, ...] | None = None  # per layer full/sliding; None = all sliding when a window is set

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            require(self.num_attention_heads > 0, "num_attention_heads", "must be > 0")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        elif self.eos_token_id is None:
            object.__setattr__(self, "eos_token_id", ())
        else:
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        require(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                f"{self.num_key_value_heads} must divide num_attention_heads={self.num_attention_heads}")
        require(self.head_dim % 2 == 0, "head_dim", f"rotary embeddings need an even head_dim, got {self.head_dim}")
        require(self.rms_norm_eps > 0, "rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        require(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        require(self.dtype in SUPPORTED_DTYPES, "dtype", f"{self.dtype!r} not in {SUPPORTED_DTYPES}")
        require(self.param_dtype in SUPPORTED_DTYPES, "param_dtype",
                f"{self.param_dtype!r} not in {SUPPORTED_DTYPES}")
        self._check_family()
        self._check_rope()

    def _check_family(self) -> None:
        require(self.model_type in MODEL_TYPES, "model_type", f"{self.model_type!r} not in {MODEL_TYPES}")
        if self.model_type in ("mistral", "qwen2"):
            require(not self.attention_bias, "attention_bias", f"{self.model_type} has no attention_bias switch")
        if self.model_type != "llama":
            require(not self.mlp_bias, "mlp_bias", f"{self.model_type} has no MLP biases")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            require(len(self.layer_types) == self.num_hidden_layers, "layer_types",
                    f"{len(self.layer_types)} entries for {self.num_hidden_layers} layers")
            require(set(self.layer_types) <= set(LAYER_TYPES), "layer_types", f"entries must be in {LAYER_TYPES}")
            require(self.model_type in ("qwen2", "qwen3"), "layer_types",
                    f"{self.model_type} applies its sliding window to every layer (layer_types must be None)")
        if self.sliding_window is not None:
            require(self.sliding_window > 0, "sliding_window", f"must be > 0, got {self.sliding_window}")
            require(self.model_type != "llama", "sliding_window", "llama has no sliding-window attention")
        elif self.layer_types is not None:
            require("sliding_attention" not in self.layer_types, "layer_types",
                    "sliding_attention layers need a sliding_window")

    def _check_rope(self) -> None:
        if self.rope_scaling is None:
            return
        object.__setattr__(self, "rope_scaling", self.rope_scaling.resolved(self.max_position_embeddings))
        scaling = self.rope_scaling
        if scaling.rope_type == "longrope":
            for name in ("short_factor", "long_factor"):
                require(len(getattr(scaling, name)) == self.head_dim // 2, f"rope_scaling.{name}",
                        f"needs head_dim / 2 = {self.head_dim // 2} entries, got {len(getattr(scaling, name))}")

    @property
    def qkv_bias(self) -> bool:
        """Biases on the query/key/value projections: Qwen2 always, else with attention_bias."""
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def qk_norm(self) -> bool:
        """Per-head RMSNorm on queries and keys before the rotation (Qwen3)."""
        return self.model_type == "qwen3"

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None = full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)


class KVCache(NamedTuple):
    """Keys and values of every layer for ``S`` slots, filled left to right.

    keys, values: one ``[B, S, num_key_value_heads, head_dim]`` array per layer (rotary already applied).
    mask: ``[B, S]`` int32, 1 where a slot holds a real (non-padding) token.
    length: int32 scalar, number of slots written so far (the next write starts here).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    mask: jax.Array
    length: jax.Array


class LMOutput(NamedTuple):
    """logits ``[B, T, V]`` (float32), the updated cache (None without one), final hidden states ``[B, T, H]``.

    Hidden states are after the final RMSNorm, the input of the output projection and of score heads.
    """

    logits: jax.Array
    cache: KVCache | None
    hidden_states: jax.Array


def init_cache(config: LlamaConfig, batch_size: int, max_length: int) -> KVCache:
    """An empty cache with ``max_length`` slots per sequence, in the computation dtype.

    The caller sizes it for prompt plus generated tokens: writes past ``max_length`` are clamped by
    ``lax.dynamic_update_slice`` and would overwrite the last slots.
    """
    shape = (batch_size, max_length, config.num_key_value_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.num_hidden_layers))
    # Separate buffers for keys and values, so the cache can be donated without aliasing.
    return KVCache(keys=zeros, values=tuple(jnp.zeros_like(z) for z in zeros),
                   mask=jnp.zeros((batch_size, max_length), jnp.int32), length=jnp.zeros((), jnp.int32))


def positions_from_mask(attention_mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """Position of each token counted over real tokens only: ``offset + cumsum(mask) - 1``, clipped at 0.

    Batch axis 0. ``offset`` (shape ``[B]`` or scalar) is the number of real tokens already in the cache.
    Padding slots get the position of the previous real token (or 0); they are masked out anyway.
    """
    chex.assert_rank(attention_mask, 2)
    counts = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
    return jnp.maximum(counts + jnp.asarray(offset, jnp.int32)[..., None], 0)


def _base_inverse_frequencies(theta: Any, dim: int, xp: Any = np) -> Any:
    """inv_freq_i = theta^(-2i / dim), i = 0 .. dim/2 - 1 (Su et al. 2021), in float32 like transformers."""
    exponents = xp.arange(0, dim, 2, dtype=xp.float32) / xp.float32(dim)
    return (1.0 / (xp.asarray(theta, xp.float32) ** exponents)).astype(xp.float32)


def _dynamic_ntk_theta(config: LlamaConfig, seq_len: Any, xp: Any = np) -> Any:
    """Dynamic NTK base: theta * (factor * L / M - (factor - 1))^(d / (d - 2)), L = max(seq_len, M),
    M = max_position_embeddings (equal to theta up to M)."""
    dim, context = config.head_dim, config.max_position_embeddings
    factor = config.rope_scaling.factor
    length = xp.maximum(xp.asarray(seq_len, xp.float32), xp.float32(context))
    return config.rope_theta * (factor * length / context - (factor - 1)) ** (dim / (dim - 2))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's Eq. 21: 0.1 * mscale * ln(scale) + 1 for scale > 1, else 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """YaRN (Peng et al. 2023): per dimension i, a ramp r_i = clip((i - low) / (high - low), 0, 1) with
    low/high the dimensions that turn beta_fast / beta_slow times over the original context,
    d(n) = dim ln(L_orig / (2 pi n)) / (2 ln theta) (floored / ceiled when truncate, clipped to [0, dim-1]);
    inv_freq_i = base_i / factor * r_i + base_i * (1 - r_i)."""
    scaling, dim, theta = config.rope_scaling, config.head_dim, config.rope_theta
    original = scaling.original_max_position_embeddings
    beta_fast, beta_slow = scaling.beta_fast or 32.0, scaling.beta_slow or 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    base = _base_inverse_frequencies(theta, dim)
    extrapolation = 1 - ramp
    return (base / scaling.factor * (1 - extrapolation) + base * extrapolation).astype(np.float32)


def rope_inverse_frequencies(config: LlamaConfig, seq_len: int | None = None) -> np.ndarray:
    """Rotary inverse frequencies ``[head_dim / 2]`` (float32) for a forward pass over ``seq_len`` positions
    (the largest position + 1; None = the frequencies transformers initialises with).

    As transformers' ``modeling_rope_utils`` computes them. Base: inv_freq_i = theta^(-2i / head_dim).
    linear: inv_freq_i / factor.
    dynamic: the base with theta replaced by :func:`_dynamic_ntk_theta` (depends on seq_len).
    yarn: :func:`_yarn_inverse_frequencies`.
    longrope: theta^(-2i / head_dim) / f_i with f = long_factor when seq_len > original_max_position_embeddings,
      else short_factor.
    llama3: with wavelength w_i = 2 pi / inv_freq_i, L = original_max_position_embeddings,
      w_i < L / high_freq_factor -> unchanged; w_i > L / low_freq_factor -> inv_freq_i / factor;
      otherwise (1 - s) inv_freq_i / factor + s inv_freq_i with s = (L / w_i - low) / (high - low).
    """
    dim, scaling = config.head_dim, config.rope_scaling
    inv_freq = _base_inverse_frequencies(config.rope_theta, dim)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    if scaling.rope_type == "dynamic":
        length = config.max_position_embeddings if seq_len is None else seq_len
        return _base_inverse_frequencies(_dynamic_ntk_theta(config, length), dim)
    if scaling.rope_type == "yarn":
        return _yarn_inverse_frequencies(config)
    if scaling.rope_type == "longrope":
        long = seq_len is not None and seq_len > scaling.original_max_position_embeddings
        factors = np.asarray(scaling.long_factor if long else scaling.short_factor, np.float32)
        exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
        return (1.0 / (factors * np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    context = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    smooth = (context / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = np.where(wavelength > context / scaling.low_freq_factor, inv_freq / scaling.factor, interpolated)
    scaled = np.where(wavelength < context / scaling.high_freq_factor, inv_freq, scaled)
    return scaled.astype(np.float32)


def rope_attention_scaling(config: LlamaConfig) -> float:
    """The factor cos and sin are multiplied by (so q.k by its square): 1 except for
    yarn: attention_factor, else mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set,
      else mscale(factor) (:func:`_yarn_mscale`);
    longrope: attention_factor, else sqrt(1 + ln(factor) / ln(original_max_position_embeddings)) for factor > 1.
    """
    scaling = config.rope_scaling
    if scaling is None or scaling.rope_type not in ("yarn", "longrope"):
        return 1.0
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)
    if scaling.rope_type == "yarn":
        if scaling.mscale and scaling.mscale_all_dim:
            return _yarn_mscale(scaling.factor, scaling.mscale) / _yarn_mscale(scaling.factor, scaling.mscale_all_dim)
        return _yarn_mscale(scaling.factor)
    if scaling.factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(scaling.factor) / math.log(scaling.original_max_position_embeddings))


def traced_inverse_frequencies(config: LlamaConfig, seq_len: jax.Array) -> jax.Array:
    """:func:`rope_inverse_frequencies` for a traced ``seq_len`` (inside jit): the rope types whose
    frequencies depend on the length (dynamic, longrope) choose them in the graph, the others are constants."""
    scaling = config.rope_scaling
    if scaling is not None and scaling.rope_type == "dynamic":
        return _base_inverse_frequencies(_dynamic_ntk_theta(config, seq_len, jnp), config.head_dim, jnp)
    if scaling is not None and scaling.rope_type == "longrope":
        original = scaling.original_max_position_embeddings
        return jnp.where(seq_len > original, rope_inverse_frequencies(config, original + 1),
                         rope_inverse_frequencies(config))
    return jnp.asarray(rope_inverse_frequencies(config))


def rotary_embedding(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin ``[B, T, 1, head_dim]`` (float32) of angle positions * inv_freq, repeated over both halves
    and multiplied by :func:`rope_attention_scaling`.

    The frequencies are those of a forward pass over max(positions) + 1 positions, the whole batch's
    largest, as transformers' rotary embedding chooses them per call (which matters for dynamic and longrope).
    """
    seq_len = jnp.max(positions) + 1
    angles = positions.astype(jnp.float32)[..., None] * traced_inverse_frequencies(config, seq_len)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    scale = rope_attention_scaling(config)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` ``[B, T, heads, head_dim]`` by the angles of ``cos``/``sin`` ("rotate half" layout).

    x' = x cos + rotate_half(x) sin, rotate_half([x1, x2]) = [-x2, x1]; cos/sin are cast to x's dtype.
    """
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    first, second = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-second, first], axis=-1) * sin


def grouped_query_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d) + mask) v with ``heads / kv_heads`` query heads sharing each key/value head.

    query ``[B, T, heads, d]``, key/value ``[B, S, kv_heads, d]``, mask ``[B, T, S]`` (True = may attend).
    Scores and softmax in float32. Rows with no allowed slot (padding queries) get finite, meaningless
    outputs rather than NaN. Grouped-query attention: Ainslie et al. 2023 ("GQA").
    """
    batch, length, heads, dim = query.shape
    kv_heads = key.shape[2]
    chex.assert_equal_shape([key, value])
    chex.assert_shape(mask, (batch, length, key.shape[1]))
    grouped = query.reshape(batch, length, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", grouped, key, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(dim)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, value)
    return out.reshape(batch, length, heads * dim)


def _dense(features: int, use_bias: bool, config: LlamaConfig, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=config.compute_dtype, param_dtype=config.storage_dtype,
                    kernel_init=nn.initializers.normal(0.02), name=name)


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps), normalised in float32 (Zhang & Sennrich 2019)."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(self.dtype) * normed.astype(self.dtype)


def _rms_norm(config: LlamaConfig, name: str) -> RMSNorm:
    return RMSNorm(config.rms_norm_eps, config.compute_dtype, config.storage_dtype, name=name)


class LlamaAttention(nn.Module):
    """Multi-head self-attention with rotary positions, grouped key/value heads and an optional cache.

    Qwen3 (``config.qk_norm``) normalises every query and key head with its own RMSNorm over head_dim
    before the rotation; Qwen2 (``config.qkv_bias``) adds biases to q/k/v but not to o.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, rotary: tuple[jax.Array, jax.Array], mask: jax.Array,
                 cached: tuple[jax.Array, jax.Array] | None, write_index: jax.Array | None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        cfg = self.config
        batch, length, _ = x.shape
        split_heads = lambda t, heads: t.reshape(batch, length, heads, cfg.head_dim)  # noqa: E731
        query = split_heads(_dense(cfg.num_attention_heads * cfg.head_dim, cfg.qkv_bias, cfg, "q_proj")(x),
                            cfg.num_attention_heads)
        key = split_heads(_dense(cfg.num_key_value_heads * cfg.head_dim, cfg.qkv_bias, cfg, "k_proj")(x),
                          cfg.num_key_value_heads)
        value = split_heads(_dense(cfg.num_key_value_heads * cfg.head_dim, cfg.qkv_bias, cfg, "v_proj")(x),
                            cfg.num_key_value_heads)
        if cfg.qk_norm:
            query = _rms_norm(cfg, "q_norm")(query)
            key = _rms_norm(cfg, "k_norm")(key)
        query = apply_rotary(query, *rotary)
        key = apply_rotary(key, *rotary)
        if cached is not None:
            start = (0, write_index, 0, 0)
            key = jax.lax.dynamic_update_slice(cached[0], key.astype(cached[0].dtype), start)
            value = jax.lax.dynamic_update_slice(cached[1], value.astype(cached[1].dtype), start)
        out = grouped_query_attention(query, key, value, mask)
        return _dense(cfg.hidden_size, cfg.attention_bias, cfg, "o_proj")(out), (key, value)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: W_down(silu(W_gate x) * W_up x) (Shazeer 2020)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        gate = _dense(cfg.intermediate_size, cfg.mlp_bias, cfg, "gate_proj")(x)
        up = _dense(cfg.intermediate_size, cfg.mlp_bias, cfg, "up_proj")(x)
        return _dense(cfg.hidden_size, cfg.mlp_bias, cfg, "down_proj")(jax.nn.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: h + Attn(RMSNorm(h)), then + MLP(RMSNorm(.))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, h: jax.Array, rotary: tuple[jax.Array, jax.Array], mask: jax.Array,
                 cached: tuple[jax.Array, jax.Array] | None, write_index: jax.Array | None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        attn, kv = LlamaAttention(self.config, name="self_attn")(
            _rms_norm(self.config, "input_layernorm")(h), rotary, mask, cached, write_index)
        h = h + attn
        h = h + LlamaMLP(self.config, name="mlp")(_rms_norm(self.config, "post_attention_layernorm")(h))
        return h, kv


def _attention_mask(attention_mask: jax.Array, cache: KVCache | None
                    ) -> tuple[jax.Array, jax.Array, KVCache | None]:
    """The ``[B, T, S]`` mask (causal over slots, padding slots excluded), the distance ``[T, S]`` from each
    query slot back to each key slot, and the cache's new slot mask."""
    length = attention_mask.shape[1]
    if cache is None:
        distance = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
        return (distance >= 0)[None] & attention_mask.astype(bool)[:, None, :], distance, None
    slot_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask.astype(jnp.int32), (0, cache.length))
    query_slots = cache.length + jnp.arange(length)
    distance = query_slots[:, None] - jnp.arange(cache.mask.shape[1])[None, :]
    mask = (distance >= 0)[None] & slot_mask.astype(bool)[:, None, :]
    return mask, distance, cache._replace(mask=slot_mask, length=cache.length + length)


def sliding_window_mask(mask: jax.Array, distance: jax.Array, window: int | None) -> jax.Array:
    """``mask`` restricted to keys fewer than ``window`` slots back (distance < window), as transformers'
    sliding-window mask (kv_idx > q_idx - window, over slot indices); the unchanged mask for None."""
    return mask if window is None else mask & (distance < window)[None]


class LlamaModel(nn.Module):
    """Embedding, decoder blocks and the final RMSNorm: tokens -> hidden states ``[B, T, H]``."""

    config: LlamaConfig

    def setup(self) -> None:
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
                                     param_dtype=cfg.storage_dtype, embedding_init=nn.initializers.normal(0.02))
        self.layers = [LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = _rms_norm(cfg, "norm")

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, cache: KVCache | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        """Hidden states after the final norm, and the updated cache.

        tokens ``[B, T]`` int; attention_mask ``[B, T]`` (1 = real token; default all ones); positions
        ``[B, T]`` (default: counted over real tokens, continuing from those already in the cache).
        With a cache, the ``T`` new tokens are written at slots ``[cache.length, cache.length + T)``.
        """
        chex.assert_rank(tokens, 2)
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, jnp.int32)
        chex.assert_equal_shape([tokens, attention_mask])
        if positions is None:
            offset = 0 if cache is None else jnp.sum(cache.mask, axis=-1)
            positions = positions_from_mask(attention_mask, offset)
        mask, distance, new_cache = _attention_mask(attention_mask, cache)
        rotary = rotary_embedding(self.config, positions)
        h = self.embed_tokens(tokens)
        keys, values = [], []
        for index, layer in enumerate(self.layers):
            cached = None if cache is None else (cache.keys[index], cache.values[index])
            layer_mask = sliding_window_mask(mask, distance, self.config.layer_window(index))
            h, (key, value) = layer(h, rotary, layer_mask, cached, None if cache is None else cache.length)
            keys.append(key)
            values.append(value)
        if new_cache is not None:
            new_cache = new_cache._replace(keys=tuple(keys), values=tuple(values))
        return self.norm(h), new_cache


class LlamaForCausalLM(nn.Module):
    """Llama backbone plus the language-model head; ``apply(variables, tokens, positions, mask, cache)``."""

    config: LlamaConfig

    def setup(self) -> None:
        self.model = LlamaModel(self.config)
        if not self.config.tie_word_embeddings:
            self.lm_head = _dense(self.config.vocab_size, False, self.config, "lm_head")

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, cache: KVCache | None = None,
                 logits_to_keep: int = 0) -> LMOutput:
        """Next-token logits ``[B, T, V]`` in float32 for every input position (see ``LlamaModel``).

        ``logits_to_keep`` > 0 computes logits for the last that many positions only (``[B, n, V]``): a
        prefill needs just the last one, and the output projection is a large share of its cost.
        """
        hidden, new_cache = self.model(tokens, positions, attention_mask, cache)
        kept = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(kept)
        else:
            logits = self.lm_head(kept)
        return LMOutput(logits.astype(jnp.float32), new_cache, hidden)


# Sharding: "fsdp" shards parameters for fully sharded data parallelism, "tp" splits attention heads and
# MLP columns for Megatron-style tensor parallelism (Shoeybi et al. 2019): column-parallel q/k/v/gate/up,
# row-parallel o/down, vocabulary-parallel embeddings and output head. Norm weights are small: replicated.
PARTITION_RULES: tuple[tuple[str, PartitionSpec], ...] = (
    (r"embed_tokens/embedding$", PartitionSpec("tp", "fsdp")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", PartitionSpec("fsdp", "tp")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", PartitionSpec("tp")),
    (r"(o_proj|down_proj)/kernel$", PartitionSpec("tp", "fsdp")),
    (r"(o_proj|down_proj)/bias$", PartitionSpec()),
    (r"lm_head/kernel$", PartitionSpec("fsdp", "tp")),
    (r"score_head/kernel$", PartitionSpec("fsdp", None)),
    (r"score_head/bias$", PartitionSpec()),
    (r"(layernorm|norm)/weight$", PartitionSpec()),
)


def partition_spec_for(path: str, rules: tuple[tuple[str, PartitionSpec], ...] = PARTITION_RULES
                       ) -> PartitionSpec:
    """The spec of the first rule whose regex matches ``path`` ("params/model/layers_0/.../kernel")."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            return spec
    raise ValueError(f"no partition rule matches parameter {path!r}")


def partition_specs(params: Any, rules: tuple[tuple[str, PartitionSpec], ...] = PARTITION_RULES) -> Any:
    """A pytree like ``params`` holding each parameter's ``PartitionSpec`` over axes ("fsdp", "tp")."""
    def spec(path: tuple[Any, ...], _: Any) -> PartitionSpec:
        return partition_spec_for("/".join(str(getattr(k, "key", k)) for k in path), rules)
    return jax.tree_util.tree_map_with_path(spec, params)


def init_params(model: nn.Module, key: jax.Array, sequence_length: int = 1) -> Any:
    """Fresh variables ``{"params": ...}`` for ``model`` (normal(0.02) weights, unit norm weights)."""
    tokens = jnp.zeros((1, sequence_length), jnp.int32)
    return jax.jit(model.init)(key, tokens)

