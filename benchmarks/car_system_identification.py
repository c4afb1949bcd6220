"""System identification of Bullet-Safety-Gym's RaceCar: record PyBullet, fit the JAX twin's constants.

Records the real racecar (Bullet-Safety-Gym 1.4.0, PyBullet) under open-loop action sequences on a
wall-free plane with each task's physics timing (Circle: 6 x 1/60 s per step, Run: 4 x 1/120 s),
then fits :class:`constrained_rl.envs.bullet_twins.car.CarDynamics` by nonlinear least squares
(``scipy.optimize.least_squares``, Jacobian by ``jax.jacfwd``) to windows of ``--horizon`` seconds:
from each recorded state the twin predicts the window under the recorded actions, and the residuals
are the errors of position (m), velocity (m/s), yaw (rad), 0.3 x yaw rate (rad/s) and steering angle
(rad) at every step. A second recording with other random sequences and starts is held out and
reports the open-loop error of whole 10 s rollouts from rest at 1, 3 and 10 s.

The sequences: constant commands (wheel command -1, -0.6, -0.3, 0.4, 1 x steering 0, 0.3, -0.6, 1),
throttle and steering steps, steering sinusoids (0.1, 0.3, 1 Hz), and random actions (i.i.d. per step,
forward-only i.i.d., and held for 0.5 s).

    python benchmarks/car_system_identification.py [--horizon 1.0] [--tasks circle run]

Prints the fitted constants in the form of ``car.FITTED`` and the held-out errors. About a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from constrained_rl.envs.bullet_twins import car

BULLET_TASK = {"circle": "CircleTask", "run": "RunTask"}
SUBSTEPS = {"circle": 6, "run": 4}
NAMES = car.CarDynamics.names()
NONNEGATIVE = {name for name in NAMES if name != "understeer"}


def real_builder(task: str):
    """The RaceCar on ``task``'s physics timing, on the wall-free ``Plane200`` world."""
    from bullet_safety_gym.envs.builder import EnvironmentBuilder

    return EnvironmentBuilder(agent="RaceCar", task=BULLET_TASK[task], obstacles={},
                              world={"name": "Plane200", "factor": 1})


