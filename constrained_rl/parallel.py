"""Devices: meshes, sharded placement, cross-device means and multi-host start-up.

JAX's own runtime does the parallel work; this module only says where arrays live. Two patterns:

* **GSPMD (the default).** Trainers stay single-program jitted code. Their inputs are placed with a
  ``NamedSharding`` over a :class:`jax.sharding.Mesh`: batches, environments, prompts or runs split
  along the ``"data"`` axis (:func:`shard_batch`), parameters replicated (:func:`replicate`) or, for the
  language model, sharded by the model's partition rules (:func:`shard_params`: fully sharded data
  parallel on ``"fsdp"``, Megatron-style tensor parallel on ``"tp"``; :func:`shard_models` on any mesh,
  the runner's one ``"data"`` axis then playing the fsdp role, see :func:`model_rules`). ``jit`` then
  partitions the whole program (Xu et al. 2021, "GSPMD: General and Scalable Parallelization for ML
  Computation Graphs").
  Every reduction over a sharded axis becomes a cross-device reduction: a mean loss over a sharded
  batch yields the *global* mean, so its gradient is already averaged over devices, and a constraint
  estimate such as ``mean(episode_costs)`` is the global estimate, identical on every device, before
  the multiplier update reads it. No trainer code changes; only placement does.

* **shard_map (explicit collectives).** Where a step is written per device
  (:func:`data_parallel`), each device sees its shard, and the code averages what must agree:
  gradients with :func:`global_mean` (``lax.pmean``) and the constraint estimate with
  :func:`global_mean` / :func:`global_weighted_mean` *before* the multiplier update
  (:func:`synced_multiplier_update`), so every device holds the same lambda. Outputs declared
  replicated are checked by ``shard_map``: forgetting the average is an error, not a silent drift.

Multi-host (one process per host, as JAX runs on TPU pods and multi-node GPU clusters):
:func:`initialize_distributed` before any computation, :func:`is_main_process` for what only one
process writes (logs, plots, summaries), :func:`process_key` for host-local randomness, and
:func:`to_host` to read metrics that span other hosts' devices. See docs/parallelism.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from constrained_rl.config import ConfigError

PyTree = Any

DATA_AXIS = "data"  # the batch axis of data parallelism
FSDP_AXIS = "fsdp"  # parameters sharded, batch split (fully sharded data parallel)
TP_AXIS = "tp"  # attention heads and MLP columns split (tensor parallel)


# --------------------------------------------------------------------------------------------------
# Meshes


def make_mesh(
    axis_names: Sequence[str] = (DATA_AXIS,),
    shape: Sequence[int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh over ``devices`` (default: every device of every process) with the named axes.

    ``shape`` defaults to all devices on the first axis and 1 on the others, e.g.
    ``make_mesh(("fsdp", "tp"))`` on 8 devices is ``{fsdp: 8, tp: 1}``; ``shape=(4, 2)`` asks for
    4-way FSDP and 2-way tensor parallelism. One entry of ``shape`` may be -1 (inferred).

    Raises:
      ConfigError: the shape does not multiply to the number of devices, or names repeat.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(axis_names)
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"mesh: axis names must be distinct and non-empty (got {names})")
    if shape is None:
        shape = (len(devices),) + (1,) * (len(names) - 1)
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(names):
        raise ConfigError(f"mesh: shape {shape} has {len(shape)} axes but names {names} have {len(names)}")
    if shape.count(-1) == 1:
        known = math.prod(s for s in shape if s != -1)
        if known > 0 and len(devices) % known == 0:
            shape = tuple(len(devices) // known if s == -1 else s for s in shape)
    if any(s < 1 for s in shape) or math.prod(shape) != len(devices):
        raise ConfigError(f"mesh: shape {shape} does not multiply to the {len(devices)} available devices")
    # make_mesh orders devices so that neighbouring mesh positions are neighbours on the interconnect.
    # Auto axes: the compiler (GSPMD) chooses every intermediate layout from the placed inputs, so the
    # trainers run unchanged; JAX's default, Explicit axes, would make shardings part of the types.
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(shape, names, axis_types=auto, devices=devices)


def local_mesh(num_devices: int, axis_name: str = DATA_AXIS) -> Mesh:
    """A one-axis mesh over the first ``num_devices`` devices of this process."""
    available = jax.local_devices()
    if not 1 <= num_devices <= len(available):
        raise ConfigError(f"--num-devices: must be in [1, {len(available)}] on this host (got {num_devices})")
    return make_mesh((axis_name,), (num_devices,), devices=available[:num_devices])


def axis_size(mesh: Mesh, axis_names: str | Sequence[str]) -> int:
    """Number of devices along one axis or the product of several."""
    names = (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)
    return math.prod(mesh.shape[name] for name in names)


# --------------------------------------------------------------------------------------------------
# Placement


def _put(x: Any, sharding: NamedSharding) -> Any:
    """Places one array leaf (other leaves, such as Python numbers, pass through). With several
    processes each fills in only its own devices' shards from the full value it holds (every process
    computed it alike), which ``make_array_from_callback`` allows."""
    if not isinstance(x, (jax.Array, np.ndarray)):
        return x
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every leaf copied whole onto every device of ``mesh`` (``PartitionSpec()``)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: _put(x, sharding), tree)


def dims_spec(ndim: int, dims: Mapping[int, str | Sequence[str]]) -> PartitionSpec:
    """``PartitionSpec`` of an ``ndim``-dimensional array splitting each dimension in ``dims`` over the
    mesh axis (or axes) it maps to, e.g. ``{0: "runs", 1: "data"}`` -> ``P("runs", "data", None...)``."""
    entries: list[Any] = [None] * ndim
    for dim, names in dims.items():
        entries[dim] = names if isinstance(names, str) else tuple(names)
    return PartitionSpec(*entries)


def shard_dims(tree: PyTree, mesh: Mesh, dims: Mapping[int, str | Sequence[str]]) -> PyTree:
    """Splits, in every leaf, each dimension in ``dims`` over its mesh axis; the rest is replicated.

    Raises:
      ConfigError: a leaf lacks one of the dimensions, or its size is not a multiple of the devices on
        the axis: silently padding would change the means a loss or a constraint estimate computes.
    """

    def place(path: tuple[Any, ...], x: Any) -> Any:
        shape = np.shape(x)
        for dim, names in dims.items():
            devices = axis_size(mesh, names)
            if len(shape) <= dim or shape[dim] % devices:
                name = jax.tree_util.keystr(path) or "batch"
                raise ConfigError(f"{name}: dimension {dim} of shape {shape} must be a multiple of the "
                                  f"{devices} devices on mesh axis {names!r}")
        return _put(x, NamedSharding(mesh, dims_spec(len(shape), dims)))

    return jax.tree_util.tree_map_with_path(place, tree)


def shard_batch(tree: PyTree, mesh: Mesh, axis_name: str | Sequence[str] = DATA_AXIS, axis: int = 0) -> PyTree:
    """Splits dimension ``axis`` (default the leading one) of every leaf over the mesh axis ``axis_name``:
    batches, environment states ``[num_envs, ...]``, prompts (``axis=1`` for time-major ``[T, N, ...]``).
    Raises ConfigError when a size is not a multiple of the device count (see :func:`shard_dims`)."""
    return shard_dims(tree, mesh, {axis: axis_name})


def shard_runs(tree: PyTree, mesh: Mesh, axis_name: str = DATA_AXIS) -> PyTree:
    """A seed-batched (or sweep-batched) state split over its leading run axis when it divides evenly,
    replicated otherwise; each device then trains its own runs (the vmapped seeds become device-parallel).

    Leaves without a leading run axis of the common size (scalars, shared constants) are replicated.
    """
    leaves = jax.tree.leaves(tree)
    sizes = {np.shape(x)[0] for x in leaves if np.ndim(x) >= 1}
    devices = axis_size(mesh, axis_name)
    if len(sizes) != 1 or next(iter(sizes)) % devices:
        return replicate(tree, mesh)
    runs = next(iter(sizes))

    def place(x: Any) -> jax.Array:
        if np.ndim(x) >= 1 and np.shape(x)[0] == runs:
            return _put(x, NamedSharding(mesh, dims_spec(np.ndim(x), {0: axis_name})))
        return _put(x, NamedSharding(mesh, PartitionSpec()))

    return jax.tree.map(place, tree)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """``spec`` restricted to ``mesh``: axes the mesh lacks, or that do not divide a dimension, are dropped
    (that dimension is replicated), and a spec shorter than the array is padded with ``None``."""
    entries = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        names = tuple(n for n in names if n in mesh.shape)
        if names and dim % axis_size(mesh, names) == 0:
            entries.append(names[0] if len(names) == 1 else names)
        else:
            entries.append(None)
    return PartitionSpec(*entries)


def param_shardings(tree: PyTree, mesh: Mesh, rules: Sequence[tuple[str, PartitionSpec]] | None = None) -> PyTree:
    """The ``NamedSharding`` of each leaf of a language-model pytree from the model's partition rules
    (default ``constrained_rl.models.llama.PARTITION_RULES``), fitted to ``mesh`` with :func:`fit_spec`.

    Rules match the end of a leaf's path ("model/layers_0/self_attn/q_proj/kernel"), so ``tree`` may be
    the parameters or a whole train state: optimizer moments shard like their parameters, and leaves
    no rule matches (step counters, keys, multiplier states) are replicated. Rules give each weight
    matrix a spec over ``("fsdp", "tp")``; on a mesh with only ``"fsdp"`` the parameters are fully
    sharded (ZeRO-3, Rajbhandari et al. 2020) and XLA gathers each layer's weights where it is used;
    a ``"tp"`` axis also splits heads and MLP columns (Megatron-LM, Shoeybi et al. 2019).
    """
    from constrained_rl.models import llama

    rules = tuple(rules) if rules is not None else llama.PARTITION_RULES

    def sharding(path: tuple[Any, ...], x: Any) -> NamedSharding:
        name = "/".join(_key_name(k) for k in path)
        spec = next((spec for pattern, spec in rules if re.search(pattern, name)), PartitionSpec())
        return NamedSharding(mesh, fit_spec(spec, np.shape(x), mesh))

    return jax.tree_util.tree_map_with_path(sharding, tree)


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def shard_params(tree: PyTree, mesh: Mesh, rules: Sequence[tuple[str, PartitionSpec]] | None = None) -> PyTree:
    """Places language-model parameters (or a train state holding them) by :func:`param_shardings`:
    fully sharded data parallel on ``"fsdp"``, tensor parallel on ``"tp"``."""
    return jax.tree.map(_put, tree, param_shardings(tree, mesh, rules))


def model_rules(mesh: Mesh, rules: Sequence[tuple[str, PartitionSpec]] | None = None, leading_dims: int = 0
                ) -> tuple[tuple[str, PartitionSpec], ...]:
    """The language-model partition rules (default the Llama ``PARTITION_RULES``) as they apply on ``mesh``.

    The rules name two axes, ``"fsdp"`` and ``"tp"``. A mesh with an ``"fsdp"`` axis takes them as
    written. On a mesh without one, the ``"data"`` axis plays the fsdp role: parameters are split over
    the data-parallel devices, the batch over the same devices (ZeRO-3's layout), which is what the
    runner's one-axis mesh (``--num-devices``, ``--distributed``) gives every language model. Axes the
    mesh lacks (``"tp"`` there) leave their dimension replicated (:func:`fit_spec`).

    ``leading_dims`` prepends that many replicated dimensions to every spec: a seed-batched train state
    ``[S, ...]`` keeps every seed on every device, each seed's weights split like one model's.
    """
    from constrained_rl.models import llama

    rules = tuple(rules) if rules is not None else llama.PARTITION_RULES
    rename = {} if FSDP_AXIS in mesh.shape or DATA_AXIS not in mesh.shape else {FSDP_AXIS: DATA_AXIS}

    def adapt(spec: PartitionSpec) -> PartitionSpec:
        entries = []
        for entry in spec:
            names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            names = tuple(rename.get(n, n) for n in names)
            entries.append(None if not names else names[0] if len(names) == 1 else names)
        return PartitionSpec(*([None] * leading_dims), *entries)

    return tuple((pattern, adapt(spec)) for pattern, spec in rules)


def model_shardings(tree: PyTree, mesh: Mesh, leading_dims: int = 0,
                    rules: Sequence[tuple[str, PartitionSpec]] | None = None) -> PyTree:
    """:func:`param_shardings` under :func:`model_rules`: each leaf's ``NamedSharding`` (``tree`` may hold
    ``jax.ShapeDtypeStruct`` leaves, e.g. ``jax.eval_shape`` of a state builder, for ``jit``'s
    ``out_shardings``, so that a large state is created sharded instead of on one device first)."""
    return param_shardings(tree, mesh, model_rules(mesh, rules, leading_dims))


def shard_models(tree: PyTree, mesh: Mesh, leading_dims: int = 0,
                 rules: Sequence[tuple[str, PartitionSpec]] | None = None) -> PyTree:
    """Places language models, or train states holding them, fully sharded on any mesh of this project
    (:func:`model_rules`): weight matrices and their optimizer moments split over ``"fsdp"`` (or
    ``"data"``) and ``"tp"``; norms, counters, keys and multiplier states replicated."""
    return jax.tree.map(_put, tree, model_shardings(tree, mesh, leading_dims, rules))


def constrain_rows(tree: PyTree, mesh: Mesh | None, axis: int = 0) -> PyTree:
    """Inside ``jit``: asks GSPMD to split dimension ``axis`` of every leaf over the mesh's batch axes
    (``"data"`` and ``"fsdp"``, those it has), the batch layout that goes with :func:`model_rules`: each
    device computes on its rows and gathers the weights it needs. A leaf whose dimension the devices do
    not divide, or any leaf without a mesh, is left to the compiler."""
    if mesh is None:
        return tree
    names = tuple(n for n in (DATA_AXIS, FSDP_AXIS) if n in mesh.shape)

    def constrain(x: jax.Array) -> jax.Array:
        if not names or x.ndim <= axis or x.shape[axis] % axis_size(mesh, names):
            return x
        spec = dims_spec(x.ndim, {axis: names[0] if len(names) == 1 else names})
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree.map(constrain, tree)


def constrain_batch(x: jax.Array, axis_name: str | Sequence[str] = DATA_AXIS, axis: int = 0) -> jax.Array:
    """Inside ``jit`` under ``jax.set_mesh(mesh)``: asks GSPMD to split ``x``'s dimension ``axis`` over
    ``axis_name`` (``lax.with_sharding_constraint``), for batches made inside the program (prompts drawn
    from a replicated pool, minibatches gathered by a permutation). Without a mesh it is the identity."""
    mesh = jax.sharding.get_abstract_mesh()
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    if mesh.empty or any(n not in mesh.shape for n in names):
        return x
    return jax.lax.with_sharding_constraint(x, dims_spec(x.ndim, {axis: axis_name}))


# --------------------------------------------------------------------------------------------------
# Collectives for per-device (shard_map) code


def global_mean(tree: PyTree, axis_name: str | Sequence[str] = DATA_AXIS) -> PyTree:
    """``pmean`` over the mesh axis: the mean over devices of each device's value.

    With equal shard sizes the mean of per-shard means is the global mean,
    ``(1/D) sum_d (1/n) sum_{i in d} x_i = (1/(D n)) sum_i x_i``, so a per-device gradient of a mean
    loss averaged this way equals the gradient on the whole batch. For per-shard means over unequal
    counts use :func:`global_weighted_mean`.
    """
    return jax.lax.pmean(tree, axis_name)


def global_sum(tree: PyTree, axis_name: str | Sequence[str] = DATA_AXIS) -> PyTree:
    """``psum`` over the mesh axis: totals and counts across devices."""
    return jax.lax.psum(tree, axis_name)


def global_weighted_mean(total: jax.Array, count: jax.Array, axis_name: str | Sequence[str] = DATA_AXIS
                         ) -> jax.Array:
    """``sum_d total_d / max(sum_d count_d, 1)``: a mean whose per-device sample counts differ (e.g. the
    mean cost of the episodes that completed, a different number on each device); 0 with no samples."""
    total, count = global_sum((total, count), axis_name)
    return total / jnp.maximum(count, 1)


def _varying_axes(x: jax.Array) -> frozenset:
    """The mesh axes over which a value inside ``shard_map`` differs between devices (its type says)."""
    aval = jax.typeof(x)
    if hasattr(aval, "vma"):  # the attribute's name in earlier JAX releases
        return frozenset(aval.vma)
    return frozenset(getattr(getattr(aval, "mat", None), "varying", ()))


def averaged_grad(loss_fn: Callable[..., Any], axis_name: str | Sequence[str] = DATA_AXIS,
                  has_aux: bool = False) -> Callable[..., Any]:
    """``jax.grad(loss_fn)`` (w.r.t. the first argument) averaged over devices: ``pmean`` of the
    per-device gradients, the gradient of the whole-batch mean loss.

    Use inside a per-device step, ``loss_fn`` being the mean loss on this device's shard. The
    parameters are first marked device-varying (``lax.pcast``): differentiating a varying loss with
    respect to *replicated* parameters would make ``shard_map`` insert a ``psum`` itself (the transpose
    of the implicit broadcast), giving the sum over devices, not the mean.
    """
    grad_fn = jax.grad(loss_fn, has_aux=has_aux)
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)

    def to_varying(x: jax.Array) -> jax.Array:
        missing = tuple(n for n in names if n not in _varying_axes(x))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    def averaged(params: Any, *args: Any, **kwargs: Any) -> Any:
        return global_mean(grad_fn(jax.tree.map(to_varying, params), *args, **kwargs), axis_name)

    return averaged


def synced_multiplier_update(rule: Any, state: Any, local_estimate: jax.Array, limit: jax.Array | float,
                             axis_name: str | Sequence[str] = DATA_AXIS, count: jax.Array | None = None) -> Any:
    """A ``constrained_rl.lagrangian`` rule updated on the *global* constraint estimate.

    The per-device estimate (a mean over this device's shard, or with ``count`` a total over ``count``
    samples) is averaged across devices first, so every device applies the same update and holds the
    same lambda: the constrained problem solved is the one over the whole batch, not D different ones.
    """
    if count is None:
        estimate = global_mean(local_estimate, axis_name)
    else:
        estimate = global_weighted_mean(local_estimate, count, axis_name)
    return rule.update(state, estimate, limit)


def data_parallel(step: Callable[..., Any], mesh: Mesh, batch_argnums: Sequence[int],
                  axis_name: str = DATA_AXIS) -> Callable[..., Any]:
    """A jitted ``shard_map`` of ``step``: arguments in ``batch_argnums`` split along their leading
    axis over ``axis_name``, the others (parameters, optimizer and multiplier states) replicated, and
    every output replicated.

    ``step`` is written per device and must make its outputs agree across devices (average gradients
    and constraint estimates with :func:`global_mean`, :func:`averaged_grad`,
    :func:`synced_multiplier_update`); ``shard_map`` refuses an output still varying over the axis.
    """
    batch_argnums = frozenset(batch_argnums)

    def wrapped(*args: Any) -> Any:
        in_specs = tuple(PartitionSpec(axis_name) if i in batch_argnums else PartitionSpec()
                         for i in range(len(args)))
        mapped = jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec())
        return mapped(*args)

    return jax.jit(wrapped)


# --------------------------------------------------------------------------------------------------
# Processes


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """``jax.distributed.initialize``: joins this process to the others; call before any computation.

    With no arguments the cluster is detected (Cloud TPU pods, SLURM, Open MPI); otherwise all three
    are given: the coordinator ``HOST:PORT`` (process 0's host), the number of processes, and this
    process's index. On CPU the cross-process collectives use gloo.
    """
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ConfigError("--distributed: give all of --coordinator-address, --num-processes and "
                          "--process-id, or none of them (auto-detection)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id: must be in [0, {num_processes}) (got {process_id})")
    if jax.config.jax_platforms in (None, "", "cpu") and not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except ValueError as error:  # auto-detection found no cluster
        raise ConfigError(f"--distributed: {error}") from error


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes logs, plots, summaries and run metadata."""
    return jax.process_index() == 0


def process_key(key: jax.Array) -> jax.Array:
    """``fold_in(key, process_index)``: a different stream per process for host-local randomness
    (which shard of a dataset a host reads, host-side shuffles).

    Not for a jitted train state: one global program needs the *same* key on every process, since its
    randomness is already split per device by the sharded computation itself.
    """
    return jax.random.fold_in(key, jax.process_index())


def to_host(tree: PyTree) -> PyTree:
    """NumPy copies of every leaf, including arrays whose shards live on other processes' devices
    (gathered with ``process_allgather``); the same on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def fetch(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return jax.device_get(x)

    return jax.tree.map(fetch, tree)


def broadcast_text(text: str, max_bytes: int = 4096) -> str:
    """Process 0's ``text`` on every process (e.g. a run directory chosen from the clock)."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    encoded = text.encode()
    if len(encoded) > max_bytes:
        raise ValueError(f"text of {len(encoded)} bytes exceeds max_bytes={max_bytes}")
    buffer = np.zeros(max_bytes + 1, np.uint8)
    buffer[0:len(encoded)] = np.frombuffer(encoded, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return bytes(received).split(b"\0", 1)[0].decode()


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier named ``name`` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
