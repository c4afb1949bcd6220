"""The one Matplotlib setup: Agg figures, curves with a dashed limit, saving; every figure goes through it."""

from __future__ import annotations

import types

import numpy as np
import pytest

from constrained_rl import plotting


def test_curves_limit_and_save(tmp_path) -> None:
    figure, axes = plotting.new_figure((5, 3))
    assert type(figure.canvas).__name__ == "FigureCanvasAgg"
    plotting.plot_curves(axes, {"a": ([1, 2, 3], [3.0, 2.0, 1.0]), "b": (list(range(40)), list(range(40)))},
                         ylabel="cost", title="t", limit=2.5, dot_short_series=True)
    a, b, limit = axes.get_lines()
    assert a.get_label() == "a" and a.get_marker() == "." and b.get_marker() == "None"
    assert limit.get_linestyle() == "--" and list(limit.get_ydata()) == [2.5, 2.5]
    assert limit.get_label() == "limit 2.5"
    assert axes.get_xlabel() == "step" and axes.get_ylabel() == "cost" and axes.get_title() == "t"
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["a", "b", "limit 2.5"]
    path = plotting.save(figure, tmp_path / "deep" / "er" / "x.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    _, (left, right) = plotting.new_figure((8, 3), 1, 2)
    plotting.plot_curves(left, {"only": ([0, 1], [0, 1])})
    assert left.get_legend() is None  # one line: no legend unless asked
    plotting.plot_curves(right, {"only": ([0, 1], [0, 1])}, legend=True)
    assert right.get_legend() is not None


@pytest.fixture
def saved(monkeypatch):
    paths = []
    original = plotting.save

    def recording(figure, path, dpi=100):
        paths.append((str(path), dpi))
        return original(figure, path, dpi)

    monkeypatch.setattr(plotting, "save", recording)
    return paths


def test_every_figure_of_the_project_goes_through_the_helper(tmp_path, saved) -> None:
    from algorithms.control import collect, offline_benchmark
    from algorithms.control.ppo_lag import train
    from algorithms.llm import rlhf_pipeline
    from experiments.context import RunContext

    ctx = RunContext(tmp_path / "run", progress=False)
    ctx.log(1, {"loss": 1.0})
    ctx.plot_learning_curves()
    ctx.close()
    rows = [{"step": s, "episode_reward": float(s), "episode_cost": 1.0} for s in range(3)]
    train.plot_reward_cost_curves({"runs": rows}, 25.0, tmp_path / "ppo.png")
    row = offline_benchmark.Row("BC-Safe", offline_benchmark.AVERAGE, 0.5, float("nan"), 0.5, float("nan"), True)
    offline_benchmark.plot_reward_vs_cost([row], tmp_path / "bench.png")
    episodes = types.SimpleNamespace(cost_returns=np.arange(4.0), reward_returns=np.arange(4.0))
    collect.plot_scatter(episodes, np.array([True, False, True, False]), tmp_path / "scatter.png")
    rlhf_pipeline.plot_categories(tmp_path, {"sft": [{"safe_rate/a": 0.5}]}, ("a",))
    assert saved == [(str(tmp_path / "run" / "plots" / "loss.png"), 100), (str(tmp_path / "ppo.png"), 100),
                     (str(tmp_path / "bench.png"), 110), (str(tmp_path / "scatter.png"), 100),
                     (str(tmp_path / "plots" / "safe_rate_by_category.png"), 100)]


def test_no_other_module_sets_up_matplotlib() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    users = sorted(str(p.relative_to(root)) for folder in ("algorithms", "benchmarks", "constrained_rl", "experiments")
                   for p in (root / folder).rglob("*.py") if "matplotlib" in p.read_text(encoding="utf-8"))
    assert users == ["constrained_rl/plotting.py"]
