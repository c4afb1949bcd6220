"""The conditional VAE over actions of BCQ (Fujimoto, Meger & Precup 2019), and its loss.

BCQ ("Off-Policy Deep Reinforcement Learning without Exploration") models the behaviour policy with a
state-conditional VAE: the encoder maps ``(s, a)`` to a diagonal Gaussian over a latent ``z``, the
decoder maps ``(s, z)`` back to an action in ``[-max_action, max_action]``. Decoding latents drawn from
a *clipped* prior (``z ~ N(0, I)`` clipped to ``[-0.5, 0.5]``) yields actions that resemble the data's.
BCQ-Lag draws its candidate actions this way, BEAR-Lag its samples of the data's action distribution; CPQ uses the encoder's KL divergence to flag
out-of-distribution actions (Xu, Zhang & Li 2022). Both follow OSRL's architecture (two hidden layers
in encoder and decoder, latent size ``2 * action_size``, encoder log-std clipped to ``[-4, 15]``).

Shapes: any leading batch axes; the last axis is the feature axis.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from constrained_rl.models.mlp import MLP

LOG_STD_MIN = -4.0  # encoder log-std clip (BCQ / OSRL), for numerical stability
LOG_STD_MAX = 15.0
PRIOR_CLIP = 0.5  # BCQ decodes latents from N(0, I) clipped to [-0.5, 0.5]


class VAEOutput(NamedTuple):
    reconstruction: jax.Array  # [..., action_size] decoded action
    latent_mean: jax.Array  # [..., latent_size]
    latent_log_std: jax.Array  # [..., latent_size], clipped


class ConditionalVAE(nn.Module):
    """``encode(s, a) -> (mu, log_sigma)``, ``decode(s, z) -> a``; ``__call__`` runs both with a
    reparameterised latent and needs the ``"latent"`` PRNG stream."""

    hidden_sizes: tuple[int, ...]
    action_size: int
    latent_size: int
    max_action: float = 1.0

    def setup(self) -> None:
        self.encoder = MLP(self.hidden_sizes, 2 * self.latent_size)
        self.decoder = MLP(self.hidden_sizes, self.action_size)

    def encode(self, observation: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean, log_std = jnp.split(self.encoder(jnp.concatenate([observation, action], -1)), 2, -1)
        return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)

    def decode_pre_squash(self, observation: jax.Array, latent: jax.Array) -> jax.Array:
        """The decoder's output before the tanh: BEAR matches the policy to the data in this space."""
        return self.decoder(jnp.concatenate([observation, latent], -1))

    def decode(self, observation: jax.Array, latent: jax.Array) -> jax.Array:
        return self.max_action * jnp.tanh(self.decode_pre_squash(observation, latent))

    def __call__(self, observation: jax.Array, action: jax.Array) -> VAEOutput:
        mean, log_std = self.encode(observation, action)
        noise = jax.random.normal(self.make_rng("latent"), mean.shape, mean.dtype)
        reconstruction = self.decode(observation, mean + jnp.exp(log_std) * noise)
        return VAEOutput(reconstruction, mean, log_std)


def clipped_prior_latents(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """BCQ's decoding latents ``clip(z, -0.5, 0.5)`` with ``z ~ N(0, I)``, of the given shape."""
    return jnp.clip(jax.random.normal(key, shape), -PRIOR_CLIP, PRIOR_CLIP)


def kl_to_standard_normal(mean: chex.Array, log_std: chex.Array) -> jax.Array:
    """``KL(N(mu, sigma^2) || N(0, I))`` per latent dimension, *averaged* over the last axis:

        -0.5 * mean_j (1 + 2 log sigma_j - mu_j^2 - sigma_j^2)

    The average (not the sum) over latent dimensions is what BCQ and OSRL use in the VAE loss and in
    CPQ's out-of-distribution score. Returns shape ``mean.shape[:-1]``.
    """
    chex.assert_equal_shape([mean, log_std])
    return -0.5 * jnp.mean(1.0 + 2.0 * log_std - jnp.square(mean) - jnp.exp(2.0 * log_std), axis=-1)


def vae_loss(output: VAEOutput, actions: chex.Array, kl_weight: float) -> jax.Array:
    """BCQ's VAE loss ``mean ||a_hat - a||^2 / A + kl_weight * mean KL`` (a scalar).

    The reconstruction term is the mean squared error over batch and action dimensions, the KL term
    :func:`kl_to_standard_normal` averaged over the batch (BCQ; OSRL uses ``kl_weight`` 0.5).
    """
    chex.assert_equal_shape([output.reconstruction, actions])
    reconstruction = jnp.mean(jnp.square(output.reconstruction - actions))
    kl = jnp.mean(kl_to_standard_normal(output.latent_mean, output.latent_log_std))
    return reconstruction + kl_weight * kl
