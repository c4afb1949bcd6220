"""Every setting of every experiment reaches the code that runs, or is refused at the door.

For each registered experiment and each key its ``--help`` lists, a value other than the default is
given; the config must then either be refused (``ConfigError``) or change what the experiment's stages
run with (``stage_configs``; of a multiplier, the fields its kind reads): a key accepted and then
overwritten or dropped fails here. Separately,
every field of every config is read somewhere in the code (a knob nothing reads fails).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from constrained_rl import envs, lagrangian
from constrained_rl.config import ConfigError
from experiments import cli, registry

ROOT = Path(__file__).resolve().parents[2]


def _candidates(default, tp) -> list:
    """A few values other than ``default`` of type ``tp``, the likeliest to be accepted first."""
    return [value for value in _values(default, tp) if value != default]


def _values(default, tp) -> list:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return [c for c in typing.get_args(tp) if c != default]
    if cli._is_union(tp):
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        values = [v for o in options for v in _candidates(default if default is not None else _zero(o), o)]
        return values + ([None] if default is not None and type(None) in typing.get_args(tp) else [])
    if tp is bool:
        return [not default]
    if tp is int:
        return [default + 1, default * 2, default - 1] if default else [1, 2]
    if tp is float:
        return [default * 1.5, default + 0.1, default / 2] if default else [0.5, 0.1]
    if tp is str:
        if default in envs.names():
            return [name for name in envs.names() if name != default][:2]
        return [default + "_other.hdf5" if default.endswith(".hdf5") else default + "x"]
    if origin is tuple or tp is tuple:
        if default:
            return [default[:-1], default + default[-1:]]
    return []


def _zero(tp):
    return {int: 0, float: 0.0, bool: False, str: ""}.get(tp)


def _leaf_type(config_cls: type, key: str):
    cls = config_cls
    for name in key.split(".")[:-1]:
        cls = cli._optional_dataclass(cli.field_types(cls)[name])
    return cli.field_types(cls)[key.split(".")[-1]]


def _default_value(config_cls: type, config, key: str):
    """The value ``key`` has in ``config`` (a section left at none counts as its class's defaults)."""
    value, cls = config, config_cls
    for name in key.split("."):
        tp = cli.field_types(cls)[name]
        value, cls = getattr(value, name), cli._optional_dataclass(tp)
        if value is None and cls is not None:
            value = cls()
    return value


def _as_read(value):
    """``value`` with each multiplier reduced to the fields its kind reads (what make_rule sees)."""
    if isinstance(value, lagrangian.MultiplierConfig):
        return (value.kind, *(getattr(value, f) for f in lagrangian.KIND_FIELDS[value.kind]))
    if dataclasses.is_dataclass(value):
        return (type(value), *(_as_read(getattr(value, f.name)) for f in dataclasses.fields(value)))
    if isinstance(value, dict):
        return {k: _as_read(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("name", list(registry.EXPERIMENTS))
def test_every_setting_reaches_a_stage_or_is_refused(name):
    experiment = registry.load(name)
    default = experiment.config_cls()
    baseline = _as_read(experiment.stage_configs(default))
    ignored = []
    for key in cli.all_keys(experiment.config_cls):
        current = _default_value(experiment.config_cls, default, key)
        for value in _candidates(current, _leaf_type(experiment.config_cls, key)):
            override = cli.Override(key, value, f"--{key}", from_text=False)
            try:
                config = cli.build_config(experiment.config_cls, [override])
            except ConfigError:
                continue  # refused: fine
            if _as_read(experiment.stage_configs(config)) == baseline:
                ignored.append(f"{key}={value!r}")
            break
    assert not ignored, f"{name}: accepted but reaching no stage: {ignored}"


def _source_text() -> str:
    files = [p for d in ("algorithms", "constrained_rl", "experiments") for p in (ROOT / d).rglob("*.py")]
    return "\n".join(p.read_text() for p in files)


def test_every_config_field_is_read_by_some_code():
    source = _source_text()
    unread = set()
    for name in registry.EXPERIMENTS:
        experiment = registry.load(name)
        for key in cli.all_keys(experiment.config_cls):
            field = key.split(".")[-1]
            # A read is an attribute access (config.field, getattr(config, "field")) or a keyword use.
            if not re.search(rf"\.{field}\b|[\"']{field}[\"']", source):
                unread.add(field)
    assert not unread, f"settings no code reads: {sorted(unread)}"


def test_a_shared_setting_is_refused_inside_a_section():
    experiment = registry.load("offline_benchmark")
    with pytest.raises(ConfigError, match="satac.task.*benchmark's --task"):
        cli.build_config(experiment.config_cls, [cli.Override("satac.task", "CarRun", "--satac.task", True)])
    assert "satac.task" not in cli.all_keys(experiment.config_cls)
    collect = registry.load("collect")
    with pytest.raises(ConfigError, match="behaviour.task.*collect's --task"):
        cli.build_config(collect.config_cls, [cli.Override("behaviour.task", "CarRun", "--behaviour.task", True)])


def test_a_comment_above_a_field_is_its_help():
    @dataclasses.dataclass(frozen=True)
    class Settings:
        # the width of the thing,
        # in metres
        width: float = 1.0
        depth: float = 2.0  # how deep

    comments = cli.field_comments(Settings)
    assert comments == {"width": "the width of the thing, in metres", "depth": "how deep"}
