"""What produced a run: ``environment.json`` beside ``config.json`` in every run directory.

::

    {"python": "3.11.7", "platform": "Linux-...-x86_64",
     "packages": {"jax": "0.8.1", "jaxlib": "0.8.1", ..., "constrained-rl": "0.1.0"},
     "git": {"commit": "94b4285...", "dirty": false}}

``git`` is ``null`` when the code is not a git checkout (an installed wheel) or git is not available;
``dirty`` says whether tracked files differ from the commit. A package that is not installed has
``null`` as its version. The runner writes the file with config.json and rewrites it on ``--resume``
(the code that continues a run may differ from the code that began it).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

ENVIRONMENT_FILE = "environment.json"

# Distribution names, as pip knows them.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "brax", "numpy", "constrained-rl")

# The folder holding constrained_rl/, algorithms/ and experiments/ (a checkout's root, when it is one).
CODE_ROOT = Path(__file__).resolve().parents[1]


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """The installed version of each distribution, ``None`` for one that is not installed."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                                check=False)
    except (OSError, subprocess.SubprocessError):  # no git executable, or it hung
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_state(root: str | Path = CODE_ROOT) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the checkout whose root is ``root``; ``None`` when ``root`` is not the
    root of a git checkout (e.g. the code is installed inside some other repository) or git fails."""
    root = Path(root)
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root.resolve():
        return None
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:  # a repository without commits
        return None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def environment() -> dict[str, Any]:
    """The record environment.json holds."""
    return {"python": platform.python_version(), "platform": platform.platform(),
            "packages": package_versions(), "git": git_state()}


def write_environment(run_dir: str | Path) -> Path:
    """Writes ``run_dir/environment.json`` (replacing an older one) and returns its path."""
    path = Path(run_dir) / ENVIRONMENT_FILE
    path.write_text(json.dumps(environment(), indent=2) + "\n")
    return path
