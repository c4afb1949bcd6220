"""An optional Weights & Biases backend beside TensorBoard: ``--wandb.project NAME``.

Off unless asked for; ``wandb`` is imported only then (``pip install wandb``, or the ``wandb`` extra).
One W&B run per run directory: every row :meth:`experiments.context.RunContext.log` writes to
metrics.jsonl and TensorBoard goes to it too, as ``<stage>/<metric>`` against its own x axis
``<stage>/step`` (stages restart their step counts), child runs' keys prefixed by their folder
(the tour's ``offline/<stage>/<metric>``). The run's config.json record is the W&B config, its
summary.json the W&B summary. W&B keeps its files in ``<run dir>/wandb/``; with the default mode
``offline`` nothing leaves the machine until ``wandb sync <run dir>/wandb/offline-run-*``.
``--resume`` with the same flags continues the same W&B run.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from constrained_rl.config import ConfigError

MODES = ("offline", "online", "disabled")
RUN_ID_FILE = "run_id"  # in <run dir>/wandb/: the W&B run a --resume continues


@dataclasses.dataclass(frozen=True)
class WandbSettings:
    """The ``--wandb.*`` runner flags."""

    project: str  # --wandb.project: the W&B project
    entity: str | None = None  # --wandb.entity: the team or user (default: W&B's default entity)
    mode: str = "offline"  # --wandb.mode: offline (sync later), online or disabled
    name: str | None = None  # --wandb.name: the run's display name (default: the run directory's name)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--wandb.mode: expected one of {', '.join(MODES)}, got {self.mode!r}")


def import_wandb() -> Any:
    """The ``wandb`` module, or a ConfigError saying how to install it."""
    try:
        return importlib.import_module("wandb")
    except ImportError:
        raise ConfigError("--wandb.project: the wandb package is not installed (pip install wandb)") from None


class WandbLogger:
    """Sends a run's logged rows, config and summary to one W&B run."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self._axes: set[str] = set()

    def log(self, prefix: str, step: int, row: Mapping[str, float]) -> None:
        """One logged row of the stage ``prefix`` (``[child/]stage``) at ``step``."""
        if prefix not in self._axes:
            self._axes.add(prefix)
            self.run.define_metric(f"{prefix}/step")
            self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
        self.run.log({f"{prefix}/step": step, **{f"{prefix}/{name}": value for name, value in row.items()}})

    def summary(self, record: Mapping[str, Any]) -> None:
        self.run.summary.update(dict(record))

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def start(settings: WandbSettings, wandb: Any, run_dir: str | Path, record: Mapping[str, Any]) -> WandbLogger:
    """Starts (or, for a run directory that had one, continues) the W&B run of ``run_dir``.

    ``record`` is config.json's ``{"experiment", "config"}``; ``wandb`` the module from
    :func:`import_wandb`.
    """
    run_dir = Path(run_dir)
    folder = run_dir / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    run = wandb.init(project=settings.project, entity=settings.entity, mode=settings.mode,
                     name=settings.name or run_dir.name, dir=str(run_dir), config=dict(record),
                     job_type=record.get("experiment"), id=run_id, resume="allow" if run_id else None)
    if run_id is None and getattr(run, "id", None):
        id_file.write_text(f"{run.id}\n")
    return WandbLogger(run)
