"""The run directory, the metrics logger and the project's one training loop.

A :class:`RunContext` is handed to every experiment's ``run(config, ctx)``. It owns the run
directory::

    config.json       the resolved config (written by the runner)
    environment.json  package versions and the code's git commit (written by the runner)
    metrics.jsonl     one row per logged step: {"stage", "step", <metric>: value, ...}
    tensorboard/      TensorBoard event files, one subfolder per stage
    checkpoints/      orbax checkpoints, one subfolder per stage, numbered by chunks completed
    plots/            a learning-curve PNG per metric (one line per stage), plus any ctx.plot()
    summary.json      what run() returned, plus the wall time (written by the runner)

:meth:`RunContext.loop` is the training loop every algorithm uses: a jitted ``chunk_fn`` runs many
updates inside ``lax.scan``; the host touches the device once per chunk to log, draw the progress
bar and checkpoint. Because a run's randomness lives in its state (PRNG keys), a run resumed from a
checkpoint reaches exactly the same result as one that was never interrupted: on resume, the rows a
stage logged after its last checkpoint (all its rows, when it has none) are dropped before they are
logged again, and a metrics.jsonl line cut short by a kill is dropped with them. A chunk whose metrics
are not finite (NaN or inf) stops the run with :class:`NonFiniteMetric`, naming the stage, the step and
the metric.

With a device mesh (``RunContext(mesh=...)``) the loop places each stage's state on it before
training (by default runs split over the ``"data"`` axis, see ``constrained_rl.parallel``), and jit
partitions the chunk accordingly. With several processes (``--distributed``) every process runs the
loop and takes part in each checkpoint (orbax writes each process's shards and process 0 commits),
but only process 0 writes metrics.jsonl, TensorBoard files and plots; the other processes keep their
rows in memory, so code that reads metrics back behaves alike everywhere.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import jax
import numpy as np

from constrained_rl import checkpoint, interrupts, parallel, plotting
from constrained_rl.config import ConfigError

State = TypeVar("State")
Reduce = Literal["mean", "last"]

METRICS_FILE = "metrics.jsonl"


def to_json_value(value: Any) -> Any:
    """Host-side JSON form of a metric or summary value: arrays become numbers or nested lists."""
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    return np.asarray(value).tolist()


def reduce_chunk_metrics(metrics: Mapping[str, Any], reduce: Reduce) -> dict[str, float]:
    """One number per metric from a chunk's host metrics.

    Each metric is a scalar or a ``[steps]`` array stacked by ``lax.scan``; ``reduce`` picks the
    mean over the chunk's steps or the value after its last step.
    """
    row = {}
    for name, value in metrics.items():
        array = np.asarray(value, dtype=np.float64)
        if array.ndim > 1:
            raise ValueError(f"metric '{name}' has shape {array.shape}; expected [] or [steps]")
        if array.ndim == 1:
            array = array.mean() if reduce == "mean" else array[-1]
        row[name] = float(array)
    return row


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "plot"


class StopRequested(KeyboardInterrupt):
    """Raised by the loop's test hook after a given number of chunks, like a Ctrl-C would be."""


class NonFiniteMetric(ConfigError):
    """A chunk's metrics hold NaN or inf (a diverged loss, parameters gone to inf): the run stops."""


def first_non_finite(metrics: Mapping[str, Any]) -> tuple[str, int, float] | None:
    """``(metric, index, value)`` of the first non-finite value among a chunk's host metrics (``index``: the
    update within the chunk, 0 for a scalar; the earliest update first, then the metric order), or None."""
    found = None
    for name, value in metrics.items():
        array = np.asarray(value, dtype=np.float64).reshape(-1)
        bad = np.flatnonzero(~np.isfinite(array))
        if bad.size and (found is None or bad[0] < found[1]):
            found = (name, int(bad[0]), float(array[bad[0]]))
    return found


_NOT_RUN_DIRS = ("checkpoints", "tensorboard", "plots", "policy", "wandb")


def saved_checkpoints(run_dir: str | Path) -> dict[str, int]:
    """Every stage with a committed checkpoint in ``run_dir`` and in the child runs inside it, with its
    latest step (chunks done): ``{"rectified": 5, "rlhf/sft/sft": 4, ...}``, a stage named by its child
    run's folder and its name. A checkpoint cut short (orbax's temporary folder) does not count."""
    run_dir = Path(run_dir)
    found: dict[str, int] = {}
    for root, dirs, _ in os.walk(run_dir):
        here = Path(root)
        if "checkpoints" in dirs:
            prefix = here.relative_to(run_dir).as_posix()
            _stage_steps(here / "checkpoints", "" if prefix == "." else prefix + "/", found)
        dirs[:] = sorted(d for d in dirs if d not in _NOT_RUN_DIRS)
    return found


