"""Small flax.linen networks for control: MLP torsos, Gaussian actors, value and Q ensembles.

These are the networks every control learner shares (PPO-Lagrangian, SATAC, ATAC and the OSRL baselines).
They hold no training logic: losses live in ``constrained_rl`` primitives and in ``algorithms``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from constrained_rl import distributions

Activation = Callable[[jax.Array], jax.Array]
Params = Any


class MLP(nn.Module):
    """Fully connected torso: ``len(hidden_sizes)`` hidden layers, then a linear output layer."""

    hidden_sizes: Sequence[int]
    output_size: int
    activation: Activation = nn.relu
    output_kernel_scale: float = 1.0  # scale of the last layer's init; small for policy heads (PPO practice)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.hidden_sizes:
            x = self.activation(nn.Dense(width, kernel_init=nn.initializers.lecun_uniform())(x))
        return nn.Dense(
            self.output_size,
            kernel_init=nn.initializers.variance_scaling(
                self.output_kernel_scale, "fan_in", "uniform"),
        )(x)


class GaussianActor(nn.Module):
    """Diagonal Gaussian policy head: observation -> (mean, log_std) before any tanh squashing.

    ``state_dependent_std`` chooses between a log-std predicted per state (SAC, ATAC) and one learned
    vector shared by all states (PPO). The log-std is clipped to ``[log_std_min, log_std_max]``.
    """

    hidden_sizes: Sequence[int]
    action_size: int
    activation: Activation = nn.relu
    state_dependent_std: bool = True
    log_std_min: float = -5.0
    log_std_max: float = 2.0
    init_log_std: float = 0.0  # initial value of the shared log-std (state_dependent_std=False)

    @nn.compact
    def __call__(self, observation: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.state_dependent_std:
            out = MLP(self.hidden_sizes, 2 * self.action_size, self.activation,
                      output_kernel_scale=0.01)(observation)
            mean, log_std = jnp.split(out, 2, axis=-1)
        else:
            mean = MLP(self.hidden_sizes, self.action_size, self.activation,
                       output_kernel_scale=0.01)(observation)
            shared = self.param("log_std", nn.initializers.constant(self.init_log_std),
                                (self.action_size,))
            log_std = jnp.broadcast_to(shared, mean.shape)
        return mean, jnp.clip(log_std, self.log_std_min, self.log_std_max)


class ValueNetwork(nn.Module):
    """State value V(s): observation -> scalar (the trailing unit axis is squeezed)."""

    hidden_sizes: Sequence[int]
    activation: Activation = nn.relu

    @nn.compact
    def __call__(self, observation: jax.Array) -> jax.Array:
        return MLP(self.hidden_sizes, 1, self.activation)(observation)[..., 0]


class QEnsemble(nn.Module):
    """``ensemble_size`` independent Q(s, a) networks evaluated at once: returns ``[ensemble, ...batch]``.

    The members share no parameters (``nn.vmap`` over the parameter axis), so twin-Q targets
    (Fujimoto et al. 2018) and ATAC's per-head losses are a reduction over the leading axis.
    """

    hidden_sizes: Sequence[int]
    ensemble_size: int = 2
    activation: Activation = nn.relu

    @nn.compact
    def __call__(self, observation: jax.Array, action: jax.Array) -> jax.Array:
        ensemble = nn.vmap(
            MLP,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=self.ensemble_size,
        )
        inputs = jnp.concatenate([observation, action], axis=-1)
        return ensemble(self.hidden_sizes, 1, self.activation)(inputs)[..., 0]


# --------------------------------------------------------------------------------------------------
# Helpers of the tanh-Gaussian actor (BC, ATAC, SATAC and the OSRL baselines' evaluation)


def state_dependent_actor(action_size: int, hidden_sizes: Sequence[int]) -> GaussianActor:
    """The tanh-Gaussian actor shared by BC, ATAC and SATAC (ReLU, state-dependent log-std)."""
    return GaussianActor(tuple(hidden_sizes), action_size, state_dependent_std=True)


def init_actor(actor: GaussianActor, key: jax.Array, observation_size: int) -> Params:
    return actor.init(key, jnp.zeros((1, observation_size), jnp.float32))


def actor_log_likelihood(actor: GaussianActor, params: Params, observations: jax.Array,
                   actions: jax.Array) -> jax.Array:
    """``log pi(a_b | s_b)`` of dataset actions under the tanh-Gaussian actor, shape ``[B]``."""
    mean, log_std = actor.apply(params, observations)
    return distributions.tanh_gaussian_log_prob(mean, log_std, actions)


def mode_policy(actor: GaussianActor, params_of=lambda state: state.actor.params):
    """The evaluation policy ``tanh(mean(s))``; ``params_of`` picks the actor's variables out of a learner
    state (by default those of its ``actor`` train state)."""

    def policy(state: Any, observation: jax.Array, key: jax.Array):
        del key
        mean, _ = actor.apply(params_of(state), observation)
        return distributions.tanh_gaussian_mode(mean), {}

    return policy
