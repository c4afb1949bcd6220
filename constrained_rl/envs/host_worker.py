"""One worker process of the host runner (:mod:`constrained_rl.envs.host`): a few environments of one task.

Run as a script, ``python host_worker.py FD PACKAGE TASK_ID``, by the interpreter that has the
task's simulator (the project's for Bullet-Safety-Gym, a side interpreter with Safety-Gymnasium's exact
pins for Safety-Gymnasium). It imports only the standard library, NumPy, Gymnasium and the simulator
package, never the project (whose JAX the side interpreter lacks), and speaks over the inherited socket
``FD`` in pickled messages:

  ``("spec",)``                      -> ``{"observation_size", "low", "high", "episode_length", "blocks"}``
  ``("reset", [(env, seed), ...])``  -> observations ``[k, obs]``: each named environment (made if new)
                                        starts an episode
  ``("step", [env, ...], actions)``  -> ``(obs [k, obs], reward [k], cost [k], terminated [k], truncated [k])``
  ``("close",)``                     -> the worker exits

Seeding (why the global generators): Bullet-Safety-Gym 1.4.0 ignores ``reset(seed=...)`` and draws its
start states from NumPy's global generator (``np.random.uniform`` in its tasks' ``specific_reset``).
Before each reset the worker therefore seeds Python's ``random`` and NumPy's global generator with the
episode's seed, and passes the seed to ``reset`` too (Safety-Gymnasium seeds its own generator from it),
so an episode depends on its seed only, not on which worker plays it or what that worker played before.

Actions arrive in [-1, 1] and are mapped affinely onto the environment's Box ``[low, high]`` after
clipping. The cost is Safety-Gymnasium's sixth step value, or ``info['cost']`` (Bullet-Safety-Gym); a
step without one is an error, never zero cost.
A failure is sent back as ``("error", traceback)`` and the parent raises it. Arrays travel as
``(dtype, shape, bytes)`` (:func:`pack`), never as pickled NumPy objects, whose pickles differ between
NumPy 1 (the side interpreter) and NumPy 2 (the project).
"""

from __future__ import annotations

import importlib
import os
import pickle
import random
import socket
import sys
import traceback

import numpy as np


def pack(array) -> tuple:
    """An array as ``(dtype string, shape, raw bytes)``: readable by any NumPy version."""
    array = np.ascontiguousarray(array)
    return (array.dtype.str, tuple(array.shape), array.tobytes())


def unpack(packed: tuple) -> np.ndarray:
    dtype, shape, raw = packed
    return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()


def make_env(package: str, task_id: str):
    """The registered environment ``task_id`` of ``package`` (imported to register its ids)."""
    if package == "safety_gymnasium":
        import safety_gymnasium

        return safety_gymnasium.make(task_id)
    import gymnasium

    importlib.import_module(package)
    return gymnasium.make(task_id)


def observation_blocks(env):
    """``[(name, size), ...]`` of a flattened dict observation in its order (Safety-Gymnasium), else None."""
    task = getattr(env.unwrapped, "task", None)
    spaces = getattr(getattr(getattr(task, "obs_info", None), "obs_space_dict", None), "spaces", None)
    if spaces is None:
        return None
    return [(name, int(np.prod(space.shape))) for name, space in spaces.items()]


def seed_everything(env, seed: int) -> np.ndarray:
    """Seeds the global generators (Python, NumPy) and resets ``env`` with ``seed``; returns the observation."""
    random.seed(seed)
    np.random.seed(seed)
    obs, _ = env.reset(seed=seed)
    return np.asarray(obs, np.float32).reshape(-1)


def scale_action(action: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """``low + (clip(a, -1, 1) + 1) (high - low) / 2``."""
    unit = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
    return low + 0.5 * (unit + 1.0) * (high - low)


def step_with_cost(env, action: np.ndarray) -> tuple:
    """``(obs, reward, cost, terminated, truncated)`` of one step. Safety-Gymnasium returns the cost
    beside the reward (six values); Gymnasium-API environments such as Bullet-Safety-Gym in ``info['cost']``."""
    result = env.step(action)
    if len(result) == 6:
        obs, reward, cost, terminated, truncated, _ = result
    else:
        obs, reward, terminated, truncated, info = result
        if "cost" not in info:
            raise KeyError("info['cost'] missing: the environment does not report a cost")
        cost = info["cost"]
    return np.asarray(obs, np.float32).reshape(-1), float(reward), float(cost), bool(terminated), bool(truncated)


def serve(connection: socket.socket, package: str, task_id: str) -> None:
    reader = connection.makefile("rb")
    writer = connection.makefile("wb")

    def send(message) -> None:
        pickle.dump(message, writer, protocol=4)
        writer.flush()

    try:
        environments = [make_env(package, task_id)]
        space = environments[0].action_space
        low, high = np.asarray(space.low, np.float64), np.asarray(space.high, np.float64)
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        send(("error", traceback.format_exc()))
        return
    while True:
        try:
            message = pickle.load(reader)
        except EOFError:
            return
        try:
            command = message[0]
            if command == "close":
                return
            if command == "spec":
                env = environments[0]
                send(("ok", {"observation_size": int(np.prod(env.observation_space.shape)),
                             "low": low.tolist(), "high": high.tolist(),
                             "episode_length": env.spec.max_episode_steps,
                             "blocks": observation_blocks(env)}))
            elif command == "reset":
                while len(environments) <= max(i for i, _ in message[1]):
                    environments.append(make_env(package, task_id))
                send(("ok", pack(np.stack([seed_everything(environments[i], int(seed)) for i, seed in message[1]]))))
            elif command == "step":
                results = []
                for i, action in zip(message[1], unpack(message[2])):
                    results.append(step_with_cost(environments[i], scale_action(action, low, high)))
                obs, reward, cost, terminated, truncated = zip(*results)
                send(("ok", tuple(pack(np.array(column)) for column in (obs, reward, cost, terminated, truncated))))
            else:
                raise ValueError(f"unknown command {command!r}")
        except Exception:  # noqa: BLE001
            send(("error", traceback.format_exc()))


def main(argv) -> None:
    fd, package, task_id = int(argv[1]), argv[2], argv[3]
    connection = socket.socket(fileno=fd)
    # The simulators print banners (PyBullet's build line): keep them off the parent's terminal.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    serve(connection, package, task_id)


if __name__ == "__main__":
    main(sys.argv)
