"""Typed configs from the command line and from JSON / TOML files.

An experiment's ``Config`` is a frozen dataclass. Values arrive as text (``--key value``) or as
JSON / TOML values (a config file) and are converted to each field's declared type: ``int``,
``float``, ``bool``, ``str``, ``tuple[X, ...]`` / ``tuple[X, Y]``, ``Literal[...]`` choices,
``Optional[X]`` (``none`` / ``null`` on the command line) and nested dataclasses, addressed by
dotted keys (``--actor.learning_rate 3e-4``) or by nested tables in a file. Anything wrong raises
:class:`~constrained_rl.config.ConfigError` with a message naming the key and where it came from.

Numbers are checked in the precision they are used in: an ``int`` must fit in 64 bits, a ``seed`` in 32
(what a PRNG key holds); a ``float`` goes to the devices as float32, so NaN and finite values beyond
float32's range (or too small to be told from 0 in it) are refused, and a learning rate must be finite.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from constrained_rl.config import ConfigError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}
_INT64 = (-(2**63), 2**63 - 1)
_SEED = (0, 2**32 - 1)
_FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max
_FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32


class _OutOfRange(ConfigError):
    """A number of the right type that the precision it is used in cannot hold (not retried as another
    type of a union: the message says what is wrong)."""


@dataclasses.dataclass(frozen=True)
class Override:
    """One ``key = value`` assignment and where it came from (for error messages)."""

    key: str  # dotted field path, e.g. "actor.learning_rate"
    value: Any  # text from the command line, or a JSON/TOML value from a file
    source: str  # "--actor.learning_rate" or "config.toml: actor.learning_rate"
    from_text: bool  # True for command-line text, which is parsed rather than type-checked


def field_types(config_cls: type) -> dict[str, Any]:
    """Resolved type of every field of a config dataclass (string annotations evaluated)."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _optional_dataclass(tp: Any) -> type | None:
    """The dataclass inside ``tp`` when ``tp`` is a dataclass or ``Optional[dataclass]``."""
    if _is_dataclass_type(tp):
        return tp
    if _is_union(tp):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1 and _is_dataclass_type(inner[0]):
            return inner[0]
    return None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def sets_in_sections(config_cls: type) -> Mapping[str, Mapping[str, str]]:
    """The fields of nested sections that ``config_cls`` sets itself: section -> field -> what sets it.

    A composing config (a benchmark over methods, a collection around a behaviour learner) declares them
    in a class attribute ``sets_in_sections``; such a field is neither listed by ``--help`` nor accepted
    inside its section, so that no setting is accepted and then overwritten.
    """
    return getattr(config_cls, "sets_in_sections", {})


