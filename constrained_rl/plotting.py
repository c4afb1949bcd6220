"""The one Matplotlib setup of the project: figures on the Agg canvas, curves, saving.

Every figure the code writes (learning curves in run directories, benchmark and dataset plots) goes
through these three functions::

    figure, axes = plotting.new_figure((6, 4))
    plotting.plot_curves(axes, {"run": (steps, values)}, ylabel="episode cost", limit=25.0)
    plotting.save(figure, run_dir / "plots" / "cost.png")

Figures are :class:`matplotlib.figure.Figure` objects drawn on the Agg canvas: no pyplot state, no
global backend choice and no display, so plotting works on headless machines and from threads, and
a figure is freed like any other object (there is no pyplot registry to close it in). Layout is
Matplotlib's constrained layout, which sizes the margins to the labels at save time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Series shorter than this are drawn with a dot at each point (a few evaluations read better so).
DOTTED_BELOW = 30


def new_figure(figsize: tuple[float, float] = (6, 4), nrows: int = 1, ncols: int = 1) -> tuple[Any, Any]:
    """A figure on the Agg canvas with constrained layout, and its axes: one ``Axes`` for a 1x1 grid,
    else the ``nrows x ncols`` array (squeezed like ``Figure.subplots``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot() if nrows == ncols == 1 else figure.subplots(nrows, ncols)
    return figure, axes


def plot_curves(
    axes: Any,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str = "step",
    ylabel: str | None = None,
    title: str | None = None,
    limit: float | None = None,
    limit_label: str | None = None,
    dot_short_series: bool = False,
    legend: bool | None = None,
) -> None:
    """Draws ``series`` (label -> (xs, ys)) as lines on ``axes``, in order.

    Args:
      limit: a horizontal dashed black line at this value (a cost limit), labelled ``limit_label``
        (default ``"limit <value>"``).
      dot_short_series: mark each point of a series shorter than :data:`DOTTED_BELOW` points.
      legend: draw the legend; ``None``: only when there is more than one labelled line.
    """
    for label, (xs, ys) in series.items():
        marker = "." if dot_short_series and len(xs) < DOTTED_BELOW else None
        axes.plot(xs, ys, label=label, marker=marker)
    if limit is not None:
        axes.axhline(limit, color="black", linestyle="--",
                     label=limit_label if limit_label is not None else f"limit {limit:g}")
    axes.set_xlabel(xlabel)
    if ylabel is not None:
        axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    if legend if legend is not None else len(series) + (limit is not None) > 1:
        axes.legend()


def save(figure: Any, path: str | Path, dpi: int = 100) -> Path:
    """Writes ``figure`` to ``path`` (parent folders created) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path
