"""PPO-Lagrangian networks: a tanh-Gaussian actor and two separate critics (reward and cost).

The networks are the shared control networks of ``constrained_rl.models.mlp``; this module only fixes
how PPO-Lagrangian uses them (Brax's ``ppo/networks.py`` plays the same role):

* the actor is a :class:`GaussianActor` with one state-independent log-std vector (the PPO convention,
  Schulman et al. 2017) squashed by tanh into the action box ``(-1, 1)``;
* the reward critic ``V_r`` and the cost critic ``V_c`` share no parameters (Ray, Achiam & Amodei 2019
  train two value functions), so a large cost signal cannot distort the reward value through a shared
  torso.

The behaviour policy keeps the pre-squash sample ``u`` (``a = tanh(u)``) beside the action, as Brax PPO
keeps its "raw action": the PPO ratio is then evaluated at ``u`` exactly, with no ``atanh`` of an action
that rounded to +-1.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from constrained_rl import distributions
from constrained_rl.models.mlp import GaussianActor, ValueNetwork

Params = Any

_ACTIVATIONS = {"tanh": nn.tanh, "relu": nn.relu, "swish": nn.swish}


class PPOLagNetworks(NamedTuple):
    """The three flax modules; their parameters live in :class:`PPOLagParams`."""

    actor: GaussianActor
    reward_critic: ValueNetwork
    cost_critic: ValueNetwork


class PPOLagParams(NamedTuple):
    actor: Params
    reward_critic: Params
    cost_critic: Params


def activation_names() -> tuple[str, ...]:
    return tuple(_ACTIVATIONS)


def make_networks(
    action_size: int,
    actor_hidden_sizes: Sequence[int],
    critic_hidden_sizes: Sequence[int],
    activation: str = "tanh",
    init_log_std: float = -0.5,
) -> PPOLagNetworks:
    act = _ACTIVATIONS[activation]
    return PPOLagNetworks(
        actor=GaussianActor(tuple(actor_hidden_sizes), action_size, act,
                            state_dependent_std=False, init_log_std=init_log_std),
        reward_critic=ValueNetwork(tuple(critic_hidden_sizes), act),
        cost_critic=ValueNetwork(tuple(critic_hidden_sizes), act),
    )


def init_params(networks: PPOLagNetworks, key: jax.Array, observation_size: int) -> PPOLagParams:
    actor_key, reward_key, cost_key = jax.random.split(key, 3)
    dummy = jnp.zeros((1, observation_size), jnp.float32)
    return PPOLagParams(
        actor=networks.actor.init(actor_key, dummy),
        reward_critic=networks.reward_critic.init(reward_key, dummy),
        cost_critic=networks.cost_critic.init(cost_key, dummy),
    )


def tanh_gaussian_log_prob_of_pre_squash(
    mean: jax.Array, log_std: jax.Array, pre_squash: jax.Array
) -> jax.Array:
    """``log pi(tanh(u)) = log N(u; mean, std) - sum_i log(1 - tanh(u_i)^2)`` from the pre-squash ``u``.

    The change of variables of Haarnoja et al. 2018 (appendix C), composed from the distribution
    primitives. Last axis = action dimension; leading axes are batch axes.
    """
    return (distributions.gaussian_log_prob(mean, log_std, pre_squash)
            - jnp.sum(distributions.log1m_tanh_sq(pre_squash), axis=-1))


def make_policy(networks: PPOLagNetworks, deterministic: bool = False):
    """A behaviour policy ``policy(actor_params, observation, key) -> (action, extras)``.

    ``extras`` holds ``pre_squash`` (the Gaussian sample ``u``) and ``log_prob`` (``log pi(tanh(u))``)
    for the PPO ratio. ``deterministic=True`` acts with the mode ``tanh(mean)`` for evaluation.
    """

    def policy(actor_params: Params, observation: jax.Array, key: jax.Array):
        mean, log_std = networks.actor.apply(actor_params, observation)
        if deterministic:
            action = distributions.tanh_gaussian_mode(mean)
            return action, {"pre_squash": mean,
                            "log_prob": jnp.zeros(mean.shape[:-1], mean.dtype)}
        pre_squash, _ = distributions.gaussian_sample_and_log_prob(key, mean, log_std)
        log_prob = tanh_gaussian_log_prob_of_pre_squash(mean, log_std, pre_squash)
        return jnp.tanh(pre_squash), {"pre_squash": pre_squash, "log_prob": log_prob}

    return policy