def sequences(steps: int, dt: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The open-loop action sequences [steps, 2] (module docstring)."""
    t = dt * np.arange(steps)
    out = {}
    for throttle in (-1.0, -0.6, -0.3, 0.4, 1.0):
        for steer in (0.0, 0.3, -0.6, 1.0):
            out[f"constant_{throttle}_{steer}"] = np.tile([throttle, steer], (steps, 1))
    a = np.zeros((steps, 2))
    a[: steps // 3, 0], a[2 * steps // 3:, 0] = -1.0, -0.5
    a[:, 1] = np.where((t // 2.0) % 2 == 0, 0.5, -0.5)
    out["steps"] = a
    a = np.zeros((steps, 2))
    a[:, 0] = np.where(t < 5.0, -1.0, 0.6)
    a[:, 1] = 0.8 * (t > 3.0)
    out["steps_reverse"] = a
    for frequency in (0.1, 0.3, 1.0):
        a = np.stack([-0.8 + 0.2 * np.sin(2 * np.pi * 0.37 * frequency * t), np.sin(2 * np.pi * frequency * t)], 1)
        out[f"sinusoid_{frequency}"] = a
    hold = int(round(0.5 / dt))
    for k in range(4):
        out[f"random_held_{k}"] = np.repeat(rng.uniform(-1, 1, (steps // hold + 1, 2)), hold, axis=0)[:steps]
        out[f"random_{k}"] = rng.uniform(-1, 1, (steps, 2))
        forward = rng.uniform(-1, 1, (steps, 2))
        forward[:, 0] = -np.abs(forward[:, 0])
        out[f"random_forward_{k}"] = forward
    return out


def raw_state(env) -> np.ndarray:
    """``[x, y, yaw, u, v, yaw_rate, steering]`` of the real car (base = centre of mass)."""
    state = car.read_car(env)
    return np.array([*np.asarray(state.position), float(state.yaw), *np.asarray(car.velocity(state)),
                     float(state.yaw_rate), float(state.steering)])


def record(task: str, seed: int, seconds: float = 10.0) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``{name: (actions [T, 2], states [T + 1, 7])}`` from the real car, starts drawn by the task."""
    env = real_builder(task)
    steps = int(round(seconds / env.dt))
    out = {}
    for index, (name, actions) in enumerate(sequences(steps, env.dt, np.random.default_rng(seed)).items()):
        np.random.seed(1000 * seed + index)  # Bullet-Safety-Gym draws its starts from np.random
        env.reset()
        states = [raw_state(env)]
        for action in actions:
            env.step(action)
            states.append(raw_state(env))
        out[name] = (actions.astype(np.float32), np.array(states, np.float32))
    return env.dt, out


def twin_state(raw: jax.Array) -> car.CarState:
    heading, left = car.driving_frame(raw[2])
    return car.CarState(position=raw[:2], yaw=raw[2], speed=raw[3:5] @ heading,
                        slip=raw[3:5] @ left + car.COM_OFFSET * raw[5], yaw_rate=raw[5], steering=raw[6])


def predict(dynamics: car.CarDynamics, actions: jax.Array, start: jax.Array, dt: float, substeps: int) -> jax.Array:
    """The twin's ``[x, y, yaw, u, v, yaw_rate, steering]`` after each action [T, 7], from the recorded ``start``."""

    def body(state, action):
        state = car.step(state, action, dynamics, dt / substeps, substeps)
        return state, jnp.concatenate([state.position, state.yaw[None], car.velocity(state),
                                       jnp.stack([state.yaw_rate, state.steering])])

    return jax.lax.scan(body, twin_state(start), actions)[1]


def errors(predicted: jax.Array, true: jax.Array) -> jax.Array:
    """Per step: position (m), velocity (m/s), wrapped yaw (rad), 0.3 yaw rate, steering errors [..., 7]."""
    yaw = jnp.angle(jnp.exp(1j * (predicted[..., 2] - true[..., 2])))
    return jnp.concatenate([predicted[..., 0:2] - true[..., 0:2], yaw[..., None], predicted[..., 3:5] - true[..., 3:5],
                            0.3 * (predicted[..., 5:6] - true[..., 5:6]), predicted[..., 6:7] - true[..., 6:7]], -1)


def windows(data, horizon: int) -> tuple[jax.Array, jax.Array]:
    """Overlapping windows (stride horizon / 2) from step 1 on: the reset's settling step is left out."""
    actions, states = [], []
    for acts, recorded in data.values():
        for start in range(1, len(acts) - horizon, max(1, horizon // 2)):
            actions.append(acts[start:start + horizon]), states.append(recorded[start:start + horizon + 1])
    return jnp.asarray(np.array(actions)), jnp.asarray(np.array(states))


def fit(task: str, dt: float, data, horizon_s: float) -> car.CarDynamics:
    actions, states = windows(data, int(round(horizon_s / dt)))
    substeps = SUBSTEPS[task]

    def residuals(theta):
        dynamics = car.CarDynamics(**dict(zip(NAMES, theta)))
        predicted = jax.vmap(predict, (None, 0, 0, None, None))(dynamics, actions, states[:, 0], dt, substeps)
        return errors(predicted, states[:, 1:]).reshape(-1)

    value, jacobian = jax.jit(residuals), jax.jit(jax.jacfwd(residuals))
    start = np.array([getattr(car.CarDynamics(), name) for name in NAMES])
    lower = [0.0 if name in NONNEGATIVE else -np.inf for name in NAMES]
    result = scipy.optimize.least_squares(lambda th: np.asarray(value(th), np.float64), start,
                                          jac=lambda th: np.asarray(jacobian(th), np.float64),
                                          bounds=(lower, np.inf), max_nfev=100)
    print(f"  {task}: {actions.shape[0]} windows of {horizon_s:g} s, rms residual "
          f"{np.sqrt(np.mean(np.square(value(start)))):.4f} -> {np.sqrt(np.mean(result.fun ** 2)):.4f}")
    return car.CarDynamics(**{name: round(float(v), 4) for name, v in zip(NAMES, result.x)})


def open_loop_errors(task: str, dynamics: car.CarDynamics, dt: float, data) -> np.ndarray:
    """Position error (m) of whole rollouts from the recorded start at 1, 3 and 10 s: [sequences, 3]."""
    rows = []
    for acts, recorded in data.values():
        predicted = np.asarray(predict(dynamics, jnp.asarray(acts), jnp.asarray(recorded[0]), dt, SUBSTEPS[task]))
        error = np.linalg.norm(predicted[:, :2] - recorded[1:, :2], axis=1)
        rows.append([error[int(round(seconds / dt)) - 1] for seconds in (1.0, 3.0, 10.0)])
    return np.array(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--horizon", type=float, default=1.0, help="seconds per fitted window")
    parser.add_argument("--tasks", nargs="+", default=["circle", "run"], choices=sorted(BULLET_TASK))
    args = parser.parse_args()
    fitted = {}
    for task in args.tasks:
        began = time.time()
        dt, train = record(task, seed=0)
        _, held_out = record(task, seed=1)
        print(f"{task}: recorded {len(train) + len(held_out)} x 10 s in {time.time() - began:.0f} s")
        fitted[task] = fit(task, dt, train, args.horizon)
        for label, dynamics in (("placeholder", car.CarDynamics()), ("fitted", fitted[task])):
            error = open_loop_errors(task, dynamics, dt, held_out)
            print(f"  held-out open-loop position error, {label}: median at 1/3/10 s "
                  f"{' / '.join(f'{e:.3f}' for e in np.median(error, 0))} m, mean "
                  f"{' / '.join(f'{e:.3f}' for e in error.mean(0))} m")
    print("FITTED = {")
    for task, dynamics in fitted.items():
        fields = ", ".join(f"{f.name}={getattr(dynamics, f.name)}" for f in dataclasses.fields(dynamics))
        print(f'    "{task}": CarDynamics({fields}),')
    print("}")


if __name__ == "__main__":
    main()
