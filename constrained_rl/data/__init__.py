"""Offline datasets: the DSRL HDF5 format on the device, episode views and episode filters."""

from constrained_rl.data.dsrl import (
    DSRL_KEYS,
    BatchReturns,
    DatasetMetadata,
    Episodes,
    OfflineDataset,
    ReturnsToGo,
    TransitionBatch,
    dataset_arrays,
    load_dsrl,
    offline_dataset_from_arrays,
    sample_batch,
    save_dsrl,
    split_episodes,
    take_transitions,
    validate_arrays,
    with_returns_to_go,
)
from constrained_rl.data.filters import (
    filter_safe_episodes,
    grid_filter_episodes,
    grid_filter_mask,
    select_episodes,
)

__all__ = [
    "DSRL_KEYS",
    "BatchReturns",
    "DatasetMetadata",
    "Episodes",
    "OfflineDataset",
    "ReturnsToGo",
    "TransitionBatch",
    "dataset_arrays",
    "filter_safe_episodes",
    "grid_filter_episodes",
    "grid_filter_mask",
    "load_dsrl",
    "offline_dataset_from_arrays",
    "sample_batch",
    "save_dsrl",
    "select_episodes",
    "split_episodes",
    "take_transitions",
    "validate_arrays",
    "with_returns_to_go",
]
