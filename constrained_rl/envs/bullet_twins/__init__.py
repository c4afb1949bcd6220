"""JAX twins of the Bullet-Safety-Gym 1.4.0 tasks (Gronauer 2022): the same observations, actions,
rewards, costs, episodes and starts, and dynamics that follow PyBullet's.

  tasks   what Circle and Run are, on any planar agent (reward, cost, observation, start, walls, timing)
  agent   ``TwinAgent``: what an agent gives a task (dynamics, kinematics, observation, own reward)
  env     ``TwinEnv``: an agent on a task as one pure-JAX ``Env`` declaring the real task's layout
  ball    the Ball (a rolling sphere, PyBullet's sub-stepping and contacts)
  car     the RaceCar (a single-track model fitted to PyBullet: steering and speed lags, slip, top speed)

``TWINS`` names each twin after its real id (``BallCircleTwin`` is ``SafetyBallCircle-v0``);
``constrained_rl.envs.make`` builds them with the usual wrappers. To add an agent, implement
:class:`~constrained_rl.envs.bullet_twins.agent.TwinAgent`, add its class to ``AGENTS`` and its tasks to ``TWINS``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from constrained_rl.config import require
from constrained_rl.envs.bullet_twins.agent import TwinAgent
from constrained_rl.envs.bullet_twins.ball import BallAgent, BallParameters
from constrained_rl.envs.bullet_twins.car import CarAgent, CarParameters
from constrained_rl.envs.bullet_twins.env import TwinEnv
from constrained_rl.envs.bullet_twins.tasks import TASKS, Kinematics, Timing, TwinTask, Walls


@dataclasses.dataclass(frozen=True)
class TwinSpec:
    """A twin: which agent on which task, the real id it stands for and that id's ``max_episode_steps``."""

    agent: str
    task: str
    real_id: str
    episode_length: int


# agent name -> a constructor taking the agent's parameters dataclass (or nothing for the defaults)
AGENTS: dict[str, Callable[..., TwinAgent]] = {"ball": BallAgent, "car": CarAgent}
AGENT_PARAMETERS: dict[str, type] = {"ball": BallParameters, "car": CarParameters}

TWINS: dict[str, TwinSpec] = {
    "BallCircleTwin": TwinSpec("ball", "circle", "SafetyBallCircle-v0", 200),
    "BallRunTwin": TwinSpec("ball", "run", "SafetyBallRun-v0", 100),
    "CarCircleTwin": TwinSpec("car", "circle", "SafetyCarCircle-v0", 300),
    "CarRunTwin": TwinSpec("car", "run", "SafetyCarRun-v0", 200),
}


def make_twin(name: str, **parameters) -> TwinEnv:
    """The named twin, unwrapped; ``parameters`` override fields of the agent's parameters dataclass."""
    require(name in TWINS, "env", f"unknown twin {name!r}; known: {', '.join(sorted(TWINS))}")
    spec = TWINS[name]
    fields = {f.name for f in dataclasses.fields(AGENT_PARAMETERS[spec.agent])}
    unknown = sorted(set(parameters) - fields)
    require(not unknown, name, f"unknown option(s) {unknown}; known: {sorted(fields)}")
    agent = AGENTS[spec.agent](AGENT_PARAMETERS[spec.agent](**parameters))
    return TwinEnv(agent, TASKS[spec.task], spec.real_id, spec.episode_length)


__all__ = ["AGENTS", "AGENT_PARAMETERS", "TASKS", "TWINS", "BallAgent", "BallParameters", "CarAgent", "CarParameters",
           "Kinematics", "Timing",
           "TwinAgent", "TwinEnv", "TwinSpec", "TwinTask", "Walls", "make_twin"]
