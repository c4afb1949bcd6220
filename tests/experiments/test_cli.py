import dataclasses
import typing

from algorithms.control import offline_benchmark
from experiments.cli import describe_fields, field_comments


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
    help_omits: typing.ClassVar[dict[str, tuple[str, ...]]] = {"first": ("seed",)}


def test_help_leaves_out_what_a_section_takes_from_the_top_level():
    keys = [line.split()[0] for line in describe_fields(WithSections)]
    assert keys == ["--seed", "--first.width", "--second.seed", "--second.width"]
    benchmark = [line.split()[0] for line in describe_fields(offline_benchmark.Config)]
    assert "--task" in benchmark and "--satac.beta" in benchmark
    assert not [key for key in benchmark if key.startswith("--satac.") and key[8:] in offline_benchmark.SHARED_FIELDS]
    assert not [key for key in benchmark if key.startswith("--cpq.collect.")]
