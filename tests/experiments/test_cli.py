import dataclasses
import typing

import pytest

from algorithms.control import offline_benchmark
from constrained_rl.config import ConfigError
from experiments.cli import Override, all_keys, build_config, describe_fields, field_comments


@dataclasses.dataclass(frozen=True)
class Parent:
    steps: int = 10  # how many steps
    rate: float = 0.1  # step size


@dataclasses.dataclass(frozen=True)
class Child(Parent):
    steps: int = 20
    rate: float = 0.5  # a larger step size


def test_field_comments_fall_back_to_the_parent_class():
    comments = field_comments(Child)
    assert comments["steps"] == "how many steps"
    assert comments["rate"] == "a larger step size"


@dataclasses.dataclass(frozen=True)
class Section:
    seed: int = 0  # set at the top level
    width: int = 64  # the section's own setting


@dataclasses.dataclass(frozen=True)
class WithSections:
    seed: int = 0  # base seed
    first: Section | None = None  # one section
    second: Section = dataclasses.field(default_factory=Section)  # another
    sets_in_sections: typing.ClassVar[dict[str, dict[str, str]]] = {"first": {"seed": "--seed"}}


def test_help_leaves_out_what_a_section_takes_from_the_top_level():
    keys = [line.split()[0] for line in describe_fields(WithSections)]
    assert keys == ["--seed", "--first.width", "--second.seed", "--second.width"]
    benchmark = [line.split()[0] for line in describe_fields(offline_benchmark.Config)]
    assert "--task" in benchmark and "--satac.beta" in benchmark
    assert not [key for key in benchmark if key.startswith("--satac.") and key[8:] in offline_benchmark.SHARED_FIELDS]
    assert not [key for key in benchmark if key.startswith("--cpq.collect.")]
    assert all_keys(WithSections) == ["seed", "first.width", "second.seed", "second.width"]
    with pytest.raises(ConfigError, match="first.seed.*set by --seed"):
        build_config(WithSections, [Override("first.seed", "3", "--first.seed", from_text=True)])


# Every learner's multiplier is one MultiplierConfig section: the same keys on every command line.

LEARNERS_WITH_A_MULTIPLIER = ("ppo_lag", "ppo", "satac", "atac", "bcq_lag", "bear_lag", "constrained_bandit")
# Sections that take only some kinds: RePO offers fixed or log-space ascent, shaping is a constant lambda.
REFUSED_KINDS = {"repo.multiplier": {"projected_ascent", "pid"},
                 "shaping_multiplier": {"log_ascent", "projected_ascent", "pid"}}


def _multiplier_sections(config_cls: type, prefix: str = "") -> list[str]:
    """The dotted path of every MultiplierConfig in a config class, nested sections included."""
    from constrained_rl import lagrangian

    sections = []
    for name, tp in typing.get_type_hints(config_cls).items():
        if name not in {f.name for f in dataclasses.fields(config_cls)}:
            continue
        for option in [a for a in typing.get_args(tp) if a is not type(None)] or [tp]:
            if option is lagrangian.MultiplierConfig:
                sections.append(prefix + name)
            elif isinstance(option, type) and dataclasses.is_dataclass(option):
                sections.extend(_multiplier_sections(option, f"{prefix}{name}."))
    return sections


def _text(key: str, value: str) -> Override:
    return Override(key, value, f"--{key}", from_text=True)


@pytest.mark.parametrize("name", LEARNERS_WITH_A_MULTIPLIER)
def test_every_learner_with_a_multiplier_takes_its_kind_and_init_from_the_command_line(name):
    from constrained_rl import lagrangian
    from experiments import registry

    config_cls = registry.load(name).config_cls
    default = config_cls().multiplier
    config = build_config(config_cls, [_text("multiplier.kind", "pid"), _text("multiplier.init", "10")])
    assert config.multiplier == dataclasses.replace(default, kind="pid", init=10.0)
    assert float(lagrangian.multiplier(lagrangian.make_rule(config.multiplier).init())) == 10.0
    with pytest.raises(ConfigError, match="^multiplier.init: "):
        build_config(config_cls, [_text("multiplier.init", "-1")])
    with pytest.raises(ConfigError, match="--multiplier.kind: expected one of"):
        build_config(config_cls, [_text("multiplier.kind", "ascent")])
    help_lines = {line.split()[0]: line for line in describe_fields(config_cls)}
    for key in ("kind", "init", "max", "learning_rate", "kp", "ki", "kd"):
        assert help_lines[f"--multiplier.{key}"].split(")", 1)[1].strip(), key  # a help text after the default


def test_every_multiplier_section_of_every_experiment_takes_every_kind():
    from experiments import registry

    seen = set()
    for name in registry.EXPERIMENTS:
        config_cls = registry.load(name).config_cls
        for section in _multiplier_sections(config_cls):
            try:  # a section the experiment refuses settings in (a method not among its methods, a shared one)
                build_config(config_cls, [_text(f"{section}.init", "0.5")])
            except ConfigError:
                continue
            seen.add(section)
            refused = next((kinds for end, kinds in REFUSED_KINDS.items() if section.endswith(end)), set())
            for kind in ("fixed", "log_ascent", "projected_ascent", "pid"):
                overrides = [_text(f"{section}.kind", kind), _text(f"{section}.init", "0.5")]
                if kind in refused:
                    with pytest.raises(ConfigError, match=f"{section}.kind: "):
                        build_config(config_cls, overrides)
                    continue
                config = build_config(config_cls, overrides)
                for part in section.split("."):
                    config = getattr(config, part)
                assert (config.kind, config.init) == (kind, 0.5), (name, section)
    assert {"multiplier", "alpha", "behaviour.multiplier", "satac.multiplier", "cpq.alpha", "repo.multiplier",
            "safe_rlhf.multiplier", "shaping_multiplier", "offline.satac.multiplier"} <= seen
