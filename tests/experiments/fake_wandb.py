"""A stand-in for the ``wandb`` package that records what the runner asks of it."""

from __future__ import annotations

import sys
import types


class FakeRun:
    def __init__(self, calls: list, kwargs: dict) -> None:
        self.calls = calls
        self.kwargs = kwargs
        self.id = kwargs.get("id") or "fake-run-1"
        self.summary: dict = {}

    def define_metric(self, name, step_metric=None):
        self.calls.append(("define_metric", name, step_metric))

    def log(self, data):
        self.calls.append(("log", dict(data)))

    def finish(self, exit_code=0):
        self.calls.append(("finish", exit_code))


def install(monkeypatch) -> types.ModuleType:
    """Puts a fake ``wandb`` module into sys.modules; its ``calls`` list records init, log, finish..."""
    module = types.ModuleType("wandb")
    module.calls = []
    module.runs = []

    def init(**kwargs):
        module.calls.append(("init", kwargs))
        run = FakeRun(module.calls, kwargs)
        module.runs.append(run)
        return run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def calls_named(module: types.ModuleType, name: str) -> list:
    return [call[1:] for call in module.calls if call[0] == name]
