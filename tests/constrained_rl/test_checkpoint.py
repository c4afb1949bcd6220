"""Tests for constrained_rl.checkpoint: round trips, step bookkeeping and clear errors."""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from constrained_rl import checkpoint
from constrained_rl.config import ConfigError


class TrainState(NamedTuple):
    params: dict
    key: jax.Array
    step: jax.Array


def make_state(value: float) -> TrainState:
    return TrainState(
        params={"w": jnp.full((2, 3), value, jnp.bfloat16), "b": jnp.arange(3, dtype=jnp.float32)},
        key=jax.random.key(int(value)),
        step=jnp.int32(value),
    )


def test_round_trip_keeps_structure_dtypes_and_keys(tmp_path):
    saved = make_state(7.0)
    checkpoint.save(tmp_path, 7, saved)
    restored = checkpoint.restore(tmp_path, make_state(0.0))
    assert isinstance(restored, TrainState)
    assert restored.params["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(restored.params["w"], saved.params["w"])
    np.testing.assert_array_equal(restored.params["b"], saved.params["b"])
    assert int(restored.step) == 7
    # The restored key must draw the same numbers as the saved one.
    np.testing.assert_array_equal(
        jax.random.uniform(restored.key, (4,)), jax.random.uniform(saved.key, (4,))
    )


def test_restore_without_template_reads_the_pytree_as_saved(tmp_path):
    checkpoint.save(tmp_path, 5, {"actor": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.int32(4)})
    restored = checkpoint.restore(tmp_path)
    np.testing.assert_array_equal(restored["actor"]["w"], np.arange(6.0).reshape(2, 3))
    assert int(restored["step"]) == 4
    checkpoint.save(tmp_path / "tuple", 1, TrainState({"b": jnp.ones(2)}, jnp.zeros(1), jnp.int32(3)))
    assert set(checkpoint.restore(tmp_path / "tuple")) == {"params", "key", "step"}  # a NamedTuple: a dict


def test_steps_latest_max_to_keep_and_overwrite(tmp_path):
    assert checkpoint.latest_step(tmp_path / "absent") is None
    assert not (tmp_path / "absent").exists()  # asking must not create the directory
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, make_state(float(step)), max_to_keep=2)
    assert checkpoint.all_steps(tmp_path) == [2, 3]
    assert checkpoint.latest_step(tmp_path) == 3
    checkpoint.save(tmp_path, 3, make_state(9.0))  # same step again replaces it
    assert int(checkpoint.restore(tmp_path, make_state(0.0)).step) == 9
    assert int(checkpoint.restore(tmp_path, make_state(0.0), step=2).step) == 2


def test_missing_checkpoint_is_a_config_error_naming_the_path(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint found") as error:
        checkpoint.restore(tmp_path / "nothing", make_state(0.0))
    assert "nothing" in str(error.value)
    checkpoint.save(tmp_path, 1, make_state(1.0))
    with pytest.raises(ConfigError, match="no checkpoint for step 5"):
        checkpoint.restore(tmp_path, make_state(0.0), step=5)


def test_mismatched_template_is_a_config_error(tmp_path):
    checkpoint.save(tmp_path, 1, make_state(1.0))
    wrong_shape = make_state(0.0)._replace(params={"w": jnp.zeros((4, 4), jnp.bfloat16),
                                                   "b": jnp.zeros(3)})
    with pytest.raises(ConfigError, match="cannot restore checkpoint"):
        checkpoint.restore(tmp_path, wrong_shape)
    with pytest.raises(ConfigError, match="cannot restore checkpoint"):
        checkpoint.restore(tmp_path, {"other": jnp.zeros(3)})


def test_corrupt_checkpoint_is_a_config_error(tmp_path):
    checkpoint.save(tmp_path, 1, make_state(1.0))
    for root, _, files in os.walk(tmp_path / "1"):
        for name in files:
            with open(os.path.join(root, name), "w") as file:
                file.write("garbage")
    with pytest.raises(ConfigError, match=str(tmp_path / "1")):
        checkpoint.restore(tmp_path, make_state(0.0))


def test_a_save_cut_short_is_not_read_and_the_next_save_replaces_it(tmp_path, capfd):
    checkpoint.save(tmp_path, 1, make_state(1.0))
    partial = tmp_path / "2.orbax-checkpoint-tmp"  # what a process killed while saving step 2 leaves
    (partial / "default").mkdir(parents=True)
    (partial / "default" / "half").write_text("half a write")
    assert checkpoint.all_steps(tmp_path) == [1] and checkpoint.latest_step(tmp_path) == 1
    checkpoint.save(tmp_path, 2, make_state(2.0))
    assert checkpoint.all_steps(tmp_path) == [1, 2] and not partial.exists()
    assert "tmp" not in capfd.readouterr().err  # replaced quietly
    assert int(checkpoint.restore(tmp_path, make_state(0.0)).step) == 2


def test_a_checkpoint_that_cannot_be_written_is_a_config_error(tmp_path):
    (tmp_path / "stage").write_text("a file where the folder should be")
    with pytest.raises(ConfigError, match="cannot write checkpoint"):
        checkpoint.save(tmp_path / "stage", 1, make_state(1.0))
