"""Checkpoints of whole pytrees (train states, model parameters) in the orbax format.

A thin, synchronous wrapper over ``orbax.checkpoint.CheckpointManager``: one directory holds
numbered steps, each a complete pytree saved with ``StandardSave``. The experiment loop uses it
to make runs resumable, and algorithms use it to hand models to each other (an SFT actor read by
the reward-model and RL stages, for example).

Restoring needs a *template*: a pytree with the same structure whose leaves are arrays (or
``jax.ShapeDtypeStruct``); the restored leaves take the template's shapes, dtypes and shardings, so
a state restored on a mesh is laid out exactly like a freshly initialised one.

A missing, corrupt or mismatched checkpoint raises :class:`~constrained_rl.config.ConfigError`
naming the directory, which the runner reports as one line. Saves and restores run inside
:func:`constrained_rl.interrupts.deferred`: under the runner a Ctrl-C waits until the step is committed
(or read), and a step cut short by a harder stop stays in orbax's temporary folder, which no read sees.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from constrained_rl import interrupts
from constrained_rl.config import ConfigError

PyTree = Any


def _manager(
    directory: str | os.PathLike, *, read_only: bool, max_to_keep: int | None = None
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        # Synchronous saves: when save() returns the step is committed, so an interrupt right after
        # it cannot leave a half-written latest checkpoint behind.
        enable_async_checkpointing=False,
        # Only a save may create the directory; reads never write to it.
        create=not read_only,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def latest_step(directory: str | os.PathLike) -> int | None:
    """The largest committed step in ``directory``, or ``None`` when it holds none (or is absent)."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def all_steps(directory: str | os.PathLike) -> list[int]:
    """Every committed step in ``directory``, ascending (empty when absent)."""
    if not os.path.isdir(directory):
        return []
    try:
        with _manager(directory, read_only=True) as manager:
            return sorted(manager.all_steps())
    except Exception as error:  # an unreadable folder
        raise ConfigError(f"{directory}: cannot list checkpoints ({_reason(error)})") from error


def save(
    directory: str | os.PathLike, step: int, pytree: PyTree, *, max_to_keep: int | None = None
) -> None:
    """Saves ``pytree`` as ``step`` in ``directory`` and returns once it is committed to disk.

    An existing checkpoint with the same step is replaced. With ``max_to_keep`` the oldest steps
    beyond that many are deleted.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    with interrupts.deferred():
        # What a save cut short by a hard stop left behind (orbax would replace it, with a warning).
        for partial in glob.glob(os.path.join(glob.escape(os.fspath(directory)), f"{step}.orbax-checkpoint-tmp*")):
            shutil.rmtree(partial, ignore_errors=True)
        try:
            with _manager(directory, read_only=False, max_to_keep=max_to_keep) as manager:
                if step in manager.all_steps():
                    manager.delete(step)
                manager.save(step, args=ocp.args.StandardSave(pytree))
                manager.wait_until_finished()
        except OSError as error:  # a file where the folder should be, a full disk, no permission
            raise ConfigError(f"{os.path.join(directory, str(step))}: cannot write checkpoint ({error})") from error


def _abstract(template: PyTree) -> PyTree:
    """Shape/dtype/sharding of each array leaf; other leaves (Python scalars) pass through."""

    def leaf(x: Any) -> Any:
        if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
            return ocp.utils.to_shape_dtype_struct(x)
        return x

    return jax.tree.map(leaf, template)


def restore(directory: str | os.PathLike, template: PyTree | None = None, step: int | None = None) -> PyTree:
    """Restores the pytree saved as ``step`` (default: the latest) into the structure of ``template``.

    Without a template the pytree comes back as saved: nested dicts (and lists) of arrays on the default
    device, custom node types (dataclasses, NamedTuples) read back as dicts of their fields.

    Raises:
      ConfigError: ``directory`` holds no checkpoint (or not ``step``), or the checkpoint cannot be
        read or does not match the template.
    """
    available = all_steps(directory)
    if not available:
        raise ConfigError(f"{directory}: no checkpoint found")
    if step is None:
        step = available[-1]
    elif step not in available:
        raise ConfigError(f"{directory}: no checkpoint for step {step} (steps saved: {available})")
    _quiet_closed_loop_callbacks()
    try:
        with interrupts.deferred(), _manager(directory, read_only=True) as manager:
            target = None if template is None else _abstract(template)
            return manager.restore(step, args=ocp.args.StandardRestore(target))
    except ConfigError:
        raise
    except Exception as error:  # orbax raises many types for unreadable or mismatched files
        raise ConfigError(
            f"{os.path.join(directory, str(step))}: cannot restore checkpoint ({_reason(error)})"
        ) from error


def _quiet_closed_loop_callbacks() -> None:
    """When a restore fails, the reads still in flight finish on orbax's event loop, already closed: each
    reports ``RuntimeError: Event loop is closed`` as an unraisable exception, a traceback beside the error
    reported. Those (and only those) are dropped."""
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop_callbacks", False):
        return

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook._drops_closed_loop_callbacks = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
