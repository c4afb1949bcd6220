import jax.numpy as jnp
import pytest

from experiments.context import RunContext, StopRequested


def test_child_context_keeps_settings_and_shares_the_stop_hook(tmp_path):
    parent = RunContext(tmp_path, progress=False, stop_after_chunks=3)
    first, second = parent.child("a"), parent.child("b")
    assert first.run_dir == tmp_path / "a" and first.mesh is parent.mesh

    def chunk(state):
        return {"count": state["count"] + 1}, {"x": state["count"]}

    def init():
        return {"count": jnp.zeros(())}

    first.loop("s", init, chunk, num_chunks=2)
    with pytest.raises(StopRequested):  # the third chunk of the whole run, counted across children
        second.loop("s", init, chunk, num_chunks=2)
    parent.close()


def _count_chunk(state):
    return {"count": state["count"] + 1}, {"x": state["count"], "y": 2.0 * state["count"]}


def _count_init():
    return {"count": jnp.zeros(())}


def test_learning_curves_are_drawn_in_every_child_run(tmp_path):
    parent = RunContext(tmp_path, progress=False)
    parent.loop("top", _count_init, _count_chunk, num_chunks=2)
    first = parent.child("first")
    first.loop("a", _count_init, _count_chunk, num_chunks=3)
    first.loop("b", _count_init, _count_chunk, num_chunks=2)
    nested = first.child("nested")
    nested.loop("c", _count_init, _count_chunk, num_chunks=2)
    parent.child("quiet")  # logs nothing: no plots
    parent.close()
    paths = parent.plot_learning_curves()
    for run_dir in (tmp_path, tmp_path / "first", tmp_path / "first" / "nested"):
        assert sorted(p.name for p in (run_dir / "plots").iterdir()) == ["x.png", "y.png"], run_dir
    assert not (tmp_path / "quiet" / "plots").exists()
    assert len(paths) == 6 and all(p.is_file() for p in paths)


def test_logged_rows_reach_wandb_under_the_child_and_stage(tmp_path, monkeypatch):
    from experiments import tracking
    from tests.experiments import fake_wandb

    wandb = fake_wandb.install(monkeypatch)
    logger = tracking.start(tracking.WandbSettings(project="p"), wandb, tmp_path, {"experiment": "e", "config": {}})
    parent = RunContext(tmp_path, progress=False, wandb=logger)
    parent.log(5, {"loss": 1.5}, stage="eval")
    parent.child("offline").child("bc").loop("train", _count_init, _count_chunk, num_chunks=2)
    parent.close()
    assert fake_wandb.calls_named(wandb, "log") == [
        ({"eval/step": 5, "eval/loss": 1.5},),
        ({"offline/bc/train/step": 1, "offline/bc/train/x": 0.0, "offline/bc/train/y": 0.0},),
        ({"offline/bc/train/step": 2, "offline/bc/train/x": 1.0, "offline/bc/train/y": 2.0},),
    ]
    assert fake_wandb.calls_named(wandb, "define_metric") == [
        ("eval/step", None), ("eval/*", "eval/step"),
        ("offline/bc/train/step", None), ("offline/bc/train/*", "offline/bc/train/step"),
    ]
    # The same rows went to metrics.jsonl of the run that logged them.
    rows = RunContext(tmp_path / "offline" / "bc").read_metrics()
    assert [(r["stage"], r["step"], r["y"]) for r in rows] == [("train", 1, 0.0), ("train", 2, 2.0)]
