"""The front door: ``python -m experiments.run [NAME] [--key value ...]``, installed as the command
``constrained-rl`` (the same verbs: ``constrained-rl --list``, ``constrained-rl NAME --help``, ...).

Usage::

    python -m experiments.run                       # the default experiment, default config
    python -m experiments.run --list                # one line per experiment
    python -m experiments.run NAME --help           # NAME's settings, types, defaults
    python -m experiments.run NAME --seed 3 --actor.learning_rate 3e-4
    python -m experiments.run NAME --config my.toml --num_steps 1000   # command line wins
    python -m experiments.run NAME --run-dir runs/mine
    python -m experiments.run --resume runs/NAME-20250101-120000
    python -m experiments.run NAME --num-devices 8           # runs split over 8 local devices
    python -m experiments.run NAME --distributed --run-dir DIR     # one process per host, all devices
    python -m experiments.run NAME --wandb.project P         # also log to Weights & Biases (offline)

Bad input (unknown experiment or key, ill-typed or refused value, unreadable file, nothing to
resume, a run directory in use or not this run's) is reported as one ``error: ...`` line on stderr with
exit code 2. Ctrl-C, at any moment, exits with code 130 and one line saying what the run directory keeps:
its committed checkpoints (``--resume`` continues from them; a checkpoint being written is finished
first), or nothing. A new run that stops (refused, interrupted, failed) before its first checkpoint
leaves the file system as it found it (experiments/rundir.py), so the same command can be run again. A
second Ctrl-C stops at once.

``--distributed`` calls ``jax.distributed.initialize`` before anything else (the cluster is detected
on Cloud TPU and SLURM; elsewhere give ``--coordinator-address HOST:PORT --num-processes N
--process-id I``); every process runs the same program over one mesh of all devices, and only
process 0 writes config.json, environment.json, metrics, plots and summary.json (docs/parallelism.md).

``--wandb.project NAME`` (with ``--wandb.entity``, ``--wandb.mode``, ``--wandb.name``) sends every
logged metric, the config and the summary to a Weights & Biases run as well (experiments/tracking.py);
like ``--run-dir`` these are settings of the runner, not of the experiment, and are not recorded in
config.json.
"""

from __future__ import annotations

from constrained_rl import interrupts

if __name__ == "__main__":  # python -m experiments.run: a Ctrl-C during the imports waits for main()
    interrupts.install(hold=True)

import dataclasses  # noqa: E402  (after the handler above)
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from constrained_rl.config import ConfigError
from experiments import cli, provenance, registry, rundir, tracking

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
# A summary key holding the experiment's own report (text): printed at the end in place of the summary's
# figures, which go to summary.json without it (docs/running.md, "Writing an experiment").
REPORT_KEY = "report"

USAGE = """\
usage: python -m experiments.run [NAME] [--key value ...] [--config FILE] [--run-dir DIR]
       python -m experiments.run --resume DIR
       python -m experiments.run --list
       python -m experiments.run NAME --help
       (installed, the command constrained-rl takes the same arguments)

Runs experiment NAME (default: {default}) and writes its run directory (default runs/NAME-<time>):
config.json, environment.json (package versions, git commit), metrics.jsonl, tensorboard/,
checkpoints/, plots/, summary.json; the parts of a composed run (the tour's offline/ and rlhf/,
the RLHF pipeline's sft/, ...) are run directories inside it, each with its own plots/.

  --list            list the experiments
  --config FILE     settings from a .json or .toml file (command-line settings win)
  --run-dir DIR     where to write the run
  --resume DIR      continue an interrupted run from its last checkpoint (reads DIR/config.json)
  --keep-checkpoints N  checkpoints kept per stage, the newest (default 2; a stage's last is always kept)
  --KEY VALUE       set a config field; nested fields by dotted keys (--actor.learning_rate 3e-4);
                    tuples as 1,2,3; Optional fields take none

devices (docs/parallelism.md):
  --num-devices N   place training states on a mesh of N local devices (runs split across them)
  --distributed     multi-host: join the other processes first (jax.distributed.initialize) and
                    use every device of every process; process 0 writes the run directory
  --coordinator-address HOST:PORT  --num-processes N  --process-id I
                    with --distributed where the cluster is not detected (TPU pods, SLURM are)

Weights & Biases (off unless --wandb.project is given; needs pip install wandb):
  --wandb.project NAME  log metrics, config and summary to a W&B run in project NAME as well
  --wandb.entity NAME   the W&B team or user (default: W&B's default entity)
  --wandb.mode MODE     offline (default: files in DIR/wandb/, wandb sync uploads them), online, disabled
  --wandb.name NAME     the W&B run's name (default: the run directory's name)
"""

