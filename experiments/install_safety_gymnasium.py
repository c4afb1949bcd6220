"""Makes the side interpreter that runs the Safety-Gymnasium tasks: ``python -m experiments.install_safety_gymnasium``.

Safety-Gymnasium 1.0.0 (Ji et al. 2023) does not import on Python 3.11 (dataclass fields with NumPy
array defaults, which Python 3.11 refuses) and pins ``mujoco==2.3.3`` and ``pygame==2.1.0``, while Brax
needs ``mujoco>=3``. Its workers (:mod:`constrained_rl.envs.host`) therefore run in a virtual environment
of their own, made here from a Python 3.8-3.10 with the exact pins of ``requirements-safety-gymnasium.txt``:

    python -m experiments.install_safety_gymnasium                 # into .venv-safety-gymnasium
    python -m experiments.install_safety_gymnasium --python /usr/bin/python3.10 --venv DIR

The interpreter is the ``--python`` given, else the first of ``python3.10``, ``python3.9``, ``python3.8``
on the PATH or under pyenv's versions that runs. Nothing is done when the environment already imports
Safety-Gymnasium. A venv elsewhere than the default is found through
``CONSTRAINED_RL_SAFETY_GYMNASIUM_PYTHON`` (its ``bin/python``).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from constrained_rl.config import ConfigError
from constrained_rl.envs import host

REQUIREMENTS = host.PROJECT_ROOT / "requirements-safety-gymnasium.txt"
SUPPORTED = ((3, 8), (3, 9), (3, 10))


def python_version(python: str) -> tuple[int, int] | None:
    """``(major, minor)`` of an interpreter, or None if it does not run."""
    try:
        out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    major, minor = out.stdout.split()
    return int(major), int(minor)


def candidates() -> list[str]:
    """Interpreters to try, newest first: on the PATH, then pyenv's."""
    found = [shutil.which(f"python3.{minor}") for minor in (10, 9, 8)]
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    for minor in (10, 9, 8):
        found += sorted(glob.glob(f"{pyenv_root}/versions/3.{minor}.*/bin/python3.{minor}"), reverse=True)
    return [path for path in found if path]


def find_python(requested: str | None) -> str:
    """The interpreter to build the venv from (see the module doc); ConfigError if none fits."""
    for python in ([requested] if requested else candidates()):
        if python_version(python) in SUPPORTED:
            return python
    if requested:
        raise ConfigError(f"python: {requested} is not a runnable Python 3.8-3.10")
    raise ConfigError("python: no Python 3.8-3.10 found (python3.10/3.9/3.8 on the PATH or under pyenv); "
                      "install one, or pass --python")


def imports_safety_gymnasium(python: Path) -> bool:
    if not python.exists():
        return False
    return subprocess.run([str(python), "-c", "import safety_gymnasium"], capture_output=True).returncode == 0


def install(venv: Path, python: str | None = None) -> Path:
    """Makes ``venv`` with Safety-Gymnasium's pins unless it already imports Safety-Gymnasium; its python."""
    venv_python = venv / "bin" / "python"
    if imports_safety_gymnasium(venv_python):
        print(f"{venv}: Safety-Gymnasium already installed")
        return venv_python
    base = find_python(python)
    print(f"making {venv} from {base} with {REQUIREMENTS.name}")
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(venv_python), "-m", "pip", "install", "-q", "--no-input", "-r", str(REQUIREMENTS)], check=True)
    if not imports_safety_gymnasium(venv_python):
        raise ConfigError(f"venv: {venv} was made but does not import safety_gymnasium")
    return venv_python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", help="a Python 3.8-3.10 to make the venv from (default: found)")
    parser.add_argument("--venv", default=str(host.SAFETY_GYMNASIUM_VENV), help="where (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        install(Path(args.venv), args.python)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as error:
        print(f"error: {' '.join(map(str, error.cmd))} failed with exit code {error.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
