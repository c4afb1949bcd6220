from __future__ import annotations

import functools

import chex
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from constrained_rl.config import ConfigError
from constrained_rl.data import (
    DSRL_KEYS,
    DatasetMetadata,
    dataset_arrays,
    load_dsrl,
    offline_dataset_from_arrays,
    sample_batch,
    save_dsrl,
    split_episodes,
    take_transitions,
    with_returns_to_go,
)
from tests.constrained_rl.data.tiny_dataset import (
    EPISODE_COSTS,
    EPISODE_ENDS,
    EPISODE_REWARDS,
    EPISODE_STARTS,
    make_arrays,
)

METADATA = DatasetMetadata(
    task="CarCircle",  # the project's own task: the file's figures stand (a DSRL task takes DSRL's)
    episode_length=300,
    reward_min=0.0,
    reward_max=700.0,
    max_episode_cost=150.0,
    collection="PPO-Lag with limits swept 5 -> 100; grid filter 60 x 50, 1 per cell",
)


def _write_raw(path, arrays, attributes=None):
    """An HDF5 file written directly with h5py, as DSRL ships them (no checks on the way in)."""
    with h5py.File(path, "w") as file:
        for key, value in arrays.items():
            file.create_dataset(key, data=value)
        for name, value in (attributes or {}).items():
            file.attrs[name] = value
    return path


# ---------------------------------------------------------------------------------------------------
# Round trip and metadata


def test_round_trip_keeps_arrays_and_metadata(tmp_path):
    arrays = make_arrays()
    path = tmp_path / "task.hdf5"
    save_dsrl(path, arrays, METADATA)
    dataset = load_dsrl(path)
    for key in DSRL_KEYS:
        np.testing.assert_array_equal(np.asarray(getattr(dataset, key)), arrays[key].astype(np.float32))
        assert getattr(dataset, key).dtype == jnp.float32
    assert dataset.metadata == METADATA
    with h5py.File(path, "r") as file:
        assert file["terminals"].dtype == np.bool_
        assert file["observations"].dtype == np.float32
    assert not (tmp_path / "task.hdf5.partial").exists()


def test_saving_a_loaded_dataset_reproduces_it(tmp_path):
    arrays = make_arrays()
    first = tmp_path / "a.hdf5"
    save_dsrl(first, arrays, METADATA)
    second = tmp_path / "nested" / "b.hdf5"
    save_dsrl(second, load_dsrl(first))
    again = load_dsrl(second)
    assert again.metadata == METADATA
    for key, value in dataset_arrays(again).items():
        np.testing.assert_array_equal(value, arrays[key].astype(np.float32))


def test_real_dsrl_file_without_attributes_takes_override_and_infers_episode_length(tmp_path):
    arrays = make_arrays()
    arrays["terminals"] = arrays["terminals"].astype(np.float32)  # DSRL files may store float flags
    path = _write_raw(tmp_path / "dsrl.hdf5", {**arrays, "extra": np.zeros(3)})
    plain = load_dsrl(path)
    # The longest complete episode [3, 7) stands in for the unknown time limit.
    assert plain.metadata == DatasetMetadata(episode_length=4)
    override = DatasetMetadata(task="CarCircle", reward_min=-5.0, reward_max=880.0)
    loaded = load_dsrl(path, metadata=override)
    assert loaded.metadata == override._replace(episode_length=4)


def test_override_replaces_only_the_fields_it_sets(tmp_path):
    arrays = make_arrays()
    path = tmp_path / "task.hdf5"
    save_dsrl(path, arrays, METADATA)
    loaded = load_dsrl(path, metadata=DatasetMetadata(reward_max=900.0, episode_length=200))
    assert loaded.metadata == METADATA._replace(reward_max=900.0, episode_length=200)


def test_bad_metadata_is_refused(tmp_path):
    arrays = make_arrays()
    with pytest.raises(ConfigError, match="reward_max"):
        save_dsrl(tmp_path / "x.hdf5", arrays, DatasetMetadata(reward_min=5.0, reward_max=5.0))
    with pytest.raises(ConfigError, match="episode_length"):
        offline_dataset_from_arrays(arrays, DatasetMetadata(episode_length=0))
    path = _write_raw(tmp_path / "attr.hdf5", arrays, {"episode_length": "long"})
    with pytest.raises(ConfigError, match=r"attr\.hdf5: attribute 'episode_length'"):
        load_dsrl(path)


# ---------------------------------------------------------------------------------------------------
# Corrupt files: every error names the file and the key


def _without(key):
    arrays = make_arrays()
    del arrays[key]
    return arrays


def _replaced(key, value):
    return {**make_arrays(), key: value}


