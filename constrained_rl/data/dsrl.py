"""Offline safe-RL datasets in the DSRL format, held on the device.

DSRL (Liu et al. 2023, "Datasets and Benchmarks for Offline Safe Reinforcement Learning"), the data
behind the OSRL baselines, stores one task's transitions in an HDF5 file with these datasets:

    observations       [N, obs_dim]    s_t
    next_observations  [N, obs_dim]    s_{t+1}
    actions            [N, act_dim]    a_t
    rewards            [N]             r_t
    costs              [N]             c_t
    terminals          [N]             1 where s_{t+1} is terminal (bool or float)
    timeouts           [N]             1 where the episode was cut by the time limit (bool or float)

Episodes are the runs of rows between ``terminals | timeouts`` flags. Our own files also carry the
task's normalization metadata as root attributes (:class:`DatasetMetadata`); real DSRL files do not.
When a file's task is a DSRL task (its ``task`` attribute, or the task its DSRL file name names), DSRL's
published references apply (:mod:`constrained_rl.data.dsrl_tasks`); :func:`load_dsrl` also takes a
``metadata`` override, which wins over both.

The loaded :class:`OfflineDataset` is a pytree of device arrays and :func:`sample_batch` is jittable, so
an entire offline training run can be one ``lax.scan`` over steps that samples inside its body.
Splitting into episodes (:func:`split_episodes`) is host-side numpy, done once at load time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import chex
import h5py
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from constrained_rl import returns
from constrained_rl.config import ConfigError

MATRIX_KEYS = ("observations", "next_observations", "actions")  # rank 2: [N, dim]
VECTOR_KEYS = ("rewards", "costs", "terminals", "timeouts")  # rank 1: [N]
FLAG_KEYS = ("terminals", "timeouts")  # values in {0, 1}
DSRL_KEYS = MATRIX_KEYS + VECTOR_KEYS


class DatasetMetadata(NamedTuple):
    """What a score or a cost threshold needs to know about the task; every field may be unknown."""

    task: str | None = None  # task name, e.g. "OfflineCarCircle-v0"
    episode_length: int | None = None  # T, the time limit of one episode
    reward_min: float | None = None  # reference episode reward that normalizes to 0
    reward_max: float | None = None  # reference episode reward that normalizes to 1
    max_episode_cost: float | None = None  # largest episode cost return the task is expected to see
    collection: str | None = None  # how the data was collected (behaviour policies, filter settings)

    def merged_with(self, override: DatasetMetadata | None) -> DatasetMetadata:
        """This metadata with every field that ``override`` sets (not None) replaced by its value."""
        if override is None:
            return self
        return self._replace(**{k: v for k, v in override._asdict().items() if v is not None})


_ATTRIBUTE_TYPES = {
    "task": str,
    "episode_length": int,
    "reward_min": float,
    "reward_max": float,
    "max_episode_cost": float,
    "collection": str,
}


class BatchReturns(NamedTuple):
    """The rest of each sampled transition's episode, for Monte-Carlo value targets.

    ``Q(s_t, a_t) ~ reward_returns + tail_discounts * V(tail_observations)``: the discounted sums
    run from ``t`` to the episode's last row, and the tail bootstraps from the state after it
    unless the episode ended in a terminal state (``tail_discounts`` is then 0).
    """

    reward_returns: jax.Array  # [B] sum_{i=t}^{end} gamma^(i-t) r_i
    cost_returns: jax.Array  # [B] sum_{i=t}^{end} gamma^(i-t) c_i
    tail_observations: jax.Array  # [B, obs_dim] s_{end+1}
    tail_discounts: jax.Array  # [B] gamma^(end-t+1) (1 - terminal_end)


class TransitionBatch(NamedTuple):
    """A batch of transitions ``(s, a, r, c, s', terminal)``; every field has the batch on axis 0."""

    observations: jax.Array  # [B, obs_dim]
    actions: jax.Array  # [B, act_dim]
    rewards: jax.Array  # [B]
    costs: jax.Array  # [B]
    next_observations: jax.Array  # [B, obs_dim]
    terminals: jax.Array  # [B] float32, 1 where s' is terminal (no bootstrapping from it)
    returns: BatchReturns | None = None  # set when the dataset carries its returns-to-go

    def discounts(self, gamma: float | jax.Array) -> jax.Array:
        """Bootstrap weights ``gamma * (1 - terminal)`` for one-step targets ``r + discount * V(s')``.

        A timeout is not a terminal: the state after a time-limit cut still has a future, so the
        target bootstraps through it (D4RL's and DSRL's flags keep the two apart; OSRL's trainers do
        not bootstrap there, ``done = terminal or timeout``: docs/algorithms/osrl_baselines.md).
        """
        return gamma * (1.0 - self.terminals)

    def scaled(self, reward_scale: float, cost_scale: float) -> "TransitionBatch":
        """Rewards and costs (and their returns-to-go) multiplied by constant scales.

        OSRL's Q-learners train on ``0.1 * r``: a value scale changes how a quadratic Bellman error
        weighs against the linear terms of a loss (relative pessimism, a cost penalty).
        """
        returns = self.returns
        if returns is not None:
            returns = returns._replace(reward_returns=reward_scale * returns.reward_returns,
                                       cost_returns=cost_scale * returns.cost_returns)
        return self._replace(rewards=reward_scale * self.rewards, costs=cost_scale * self.costs, returns=returns)


@struct.dataclass
class ReturnsToGo:
    """Per row: the discounted rest of its episode (see :class:`BatchReturns`, :func:`with_returns_to_go`)."""

    reward_returns: jax.Array  # [N] float32
    cost_returns: jax.Array  # [N] float32
    tail_rows: jax.Array  # [N] int32, the last row of the row's episode
    tail_discounts: jax.Array  # [N] float32


@struct.dataclass
class OfflineDataset:
    """A whole offline dataset as device arrays (a pytree) plus static metadata.

    Rows are transitions in collection order, so episodes are contiguous. Flags are float32 in {0, 1}.
    The metadata is static pytree data: it does not enter traced computation.
    """

    observations: jax.Array  # [N, obs_dim] float32
    actions: jax.Array  # [N, act_dim] float32
    rewards: jax.Array  # [N] float32
    costs: jax.Array  # [N] float32
    next_observations: jax.Array  # [N, obs_dim] float32
    terminals: jax.Array  # [N] float32
    timeouts: jax.Array  # [N] float32
    metadata: DatasetMetadata = struct.field(pytree_node=False, default=DatasetMetadata())
    returns: ReturnsToGo | None = None  # discounted returns-to-go, added by with_returns_to_go

    @property
    def num_transitions(self) -> int:
        return self.observations.shape[0]


def sample_batch(dataset: OfflineDataset, key: jax.Array, batch_size: int) -> TransitionBatch:
    """Draws ``batch_size`` transitions uniformly with replacement; jittable with a static batch size.

    ``indices ~ Uniform{0, ..., N - 1}^B`` (the sampler of OSRL's and D4RL's offline learners).
    Inside a jitted loop, close over ``batch_size`` or mark it static.
    """
    chex.assert_rank(dataset.rewards, 1)
    indices = jax.random.randint(key, (batch_size,), 0, dataset.num_transitions)
    return take_transitions(dataset, indices)


def take_transitions(dataset: OfflineDataset, indices: jax.Array) -> TransitionBatch:
    """The transitions at ``indices`` (any integer shape ``S``; every field gets leading shape ``S``)."""
    chex.assert_type(indices, int)
    returns = None
    if dataset.returns is not None:
        returns = BatchReturns(
            reward_returns=dataset.returns.reward_returns[indices],
            cost_returns=dataset.returns.cost_returns[indices],
            tail_observations=dataset.next_observations[dataset.returns.tail_rows[indices]],
            tail_discounts=dataset.returns.tail_discounts[indices],
        )
    return TransitionBatch(
        observations=dataset.observations[indices],
        actions=dataset.actions[indices],
        rewards=dataset.rewards[indices],
        costs=dataset.costs[indices],
        next_observations=dataset.next_observations[indices],
        terminals=dataset.terminals[indices],
        returns=returns,
    )


# --------------------------------------------------------------------------------------------------
# Episodes (host-side, once at load time)


class Episodes(NamedTuple):
    """Complete episodes of a dataset as row ranges ``[start, end)`` with undiscounted returns."""

    starts: np.ndarray  # [E] int64, first row of each episode
    ends: np.ndarray  # [E] int64, one past the last row
    reward_returns: np.ndarray  # [E] float64, sum of r_t over the episode
    cost_returns: np.ndarray  # [E] float64, sum of c_t over the episode

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    @property
    def num_episodes(self) -> int:
        return int(self.starts.shape[0])


def split_episodes(dataset: OfflineDataset) -> Episodes:
    """Splits the rows into episodes, each ending at a row with ``terminal or timeout``.

    Rows after the last flagged row form no episode: their returns are unfinished, so counting them
    would make a partial trajectory look cheaper than it is (DSRL's own trajectory statistics drop
    them the same way).
    """
    done = (np.asarray(dataset.terminals) > 0) | (np.asarray(dataset.timeouts) > 0)
    ends = np.flatnonzero(done).astype(np.int64) + 1
    starts = np.concatenate([np.zeros(1, np.int64), ends[:-1]])[: ends.shape[0]]
    return Episodes(
        starts=starts,
        ends=ends,
        reward_returns=_segment_sums(np.asarray(dataset.rewards), starts, ends),
        cost_returns=_segment_sums(np.asarray(dataset.costs), starts, ends),
    )


def with_returns_to_go(dataset: OfflineDataset, gamma: float) -> OfflineDataset:
    """The dataset with each row's discounted returns-to-go within its episode (host-side, once).

    For row ``t`` of an episode whose last row is ``end``::

        G^r_t = sum_{i=t}^{end} gamma^(i-t) r_i,    G^c_t likewise with c,
        tail_discount_t = gamma^(end-t+1) * (1 - terminal_end),

    so ``G_t + tail_discount_t * V(s_{end+1})`` is a Monte-Carlo estimate of the behaviour's
    ``Q(s_t, a_t)`` that bootstraps past a time-limit cut (the targets of the value pretraining in
    lightATAC's behaviour pretraining, Cheng et al. 2022). Rows after the last flagged row form an
    episode cut at the end of the data, bootstrapped the same way. Computed with
    :func:`constrained_rl.returns.discounted_returns`, the episode ends cutting the recurrence.
    """
    terminals = np.asarray(dataset.terminals) > 0
    done = terminals | (np.asarray(dataset.timeouts) > 0)
    done[-1] = True
    ends = np.flatnonzero(done)
    tail_rows = ends[np.searchsorted(ends, np.arange(done.shape[0]))]  # the first episode end at or after t
    # One backward recurrence X_t = input_t + gamma (1 - done_t) X_{t+1} over three columns: the reward
    # and cost returns, and the tail discount, whose input gamma (1 - terminal_t) enters at the last row.
    inputs = jnp.stack([dataset.rewards, dataset.costs,
                        jnp.asarray(done & ~terminals, jnp.float32) * gamma], axis=1)
    discounts = jnp.asarray(gamma * (1.0 - done), jnp.float32)[:, None].repeat(3, axis=1)
    columns = returns.discounted_returns(inputs, discounts, jnp.zeros(3, jnp.float32))
    return dataset.replace(returns=ReturnsToGo(
        reward_returns=columns[:, 0],
        cost_returns=columns[:, 1],
        tail_rows=jnp.asarray(tail_rows, jnp.int32),
        tail_discounts=columns[:, 2],
    ))


def _segment_sums(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    # Differences of a float64 prefix sum: exact enough for returns of float32 rewards.
    prefix = np.concatenate([np.zeros(1), np.cumsum(values, dtype=np.float64)])
    return prefix[ends] - prefix[starts]


# --------------------------------------------------------------------------------------------------
# Construction, validation, reading and writing


def offline_dataset_from_arrays(
    arrays: Mapping[str, Any],
    metadata: DatasetMetadata | None = None,
    source: str = "dataset",
) -> OfflineDataset:
    """Validates host arrays with the DSRL keys and moves them to the device as float32.

    ``source`` names the arrays' origin in error messages (a file path when reading one). If the
    metadata lacks an episode length, the longest complete episode in the data stands in for it.
    """
    checked = validate_arrays(arrays, source)
    metadata = metadata if metadata is not None else DatasetMetadata()
    _validate_metadata(metadata, source)
    dataset = OfflineDataset(
        **{key: jnp.asarray(checked[key], dtype=jnp.float32) for key in DSRL_KEYS},
        metadata=metadata,
    )
    if metadata.episode_length is None:
        lengths = split_episodes(dataset).lengths
        if lengths.size:
            dataset = dataset.replace(metadata=metadata._replace(episode_length=int(lengths.max())))
    return dataset


def dataset_arrays(dataset: OfflineDataset) -> dict[str, np.ndarray]:
    """The dataset's arrays on the host, keyed by their DSRL names."""
    return {key: np.asarray(getattr(dataset, key)) for key in DSRL_KEYS}


def validate_arrays(arrays: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
    """Checks DSRL arrays and returns them as numpy; raises ConfigError naming ``source`` and the key.

    Checked: every key present and numeric; ranks (2 for observations/actions, 1 otherwise); no empty
    dataset; all lengths equal; next_observations shaped like observations; every value finite (the
    message counts the bad values and gives the first row); flags only 0 or 1.
    """
    checked: dict[str, np.ndarray] = {}
    for key in DSRL_KEYS:
        if key not in arrays:
            raise _missing_dataset(source, key)
        array = np.asarray(arrays[key])
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise ConfigError(f"{source}: dataset '{key}' has non-numeric dtype {array.dtype}")
        expected_rank = 2 if key in MATRIX_KEYS else 1
        if array.ndim != expected_rank:
            raise ConfigError(
                f"{source}: dataset '{key}' has rank {array.ndim} (shape {array.shape}), expected rank "
                f"{expected_rank}"
            )
        if array.shape[0] == 0:
            raise ConfigError(f"{source}: dataset '{key}' is empty (0 rows)")
        checked[key] = array

    num_rows = checked["observations"].shape[0]
    for key in DSRL_KEYS:
        if checked[key].shape[0] != num_rows:
            raise ConfigError(
                f"{source}: dataset '{key}' has {checked[key].shape[0]} rows but 'observations' has "
                f"{num_rows}"
            )
    if checked["next_observations"].shape != checked["observations"].shape:
        raise ConfigError(
            f"{source}: dataset 'next_observations' has shape {checked['next_observations'].shape} but "
            f"'observations' has {checked['observations'].shape}"
        )
    for key in DSRL_KEYS:
        _check_finite(checked[key], key, source)
    for key in FLAG_KEYS:
        flags = checked[key].astype(np.float64)
        bad = np.flatnonzero((flags != 0) & (flags != 1))
        if bad.size:
            raise ConfigError(
                f"{source}: dataset '{key}' must hold only 0 or 1; {bad.size} other values, first at row "
                f"{bad[0]} ({flags[bad[0]]})"
            )
    return checked


def _missing_dataset(source: str, key: str) -> ConfigError:
    return ConfigError(f"{source}: dataset '{key}' is missing (DSRL needs {', '.join(DSRL_KEYS)})")


def _check_finite(array: np.ndarray, key: str, source: str) -> None:
    if not np.issubdtype(array.dtype, np.floating):
        return
    bad_rows = ~np.isfinite(array).reshape(array.shape[0], -1)
    count = int(bad_rows.sum())
    if count:
        first_row = int(np.flatnonzero(bad_rows.any(axis=1))[0])
        raise ConfigError(
            f"{source}: dataset '{key}' has {count} non-finite values (NaN or inf), first at row {first_row}"
        )


def _validate_metadata(metadata: DatasetMetadata, source: str) -> None:
    if metadata.episode_length is not None and metadata.episode_length < 1:
        raise ConfigError(f"{source}: metadata 'episode_length' must be >= 1, got {metadata.episode_length}")
    for field in ("reward_min", "reward_max", "max_episode_cost"):
        value = getattr(metadata, field)
        if value is not None and not np.isfinite(value):
            raise ConfigError(f"{source}: metadata '{field}' must be finite, got {value}")
    if metadata.max_episode_cost is not None and metadata.max_episode_cost < 0:
        raise ConfigError(
            f"{source}: metadata 'max_episode_cost' must be >= 0, got {metadata.max_episode_cost}"
        )
    if (
        metadata.reward_min is not None
        and metadata.reward_max is not None
        and not metadata.reward_max > metadata.reward_min
    ):
        raise ConfigError(
            f"{source}: metadata 'reward_max' ({metadata.reward_max}) must exceed 'reward_min' "
            f"({metadata.reward_min})"
        )


def save_dsrl(
    path: str | os.PathLike,
    data: OfflineDataset | Mapping[str, Any],
    metadata: DatasetMetadata | None = None,
) -> None:
    """Writes a DSRL-format HDF5 file: the seven datasets plus the metadata as root attributes.

    Floats are stored as float32 and flags as bool, as DSRL stores them. ``metadata`` defaults to the
    dataset's own when ``data`` is an :class:`OfflineDataset`. The file appears complete or not at all
    (written beside the target, then renamed over it).
    """
    path = Path(path)
    if metadata is None:
        metadata = data.metadata if isinstance(data, OfflineDataset) else DatasetMetadata()
    arrays = dataset_arrays(data) if isinstance(data, OfflineDataset) else data
    checked = validate_arrays(arrays, str(path))
    _validate_metadata(metadata, str(path))

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with h5py.File(partial, "w") as file:
        for key in DSRL_KEYS:
            dtype = np.bool_ if key in FLAG_KEYS else np.float32
            file.create_dataset(key, data=checked[key].astype(dtype), compression="gzip")
        for name, value in metadata._asdict().items():
            if value is not None:
                file.attrs[name] = value
    os.replace(partial, path)


def load_dsrl(path: str | os.PathLike, metadata: DatasetMetadata | None = None) -> OfflineDataset:
    """Reads a DSRL-format HDF5 file onto the device, validating every dataset.

    Attributes written by :func:`save_dsrl` fill the metadata; fields set in ``metadata`` override
    them (that is how a real DSRL file, which has no attributes, gets its task's reference returns).
    Extra datasets in the file are ignored. Any problem raises ConfigError naming the file and key.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"{source}: no such file")
    if not h5py.is_hdf5(path):
        raise ConfigError(f"{source}: not an HDF5 file")
    try:
        with h5py.File(path, "r") as file:
            arrays = {key: _read_dataset(file, key, source) for key in DSRL_KEYS}
            stored = _read_attributes(file.attrs, source)
    except OSError as error:
        raise ConfigError(f"{source}: cannot be read as HDF5 ({error})") from error
    return offline_dataset_from_arrays(arrays, resolved_metadata(stored, path, metadata), source)


def resolved_metadata(stored: DatasetMetadata, path: str | os.PathLike,
                      override: DatasetMetadata | None = None) -> DatasetMetadata:
    """A file's metadata: its attributes, then DSRL's published references when its task is a DSRL task,
    then ``override``.

    The task is ``override.task``, else the file's ``task`` attribute, else the one its DSRL file name
    names (:func:`constrained_rl.data.dsrl_tasks.task_from_file_name`). For a DSRL task the task becomes
    the simulator's id and DSRL's reward range, largest episode cost and time limit replace the file's
    own; for any other task the file's own figures stand. Fields ``override`` sets win over both.
    """
    from constrained_rl.data import dsrl_tasks  # it imports this module

    named = (override.task if override is not None else None) or stored.task
    task = dsrl_tasks.dsrl_task(named or dsrl_tasks.task_from_file_name(path))
    if task is not None:
        stored = stored.merged_with(dsrl_tasks.published_metadata(task))
        if override is not None and override.task is not None:
            override = override._replace(task=task.env_id)
    return stored.merged_with(override)


def _read_dataset(file: h5py.File, key: str, source: str) -> np.ndarray:
    if key not in file:
        raise _missing_dataset(source, key)
    node = file[key]
    if not isinstance(node, h5py.Dataset):
        raise ConfigError(f"{source}: '{key}' is a {type(node).__name__}, expected a dataset")
    return node[()]


def _read_attributes(attributes: h5py.AttributeManager, source: str) -> DatasetMetadata:
    values: dict[str, Any] = {}
    for name, kind in _ATTRIBUTE_TYPES.items():
        if name not in attributes:
            continue
        raw = attributes[name]
        raw = raw.decode() if isinstance(raw, bytes) else raw
        try:
            values[name] = kind(raw.item() if isinstance(raw, np.generic) else raw)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{source}: attribute '{name}' is not a {kind.__name__}: {raw!r}") from error
    return DatasetMetadata(**values)
