"""The Safety-Gymnasium tasks through the host runner, in the side interpreter with the exact pins."""

from __future__ import annotations

import numpy as np
import pytest

from constrained_rl.config import ConfigError
from constrained_rl.envs import host
from constrained_rl.envs import layout as layouts

try:
    host.interpreter_for(host.host_task("SafetyPointPush1-v0"))
except ConfigError as missing:
    pytest.skip(f"{missing} (the README's test command makes it)", allow_module_level=True)


@pytest.mark.parametrize("task", ["SafetyPointButton1-v0", "SafetyPointPush1-v0"])
def test_declared_layout_is_the_environments(task):
    declared = layouts.LAYOUTS[task]
    with host.HostPool(task, num_workers=1) as pool:
        spec = pool.spec
        assert pool.episode_length == host.HOST_TASKS[task].episode_length == 1000
    assert spec["observation_size"] == declared.observation_size == 76
    np.testing.assert_array_equal(spec["low"], [d.low for d in declared.action])
    np.testing.assert_array_equal(spec["high"], [d.high for d in declared.action])
    # Block by block, in the environment's order: the sensors, then one 16-bin lidar per object kind.
    names = [d.name for d in declared.observation]
    start = 0
    for block, size in spec["blocks"]:
        expected = [f"{block}_{axis}" for axis in "xyz"] if size == 3 else [f"{block}_{i}" for i in range(size)]
        assert names[start:start + size] == expected, block
        start += size
    assert start == 76


def test_an_episode_depends_on_its_seed_only():
    # Safety-Gymnasium rebuilds its world at every reset (seconds each): one reset per worker. That an
    # episode does not depend on what its worker played before is held on Bullet-Safety-Gym (test_host).
    actions = np.tile([[0.5, -0.3]], (2, 1))
    with host.HostPool("SafetyPointPush1-v0", num_workers=2, envs_per_worker=1) as pool:
        first = pool.reset([7, 7])
        stepped = pool.step(actions, np.ones(2, bool))
    np.testing.assert_array_equal(first[0], first[1])
    for column in stepped:
        np.testing.assert_array_equal(column[0], column[1])
    lidars = [i for i, d in enumerate(layouts.LAYOUTS["SafetyPointPush1-v0"].observation) if "_lidar_" in d.name]
    assert np.all((first[:, lidars] >= 0) & (first[:, lidars] <= 1))
