"""How closely the JAX twins follow Bullet-Safety-Gym: open-loop trajectory error and episode returns.

    python benchmarks/twin_fidelity.py            # the tables of docs/environments.md
    python benchmarks/twin_fidelity.py --fit      # also fit the Ball's parameters to PyBullet trajectories
    python benchmarks/twin_fidelity.py --agent car  # only the Car twins (their fit: benchmarks/car_system_identification.py)

Open loop: from the same start (read back from PyBullet after a seeded reset), the fixed action sequences of
``bullet_twins.controllers`` run for 10 s in both simulators (no time limit); the table gives the position
and velocity error ``||twin - real||`` at 1, 3 and 10 s, mean and max over the starts.
Episodes: each policy plays full episodes from the same starts in both; the table gives the mean episode
reward and cost and the twin's relative difference.
Fit: ``scipy.optimize.least_squares`` on the velocity error of free-rolling trajectories (Run timing,
no walls) over the force scale, the two damping coefficients and the rolling friction.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np

from constrained_rl.envs.bullet_twins import TWINS, make_twin
from constrained_rl.envs.bullet_twins import controllers as C
from constrained_rl.envs.bullet_twins import reference as R

HORIZONS_S = (1.0, 3.0, 10.0)
BALL_TWINS = ("BallCircleTwin", "BallRunTwin")
CAR_TWINS = ("CarCircleTwin", "CarRunTwin")


def open_loop_errors(name: str, seeds: range) -> dict[str, dict[str, list[float]]]:
    """Per sequence, per horizon: position and velocity errors over the starts."""
    twin, spec = make_twin(name), TWINS[name]
    env = R.real_env(spec.real_id)
    steps = int(round(max(HORIZONS_S) / twin.dt))
    rows = {}
    for sequence in C.OPEN_LOOP:
        errors = {f"{kind}@{h:g}s": [] for kind in ("position", "velocity") for h in HORIZONS_S}
        for seed in seeds:
            R.real_reset(env, seed)
            start = R.twin_start(twin, env)
            actions = C.open_loop(sequence, steps, twin.dt, seed=seed)
            real = R.real_rollout(env, steps, actions)
            sim = R.twin_rollout(twin, start, steps, actions)
            for h in HORIZONS_S:
                t = int(round(h / twin.dt))
                errors[f"position@{h:g}s"].append(float(np.linalg.norm(sim.position[t] - real.position[t])))
                errors[f"velocity@{h:g}s"].append(float(np.linalg.norm(sim.velocity[t] - real.velocity[t])))
        rows[sequence] = errors
    env.close()
    return rows


def policies_for(name: str) -> dict:
    if TWINS[name].agent == "car":
        reference = C.car_circle_driver if "Circle" in name else C.car_straight_runner
        return {"constant": C.constant_policy(C.CAR_CONSTANT_ACTION), "random": None, "reference": reference}
    reference = C.circle_follower if "Circle" in name else C.speed_limited_runner
    return {"constant": C.constant_policy(), "random": None, "reference": reference}


def episode_returns(name: str, seeds: range) -> dict[str, dict[str, list[float]]]:
    """Per policy: episode reward and cost in both simulators, from the same starts."""
    twin, spec = make_twin(name), TWINS[name]
    env = R.real_env(spec.real_id)
    steps = spec.episode_length
    out = {}
    for label, policy in policies_for(name).items():
        record = {"real_reward": [], "twin_reward": [], "real_cost": [], "twin_cost": []}
        for seed in seeds:
            R.real_reset(env, seed)
            start = R.twin_start(twin, env)
            if policy is None:  # random: the same i.i.d. uniform actions in both
                actions = C.open_loop("random", steps, twin.dt, seed=1000 + seed)
                real = R.real_rollout(env, steps, actions)
                sim = R.twin_rollout(twin, start, steps, actions)
            else:
                real = R.real_rollout(env, steps, policy=lambda o: np.asarray(policy(o)))
                sim = R.twin_rollout(twin, start, steps, policy=policy)
            record["real_reward"].append(float(real.reward.sum())), record["twin_reward"].append(float(sim.reward.sum()))
            record["real_cost"].append(float(real.cost.sum())), record["twin_cost"].append(float(sim.cost.sum()))
        out[label] = record
    env.close()
    return out


def fit_ball(seeds: range) -> dict:
    """Least-squares fit of the Ball's force scale, damping and rolling friction to free PyBullet rollouts.

    The twin's rollout is differentiable in its parameters, so ``least_squares`` gets the exact Jacobian
    (``jax.jacfwd``); it starts away from PyBullet's values.
    """
    import jax
    import jax.numpy as jnp
    from scipy.optimize import least_squares

    from constrained_rl.envs.bullet_twins.ball import BallAgent, BallParameters
    from constrained_rl.envs.bullet_twins.env import TwinEnv
    from constrained_rl.envs.bullet_twins.tasks import TASKS

    spec = TWINS["BallRunTwin"]
    env = R.real_env(spec.real_id)
    steps, starts, action_rows, targets = 150, [], [], []
    for seed in seeds:
        for sequence in C.OPEN_LOOP:
            R.real_reset(env, seed)
            starts.append(R.read_ball(env))
            actions = C.open_loop(sequence, steps, TASKS["run"].timing.dt, seed=seed)
            action_rows.append(actions)
            targets.append(R.real_rollout(env, steps, actions).velocity[1:])
    env.close()
    start = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *starts)
    actions, target = jnp.asarray(np.stack(action_rows)), jnp.asarray(np.stack(targets), jnp.float32)
    names = ("max_force", "linear_damping", "angular_damping", "ground_rolling_friction")

    def residuals(theta):
        twin = TwinEnv(BallAgent(BallParameters(**dict(zip(names, theta)))), TASKS["run"], spec.real_id,
                       spec.episode_length)

        def one(physics, sequence):
            def step(state, action):
                state = twin.step(state, action)
                return state, state.physics.velocity

            return jax.lax.scan(step, twin.state_from_physics(physics), sequence)[1]

        return (jax.vmap(one)(start, actions) - target).ravel()

    f = jax.jit(residuals)
    jac = jax.jit(jax.jacfwd(residuals))
    initial = np.array([3.0, 0.1, 0.1, 0.05])  # deliberately away from PyBullet's values
    result = least_squares(lambda th: np.asarray(f(jnp.asarray(th, jnp.float32)), np.float64), initial,
                           jac=lambda th: np.asarray(jac(jnp.asarray(th, jnp.float32)), np.float64),
                           bounds=([0.1, 0.0, 0.0, 0.0], [10.0, 1.0, 1.0, 0.5]))
    fitted = {n: float(v) for n, v in zip(names, result.x)}
    return {"fitted": fitted, "pybullet": {n: getattr(BallParameters(), n) for n in names},
            "rms_velocity_error": float(np.sqrt(np.mean(result.fun**2))), "trajectories": len(starts), "steps": steps}


def markdown(errors: dict, returns: dict) -> str:
    lines = []
    for name in errors:
        lines.append(f"\n{name} ({TWINS[name].real_id}), open loop, error mean / max over starts (m, m/s):\n")
        header = " | ".join(f"{k.split('@')[0][:3]}. {k.split('@')[1]}" for k in next(iter(errors[name].values())))
        lines.append(f"| sequence | {header} |")
        lines.append("|---" * (1 + len(next(iter(errors[name].values())))) + "|")
        for sequence, row in errors[name].items():
            cells = " | ".join(f"{np.mean(v):.3g} / {np.max(v):.3g}" for v in row.values())
            lines.append(f"| {sequence} | {cells} |")
    for name in returns:
        lines.append(f"\n{name}, episodes of {TWINS[name].episode_length} steps, mean over starts:\n")
        lines.append("| policy | reward real | reward twin | diff | cost real | cost twin | diff |")
        lines.append("|---|---|---|---|---|---|---|")
        for label, rec in returns[name].items():
            rr, tr = np.mean(rec["real_reward"]), np.mean(rec["twin_reward"])
            rc, tc = np.mean(rec["real_cost"]), np.mean(rec["twin_cost"])
            rel = lambda a, b: f"{100 * (b - a) / abs(a):+.1f}%" if abs(a) > 1e-9 else ("0" if abs(b) < 1e-9 else "n/a")
            lines.append(f"| {label} | {rr:.2f} | {tr:.2f} | {rel(rr, tr)} | {rc:.1f} | {tc:.1f} | {rel(rc, tc)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5, help="seeded starts per sequence / policy")
    parser.add_argument("--fit", action="store_true", help="also fit the Ball's parameters")
    parser.add_argument("--agent", default="all", choices=("all", "ball", "car"),
                        help="which twins (the Car's fit is benchmarks/car_system_identification.py)")
    parser.add_argument("--fit-only", action="store_true", help="only the fit")
    parser.add_argument("--json", default=None, help="write the raw numbers to this file")
    args = parser.parse_args(argv)
    began = time.time()
    seeds = range(args.starts)
    names = BALL_TWINS + CAR_TWINS if args.agent == "all" else (BALL_TWINS if args.agent == "ball" else CAR_TWINS)
    errors = {name: open_loop_errors(name, seeds) for name in names} if not args.fit_only else {}
    returns = {name: episode_returns(name, seeds) for name in names} if not args.fit_only else {}
    report = {"open_loop": errors, "episodes": returns}
    print(markdown(errors, returns))
    if args.fit or args.fit_only:
        report["fit"] = fit_ball(range(2))
        print("\nBall parameters fitted to PyBullet (free rolling, Run timing):\n" + json.dumps(report["fit"], indent=1))
    print(f"\n({time.time() - began:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
