"""Trained policies exported beside their run, in one format (docs/running.md, "Exported policies").

At the end of training a control learner (every offline learner through :mod:`algorithms.control.offline`,
and PPO-Lagrangian) writes ``policy/`` into its run directory::

    policy/params/<step>/   the parameters its evaluation policy reads: an orbax checkpoint
                            (:mod:`constrained_rl.checkpoint`), every leaf with a leading run axis [R]
    policy/policy.json      what rebuilds the network, and which run is which

The parameters are the fields of the learner state that the evaluation policy reads (``fields`` in the
JSON, dotted paths such as ``actor.params``), nested as they sit in the state: fields ``("actor.params",
"vae.params")`` are saved as ``{"actor": {"params": ...}, "vae": {"params": ...}}``. :func:`select` takes
them out of a state and :func:`insert` puts them back into another of the same structure (a freshly
initialised one), which then acts exactly as the trained state did.

``policy.json`` is written after the parameters are committed, so its presence means the export is
complete. Its fields (:func:`record`): ``format``, ``experiment`` (the registry name, read from the run's
``config.json`` when the runner wrote one, else ``null``), ``config_class`` (``module:Class`` of the
learner's config), ``config`` (every field, resolved), ``task``, ``observation_size``, ``action_size``,
``episode_length``, ``fields`` (``null``: the whole learner state), ``step`` (updates or iterations trained), ``num_runs`` and ``runs``: one
``{"index", "cost_limit", "seed_index"}`` per run, in the order of the leading axis (``cost_limit`` is
``null`` for a run trained for no particular limit). A learner family adds its own keys (the offline
scaffold: the scored ``cost_limits``, the ``reference_returns`` of the DSRL normalization and the ``layout``
of its data's task; PPO-Lagrangian: its ``train_task`` and its ``layout``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from constrained_rl import checkpoint
from constrained_rl.config import ConfigError

FORMAT = 1
DIRECTORY = "policy"  # in the run directory
PARAMS = "params"  # orbax steps, in DIRECTORY
RECORD = "policy.json"  # in DIRECTORY


def _child(node: Any, name: str) -> Any:
    return node[name] if isinstance(node, Mapping) else getattr(node, name)


def _with_child(node: Any, name: str, value: Any) -> Any:
    if isinstance(node, Mapping):
        return {**node, name: value}
    if hasattr(node, "_replace"):  # NamedTuple
        return node._replace(**{name: value})
    return node.replace(**{name: value})  # flax.struct dataclasses (train states)


def select(state: Any, fields: Sequence[str]) -> dict[str, Any]:
    """The ``fields`` (dotted paths) of ``state``, as nested dicts keyed by the path's names."""
    selected: dict[str, Any] = {}
    for path in fields:
        names = path.split(".")
        value = state
        for name in names:
            value = _child(value, name)
        node = selected
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = value
    return selected


def insert(state: Any, fields: Sequence[str], params: Mapping[str, Any]) -> Any:
    """``state`` with each of ``fields`` replaced by its value in ``params`` (as :func:`select` made it)."""

    def put(node: Any, names: list[str], value: Any) -> Any:
        if not names:
            return value
        return _with_child(node, names[0], put(_child(node, names[0]), names[1:], value))

    for path in fields:
        names = path.split(".")
        value = params
        for name in names:
            value = _child(value, name)
        state = put(state, names, value)
    return state


def config_class(config: Any) -> str:
    """``module:QualifiedName`` of a config's class."""
    return f"{type(config).__module__}:{type(config).__qualname__}"


def experiment_name(run_dir: str | os.PathLike) -> str | None:
    """The registry name in the run's ``config.json`` (written by the runner), or None without one."""
    path = Path(run_dir) / "config.json"
    try:
        name = json.loads(path.read_text()).get("experiment")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def record(config: Any, run_dir: str | os.PathLike, *, observation_size: int, action_size: int,
           episode_length: int, fields: Sequence[str] | None, step: int, run_limits: Sequence[float | None],
           seed_indices: Sequence[int], **extra: Any) -> dict[str, Any]:
    """The content of ``policy.json`` (module docstring): ``run_limits`` and ``seed_indices`` have one
    entry per run; ``fields`` None means the whole learner state; ``extra`` keys are added at the end."""
    if len(run_limits) != len(seed_indices):
        raise ValueError("run_limits and seed_indices must have one entry per run")
    runs = [{"index": i, "cost_limit": None if k is None else float(k), "seed_index": int(s)}
            for i, (k, s) in enumerate(zip(run_limits, seed_indices))]
    return {
        "format": FORMAT,
        "experiment": experiment_name(run_dir),
        "config_class": config_class(config),
        "config": json.loads(json.dumps(dataclasses.asdict(config))),
        "task": config.task,
        "observation_size": int(observation_size),
        "action_size": int(action_size),
        "episode_length": int(episode_length),
        "fields": None if fields is None else list(fields),
        "step": int(step),
        "num_runs": len(runs),
        "runs": runs,
        **extra,
    }


def write(ctx, params: Any, content: Mapping[str, Any]) -> Path:
    """Saves ``params`` and then ``content`` as ``policy.json`` into ``ctx.run_dir/policy``; returns it.

    Every process takes part in the save (orbax writes each one's shards); only process 0 writes the
    JSON, through a temporary file, so a reader never sees half of it. A repeated export (a resumed run)
    replaces the previous one.
    """
    directory = Path(ctx.run_dir) / DIRECTORY
    if ctx.is_main:
        (directory / RECORD).unlink(missing_ok=True)
    checkpoint.save(directory / PARAMS, int(content["step"]), params, max_to_keep=1)
    if ctx.is_main:
        temporary = directory / f".{RECORD}.tmp"
        temporary.write_text(json.dumps(content, indent=2) + "\n")
        temporary.replace(directory / RECORD)
    return directory


def read(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's ``policy.json``, or None when the run has no (complete) export."""
    path = Path(run_dir) / DIRECTORY / RECORD
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
    except ValueError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ConfigError(f"{path}: not an exported policy of format {FORMAT}")
    return content


def load_params(run_dir: str | os.PathLike, template: Any = None) -> Any:
    """The exported parameters (leading run axis), restored into ``template``'s structure when given
    (:func:`constrained_rl.checkpoint.restore`), else as saved: nested dicts of arrays."""
    return checkpoint.restore(Path(run_dir) / DIRECTORY / PARAMS, template)
