"""Ctrl-C that never cuts a write in half.

The runner (``experiments/run.py``) calls :func:`install` first thing. From then on:

* the first SIGINT raises ``KeyboardInterrupt`` in the main thread, as Python's own handler does, except
  inside a :func:`deferred` block (a checkpoint being committed, a metrics row being appended), where it
  waits until the block ends; raised where Python drops exceptions (a garbage-collector callback such as
  JAX's, a ``__del__``), it is not printed but delivered again a moment later;
* :func:`check` raises ``KeyboardInterrupt`` again once an interrupt has been asked for, so that an
  interrupt a library swallowed still stops the run at the next safe point, and :func:`requested` tells
  the runner that whatever exception ended the run came from a Ctrl-C;
* a second SIGINT ends the process at once with exit code :data:`EXIT_CODE` and one line on stderr
  (:func:`set_note` says what it adds about the run directory).

Without :func:`install` (library use, notebooks, tests) :func:`deferred` and :func:`check` do nothing, and
Ctrl-C behaves as Python's default.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C

_installed = False
_requested = False  # a SIGINT arrived since install()
_pending = False  # ... inside a deferred block, not raised yet
_depth = 0  # nesting of deferred blocks (and of install's hold)
_note = ""  # what the second Ctrl-C's line says about the run directory
_ended = ""  # set by end(): what a Ctrl-C's line says while the process exits
_previous_hook: Any = None  # sys.unraisablehook before install()
_previous_excepthook: Any = None  # sys.excepthook before install()
_previous_alarm: Any = None  # the SIGALRM handler before a KeyboardInterrupt had to be delivered again


def _handle(signum: int, frame: Any) -> None:
    global _requested
    if _requested or _ended:
        line = (_ended or "interrupted again: stopped at once" + (f"; {_note}" if _note else "")) + "\n"
        try:
            sys.stdout.flush()
        except Exception:  # stdout may be closed or broken; the line on stderr matters more
            pass
        os.write(2, line.encode(errors="replace"))
        os._exit(EXIT_CODE)
    _requested = True
    _deliver()


def _deliver() -> None:
    global _pending
    if _depth > 0:
        _pending = True
        return
    raise KeyboardInterrupt


def _redeliver(signum: int, frame: Any) -> None:
    if _installed and _requested and not _ended:
        _deliver()


def _unraisable(unraisable: Any) -> None:
    """A KeyboardInterrupt raised where Python cannot raise it (a garbage-collector callback, a ``__del__``)
    is printed and dropped: instead, it is delivered again a moment later (SIGALRM), in code that can."""
    global _previous_alarm
    if (_installed and isinstance(unraisable.exc_value, KeyboardInterrupt) and hasattr(signal, "setitimer")
            and threading.current_thread() is threading.main_thread()):
        if _previous_alarm is None:  # SIGALRM is taken only when needed, and given back by uninstall()
            _previous_alarm = signal.signal(signal.SIGALRM, _redeliver)
        signal.setitimer(signal.ITIMER_REAL, 0.005)
        return
    (_previous_hook or sys.__unraisablehook__)(unraisable)


def _excepthook(kind: type, value: BaseException, traceback: Any) -> None:
    """Extension modules print an exception raised while they import (numpy's, during ``import jax``), and
    go on with an ImportError: a KeyboardInterrupt is not printed, the runner reports it."""
    if _installed and issubclass(kind, KeyboardInterrupt):
        return
    (_previous_excepthook or sys.__excepthook__)(kind, value, traceback)


def install(*, hold: bool = False) -> Any:
    """Takes over SIGINT; returns the handler it replaced (pass it to :func:`uninstall`).

    With ``hold`` a Ctrl-C waits (as in a :func:`deferred` block) until :func:`release` is called: the
    handler can be installed before the code that handles the interrupt has been imported. Installing
    again while installed (or off the main thread, where signal handlers cannot be set) does nothing and
    returns ``None``.
    """
    global _installed, _requested, _pending, _depth, _note, _ended, _previous_hook, _previous_excepthook
    if _installed or threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.signal(signal.SIGINT, _handle)
    _previous_hook, sys.unraisablehook = sys.unraisablehook, _unraisable
    _previous_excepthook, sys.excepthook = sys.excepthook, _excepthook
    _installed, _requested, _pending, _note, _ended = True, False, False, "", ""
    _depth = 1 if hold else 0
    return previous


def release() -> None:
    """Ends :func:`install`'s hold; raises ``KeyboardInterrupt`` if a Ctrl-C came meanwhile."""
    global _depth
    if _installed and _depth > 0:
        _depth -= 1
        _raise_pending()


def uninstall(previous: Any) -> None:
    """Puts back the handler :func:`install` returned (nothing when it returned ``None``)."""
    global _installed, _requested, _pending, _depth, _note, _ended
    global _previous_hook, _previous_alarm, _previous_excepthook
    if previous is None:
        return
    signal.signal(signal.SIGINT, previous)
    if sys.unraisablehook is _unraisable:
        sys.unraisablehook = _previous_hook
    if sys.excepthook is _excepthook:
        sys.excepthook = _previous_excepthook
    if _previous_alarm is not None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, _previous_alarm)
    _installed, _requested, _pending, _depth, _note, _ended = False, False, False, 0, "", ""
    _previous_hook = _previous_alarm = _previous_excepthook = None


def end(line: str) -> None:
    """The program has done its work (and reported any interrupt): nothing is raised any more, and a Ctrl-C
    while the process exits prints ``line`` and ends it at once."""
    global _ended
    if _installed:
        _ended = line
        if _previous_alarm is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)


def requested() -> bool:
    """Whether a Ctrl-C arrived since :func:`install`."""
    return _requested


def set_note(note: str) -> None:
    """What the line of a second Ctrl-C adds (e.g. what the run directory keeps); ``""`` for nothing."""
    global _note
    _note = note


def check() -> None:
    """Raises ``KeyboardInterrupt`` when a Ctrl-C has been asked for (outside any deferred block)."""
    if _installed and _requested and _depth == 0 and not _ended:
        raise KeyboardInterrupt


def _raise_pending() -> None:
    global _pending
    if _depth == 0 and _pending:
        _pending = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block a first Ctrl-C does not cut: the interrupt is raised when the block ends (a second Ctrl-C
    still stops the process at once)."""
    global _depth
    if not _installed:
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    _raise_pending()  # only when the block ended normally: an exception already on its way goes on