def _stage_steps(directory: Path, prefix: str, found: dict[str, int]) -> None:
    for stage_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
        step = checkpoint.latest_step(stage_dir)
        if step is not None:
            found[prefix + stage_dir.name] = step
        elif not stage_dir.name[:1].isdigit():  # a stage named "a/b" is a folder a/ holding b/
            _stage_steps(stage_dir, f"{prefix}{stage_dir.name}/", found)


class RunContext:
    """Run directory, metrics logging, plots, progress bar and the chunked training loop."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        progress: bool | None = None,
        stop_after_chunks: int | None = None,
        max_checkpoints_to_keep: int = 2,
        mesh: jax.sharding.Mesh | None = None,
        wandb: Any = None,
    ) -> None:
        """
        Args:
          run_dir: the run directory (created if absent).
          progress: draw tqdm bars; ``None`` draws them only when stderr is a terminal.
          stop_after_chunks: test hook: raise :class:`StopRequested` (a KeyboardInterrupt) after
            this many chunks have run in this process, to exercise interruption and resume.
          max_checkpoints_to_keep: per stage, older checkpoints are deleted.
          mesh: devices the training states are placed on (None: JAX's default device).
          wandb: an :class:`experiments.tracking.WandbLogger` every logged row also goes to (None: off).
        """
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._progress = progress
        self._stop_after_chunks = stop_after_chunks
        self._max_checkpoints_to_keep = max_checkpoints_to_keep
        self._chunks_run = [0]  # shared with child contexts: the stop hook counts the whole run
        self._stages: set[str] = set()
        self._writers: dict[str, Any] = {}
        self.mesh = mesh
        # Only process 0 writes files; the others keep their metrics rows here.
        self.is_main = parallel.is_main_process()
        self._rows: list[dict[str, Any]] = []
        self._children: list[RunContext] = []
        self._wandb = wandb
        self._wandb_prefix = ""  # a child run's rows go to W&B as "<child>/<stage>/<metric>"
        self._stages_logged: set[str] = set()  # stages whose rows from an earlier process are settled
        if self.is_main:
            self._drop_cut_line()

    def child(self, name: str) -> "RunContext":
        """A context for a sub-run in ``<run_dir>/<name>`` (e.g. the SFT stage of a pipeline, or one half
        of a tour), with this run's settings: devices, progress bars, checkpoint retention and the
        interruption hook, which counts chunks across parent and children."""
        child = RunContext(self.run_dir / name, progress=self._progress,
                           stop_after_chunks=self._stop_after_chunks,
                           max_checkpoints_to_keep=self._max_checkpoints_to_keep, mesh=self.mesh,
                           wandb=self._wandb)
        child._chunks_run = self._chunks_run
        child._wandb_prefix = f"{self._wandb_prefix}{name}/"
        self._children.append(child)
        return child

    # Paths -----------------------------------------------------------------------------------

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    def checkpoint_dir(self, stage: str) -> Path:
        """Where ``stage``'s checkpoints live (also usable to hand a model to a later stage)."""
        return self.run_dir / "checkpoints" / stage

    def has_checkpoint(self) -> bool:
        """Whether any stage of this run directory, or of a child run inside it, has saved a checkpoint."""
        return bool(saved_checkpoints(self.run_dir))

    # Logging ---------------------------------------------------------------------------------

    def _writer(self, stage: str, purge_step: int | None = None) -> Any:
        if stage not in self._writers:
            from tensorboardX import SummaryWriter  # imported here: only runs that log need it

            self._writers[stage] = SummaryWriter(
                str(self.run_dir / "tensorboard" / _file_name(stage)), purge_step=purge_step
            )
        return self._writers[stage]

    def log(self, step: int, metrics: Mapping[str, Any], *, stage: str = "main") -> None:
        """Appends one row to metrics.jsonl and writes each scalar to TensorBoard (and W&B, when on).

        ``metrics`` must already be on the host (Python or NumPy scalars).
        """
        row = {name: float(value) for name, value in metrics.items()}
        if stage not in self._stages_logged:  # a stage outside ctx.loop has no checkpoint: rows redone
            self._forget_stage(stage, None)
        if not self.is_main:
            self._rows.append({"stage": stage, "step": int(step), **row})
            return
        with interrupts.deferred(), self.metrics_path.open("a") as file:  # a Ctrl-C never cuts a line
            file.write(json.dumps({"stage": stage, "step": int(step), **row}) + "\n")
        writer = self._writer(stage)
        for name, value in row.items():
            writer.add_scalar(f"{stage}/{name}", value, int(step))
        if self._wandb is not None:
            self._wandb.log(f"{self._wandb_prefix}{stage}", int(step), row)

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every row of metrics.jsonl, in the order written (off process 0: this process's rows)."""
        if not self.is_main:
            return list(self._rows)
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text().split("\n")
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                if number == len(lines):  # a last line without its newline: cut by a kill mid-write
                    break
                raise ConfigError(f"{self.metrics_path}: line {number} is not a JSON row") from None
            if not (isinstance(row, dict) and isinstance(row.get("stage"), str) and isinstance(row.get("step"), int)):
                raise ConfigError(f"{self.metrics_path}: line {number} is not a row with a stage and a step")
            rows.append(row)
        return rows

    def _drop_cut_line(self) -> None:
        """Drops a last line of metrics.jsonl without its newline (a kill mid-write), so that the next row
        starts a line of its own; it belongs to a chunk after the last checkpoint, which is redone."""
        try:
            with self.metrics_path.open("rb+") as file:
                data = file.read()
                if data and not data.endswith(b"\n"):
                    file.truncate(data.rfind(b"\n") + 1)
        except FileNotFoundError:
            pass

    def _drop_rows_after(self, stage: str, step: int | None) -> None:
        """Forgets ``stage``'s rows past ``step`` (all of them for ``None``): they are recomputed after a resume."""
        rows = self.read_metrics()
        kept = [r for r in rows if r["stage"] != stage or (step is not None and r["step"] <= step)]
        if not self.is_main:
            self._rows = kept
        elif len(kept) != len(rows):
            partial = self.metrics_path.with_name(METRICS_FILE + ".tmp")
            with interrupts.deferred():  # the new file replaces the old one whole, or not at all
                with partial.open("w") as file:
                    file.writelines(json.dumps(r) + "\n" for r in kept)
                os.replace(partial, self.metrics_path)

    def _forget_stage(self, stage: str, step: int | None) -> None:
        """Before this process logs ``stage``'s first row: the rows an earlier process logged after the stage's
        last checkpoint ``step`` are dropped, all of them (and its TensorBoard events) when it has none."""
        self._stages_logged.add(stage)
        self._drop_rows_after(stage, step)
        events = self.run_dir / "tensorboard" / _file_name(stage)
        if step is None and self.is_main and stage not in self._writers and events.is_dir():
            shutil.rmtree(events)

    # Plots -----------------------------------------------------------------------------------

    def plot(
        self,
        name: str,
        series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
        *,
        xlabel: str = "step",
        ylabel: str | None = None,
    ) -> Path:
        """Draws ``series`` (label -> (xs, ys)) as lines into plots/<name>.png and returns the path.

        Off process 0 nothing is drawn; the path is returned all the same.
        """
        path = self.run_dir / "plots" / f"{_file_name(name)}.png"
        if not self.is_main:
            return path
        figure, axes = plotting.new_figure((6, 4))
        plotting.plot_curves(axes, series, xlabel=xlabel, ylabel=ylabel or name, title=name,
                             dot_short_series=True)
        return plotting.save(figure, path)

    def plot_learning_curves(self) -> list[Path]:
        """One PNG per logged metric, one line per stage that logged it (last row per step wins), in
        plots/ of this run and of each child run (each stage of a multi-stage run gets its curves)."""
        curves: dict[str, dict[str, dict[int, float]]] = {}
        for row in self.read_metrics():
            for name, value in row.items():
                if name not in ("stage", "step"):
                    curves.setdefault(name, {}).setdefault(row["stage"], {})[row["step"]] = value
        paths = []
        for name, by_stage in curves.items():
            series = {
                stage: (sorted(points), [points[s] for s in sorted(points)])
                for stage, points in by_stage.items()
            }
            paths.append(self.plot(name, series))
        for child in self._children:
            paths.extend(child.plot_learning_curves())
        return paths

    # The training loop -----------------------------------------------------------------------

    def loop(
        self,
        stage: str,
        init_state_fn: Callable[[], State],
        chunk_fn: Callable[[State], tuple[State, Mapping[str, Any]]],
        num_chunks: int,
        *,
        steps_per_chunk: int = 1,
        checkpoint_every: int = 10,
        reduce: Reduce = "mean",
        progress_keys: Sequence[str] | None = None,
        placement: Callable[[State, jax.sharding.Mesh], State] | None = None,
    ) -> State:
        """Runs ``chunk_fn`` ``num_chunks`` times from ``init_state_fn()``; returns the final state.

        Args:
          stage: a name unique within the run (e.g. "sft", "reward_model", "rl"); it names the
            checkpoint folder and prefixes the logged metrics.
          init_state_fn: builds the initial state (PRNG keys included). On resume it is called
            too, and its result is the template the checkpoint is restored into.
          chunk_fn: jitted ``state -> (state, metrics)`` running ``steps_per_chunk`` updates in
            ``lax.scan``; metrics are scalars or ``[steps_per_chunk]`` arrays.
          num_chunks: how many chunks the stage runs in all (counting chunks before a resume).
          steps_per_chunk: updates per chunk; logged steps are ``chunks_done * steps_per_chunk``.
          checkpoint_every: save the whole state every this many chunks, and after the last.
          reduce: how a chunk's per-step metrics become one logged value ("mean" or "last").
          progress_keys: the metrics shown on the progress bar (default: the first four).
          placement: ``(state, mesh) -> state`` laying the state out on ``ctx.mesh`` (default
            ``parallel.shard_runs``: a leading run axis split over "data" when it divides evenly,
            else replicated); unused without a mesh.

        A stage whose checkpoint says it has finished is restored and skipped; a stage with an
        earlier checkpoint continues from it, so multi-stage pipelines resume where they stopped.
        """
        if stage in self._stages:
            raise ValueError(f"stage '{stage}' already ran in this run; stage names must be unique")
        if num_chunks < 1 or steps_per_chunk < 1 or checkpoint_every < 1:
            raise ValueError("num_chunks, steps_per_chunk and checkpoint_every must be >= 1")
        self._stages.add(stage)
        directory = self.checkpoint_dir(stage)
        state = init_state_fn()
        if self.mesh is not None:
            # The template is placed first, so a restored state takes the same layout.
            state = (placement or parallel.shard_runs)(state, self.mesh)
        start = checkpoint.latest_step(directory) or 0
        if start:
            state = checkpoint.restore(directory, state, start)
            if start >= num_chunks:
                self._stages_logged.add(stage)
                return state
            self._forget_stage(stage, start * steps_per_chunk)
            if self.is_main:
                self._writer(stage, purge_step=start * steps_per_chunk + 1)
        elif stage not in self._stages_logged:  # (rows logged before the loop in this process are kept)
            self._forget_stage(stage, None)

        from tqdm import tqdm  # the bar draws on stderr, and only on a terminal by default

        disable = (None if self._progress is None else not self._progress) if self.is_main else True
        with tqdm(total=num_chunks, initial=start, desc=stage, unit="chunk", disable=disable) as bar:
            for chunk in range(start, num_chunks):
                state, metrics = chunk_fn(state)
                # The one device-to-host transfer of the chunk (gathered from every process's devices).
                host_metrics = parallel.to_host(metrics)
                bad = first_non_finite(host_metrics)
                if bad is not None:
                    name, index, value = bad
                    at = chunk * steps_per_chunk + (index + 1 if np.ndim(host_metrics[name]) else steps_per_chunk)
                    raise NonFiniteMetric(
                        f"{self.run_dir}: stage '{stage}', step {at}: metric '{name}' is {value} (training "
                        f"diverged; a smaller learning rate or step size may help)")
                row = reduce_chunk_metrics(host_metrics, reduce)
                done = chunk + 1
                self.log(done * steps_per_chunk, row, stage=stage)
                keys = progress_keys if progress_keys is not None else list(row)[:4]
                bar.set_postfix({k: _short(row[k]) for k in keys if k in row}, refresh=False)
                bar.update(1)
                if done % checkpoint_every == 0 or done == num_chunks:
                    checkpoint.save(directory, done, state, max_to_keep=self._max_checkpoints_to_keep)
                self._chunks_run[0] += 1
                if self._stop_after_chunks is not None and self._chunks_run[0] >= self._stop_after_chunks:
                    raise StopRequested(f"stopped after {self._chunks_run[0]} chunks")
                interrupts.check()  # a Ctrl-C that a library swallowed during the chunk stops the run here
        return state

    def close(self) -> None:
        """Flushes and closes the TensorBoard writers, this context's and its children's."""
        for child in self._children:
            child.close()
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def _short(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return str(value)
    return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"
