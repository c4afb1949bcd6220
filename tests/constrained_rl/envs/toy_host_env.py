"""A Gymnasium toy for the host runner's tests, registered as ``ToyWalk-v0`` when imported.

Like Bullet-Safety-Gym it ignores ``reset(seed=...)`` and draws its start from NumPy's global
generator: x0 ~ U{0..9}. Step: x += 2 * a (the Box is [-2, 2], so unit action a moves 2 a);
reward = x; cost = 1[x > 12]; terminates when x >= 15; time limit 8 steps. obs = [x, t].
"""

from __future__ import annotations

import gymnasium
import numpy as np


class ToyWalk(gymnasium.Env):
    def __init__(self):
        self.action_space = gymnasium.spaces.Box(-2.0, 2.0, (1,), np.float32)
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (2,), np.float64)

    def reset(self, seed=None, options=None):
        self.x, self.t = float(np.random.randint(10)), 0
        return np.array([self.x, 0.0]), {}

    def step(self, action):
        self.x += float(action[0])
        self.t += 1
        return np.array([self.x, float(self.t)]), self.x, self.x >= 15.0, False, {"cost": float(self.x > 12.0)}


if "ToyWalk-v0" not in gymnasium.registry:
    gymnasium.register("ToyWalk-v0", entry_point=ToyWalk, max_episode_steps=8)