# Runner flags that take a value; everything else starting with "--" is a config override.
_VALUE_FLAGS = {"--config", "--run-dir", "--resume", "--keep-checkpoints", "--stop-after-chunks", "--num-devices",
                "--coordinator-address", "--num-processes", "--process-id"}
_WANDB_FLAGS = {"--wandb.project": "project", "--wandb.entity": "entity", "--wandb.mode": "mode",
                "--wandb.name": "name"}
_INT_FLAGS = {"--keep-checkpoints": "keep_checkpoints", "--stop-after-chunks": "stop_after_chunks",
              "--num-devices": "num_devices",
              "--num-processes": "num_processes", "--process-id": "process_id"}


@dataclasses.dataclass
class Invocation:
    """What the command line asked for."""

    name: str | None = None  # the experiment, None for the default
    overrides: list[cli.Override] = dataclasses.field(default_factory=list)  # --key value pairs
    config_file: str | None = None  # --config
    run_dir: str | None = None  # --run-dir
    resume: str | None = None  # --resume
    keep_checkpoints: int = 2  # --keep-checkpoints: per stage, the newest this many are kept
    list_experiments: bool = False  # --list
    help: bool = False  # --help / -h
    stop_after_chunks: int | None = None  # hidden test hook: interrupt after this many chunks
    num_devices: int | None = None  # --num-devices: a mesh of this many local devices
    distributed: bool = False  # --distributed: multi-process run over every device
    coordinator_address: str | None = None  # --coordinator-address HOST:PORT (process 0's)
    num_processes: int | None = None  # --num-processes
    process_id: int | None = None  # --process-id
    wandb: dict[str, str] = dataclasses.field(default_factory=dict)  # --wandb.KEY VALUE flags, by KEY

    def wandb_settings(self) -> tracking.WandbSettings | None:
        """The W&B settings asked for, None when W&B is off."""
        if not self.wandb:
            return None
        if "project" not in self.wandb:
            flags = "/".join(f"--wandb.{key}" for key in self.wandb)
            raise ConfigError(f"{flags}: need --wandb.project (W&B is off without a project)")
        return tracking.WandbSettings(**self.wandb)


def parse_args(argv: Sequence[str]) -> Invocation:
    """Splits the command line into runner flags, the experiment name and config overrides."""
    invocation = Invocation()
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token in ("-h", "--help"):
            invocation.help = True
        elif token == "--list":
            invocation.list_experiments = True
        elif token == "--distributed":
            invocation.distributed = True
        elif token.startswith("--"):
            key, has_inline_value, inline_value = token[2:].partition("=")
            flag = "--" + key
            if has_inline_value:
                value: str | None = inline_value
            elif i < len(tokens) and not tokens[i].startswith("--"):
                value = tokens[i]
                i += 1
            else:
                value = None
            if flag in _VALUE_FLAGS:
                _set_runner_flag(invocation, flag, value)
            elif flag in _WANDB_FLAGS:
                if value is None or value == "":
                    raise ConfigError(f"{flag}: needs a value")
                invocation.wandb[_WANDB_FLAGS[flag]] = value
            elif not key:
                raise ConfigError(f"argument '{token}': expected --KEY")
            else:
                invocation.overrides.append(cli.Override(key, value, flag, from_text=True))
        elif invocation.name is None and not invocation.overrides:
            invocation.name = token
        else:
            raise ConfigError(f"argument '{token}': unexpected (settings are written --key value)")
    return invocation


def _set_runner_flag(invocation: Invocation, flag: str, value: str | None) -> None:
    if value is None or value == "":
        raise ConfigError(f"{flag}: needs a value")
    if flag == "--config":
        invocation.config_file = value
    elif flag == "--run-dir":
        invocation.run_dir = value
    elif flag == "--resume":
        invocation.resume = value
    elif flag == "--coordinator-address":
        invocation.coordinator_address = value
    else:
        try:
            setattr(invocation, _INT_FLAGS[flag], int(value))
        except ValueError:
            raise ConfigError(f"{flag}: expected an int, got {value!r}") from None
        if flag == "--keep-checkpoints" and invocation.keep_checkpoints < 1:
            raise ConfigError(f"{flag}: must be >= 1 (a stage's last checkpoint is what a resume starts from), "
                              f"got {value}")


