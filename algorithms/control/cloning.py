"""Behaviour cloning by maximum likelihood: the step BC-All and BC-Safe train with, and that SATAC reuses
for its BC-Safe reference policy and its actor's warm start,

    L(theta) = -mean_b log pi_theta(a_b | s_b),

for the tanh-Gaussian actor of :mod:`constrained_rl.models.mlp`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training.train_state import TrainState

from constrained_rl.data.dsrl import TransitionBatch
from constrained_rl.models import mlp
from constrained_rl.models.mlp import GaussianActor

Params = Any


@struct.dataclass
class BCState:
    actor: TrainState  # params: the actor's variables ({"params": ...}), as ``actor.apply`` takes them


def init_bc_state(actor: GaussianActor, optimizer: optax.GradientTransformation, key: jax.Array,
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
