"""Behaviour cloning, two ways: the steps BC-All and BC-Safe train with, one of which SATAC reuses for
its BC-Safe reference policy and its actor's warm start.

* **regression** (OSRL's BC, ``osrl/algorithms/bc.py``): a deterministic actor ``mu(s) = tanh(f(s))``
  (ReLU MLP, tanh output, OSRL's ``MLPActor``) fitted by the mean squared error over the batch and the
  action dimensions (``F.mse_loss``),

      L(theta) = mean_{b,i} (mu_theta(s_b)_i - a_b,i)^2;

* **maximum likelihood** for the tanh-Gaussian actor of :mod:`constrained_rl.models.mlp` (SATAC's
  reference and warm start, ATAC's behaviour pretraining),

      L(theta) = -mean_b log pi_theta(a_b | s_b).
"""

from __future__ import annotations

from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training.train_state import TrainState

from constrained_rl.data.dsrl import TransitionBatch
from constrained_rl.models import mlp
from constrained_rl.models.mlp import MLP, GaussianActor

Params = Any


@struct.dataclass
class BCState:
    actor: TrainState  # params: the actor's variables ({"params": ...}), as ``actor.apply`` takes them


def init_bc_state(actor: GaussianActor | MLP, optimizer: optax.GradientTransformation, key: jax.Array,
                  observation_size: int) -> BCState:
    params = mlp.init_actor(actor, key, observation_size)
    return BCState(TrainState.create(apply_fn=actor.apply, params=params, tx=optimizer))


def bc_update(actor: GaussianActor):
    """One maximum-likelihood step ``(BCState, batch, key) -> (BCState, metrics)`` with the state's optimizer."""

    def loss_fn(params: Params, batch: TransitionBatch) -> jax.Array:
        return -jnp.mean(mlp.actor_log_likelihood(actor, params, batch.observations, batch.actions))

    def update(state: BCState, batch: TransitionBatch, key: jax.Array) -> tuple[BCState, dict]:
        del key  # maximum likelihood needs no sampling
        loss, grads = jax.value_and_grad(loss_fn)(state.actor.params, batch)
        return state.replace(actor=state.actor.apply_gradients(grads=grads)), {"log_likelihood": -loss}

    return update


def deterministic_actor(action_size: int, hidden_sizes: Sequence[int]) -> MLP:
    """OSRL's BC actor before its tanh: a ReLU MLP with ``action_size`` linear outputs."""
    return MLP(tuple(hidden_sizes), action_size)


def deterministic_action(actor: MLP, params: Params, observations: jax.Array) -> jax.Array:
    """``mu(s) = tanh(f(s))``, inside ``[-1, 1]`` (OSRL's ``MLPActor`` with ``act_limit`` 1)."""
    return jnp.tanh(actor.apply(params, observations))


def regression_loss(predicted: chex.Array, actions: chex.Array) -> jax.Array:
    """``mean_{b,i} (predicted_b,i - a_b,i)^2``: the mean over every entry, as ``F.mse_loss``."""
    chex.assert_equal_shape([predicted, actions])
    return jnp.mean(jnp.square(predicted - actions))


def regression_update(actor: MLP):
    """One step of OSRL's BC ``(BCState, batch, key) -> (BCState, metrics)``: the deterministic actor
    regressed on the data's actions (:func:`regression_loss`)."""

    def loss_fn(params: Params, batch: TransitionBatch) -> jax.Array:
        return regression_loss(deterministic_action(actor, params, batch.observations), batch.actions)

    def update(state: BCState, batch: TransitionBatch, key: jax.Array) -> tuple[BCState, dict]:
        del key  # regression needs no sampling
        loss, grads = jax.value_and_grad(loss_fn)(state.actor.params, batch)
        return state.replace(actor=state.actor.apply_gradients(grads=grads)), {"mse": loss}

    return update


def deterministic_policy(actor: MLP):
    """The evaluation policy ``mu(s)`` of a regression-cloned actor (a learner state with ``actor``)."""

    def policy(state: Any, observation: jax.Array, key: jax.Array):
        del key
        return deterministic_action(actor, state.actor.params, observation), {}

    return policy
