"""What the runner does to a run directory before and after the experiment: claim it, lock it, record the
config it began with, and leave the file system as it found it when a new run stops before its first
checkpoint.

* A new run takes a directory that does not exist yet (created, with any missing parents) or an empty one;
  a directory holding a run (``config.json``) is refused, and so is any other non-empty directory: a run
  is never mixed into files that are not its own.
* A run holds an exclusive lock (``fcntl.flock``) on :data:`LOCK_FILE` inside its directory for its whole
  life: a second runner on the same directory (a new run or a ``--resume``) is refused with one line naming
  the process that holds it. The lock file stays (removing a lock file races with the next locker).
* Beside ``config.json`` a new run writes :data:`CONFIG_HASH_FILE`, the SHA-256 of ``config.json`` in
  ``sha256sum`` format; ``--resume`` refuses a ``config.json`` that no longer matches it (edited, or
  replaced by another run's), since the checkpoints were made with the settings it began with.
* A new run that stops (refused, interrupted or failed) before any stage committed a checkpoint has
  nothing to resume from: :meth:`RunDirectory.discard` removes what it created (the directory and the
  parents it made, or the files it wrote into a directory that was empty).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

from constrained_rl.config import ConfigError

LOCK_FILE = ".lock"
CONFIG_HASH_FILE = ".config.sha256"
CONFIG_FILE = "config.json"


def _reason(error: OSError) -> str:
    what = error.strerror or str(error)
    return f"{what}: {error.filename}" if error.filename else what


def _entries(path: Path) -> list[str]:
    """What a directory holds besides a lock file left by an earlier run."""
    return sorted(name for name in os.listdir(path) if name != LOCK_FILE)


def config_digest(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / CONFIG_FILE).read_bytes()).hexdigest()


def check_new(path: Path, flag: str = "--run-dir") -> None:
    """Refuses a path a new run cannot take (every process runs this check before process 0 claims it)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: is a file, not a directory")
    if not path.is_dir():
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(f"{flag} {path}: cannot be created ({parent} is a file)")
                break
        return
    entries = _entries(path)
    if CONFIG_FILE in entries:
        _refuse_if_locked(path)
        raise ConfigError(f"{flag} {path}: already holds a run (continue it with --resume)")
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(f"{flag} {path}: not empty and holds no run ({shown}); a new run needs a new or "
                          "empty directory")


def _refuse_if_locked(path: Path) -> None:
    """Refuses when another process holds ``path``'s lock (takes it and lets it go otherwise)."""
    probe = RunDirectory(path, new=False)
    probe.lock()
    probe.release()


class RunDirectory:
    """A run directory as this invocation holds it: locked, and what it created there."""

    def __init__(self, path: Path, *, new: bool) -> None:
        self.path = path
        self.new = new  # a new run (which removes what it made when it ends with nothing to resume)
        self.owned = False  # a new run's claim succeeded: what is in the directory is this run's
        self.created: list[Path] = []  # directories this invocation made, outermost first
        self._lock_fd: int | None = None

    @classmethod
    def claim_new(cls, path: Path, flag: str = "--run-dir") -> RunDirectory:
        """Creates (or takes, when empty) ``path`` for a new run and locks it; refuses one it cannot take."""
        check_new(path, flag)
        claim = cls(path, new=True)
        missing = [p for p in (path, *path.parents) if not p.exists()]
        try:
            for directory in reversed(missing):
                try:
                    directory.mkdir()
                except FileExistsError:
                    continue  # made meanwhile by someone else: not ours to remove
                except OSError as error:
                    raise ConfigError(f"{flag} {path}: cannot be created ({_reason(error)})") from None
                claim.created.append(directory)
            claim.lock()
            check_new(path, flag)  # under the lock: no other runner took it between the check and the lock
        except BaseException:
            claim.discard()
            raise
        claim.owned = True
        return claim

    def lock(self) -> None:
        """Takes the exclusive lock on the run directory; refuses when another process holds it."""
        import fcntl

        lock_path = self.path / LOCK_FILE
        for _ in range(10):
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise ConfigError(f"{self.path}: cannot create its lock file ({_reason(error)})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ConfigError(f"{self.path} is in use by another run (pid {holder})") from None
                raise ConfigError(f"{self.path}: cannot lock it ({_reason(error)})") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file its last holder removed while we waited to take it
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._lock_fd = fd
                return
            os.close(fd)
        raise ConfigError(f"{self.path} is in use by another run")

    def release(self) -> None:
        """Lets the lock go (the lock file stays)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def write_config_hash(self) -> None:
        (self.path / CONFIG_HASH_FILE).write_text(f"{config_digest(self.path)}  {CONFIG_FILE}\n")

    def check_config_hash(self, flag: str = "--resume") -> None:
        """Refuses a ``config.json`` that is not the one the run began with."""
        record = self.path / CONFIG_HASH_FILE
        if not record.is_file():
            raise ConfigError(
                f"{flag} {self.path}: no {CONFIG_HASH_FILE} recording the config the run began with; if "
                f"{CONFIG_FILE} is that config, record it (in {self.path}: sha256sum {CONFIG_FILE} > "
                f"{CONFIG_HASH_FILE})")
        expected = record.read_text().split()[:1]
        if expected != [config_digest(self.path)]:
            raise ConfigError(
                f"{flag} {self.path}: {CONFIG_FILE} was changed after the run began (it does not match "
                f"{CONFIG_HASH_FILE}); a run continues only with the settings its checkpoints were made with: "
                f"put the file back, or start a new run (--config {self.path / CONFIG_FILE} --run-dir NEW)")

    def discard(self) -> str:
        """Removes what this new run created (then lets the lock go); returns what was done, for the user."""
        try:
            if not self.new:
                return f"{self.path} left as it was"
            outcome = f"{self.path} left as it was"
            if self.owned and self.path in self.created:
                shutil.rmtree(self.path, ignore_errors=True)
                outcome = f"{self.path} removed"
            elif self.owned and self.path.is_dir():
                for entry in os.listdir(self.path):  # the directory was empty: everything in it is this run's
                    target = self.path / entry
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target, ignore_errors=True)
                    else:
                        target.unlink(missing_ok=True)
                outcome = f"{self.path} left empty, as it was"
            for directory in reversed(self.created):  # the parents it made, unless something else came in
                try:
                    directory.rmdir()
                except FileNotFoundError:
                    continue
                except OSError:
                    break
            return outcome
        finally:
            self.release()
