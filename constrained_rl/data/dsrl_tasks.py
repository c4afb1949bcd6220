"""DSRL's tasks on the real simulators: their names, file names and published reference figures.

DSRL (Liu et al. 2023, "Datasets and Benchmarks for Offline Safe Reinforcement Learning") names its
offline tasks ``Offline<Agent><Task>-v0`` (Bullet-Safety-Gym) and ``Offline<Agent><Task>Gymnasium-v0``
(Safety-Gymnasium), and its files ``<env id>-<max episode cost>-<episodes>.hdf5`` with the env id of the
simulator (``SafetyBallCircle-v0-80-886.hdf5``) or of Safety-Gymnasium's Gymnasium conversion
(``SafetyPointButton1Gymnasium-v0-200-2268.hdf5``). Its reference figures, which its
``get_normalized_score`` divides by, are published in ``dsrl/infos.py`` (repository liuzuxin/DSRL,
commit 71064f2): ``MAX_EPISODE_REWARD``, ``MIN_EPISODE_REWARD``, ``MAX_EPISODE_COST``,
``MIN_EPISODE_COST`` and ``DEFAULT_MAX_EPISODE_STEPS``, carried below for the tasks of the two
simulators this project runs (:mod:`constrained_rl.envs.host`).

Every such task resolves to the registered id of the simulator's task (``SafetyBallCircle-v0``,
``SafetyPointButton1-v0``), the name this project addresses the real task by. The short names of the
project's own JAX tasks (``BallCircle``) are *not* DSRL tasks, even where DSRL's short name is the same.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from constrained_rl.data.dsrl import DatasetMetadata


class DsrlTask(NamedTuple):
    """One DSRL task and its published references (``dsrl/infos.py``)."""

    env_id: str  # the simulator's registered id, e.g. "SafetyBallCircle-v0"
    offline_id: str  # DSRL's offline env id, e.g. "OfflineBallCircle-v0"
    file_env_id: str  # the env id in DSRL's file names, e.g. "SafetyPointButton1Gymnasium-v0"
    episode_length: int  # DEFAULT_MAX_EPISODE_STEPS
    reward_min: float  # MIN_EPISODE_REWARD
    reward_max: float  # MAX_EPISODE_REWARD
    cost_min: float  # MIN_EPISODE_COST
    cost_max: float  # MAX_EPISODE_COST


def _bullet(name: str, steps: int, reward_min: float, reward_max: float, cost_max: float) -> DsrlTask:
    return DsrlTask(f"Safety{name}-v0", f"Offline{name}-v0", f"Safety{name}-v0", steps, reward_min, reward_max,
                    0.0, cost_max)


def _gymnasium(name: str, steps: int, reward_min: float, reward_max: float, cost_max: float) -> DsrlTask:
    return DsrlTask(f"Safety{name}-v0", f"Offline{name}Gymnasium-v0", f"Safety{name}Gymnasium-v0", steps,
                    reward_min, reward_max, 0.0, cost_max)


# dsrl/infos.py at liuzuxin/DSRL 71064f2 (MIN_EPISODE_COST is 0.0 for all of them).
DSRL_TASKS: dict[str, DsrlTask] = {task.env_id: task for task in (
    _bullet("BallCircle", 200, 0.38312244415283203, 881.46337890625, 80.0),
    _bullet("BallRun", 100, 26.339754104614258, 1327.445556640625, 80.0),
    _bullet("CarCircle", 300, 3.484419822692871, 534.3060913085938, 100.0),
    _bullet("CarRun", 200, 204.28726196289062, 574.6533203125, 40.0),
    _gymnasium("PointButton1", 1000, 0.008822109034937853, 41.19301568767707, 200.0),
    _gymnasium("PointButton2", 1000, 0.014114166087574098, 42.8985953616709, 250.0),
    _gymnasium("PointPush1", 1000, 0.0014001545292344209, 16.518654299293367, 150.0),
    _gymnasium("PointPush2", 1000, 0.0012438183001730607, 14.691039145644403, 200.0),
)}

_ALIASES = {alias: task.env_id for task in DSRL_TASKS.values()
            for alias in (task.env_id, task.offline_id, task.file_env_id)}
_FILE_NAME = re.compile(r"^(?P<env>.+-v\d+)-(?P<cost>\d+(?:\.\d+)?)-(?P<episodes>\d+)\.(hdf5|h5)$")


def dsrl_task(name: str | None) -> DsrlTask | None:
    """The DSRL task ``name`` denotes (its simulator id, DSRL's offline id or file id), else ``None``."""
    return DSRL_TASKS[_ALIASES[name]] if name in _ALIASES else None


def task_from_file_name(path: str | Path) -> str | None:
    """The simulator id of a file named as DSRL names its files (``<env id>-<cost>-<episodes>.hdf5``), else ``None``."""
    match = _FILE_NAME.match(Path(path).name)
    if match is None:
        return None
    task = dsrl_task(match.group("env"))
    return None if task is None else task.env_id


def published_metadata(task: DsrlTask) -> DatasetMetadata:
    """DSRL's reference figures as metadata: the task's simulator id, time limit, reward range, largest cost."""
    return DatasetMetadata(task=task.env_id, episode_length=task.episode_length, reward_min=task.reward_min,
                           reward_max=task.reward_max, max_episode_cost=task.cost_max)
