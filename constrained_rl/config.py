"""Typed-config validation shared by every algorithm and the experiment runner.

A config is a frozen dataclass whose ``__post_init__`` calls :func:`require` for
each constraint on its fields. A violated constraint raises :class:`ConfigError`
naming the field, which the runner reports as one line with exit code 2.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple


class ConfigError(ValueError):
    """A config value, file or name is invalid. The message says which and why."""


def require(condition: bool, field: str, message: str) -> None:
    """Raises ``ConfigError("field: message")`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


def require_if_concrete(values: tuple, condition, field: str, message: str) -> None:
    """:func:`require` for hyperparameters that may arrive traced.

    A sweep may vmap a primitive over its hyperparameters; traced values cannot be checked on the
    host and are left to the caller. ``condition`` is a zero-argument callable, evaluated only when
    every one of ``values`` is a concrete (host) value.
    """
    import jax  # deferred: the config module stays importable without initialising JAX

    if not any(isinstance(v, jax.core.Tracer) for v in values):
        require(bool(condition()), field, message)


def require_positive_integers(config: object, *fields: str) -> None:
    """:func:`require` that each named field of ``config`` is an integer >= 1."""
    for field in fields:
        value = getattr(config, field)
        require(isinstance(value, int) and value >= 1, field, f"must be an integer >= 1 (got {value!r})")


class Experiment(NamedTuple):
    """What the experiment registry names: a config class and the function that runs it.

    ``run(config, ctx) -> summary``. An experiment that composes others (a benchmark over methods, a
    collection around a behaviour learner, a tour) also gives ``stage_configs(config) -> {stage: config}``,
    the configs its stages actually run with, so that a test can check every setting reaches one.
    """

    Config: type  # a frozen dataclass whose fields are the experiment's settings
    run: Callable[[Any, Any], dict]  # run(config, ctx) -> summary figures
    stage_configs: Callable[[Any], dict[str, Any]] | None = None  # composed experiments only
