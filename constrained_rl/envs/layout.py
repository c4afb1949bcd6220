"""What each observation and action dimension of a task means, and the check that a policy fits a task.

A policy maps vectors to vectors; nothing in the numbers says that input 4 is a ball's angular velocity
in one simulator and the distance to a circle in another. A :class:`Layout` names every dimension, with
its physical quantity, unit and the scale the environment multiplies it by, and the action box. A task
declares its layout; a trained policy records the layout of the task it was trained on; and
:func:`check_layout` refuses to run a policy on a task whose layout differs, naming the first dimension
that differs.

Two layouts agree when every dimension has the same name, unit and scale (observations) or the same
name, unit and bounds (actions). The ``source`` (which simulator) is reported, never compared: a JAX
twin of a real task declares the real task's layout, so a policy trained on the twin runs on the real
simulator, and one trained on the project's own tasks (which differ dimension by dimension) does not.

``LAYOUTS`` holds the real tasks, keyed by their registered ids:
  * Bullet-Safety-Gym 1.4.0 (Gronauer 2022): observation = the agent's specific observation
    (``Ball.agent_specific_observation``, ``RaceCar.agent_specific_observation``) followed by the task's
    (``CircleTask.get_observation``: distance to the circle over the world size, 10 m in the Octagon
    world; ``RunTask``: none). Actions are in the Box [-1, 1]^2; the Ball's are a world-frame force of
    3.5 N per unit, the RaceCar's a wheel-velocity command of 40 rad/s per unit (negative drives forward)
    and a steering angle of 0.5 rad per unit.
  * Safety-Gymnasium 1.0.0 (Ji et al. 2023), Point agent: the flattened observation, in the order of
    the task's ``OrderedDict`` (``BaseTask.build_observation_space``): the Point's sensors
    (accelerometer, velocimeter, gyro, magnetometer: 3 each, in the agent's frame), then one 16-bin
    pseudo-lidar per lidar-observed object kind in the task's order (each bin reads the closeness
    ``max(0, 3 - distance) / 3`` of the nearest object in its sector, with aliasing into the two
    neighbouring bins: ``LidarConf`` defaults ``max_dist = 3``, ``type = 'pseudo'``). Actions, both in
    [-1, 1] (``point.xml``): a force along the agent's x axis (motor, gear 0.3) and a velocity servo on
    the z hinge (gear 0.3).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from constrained_rl.config import ConfigError


@dataclasses.dataclass(frozen=True)
class ObservationDimension:
    """One observation entry: ``scale * quantity``, the quantity in ``unit``."""

    name: str  # what the entry is, e.g. "ball_velocity_x" (world frame unless the name says otherwise)
    unit: str  # unit of the unscaled quantity: "m", "m/s", "rad/s", "1" (dimensionless)
    scale: float = 1.0  # the environment observes scale * quantity

    def describe(self) -> str:
        scaled = "" if self.scale == 1.0 else f" x {self.scale:g}"
        return f"{self.name} [{self.unit}]{scaled}"

    def matches(self, other: ObservationDimension) -> bool:
        return (self.name, self.unit) == (other.name, other.unit) and math.isclose(self.scale, other.scale)


@dataclasses.dataclass(frozen=True)
class ActionDimension:
    """One action entry: the environment's Box bounds ``[low, high]`` and what one unit of it does."""

    name: str  # what the entry commands, e.g. "force_x", "wheel_velocity_command"
    unit: str  # physical meaning of one unit of the raw action, e.g. "3.5 N", "40 rad/s (negative: forward)"
    low: float = -1.0  # the environment's action_space.low for this entry
    high: float = 1.0  # the environment's action_space.high

    def describe(self) -> str:
        return f"{self.name} in [{self.low:g}, {self.high:g}] (1 = {self.unit})"

    def matches(self, other: ActionDimension) -> bool:
        return ((self.name, self.unit) == (other.name, other.unit)
                and math.isclose(self.low, other.low) and math.isclose(self.high, other.high))