def _with_bad_values(key, index, value):
    arrays = make_arrays()
    arrays[key] = arrays[key].astype(np.float32)
    arrays[key][index] = value
    return arrays


CORRUPT_FILES = {
    "missing key": (_without("costs"), "costs", "is missing"),
    "mismatched length": (_replaced("rewards", np.ones(9, np.float32)), "rewards", "9 rows"),
    "observations rank": (_replaced("observations", np.zeros(10, np.float32)), "observations", "rank 1"),
    "rewards rank": (_replaced("rewards", np.zeros((10, 1), np.float32)), "rewards", "rank 2"),
    "next_observations shape": (
        _replaced("next_observations", np.zeros((10, 4), np.float32)),
        "next_observations",
        "shape",
    ),
    "NaN": (_with_bad_values("rewards", [4, 7, 8], np.nan), "rewards", "3 non-finite values.*first at row 4"),
    "inf": (_with_bad_values("observations", (6, 2), np.inf), "observations", "1 non-finite.*row 6"),
    "flag not 0/1": (_with_bad_values("timeouts", [5], 2.0), "timeouts", "only 0 or 1.*row 5"),
    "strings": (_replaced("costs", np.array([b"a"] * 10)), "costs", "non-numeric"),
    "empty": (
        {key: value[:0] for key, value in make_arrays().items()},
        "observations",
        "empty",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_FILES))
def test_corrupt_file_error_names_file_and_key(tmp_path, case):
    arrays, key, message = CORRUPT_FILES[case]
    path = _write_raw(tmp_path / "bad.hdf5", arrays)
    with pytest.raises(ConfigError, match=f"bad\\.hdf5: .*'{key}'.*{message}") as error:
        load_dsrl(path)
    assert str(path) in str(error.value)


def test_writer_refuses_the_same_corruptions(tmp_path):
    path = tmp_path / "out.hdf5"
    with pytest.raises(ConfigError, match="out\\.hdf5: dataset 'rewards' has 3 non-finite"):
        save_dsrl(path, _with_bad_values("rewards", [1, 2, 3], np.inf))
    assert not path.exists()


def test_missing_file_not_hdf5_and_group_instead_of_dataset(tmp_path):
    arrays = make_arrays()
    with pytest.raises(ConfigError, match="nowhere\\.hdf5: no such file"):
        load_dsrl(tmp_path / "nowhere.hdf5")
    text = tmp_path / "notes.hdf5"
    text.write_text("observations,actions\n1,2\n")
    with pytest.raises(ConfigError, match="notes\\.hdf5: not an HDF5 file"):
        load_dsrl(text)
    path = _write_raw(tmp_path / "group.hdf5", _without("actions"))
    with h5py.File(path, "a") as file:
        file.create_group("actions")
    with pytest.raises(ConfigError, match="group\\.hdf5: 'actions' is a Group"):
        load_dsrl(path)


# ---------------------------------------------------------------------------------------------------
# Sampling on the device


@pytest.fixture(scope="module")
def dataset():
    return offline_dataset_from_arrays(make_arrays(), METADATA)


class SampleBatchTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_rows_in_range_consistent_and_shaped(self):
        dataset = offline_dataset_from_arrays(make_arrays(), METADATA)
        batch = self.variant(functools.partial(sample_batch, batch_size=64))(dataset, jax.random.key(3))
        chex.assert_shape([batch.observations, batch.next_observations], (64, 3))
        chex.assert_shape(batch.actions, (64, 2))
        chex.assert_shape([batch.rewards, batch.costs, batch.terminals], (64,))
        rows = np.asarray(batch.observations[:, 0]).astype(int)  # column 0 holds the row index
        assert rows.min() >= 0 and rows.max() <= 9
        assert len(set(rows)) > 5  # uniform over 10 rows: 64 draws cover most of them
        arrays = make_arrays()
        for key in ("actions", "rewards", "costs", "next_observations"):
            np.testing.assert_array_equal(np.asarray(getattr(batch, key)), arrays[key][rows])
        np.testing.assert_array_equal(np.asarray(batch.terminals), arrays["terminals"][rows])


def test_jit_and_eager_draw_the_same_rows(dataset):
    key = jax.random.key(7)
    eager = sample_batch(dataset, key, 16)
    jitted = jax.jit(sample_batch, static_argnums=2)(dataset, key, 16)
    chex.assert_trees_all_equal(eager, jitted)


def test_sampling_inside_a_scan_draws_fresh_rows_each_step(dataset):
    def step(key, _):
        key, sample_key = jax.random.split(key)
        return key, sample_batch(dataset, sample_key, 8).observations[:, 0]

    _, rows = jax.jit(lambda key: jax.lax.scan(step, key, length=4))(jax.random.key(0))
    chex.assert_shape(rows, (4, 8))
    assert not np.array_equal(np.asarray(rows[0]), np.asarray(rows[1]))


