"""Host and device memory between the stages of a long run: what is still held, and giving the rest back.

A stage's arrays are freed when the last Python reference to them goes; the memory then returns to the
allocator, not necessarily to the operating system. On the CPU backend the buffers come from glibc's
``malloc``, which keeps freed blocks of its heap for later ``malloc`` calls: a second training stage whose
blocks do not fit the holes the first one left grows the process instead (measured in docs/llm.md: two RL
methods on a 45 MB model peak at 3.9 GB without it, 3.0 GB with it). ``malloc_trim(0)`` hands the free pages
back, so the next stage starts from the memory actually in use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import functools
from typing import Callable

import jax


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on a C library without it (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Collects unreachable Python objects (and the arrays only they held), then returns the allocator's free
    pages to the operating system where the C library can (glibc's ``malloc_trim``)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def live_array_bytes() -> int:
    """Bytes of the device buffers that live ``jax.Array`` objects hold, each buffer counted once (a shard of
    an array, as ``addressable_shards`` and checkpoint writers create, shares its array's buffer)."""
    buffers = {}
    for array in jax.live_arrays():
        if array.is_deleted():
            continue
        for shard in array.addressable_shards:
            buffers[(shard.device, shard.data.unsafe_buffer_pointer())] = shard.data.nbytes
    return sum(buffers.values())