def all_keys(config_cls: type, prefix: str = "", omit: Mapping[str, str] | Sequence[str] = ()) -> list[str]:
    """Every settable dotted key of a config dataclass, nested dataclasses expanded."""
    keys = []
    sections = sets_in_sections(config_cls)
    for name, tp in field_types(config_cls).items():
        if name in omit:
            continue
        nested = _optional_dataclass(tp)
        if nested is None:
            keys.append(prefix + name)
        else:
            keys.extend(all_keys(nested, f"{prefix}{name}.", sections.get(name, ())))
    return keys


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def convert(value: Any, tp: Any, source: str, *, from_text: bool) -> Any:
    """Converts ``value`` to type ``tp``; raises ConfigError naming ``source`` when it cannot."""

    def refuse(expected: str) -> ConfigError:
        return ConfigError(f"{source}: expected {expected}, got {value!r}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice or (from_text and str(choice) == value):
                return choice
        raise refuse("one of " + ", ".join(repr(c) for c in choices))
    if _is_union(tp):
        options = typing.get_args(tp)
        if type(None) in options and (
            value is None or (from_text and str(value).lower() in _NONE)
        ):
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return convert(value, option, source, from_text=from_text)
            except _OutOfRange:
                raise
            except ConfigError:
                continue
        raise refuse(" or ".join(_type_name(o) for o in options))
    if origin is tuple or tp is tuple:
        return _convert_tuple(value, tp, source, from_text=from_text, refuse=refuse)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise refuse("a bool (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return _check_int(value, value, source)
        number = _parse_number(value, from_text)
        if number is not None and float(number).is_integer():
            return _check_int(int(number), value, source)
        raise refuse("an int")
    if tp is float:
        number = _parse_number(value, from_text)
        if number is None:
            raise refuse("a float")
        try:
            result = float(number)
        except OverflowError:  # an int too large even for float64
            result = math.nan
        written_inf = isinstance(value, str) and value.strip().lower().lstrip("+-") in ("inf", "infinity")
        if math.isinf(result) and isinstance(value, str) and not written_inf:
            result = math.nan  # "1e400": a finite number, too large even for float64
        if math.isnan(result) and not (isinstance(value, str) and "nan" in value.lower()):
            raise _OutOfRange(f"{source}: {value!r} is too large for float32, the precision it is used in "
                              f"(|x| <= {_FLOAT32_MAX:.4g})")
        return _check_float32(result, value, source)
    if tp is str:
        if isinstance(value, str):
            return value
        raise refuse("a string")
    if _is_dataclass_type(tp):
        raise ConfigError(f"{source}: is a group of settings; set its fields with dotted keys")
    raise ConfigError(f"{source}: fields of type {_type_name(tp)} cannot be set")


def _check_int(number: int, value: Any, source: str) -> int:
    if not _INT64[0] <= number <= _INT64[1]:
        raise _OutOfRange(f"{source}: {value} does not fit in a 64-bit integer")
    return number


def _check_float32(number: float, value: Any, source: str) -> float:
    """Refuses NaN, and finite numbers float32 turns into inf or 0 (inf itself is a value some settings take)."""
    if math.isnan(number):
        raise _OutOfRange(f"{source}: expected a number, got {value!r}")
    if math.isfinite(number) and abs(number) > _FLOAT32_MAX:
        raise _OutOfRange(f"{source}: {value!r} is too large for float32, the precision it is used in "
                          f"(|x| <= {_FLOAT32_MAX:.4g})")
    if number != 0 and abs(number) < _FLOAT32_TINY:
        raise _OutOfRange(f"{source}: {value!r} is too small for float32, the precision it is used in "
                          f"(|x| >= {_FLOAT32_TINY:.4g}, or 0)")
    return number


def _check_named(name: str, value: Any, source: str) -> None:
    """What some settings need beyond their type, by name: a seed fits a PRNG key, a learning rate is finite."""
    if name == "seed" and isinstance(value, int) and not _SEED[0] <= value <= _SEED[1]:
        raise ConfigError(f"{source}: a seed must be in [{_SEED[0]}, {_SEED[1]}] (32 bits), got {value}")
    if "learning_rate" in name and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: a learning rate must be finite, got {value}")


def _parse_number(value: Any, from_text: bool) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if from_text and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _convert_tuple(value: Any, tp: Any, source: str, *, from_text: bool, refuse) -> tuple:
    if from_text and isinstance(value, str):
        # "256,256", "[256, 256]" and "()" are all accepted on the command line.
        text = value.strip().strip("[]()").strip()
        items: Sequence[Any] = [t.strip() for t in text.split(",")] if text else []
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise refuse("a list")
    args = typing.get_args(tp)
    if not args:
        return tuple(items)
    if len(args) == 2 and args[1] is Ellipsis:
        element_types = [args[0]] * len(items)
    else:
        if len(items) != len(args):
            raise refuse(f"a list of {len(args)} items")
        element_types = list(args)
    return tuple(
        convert(item, element_type, f"{source}[{i}]", from_text=from_text)
        for i, (item, element_type) in enumerate(zip(items, element_types))
    )


def _resolve(config_cls: type, override: Override) -> tuple[list[str], Any]:
    """The field path of ``override`` and its leaf type; unknown keys suggest close matches."""
    path = override.key.split(".")
    cls = config_cls
    for depth, name in enumerate(path):
        types_here = field_types(cls)
        if name not in types_here:
            keys = all_keys(config_cls)
            close = difflib.get_close_matches(override.key, keys, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(k) for k in close)}?" if close else ""
            raise ConfigError(f"{override.source}: unknown key '{override.key}'{hint}")
        tp = types_here[name]
        if depth == len(path) - 1:
            return path, tp
        nested = _optional_dataclass(tp)
        if nested is None:
            raise ConfigError(f"{override.source}: '{name}' has no fields")
        setter = sets_in_sections(cls).get(name, {}).get(path[depth + 1])
        if setter is not None and depth + 1 == len(path) - 1:
            raise ConfigError(f"{override.source}: '{override.key}' is not settable here; it is set by {setter}")
        cls = nested
    raise AssertionError("unreachable")


def _replace_nested(config: Any, config_cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    """``dataclasses.replace`` applied recursively; validation errors get the dotted prefix."""
    changes = {}
    types_here = field_types(config_cls)
    for name, value in values.items():
        if isinstance(value, dict):
            nested_cls = _optional_dataclass(types_here[name])
            current = getattr(config, name)
            if current is None:
                current = _construct(nested_cls, f"{prefix}{name}.")
            changes[name] = _replace_nested(current, nested_cls, value, f"{prefix}{name}.")
        else:
            changes[name] = value
    try:
        return dataclasses.replace(config, **changes)
    except ConfigError as error:
        raise ConfigError(f"{prefix}{error}") from None


def _construct(config_cls: type, prefix: str = "") -> Any:
    try:
        return config_cls()
    except ConfigError as error:
        raise ConfigError(f"{prefix}{error}") from None


def build_config(config_cls: type, overrides: Sequence[Override], *, record: bool = False) -> Any:
    """The default config with ``overrides`` applied in order (later ones win), then validated.

    ``record``: the overrides are a run's own record (its config.json), every field written out, rather
    than what a user set; fields the config does not read (:func:`_refuse_if_unread`) are then accepted.
    """
    values: dict[str, Any] = {}
    for override in overrides:
        path, tp = _resolve(config_cls, override)
        if override.from_text and override.value is None:
            if tp is not bool:
                raise ConfigError(f"{override.source}: needs a value")
            converted: Any = True
        else:
            converted = convert(override.value, tp, override.source, from_text=override.from_text)
        _check_named(path[-1], converted, override.source)
        node = values
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = converted
    config = _replace_nested(_construct(config_cls), config_cls, values, "")
    for override in () if record else overrides:
        _refuse_if_unread(config, override)
    return config


def without_inactive_file_sections(config_cls: type, file_overrides: Sequence[Override],
                                   overrides: Sequence[Override]) -> list[Override]:
    """``file_overrides`` then ``overrides``, less the file's settings of the sections the run leaves
    unused (a config's ``inactive_sections``, e.g. the methods not chosen).

    One config file may hold the sizes of every method (experiments/configs/offline_cpu_tables.toml) and
    serve a run of a few of them; the same settings on the command line stay refused. The chosen
    methods are read from a config built without the file's nested settings. Should that config not
    build, nothing is dropped if the full one builds; if neither does, the first one's error is raised (it
    names the command line's mistake, not a section of the file).
    """
    everything = [*file_overrides, *overrides]
    if not hasattr(config_cls, "inactive_sections"):
        return everything
    plain = [o for o in file_overrides if "." not in o.key]
    try:
        inactive = set(build_config(config_cls, [*plain, *overrides]).inactive_sections)
    except ConfigError as error:
        try:
            build_config(config_cls, everything)
        except ConfigError:
            raise error from None
        return everything
    return [o for o in file_overrides if o.key.split(".")[0] not in inactive] + list(overrides)


def _refuse_if_unread(config: Any, override: Override) -> None:
    """A setting its section does not read under the chosen values is refused: a section may say which of
    its fields those are, and why, in a method ``unread_fields() -> {field: reason}`` (a multiplier's
    fields of other kinds)."""
    *parents, leaf = override.key.split(".")
    section = config
    for name in parents:
        section = getattr(section, name)
    reason = getattr(section, "unread_fields", dict)().get(leaf)
    if reason is not None:
        raise ConfigError(f"{override.source}: not read here ({reason})")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready nested dict of a config (tuples become lists), without the fields of a section that
    the config sets itself (:func:`sets_in_sections`): the record reads back with :func:`build_config`."""
    record = json.loads(json.dumps(dataclasses.asdict(config)))
    _drop_set_fields(type(config), record)
    return record


def _drop_set_fields(config_cls: type, record: dict[str, Any]) -> None:
    sections = sets_in_sections(config_cls)
    for name, tp in field_types(config_cls).items():
        nested = _optional_dataclass(tp)
        if nested is None or not isinstance(record.get(name), dict):
            continue
        for field in sections.get(name, {}):
            record[name].pop(field, None)
        _drop_set_fields(nested, record[name])


def flatten(mapping: Mapping[str, Any], source: str, prefix: str = "") -> list[Override]:
    """Overrides from a nested mapping (a parsed file); nested tables become dotted keys."""
    overrides = []
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            overrides.extend(flatten(value, source, f"{prefix}{key}."))
        else:
            dotted = prefix + key
            overrides.append(Override(dotted, value, f"{source}: {dotted}", from_text=False))
    return overrides


def read_mapping_file(path: str | Path) -> dict[str, Any]:
    """Parses a ``.json`` or ``.toml`` file into a dict; any problem is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        text = path.read_text()
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format (use .json or .toml)")
    except ConfigError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"{path}: cannot parse ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings at the top level")
    return data


_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.*)$")
_FIELD = re.compile(r"^\s+(\w+)\s*:\s*[^#]*=")
_COMMENT_LINE = re.compile(r"^\s+#\s?(.*)$")