def test_discounts_do_not_bootstrap_through_terminals(dataset):
    batch = sample_batch(dataset, jax.random.key(1), 32)
    expected = 0.9 * (1.0 - make_arrays()["terminals"][np.asarray(batch.observations[:, 0]).astype(int)])
    np.testing.assert_allclose(np.asarray(batch.discounts(0.9)), expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Episodes


def test_split_episodes_by_hand(dataset):
    episodes = split_episodes(dataset)
    np.testing.assert_array_equal(episodes.starts, EPISODE_STARTS)
    np.testing.assert_array_equal(episodes.ends, EPISODE_ENDS)
    np.testing.assert_array_equal(episodes.lengths, [3, 4, 2])
    np.testing.assert_allclose(episodes.reward_returns, EPISODE_REWARDS)
    np.testing.assert_allclose(episodes.cost_returns, EPISODE_COSTS)


def test_episode_ending_on_both_flags_and_on_the_last_row():
    arrays = make_arrays()
    arrays["timeouts"][2] = True  # terminal and timeout together end one episode, not two
    arrays["terminals"][9] = True  # the tail now completes
    episodes = split_episodes(offline_dataset_from_arrays(arrays))
    np.testing.assert_array_equal(episodes.starts, [0, 3, 7, 9])
    np.testing.assert_array_equal(episodes.ends, [3, 7, 9, 10])
    np.testing.assert_allclose(episodes.cost_returns, EPISODE_COSTS + [5.0])


# ---------------------------------------------------------------------------------------------------
# Returns-to-go


def test_returns_to_go_by_hand():
    gamma = 0.5
    dataset = with_returns_to_go(offline_dataset_from_arrays(make_arrays()), gamma)
    returns = jax.device_get(dataset.returns)
    # Episode [0, 3) ends terminal: no tail bootstrap. Rewards 1, 2, 3; costs 0, 1, 0.
    np.testing.assert_allclose(returns.reward_returns[:3], [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3])
    np.testing.assert_allclose(returns.cost_returns[:3], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(returns.tail_discounts[:3], 0.0)
    # Episode [3, 7) ends by timeout: bootstrap from s' of row 6 with gamma^(6 - t + 1).
    np.testing.assert_allclose(returns.reward_returns[3:7], [0.5 * (1 + 0.5 + 0.25 + 0.125), 0.5 * 1.75, 0.75, 0.5])
    np.testing.assert_allclose(returns.tail_discounts[3:7], [0.5 ** 4, 0.5 ** 3, 0.5 ** 2, 0.5])
    np.testing.assert_array_equal(returns.tail_rows[3:7], 6)
    # Row 9, after the last flagged row, is an episode cut at the end of the data.
    assert returns.tail_rows[9] == 9 and returns.tail_discounts[9] == 0.5 and returns.cost_returns[9] == 5.0
    np.testing.assert_array_equal(returns.tail_rows[7:9], 8)

    batch = take_transitions(dataset, jnp.array([4, 0]))
    np.testing.assert_allclose(batch.returns.tail_observations, np.asarray(dataset.next_observations)[[6, 2]])
    np.testing.assert_allclose(batch.returns.tail_discounts, [0.125, 0.0])
    assert take_transitions(offline_dataset_from_arrays(make_arrays()),
                                 jnp.array([0])).returns is None


def test_scaled_batch_scales_signals_and_their_returns_only():
    dataset = with_returns_to_go(offline_dataset_from_arrays(make_arrays()), 0.5)
    batch = take_transitions(dataset, jnp.array([4, 0]))
    scaled = jax.jit(lambda b: b.scaled(0.1, 2.0))(batch)
    np.testing.assert_allclose(scaled.rewards, 0.1 * batch.rewards, rtol=1e-6)
    np.testing.assert_allclose(scaled.costs, 2.0 * batch.costs, rtol=1e-6)
    np.testing.assert_allclose(scaled.returns.reward_returns, 0.1 * batch.returns.reward_returns, rtol=1e-6)
    np.testing.assert_allclose(scaled.returns.cost_returns, 2.0 * batch.returns.cost_returns, rtol=1e-6)
    # Bootstrapping weights and states are not signals: unchanged.
    np.testing.assert_array_equal(scaled.returns.tail_discounts, batch.returns.tail_discounts)
    np.testing.assert_array_equal(scaled.observations, batch.observations)
    assert take_transitions(offline_dataset_from_arrays(make_arrays()), jnp.array([0])).scaled(0.1, 1.0).returns is None
