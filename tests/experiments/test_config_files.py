"""A config file holding every method's sections serves a run of a few methods."""

from __future__ import annotations

from pathlib import Path

import pytest

from algorithms.control import offline_benchmark as bench
from constrained_rl.config import ConfigError
from experiments import cli
from experiments import run as runner

TABLES = str(Path(runner.__file__).parent / "configs" / "offline_cpu_tables.toml")


def text(key: str, value: str) -> cli.Override:
    return cli.Override(key, value, f"--{key}", from_text=True)


def build(*command_line: cli.Override) -> bench.Config:
    overrides = cli.without_inactive_file_sections(
        bench.Config, runner._file_overrides(TABLES, "offline_benchmark"), command_line)
    return cli.build_config(bench.Config, overrides)


def test_the_file_s_sections_of_methods_not_chosen_are_dropped():
    config = build(text("methods", "bc_safe,satac"))
    assert config.methods == ("bc_safe", "satac") and config.cpq is None and config.cdt is None
    assert bench.method_config(config, "satac").hidden_sizes == (64, 64, 64)  # the chosen keep the file's
    assert bench.method_config(config, "bc_safe").hidden_sizes == (64, 64)
    assert config.num_updates == 4000


def test_the_same_section_on_the_command_line_is_still_refused():
    with pytest.raises(ConfigError, match="settings for cpq, which is not among methods"):
        build(text("methods", "bc_safe"), text("cpq.actor_hidden_sizes", "8"))


def test_without_methods_every_section_of_the_file_applies():
    config = build()
    assert bench.method_config(config, "cpq").actor_hidden_sizes == (64, 64)