def field_comments(config_cls: type) -> dict[str, str]:
    """The one-line ``# comment`` after each field (or, when there is none, the comment lines just above
    it), from the class and the config classes it extends.

    A subclass that overrides a field's default without a comment keeps its parent's comment.
    """
    comments: dict[str, str] = {}
    for cls in config_cls.__mro__:  # the most derived class first: its comments win
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        above: list[str] = []  # the comment lines just above the current line
        for line in source.splitlines():
            match = _FIELD_COMMENT.match(line)
            if match:
                comments.setdefault(match.group(1), match.group(2).strip())
            else:
                field = _FIELD.match(line)
                if field and above:
                    comments.setdefault(field.group(1), " ".join(above))
            comment = _COMMENT_LINE.match(line)
            above = above + [comment.group(1).strip()] if comment else []
    return comments


def describe_fields(config_cls: type, prefix: str = "", defaults: Any = None,
                    omit: Mapping[str, str] | Sequence[str] = ()) -> list[str]:
    """``--key (type, default value): comment`` lines for every settable key, for ``--help``.

    The fields a composing config sets in its sections (:func:`sets_in_sections`) are not listed, nor
    the sections its defaults leave unused (a property ``inactive_sections``, e.g. the settings of a
    method not among the chosen ones, which the config refuses).
    """
    lines = []
    if defaults is None:
        defaults = _construct(config_cls)
    comments = field_comments(config_cls)
    section_omits = sets_in_sections(config_cls)
    inactive = getattr(defaults, "inactive_sections", ())
    for name, tp in field_types(config_cls).items():
        if name in omit or name in inactive:
            continue
        nested = _optional_dataclass(tp)
        if nested is not None:
            lines.extend(describe_fields(nested, f"{prefix}{name}.", getattr(defaults, name),
                                         section_omits.get(name, ())))
            continue
        default = getattr(defaults, name)
        comment = comments.get(name, "")
        lines.append(f"  --{prefix}{name} ({_type_name(tp)}, default {default!r})  {comment}")
    return lines
