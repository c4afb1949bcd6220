"""A narrowly scoped fix that lets Brax 0.14.2's fluid forces run on JAX versions without ``jnp.clip(a_min=...)``.

Brax 0.14.2 computes the drag of bodies moving through a viscous or dense medium in ``brax/fluid.py``,
whose ``force`` calls ``jax.numpy.clip(x, a_min=1e-12)`` (line 73). JAX deprecated the ``a_min`` / ``a_max``
keywords of ``clip`` during the 0.4 series in favour of ``min`` / ``max`` and later removed them (JAX 0.10.2, as
installed here, raises ``TypeError: clip() got an unexpected keyword argument 'a_min'``). Only systems
with fluid enabled (``sys.enable_fluid``: a nonzero viscosity or density) reach that line: of the velocity
tasks, the swimmer.

:func:`install` rebinds the name ``jp`` inside the module ``brax.fluid`` (and nowhere else) to a proxy
that forwards every attribute to ``jax.numpy`` except ``clip``, which translates the old keywords to the
new ones. ``jax.numpy`` itself is untouched, so no other code sees a difference. The fix is a no-op when
the installed ``clip`` still accepts ``a_min`` or when ``brax.fluid`` no longer uses the name ``jp``.
"""

from __future__ import annotations

import inspect
import types

import jax.numpy as jnp


def clip_accepting_a_min(x, a_min=None, a_max=None, *, min=None, max=None):  # noqa: A002
    """``jnp.clip`` that also takes the removed ``a_min`` / ``a_max`` keywords (mapped to ``min`` / ``max``)."""
    lower = min if a_min is None else a_min
    upper = max if a_max is None else a_max
    return jnp.clip(x, min=lower, max=upper)


class _NumpyWithOldClip(types.ModuleType):
    """``jax.numpy`` with ``clip`` replaced by :func:`clip_accepting_a_min`."""

    def __init__(self) -> None:
        super().__init__("jax.numpy (clip accepting a_min/a_max)")
        self.clip = clip_accepting_a_min

    def __getattr__(self, name: str):
        return getattr(jnp, name)


def clip_needs_shim() -> bool:
    """True when the installed ``jnp.clip`` no longer accepts ``a_min``."""
    return "a_min" not in inspect.signature(jnp.clip).parameters


def install() -> bool:
    """Gives ``brax.fluid`` the clip-translating proxy as its ``jp``; returns whether it did anything."""
    from brax import fluid

    current = getattr(fluid, "jp", None)
    if not clip_needs_shim() or current is None or isinstance(current, _NumpyWithOldClip):
        return False
    fluid.jp = _NumpyWithOldClip()
    return True