def _file_overrides(path: str, name: str) -> list[cli.Override]:
    """Overrides from a config file; a run's own config.json (experiment + config) is accepted."""
    data = cli.read_mapping_file(path)
    if set(data) == {"experiment", "config"} and isinstance(data["config"], dict):
        if data["experiment"] != name:
            raise ConfigError(f"{path}: holds a config for '{data['experiment']}', not '{name}'")
        data = data["config"]
    return cli.flatten(data, path)


def config_tasks(config: Any) -> list[str]:
    """Every ``task`` a config and its sections name (a composed run names one per part)."""
    tasks = []
    for field in dataclasses.fields(config) if dataclasses.is_dataclass(config) else ():
        value = getattr(config, field.name)
        if field.name == "task" and isinstance(value, str):
            tasks.append(value)
        elif dataclasses.is_dataclass(value):
            tasks.extend(config_tasks(value))
    return tasks


def refuse_real_tasks_across_processes(config: Any) -> None:
    """A real task runs in worker processes of the process that plays it (constrained_rl/envs/host.py),
    with the whole batch of policies on that process; a multi-process run (--distributed) holds only its
    own shards of them, so it is refused before anything starts."""
    import jax

    from constrained_rl import envs

    if jax.process_count() > 1:
        for task in config_tasks(config):
            if envs.is_host_task(task):
                raise ConfigError(f"--distributed: {task} is a real task, played by simulator workers of one "
                                  "process; run it in one process (--num-devices N places the training "
                                  "on N local devices)")


