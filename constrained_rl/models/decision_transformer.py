"""The Constrained Decision Transformer's network (Liu et al. 2023, "Constrained Decision Transformer
for Offline Safe Reinforcement Learning"), a GPT over interleaved return, cost, state and action tokens.

Each step ``t`` of a context of ``K`` steps contributes four tokens, in this order::

    R_t (reward-to-go), C_t (cost-to-go), s_t, a_t

each a linear embedding of its value plus a learned embedding of the step's time index ``t`` (the
Decision Transformer of Chen et al. 2021, with CDT's cost-to-go token). The ``4K`` tokens pass a
layer norm, dropout and pre-norm causal transformer blocks (GPT-2's: attention and a 4x GELU MLP,
each added back to its input); the output at ``s_t`` predicts ``a_t`` (a diagonal Gaussian), the
output at ``a_t`` classifies whether step ``t`` incurs a cost (CDT's auxiliary head). Causal masking
means the action at the last position never affects the prediction of its own action.

Initialisation and head shapes follow OSRL's CDT: every dense and embedding kernel ``N(0, 0.02)``,
zero biases; the Gaussian head's log-std is the plain linear output, unbounded: OSRL's
``DiagGaussianActor`` (``osrl/common/net.py``) stores ``log_std_bounds = [-5.0, 2.0]`` but its
``forward`` takes ``std = log_std.exp()`` without applying them.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

TOKENS_PER_STEP = 4  # R, C, s, a


class DecisionTransformerOutput(NamedTuple):
    action_mean: jax.Array  # [B, K, action_size], before any clipping
    action_log_std: jax.Array  # [B, K, action_size], unbounded (OSRL's)
    cost_logits: jax.Array  # [B, K, 2]: log-probabilities of (no cost, cost) at each step


def _dense(features: int, name: str | None = None) -> nn.Dense:
    return nn.Dense(features, kernel_init=nn.initializers.normal(0.02), name=name)


class TransformerBlock(nn.Module):
    """Pre-norm GPT block: ``x + Drop(Attn(LN(x)))``, then ``x + Drop(MLP(LN(x)))``."""

    num_heads: int
    attention_dropout: float
    residual_dropout: float

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        width = x.shape[-1]
        attention = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, dropout_rate=self.attention_dropout,
            kernel_init=nn.initializers.normal(0.02), deterministic=deterministic)
        normed = nn.LayerNorm()(x)
        x = x + nn.Dropout(self.residual_dropout)(attention(normed, normed, mask=mask), deterministic)
        hidden = nn.gelu(_dense(4 * width)(nn.LayerNorm()(x)), approximate=False)
        return x + nn.Dropout(self.residual_dropout)(_dense(width)(hidden), deterministic)


class DecisionTransformer(nn.Module):
    """``(states, actions, reward_to_go, cost_to_go, timesteps, valid) -> DecisionTransformerOutput``.

    Shapes ``[B, K, obs]``, ``[B, K, act]``, ``[B, K]`` (x3, timesteps int), ``[B, K]`` bool: ``valid``
    is False at padding, whose tokens no other token attends to. The to-go values arrive already
    scaled / transformed (the learner's business); ``max_timestep`` sizes the time embedding.
    """

    action_size: int
    max_timestep: int
    embedding_dim: int = 128
    num_layers: int = 3
    num_heads: int = 8
    attention_dropout: float = 0.1
    residual_dropout: float = 0.1
    embedding_dropout: float = 0.1

    @nn.compact
    def __call__(self, states: jax.Array, actions: jax.Array, reward_to_go: jax.Array, cost_to_go: jax.Array,
                 timesteps: jax.Array, valid: jax.Array, deterministic: bool = True) -> DecisionTransformerOutput:
        batch, steps = states.shape[:2]
        width = self.embedding_dim
        time = nn.Embed(self.max_timestep, width, embedding_init=nn.initializers.normal(0.02),
                        name="timestep_embedding")(timesteps)
        tokens = jnp.stack([
            _dense(width, "reward_embedding")(reward_to_go[..., None]) + time,
            _dense(width, "cost_embedding")(cost_to_go[..., None]) + time,
            _dense(width, "state_embedding")(states) + time,
            _dense(width, "action_embedding")(actions) + time,
        ], axis=2).reshape(batch, TOKENS_PER_STEP * steps, width)  # (R_0, C_0, s_0, a_0, R_1, ...)
        token_valid = jnp.repeat(valid, TOKENS_PER_STEP, axis=1)
        mask = nn.combine_masks(nn.make_causal_mask(token_valid), nn.make_attention_mask(token_valid, token_valid))
        x = nn.Dropout(self.embedding_dropout)(nn.LayerNorm()(tokens), deterministic)
        for _ in range(self.num_layers):
            x = TransformerBlock(self.num_heads, self.attention_dropout, self.residual_dropout)(x, mask, deterministic)
        x = nn.LayerNorm()(x).reshape(batch, steps, TOKENS_PER_STEP, width)
        state_out, action_out = x[:, :, 2], x[:, :, 3]
        mean = _dense(self.action_size, "action_mean")(state_out)
        log_std = _dense(self.action_size, "action_log_std")(state_out)
        cost_logits = jax.nn.log_softmax(_dense(2, "cost_head")(action_out), axis=-1)
        return DecisionTransformerOutput(mean, log_std, cost_logits)
