"""Brax velocity-constrained locomotion, after Safety-Gymnasium's velocity tasks (Ji et al. 2023).

The reward, observation and termination are Brax's own (``brax.envs``, Freeman et al. 2021). The
cost counts the physics frames of the step whose speed exceeds a threshold:

    cost_t = sum_{k=1}^{n_frames} 1[speed_k > threshold],
    speed_k = (x_k - x_{k-1}) / frame_dt  (torso x-displacement; planar ||(dx, dy)|| for Ant),

where ``frame_dt`` is the physics timestep and ``n_frames`` Brax's action repeat. The frames are
stepped here, one by one, with Brax's pipeline; Brax's ``step`` then computes reward, observation and
termination from the final frame exactly as it would have. Safety-Gymnasium's cost is
``1[speed > threshold]`` per environment step (speed averaged over its frame skip); the per-frame
count is finer and ranges over [0, n_frames] per step.

Thresholds: calibrated on Brax by Safety-Gymnasium's rule; docs/environments.md records how.
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
from brax import envs as brax_envs

from constrained_rl.config import require
from constrained_rl.envs import brax_compat
from constrained_rl.envs.base import Env, EnvState, initial_state
from constrained_rl.envs.layout import Layout, unnamed_layout


@dataclasses.dataclass(frozen=True)
class VelocityTask:
    brax_name: str  # name in brax.envs
    backend: str  # default physics backend (fast and stable on CPU)
    threshold: float  # speed threshold in m/s
    planar: bool = False  # speed is ||(dx, dy)|| / dt instead of dx / dt


# Thresholds calibrated on Brax by Safety-Gymnasium's rule (half the top speed of a plain-PPO policy
# trained for about 1e7 steps, experiments/calibrate_velocity.py); docs/environments.md records how.
VELOCITY_TASKS: dict[str, VelocityTask] = {
    "HalfCheetahVelocity": VelocityTask("halfcheetah", "spring", 1.6870),
    "HopperVelocity": VelocityTask("hopper", "spring", 0.4066),
    "Walker2dVelocity": VelocityTask("walker2d", "generalized", 1.1394),  # 5e6 steps, not 1e7
    "AntVelocity": VelocityTask("ant", "spring", 4.4902, planar=True),
    # Brax's swimmer supports only the generalized backend; its viscous drag needs brax_compat.
    "SwimmerVelocity": VelocityTask("swimmer", "generalized", 0.0214),
}
BRAX_BACKENDS = ("generalized", "positional", "spring", "mjx")


def find_task(name: str) -> tuple[str, VelocityTask] | None:
    """``(registry name, task)`` for a velocity task given either name (``AntVelocity`` or ``ant``)."""
    for registry_name, task in VELOCITY_TASKS.items():
        if name in (registry_name, task.brax_name):
            return registry_name, task
    return None


def frame_speeds(positions: jax.Array, frame_dt: float, planar: bool) -> jax.Array:
    """Per-frame speed from torso positions ``[n_frames + 1, 3]`` (first row: before the step).

    ``(x_k - x_{k-1}) / dt`` (forward velocity), or ``||(x, y)_k - (x, y)_{k-1}|| / dt`` if planar.
    """
    displacement = jnp.diff(positions, axis=0)
    if planar:
        return jnp.sqrt(jnp.sum(jnp.square(displacement[:, :2]), axis=-1)) / frame_dt
    return displacement[:, 0] / frame_dt


def velocity_cost(speeds: jax.Array, threshold: float) -> jax.Array:
    """``sum_k 1[speed_k > threshold]`` over the frames of one step (Safety-Gymnasium's indicator per frame)."""
    return jnp.sum((speeds > threshold).astype(jnp.float32))


def _with_type_of(new, old):
    """``new`` (an array or a Python number) with the strong dtype of ``old`` where that is an array."""
    if isinstance(old, jax.Array):
        return jnp.asarray(new, old.dtype)
    return new


class VelocityEnv(Env):
    """A Brax locomotion task with a per-frame speed cost; unbatched, no time limit."""

    def __init__(self, name: str, backend: str | None = None, threshold: float | None = None,
                 episode_length: int = 1000, **brax_kwargs):
        found = find_task(name)
        require(found is not None, "env", f"unknown velocity task {name!r}; known: {sorted(VELOCITY_TASKS)}")
        _, task = found
        self.task = task
        self.backend = backend or task.backend
        require(self.backend in BRAX_BACKENDS, "backend", f"must be one of {BRAX_BACKENDS}, got {self.backend!r}")
        self.threshold = task.threshold if threshold is None else float(threshold)
        require(self.threshold > 0, "threshold", f"must be positive, got {self.threshold}")
        require(episode_length > 0, "episode_length", f"must be positive, got {episode_length}")
        self._episode_length = int(episode_length)
        brax_compat.install()  # fluid drag (the swimmer's viscosity) calls a jnp.clip keyword newer JAX lacks
        self.brax_env = brax_envs.get_environment(task.brax_name, backend=self.backend, **brax_kwargs)
        self.n_frames = int(self.brax_env._n_frames)
        self.frame_dt = float(self.brax_env.sys.opt.timestep)

    @property
    def observation_size(self) -> int:
        return int(self.brax_env.observation_size)

    @property
    def action_size(self) -> int:
        return int(self.brax_env.action_size)

    @property
    def episode_length(self) -> int:
        return self._episode_length

    @property
    def layout(self) -> Layout:
        """Brax's own observation (unnamed dimensions), for the project's velocity task of this robot."""
        return unnamed_layout(f"brax {self.task.brax_name} velocity task", self.observation_size, self.action_size)

    def reset(self, key: jax.Array) -> EnvState:
        brax_state = self.brax_env.reset(key)
        zero = jnp.zeros((), jnp.float32)
        return initial_state(brax_state.obs, brax_state, {"mean_frame_speed": zero})

    def _step_frames(self, pipeline_state, action: jax.Array):
        """Brax's action repeat, unrolled here to read the torso position after every frame."""
        pipeline = self.brax_env._pipeline
        sys = self.brax_env.sys

        def frame(state, _):
            state = pipeline.step(sys, state, action, self.brax_env._debug)
            return state, state.x.pos[0]

        final, positions = jax.lax.scan(frame, pipeline_state, None, length=self.n_frames)
        return final, jnp.concatenate([pipeline_state.x.pos[0][None], positions])

    def step(self, state: EnvState, action: jax.Array) -> EnvState:
        action = jnp.clip(action, -1.0, 1.0)
        brax_state = state.physics
        final, positions = self._step_frames(brax_state.pipeline_state, action)
        # Brax's step on a copy whose physics returns the frames already stepped above, so that the
        # reward, observation and termination are exactly Brax's without simulating twice.
        replay = copy.copy(self.brax_env)
        replay.pipeline_step = lambda pipeline_state, action: final
        # Brax's step updates the metrics dict of the state it is given in place: hand it a copy.
        brax_next = replay.step(brax_state.replace(metrics=dict(brax_state.metrics)), action)
        # Some Brax tasks return weakly typed ``done`` / metrics from step but not from reset; keeping
        # the reset's types keeps the state's type fixed, so a jitted loop over it compiles once.
        brax_next = jax.tree.map(_with_type_of, brax_next, brax_state)
        speeds = frame_speeds(positions, self.frame_dt, self.task.planar)
        return state.replace(
            obs=brax_next.obs,
            next_obs=brax_next.obs,
            reward=brax_next.reward.astype(jnp.float32),
            cost=velocity_cost(speeds, self.threshold),
            done=brax_next.done.astype(jnp.float32),
            truncation=jnp.zeros((), jnp.float32),
            metrics={**state.metrics, "mean_frame_speed": jnp.mean(speeds)},
            physics=brax_next,
        )