def _timestamped_run_dir(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path("runs") / f"{name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = Path("runs") / f"{name}-{stamp}-{suffix}"
    return run_dir


@dataclasses.dataclass
class _Held:
    """What this invocation holds of its run directory, for the clean-up when the run stops early."""

    path: Path | None = None  # the run directory, once chosen
    directory: rundir.RunDirectory | None = None  # locked, on process 0 only
    summary_before: int | None = None  # summary.json's mtime when the run began (None: absent)


def _prepare_new_run(invocation: Invocation, held: _Held) -> tuple[registry.Experiment, Any, Path]:
    from constrained_rl import parallel

    name = invocation.name or registry.DEFAULT_EXPERIMENT
    experiment = registry.load(name)
    from_file = [] if invocation.config_file is None else _file_overrides(invocation.config_file, name)
    # Later ones win: the command line beats the file.
    overrides = cli.without_inactive_file_sections(experiment.config_cls, from_file, invocation.overrides)
    config = cli.build_config(experiment.config_cls, overrides)
    refuse_real_tasks_across_processes(config)
    if invocation.run_dir:
        run_dir = Path(invocation.run_dir)
    else:  # every process takes process 0's choice: the clocks (and what exists) may differ
        run_dir = Path(parallel.broadcast_text(str(_timestamped_run_dir(name))))
    rundir.check_new(run_dir)  # every process refuses alike
    held.path = run_dir
    parallel.barrier("run directory checked")  # before process 0 writes config.json below
    if parallel.is_main_process():
        held.directory = rundir.RunDirectory.claim_new(run_dir)
        interrupts.set_note(f"{run_dir} may hold part of the run")
        with interrupts.deferred():
            _write_run_record(run_dir, {"experiment": name, "config": cli.config_to_dict(config)})
            held.directory.write_config_hash()
    return experiment, config, run_dir


def _write_run_record(run_dir: Path, record: dict[str, Any] | None) -> None:
    """config.json (unless ``record`` is None: a resumed run keeps its own) and environment.json, the
    package versions and git commit of the code that runs now. Process 0 only."""
    try:
        if record is not None:
            (run_dir / "config.json").write_text(json.dumps(record, indent=2) + "\n")
        provenance.write_environment(run_dir)
    except OSError as error:
        raise ConfigError(f"{run_dir}: cannot write the run's records ({error})") from None


def _prepare_resume(invocation: Invocation, held: _Held) -> tuple[registry.Experiment, Any, Path]:
    from constrained_rl import parallel
    from experiments.context import saved_checkpoints

    if invocation.name or invocation.overrides or invocation.config_file or invocation.run_dir:
        raise ConfigError("--resume: takes no experiment name or settings (they come from the run)")
    run_dir = Path(invocation.resume)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.json (not a run directory)")
    held.path = run_dir
    directory = rundir.RunDirectory(run_dir, new=False)
    if parallel.is_main_process():
        directory.lock()
        held.directory = directory
        interrupts.set_note(f"{run_dir} keeps the checkpoints committed so far")
    summary_path = run_dir / "summary.json"
    held.summary_before = summary_path.stat().st_mtime_ns if summary_path.exists() else None
    record = cli.read_mapping_file(config_path)
    if not isinstance(record.get("experiment"), str) or not isinstance(record.get("config"), dict):
        raise ConfigError(f"{config_path}: expected keys 'experiment' and 'config'")
    experiment = registry.load(record["experiment"])
    config = cli.build_config(experiment.config_cls, cli.flatten(record["config"], str(config_path)), record=True)
    refuse_real_tasks_across_processes(config)
    if not saved_checkpoints(run_dir):
        raise ConfigError(f"--resume {run_dir}: no checkpoint to resume from")
    directory.check_config_hash()  # the checkpoints were made with this config, not an edited one
    if parallel.is_main_process():
        _write_run_record(run_dir, None)  # the code continuing the run may not be the code that began it
    return experiment, config, run_dir


def execute(invocation: Invocation) -> int:
    """Runs what ``invocation`` asks for; returns the exit code. ConfigError propagates.

    Whatever stops the run, a new run without a committed checkpoint removes what it created; an interrupt
    returns EXIT_INTERRUPTED after one line saying what the run directory keeps.
    """
    held = _Held()
    try:
        code = _execute(invocation, held)
        interrupts.check()  # a Ctrl-C while the summary was written (which a library may have swallowed)
        return code
    except BaseException as error:
        return _stopped(held, error)
    finally:
        if held.directory is not None:
            held.directory.release()


def _stopped(held: _Held, error: BaseException) -> int:
    """After ``error`` stopped the run: the clean-up, then the interrupt's line (EXIT_INTERRUPTED) or ``error``
    raised again."""
    try:
        with interrupts.deferred():  # a first Ctrl-C now waits for the clean-up to end
            outcome = _clean_up(held, error)
    except KeyboardInterrupt:
        outcome = _clean_up(held, KeyboardInterrupt())  # done already: this only words the line
    if outcome is None:
        raise error
    return _interrupted(outcome)


def _clean_up(held: _Held, error: BaseException) -> str | None:
    """Removes what a new run made when it has no checkpoint; returns the interrupt's line (None: not one)."""
    from constrained_rl import parallel
    from experiments.context import saved_checkpoints

    interrupted = isinstance(error, KeyboardInterrupt) or interrupts.requested()
    directory = held.directory
    if directory is None or not (interrupted or isinstance(error, Exception)):
        if not interrupted:
            return None
        if held.path is not None and not parallel.is_main_process():
            return f"interrupted: {held.path} is reported on by process 0"
        return "interrupted before the run started: nothing written"
    path = directory.path
    try:
        kept = saved_checkpoints(path)
    except ConfigError as unreadable:
        return f"interrupted: {path} kept as it is ({unreadable})" if interrupted else None
    summary = path / "summary.json"
    finished = summary.exists() and summary.stat().st_mtime_ns != held.summary_before
    outcome = None
    if not kept and not finished and directory.new and directory.owned:
        interrupts.set_note(f"{path} may be partly removed")
        outcome = directory.discard()
    if not interrupted:
        return None
    if outcome is not None:
        return (f"interrupted before the first checkpoint: nothing kept ({outcome}); the same command starts "
                "the run again")
    if finished:
        return f"interrupted after the run finished: {path} is complete (summary.json written)"
    if not kept:
        return f"interrupted: {path} left as it was (it holds no checkpoint)"
    shown = [f"{stage} at chunk {step}" for stage, step in kept.items()]
    if len(shown) > 4:
        shown = shown[:4] + [f"{len(kept) - 4} more"]
    return (f"interrupted: {path} keeps its checkpoints ({', '.join(shown)}); continue with "
            f"python -m experiments.run --resume {path}")


def _interrupted(line: str) -> int:
    interrupts.end("interrupted again: stopped at once")  # reported: nothing more is raised
    print(line, file=sys.stderr)
    return EXIT_INTERRUPTED


def _exit_code(error: BaseException) -> int:
    if isinstance(error, KeyboardInterrupt) or interrupts.requested():
        return EXIT_INTERRUPTED
    return EXIT_BAD_INPUT if isinstance(error, ConfigError) else 1


def _execute(invocation: Invocation, held: _Held) -> int:
    from constrained_rl import parallel
    from experiments.context import RunContext, to_json_value

    wandb_settings = invocation.wandb_settings()
    wandb = tracking.import_wandb() if wandb_settings is not None else None  # refused before any run starts
    mesh = _mesh(invocation)
    if invocation.resume is not None:
        experiment, config, run_dir = _prepare_resume(invocation, held)
    else:
        experiment, config, run_dir = _prepare_new_run(invocation, held)

    main_process = parallel.is_main_process()
    wandb_logger = None
    if wandb is not None and main_process:
        record = {"experiment": experiment.name, "config": cli.config_to_dict(config)}
        wandb_logger = tracking.start(wandb_settings, wandb, run_dir, record)
    ctx = RunContext(run_dir, stop_after_chunks=invocation.stop_after_chunks, mesh=mesh, wandb=wandb_logger,
                     max_checkpoints_to_keep=invocation.keep_checkpoints)
    if main_process:
        print(f"{experiment.name}: run directory {run_dir}")
    started = time.perf_counter()
    try:
        summary = experiment.run(config, ctx)
        interrupts.check()  # a Ctrl-C that a library swallowed stops the run all the same
    except BaseException as error:  # execute() cleans up and says what was kept
        ctx.close()
        if wandb_logger is not None:
            wandb_logger.finish(_exit_code(error))
        raise
    ctx.close()
    if not main_process:
        return 0
    ctx.plot_learning_curves()  # this run's and every child run's
    summary = dict(summary)
    report = summary.pop(REPORT_KEY, None)  # the experiment's own short report, printed instead of the figures
    record = {**to_json_value(summary), "wall_time_s": time.perf_counter() - started}
    (run_dir / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    if wandb_logger is not None:
        wandb_logger.summary(record)
        wandb_logger.finish(0)
    if report is not None:
        print(str(report).rstrip("\n"))
        print(f"\nWall time {record['wall_time_s']:.0f} s; every figure in {run_dir / 'summary.json'}.")
        return 0
    for key, value in record.items():
        print(f"{key}: {_format(value)}")
    return 0


def _mesh(invocation: Invocation) -> Any:
    """The device mesh the training states go on: every device of every process with
    ``--distributed``, the first ``--num-devices`` local ones, or none (JAX's default device)."""
    from constrained_rl import parallel

    if invocation.distributed:
        if invocation.num_devices is not None:
            raise ConfigError("--num-devices: not with --distributed (which uses every device)")
        return parallel.make_mesh()
    if invocation.num_devices is not None:
        return parallel.local_mesh(invocation.num_devices)
    return None


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    previous = interrupts.install()  # None when already installed (python -m experiments.run, above)
    try:
        code = _main(argv)
        interrupts.end(f"interrupted while exiting (exit code {code})")
        return code
    finally:
        interrupts.uninstall(previous)


def _main(argv: Sequence[str] | None) -> int:
    try:
        interrupts.release()  # the early handler's hold: a Ctrl-C during the imports is raised here
        invocation = parse_args(sys.argv[1:] if argv is None else argv)
        multi_host_flags = (invocation.coordinator_address, invocation.num_processes, invocation.process_id)
        if not invocation.distributed and any(flag is not None for flag in multi_host_flags):
            raise ConfigError("--coordinator-address/--num-processes/--process-id: need --distributed")
        if invocation.distributed:
            # Before anything touches a device: importing an experiment may already create arrays.
            from constrained_rl import parallel

            parallel.initialize_distributed(*multi_host_flags)
        if invocation.list_experiments:
            print("\n".join(registry.describe()))
            return 0
        if invocation.help:
            print(USAGE.format(default=registry.DEFAULT_EXPERIMENT))
            if invocation.name is not None:
                experiment = registry.load(invocation.name)
                print(f"settings of {invocation.name}:")
                print("\n".join(cli.describe_fields(experiment.config_cls)))
            return 0
        return execute(invocation)
    except ConfigError as error:
        if interrupts.requested():
            return _interrupted("interrupted before the run started: nothing written")
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BaseException:
        if interrupts.requested():  # whatever a Ctrl-C during the imports turned into (an ImportError, ...)
            return _interrupted("interrupted before the run started: nothing written")
        raise


if __name__ == "__main__":
    sys.exit(main())