@dataclasses.dataclass(frozen=True)
class Layout:
    """The observation and action layout of a task, and where it comes from.

    ``source`` says which simulator the layout was read from; it is for messages only and is not
    compared by :func:`check_layout`.
    """

    source: str
    observation: tuple[ObservationDimension, ...]
    action: tuple[ActionDimension, ...]

    @property
    def observation_size(self) -> int:
        return len(self.observation)

    @property
    def action_size(self) -> int:
        return len(self.action)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (recorded beside an exported policy)."""
        return {
            "source": self.source,
            "observation": [dataclasses.asdict(d) for d in self.observation],
            "action": [dataclasses.asdict(d) for d in self.action],
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Layout:
        """The layout :meth:`to_json` wrote; a malformed record raises ``ConfigError``."""
        try:
            return cls(source=str(record["source"]),
                       observation=tuple(ObservationDimension(**d) for d in record["observation"]),
                       action=tuple(ActionDimension(**d) for d in record["action"]))
        except (KeyError, TypeError) as error:
            raise ConfigError(f"layout: malformed layout record ({error})") from None


def first_mismatch(policy: Layout, env: Layout) -> str | None:
    """A sentence naming the first dimension where ``policy`` and ``env`` differ, or ``None`` if they agree.

    Observation dimensions are compared before action dimensions; a dimension present in one layout
    only counts as a difference at its index.
    """
    for kind, ours, theirs in (("observation", policy.observation, env.observation),
                               ("action", policy.action, env.action)):
        for index in range(max(len(ours), len(theirs))):
            mine = ours[index] if index < len(ours) else None
            other = theirs[index] if index < len(theirs) else None
            if mine is not None and other is not None and mine.matches(other):
                continue
            size_note = f" ({len(ours)} {kind} dimensions vs {len(theirs)})" if len(ours) != len(theirs) else ""
            mine_text = mine.describe() if mine is not None else "absent"
            other_text = other.describe() if other is not None else "absent"
            return (f"{kind} dimension {index} is {mine_text} in the policy's layout ({policy.source}) "
                    f"but {other_text} in the environment's ({env.source}){size_note}")
    return None


def check_layout(policy: Layout, env: Layout, *, task: str = "the environment") -> None:
    """Raises ``ConfigError`` unless a policy trained on ``policy``'s layout can act on ``env``'s.

    The message names ``task`` and the first mismatching dimension (:func:`first_mismatch`).
    """
    mismatch = first_mismatch(policy, env)
    if mismatch is not None:
        raise ConfigError(f"layout: the policy was not trained for {task}: {mismatch}")


# --- building blocks -------------------------------------------------------------------------------

def _obs(name: str, unit: str, scale: float = 1.0) -> ObservationDimension:
    return ObservationDimension(name, unit, scale)


def _planar(prefix: str, unit: str, scale: float) -> tuple[ObservationDimension, ...]:
    return (_obs(f"{prefix}_x", unit, scale), _obs(f"{prefix}_y", unit, scale))


def _xyz(prefix: str, unit: str, scale: float = 1.0) -> tuple[ObservationDimension, ...]:
    return tuple(_obs(f"{prefix}_{axis}", unit, scale) for axis in "xyz")


BULLET = "Bullet-Safety-Gym 1.4.0"
SAFETY_GYMNASIUM = "Safety-Gymnasium 1.0.0"

# Bullet-Safety-Gym agents (agents.py): Ball.agent_specific_observation and RaceCar.agent_specific_observation.
BULLET_BALL_OBSERVATION = (
    *_planar("position", "m", 0.1),
    *_planar("velocity", "m/s", 0.2),
    *_xyz("angular_velocity", "rad/s", 0.1),
)
BULLET_CAR_OBSERVATION = (
    *_planar("position", "m", 0.1),
    *_planar("velocity", "m/s", 1.0),  # unscaled in RaceCar
    _obs("sin_yaw", "1"),  # yaw of the car body: the urdf faces -x, so yaw = heading + pi
    _obs("cos_yaw", "1"),
    _obs("yaw_rate", "rad/s", 0.1),
)
# CircleTask.get_observation: (||(x, y)|| - 7) / env_dim with env_dim = 10 m in the Octagon world.
BULLET_CIRCLE_OBSERVATION = (_obs("distance_to_circle", "m", 0.1),)
BULLET_BALL_ACTION = (ActionDimension("force_x", "3.5 N (world frame)"),
                      ActionDimension("force_y", "3.5 N (world frame)"))
BULLET_CAR_ACTION = (ActionDimension("wheel_velocity_command", "40 rad/s (negative drives forward)"),
                     ActionDimension("steering_angle", "0.5 rad"))

# Safety-Gymnasium Point agent (point.xml): sensors in the agent's frame, then the lidars in the task's order.
POINT_SENSORS = (
    *_xyz("accelerometer", "m/s^2"),
    *_xyz("velocimeter", "m/s"),
    *_xyz("gyro", "rad/s"),
    *_xyz("magnetometer", "1"),
)
LIDAR_BINS = 16
POINT_ACTION = (ActionDimension("agent_x_force", "motor gear 0.3"),
                ActionDimension("z_hinge_velocity", "velocity servo gear 0.3"))


def _lidar(kind: str) -> tuple[ObservationDimension, ...]:
    return tuple(_obs(f"{kind}_lidar_{bin_index}", "closeness max(0, 3 - m) / 3") for bin_index in range(LIDAR_BINS))


def safety_gymnasium_point_observation(lidars: Sequence[str]) -> tuple[ObservationDimension, ...]:
    """The Point agent's flattened observation with one 16-bin lidar per object kind, in ``lidars``' order."""
    return POINT_SENSORS + tuple(dim for kind in lidars for dim in _lidar(kind))


def _bullet(agent: str, task: str) -> Layout:
    observation = BULLET_BALL_OBSERVATION if agent == "ball" else BULLET_CAR_OBSERVATION
    if task == "circle":
        observation = observation + BULLET_CIRCLE_OBSERVATION
    return Layout(BULLET, observation, BULLET_BALL_ACTION if agent == "ball" else BULLET_CAR_ACTION)


def _point(lidars: Sequence[str]) -> Layout:
    return Layout(SAFETY_GYMNASIUM, safety_gymnasium_point_observation(lidars), POINT_ACTION)


# The tasks' lidar order, as Safety-Gymnasium 1.0.0 builds it (read off the constructed environments).
_BUTTON_LIDARS = ("buttons", "goal", "hazards", "gremlins")
_PUSH_LIDARS = ("goal", "hazards", "pillars", "push_box")

LAYOUTS: dict[str, Layout] = {
    "SafetyBallCircle-v0": _bullet("ball", "circle"),
    "SafetyCarCircle-v0": _bullet("car", "circle"),
    "SafetyBallRun-v0": _bullet("ball", "run"),
    "SafetyCarRun-v0": _bullet("car", "run"),
    "SafetyPointButton1-v0": _point(_BUTTON_LIDARS),
    "SafetyPointButton2-v0": _point(_BUTTON_LIDARS),
    "SafetyPointPush1-v0": _point(_PUSH_LIDARS),
    "SafetyPointPush2-v0": _point(_PUSH_LIDARS),
}


def layout_of(task: str) -> Layout:
    """The declared layout of a real task id; ``ConfigError`` listing the known ids otherwise."""
    if task not in LAYOUTS:
        raise ConfigError(f"layout: no layout declared for {task!r}; known: {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[task]


# --- the project's own JAX navigation tasks (constrained_rl.envs.navigation) -----------------------

PROJECT_NAVIGATION = "constrained_rl navigation (the project's own task)"
PROJECT_BALL_ACTION = BULLET_BALL_ACTION  # the same command (its dynamics differ; the observation tells them apart)
PROJECT_CAR_ACTION = (ActionDimension("left_wheel_command", "differential drive, see NavigationConfig"),
                      ActionDimension("right_wheel_command", "differential drive, see NavigationConfig"))


def project_navigation_layout(agent: str, task: str) -> Layout:
    """The layout of :class:`~constrained_rl.envs.navigation.NavigationEnv` (its ``observe``).

    ``[0.1 x, 0.1 y, 0.2 u, 0.2 v]``, the Car adds ``[cos heading, sin heading, 0.1 yaw rate]``
    (heading 0 along +x), Circle adds ``0.1 (||(x, y)|| - radius)``. It differs from the real tasks'
    dimension by dimension (no angular velocities for the Ball; the Car's velocity scaled, its heading
    as cos/sin rather than sin/cos of the body yaw; other actions), so policies do not cross over.
    """
    observation = (*_planar("position", "m", 0.1), *_planar("velocity", "m/s", 0.2))
    if agent == "car":
        observation += (_obs("cos_heading", "1"), _obs("sin_heading", "1"), _obs("yaw_rate", "rad/s", 0.1))
    if task == "circle":
        observation += (_obs("distance_to_circle", "m", 0.1),)
    return Layout(PROJECT_NAVIGATION, observation, PROJECT_BALL_ACTION if agent == "ball" else PROJECT_CAR_ACTION)


def unnamed_layout(source: str, observation_size: int, action_size: int) -> Layout:
    """A layout for a task that names no dimensions (e.g. Brax's own observations): ``observation_i``."""
    return Layout(source,
                  tuple(_obs(f"{source}:observation_{i}", "unspecified") for i in range(observation_size)),
                  tuple(ActionDimension(f"{source}:action_{i}", "unspecified") for i in range(action_size)))
