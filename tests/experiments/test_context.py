import jax.numpy as jnp
import pytest

from experiments.context import RunContext, StopRequested

pytestmark = pytest.mark.quick_compile  # tiny loops: mostly compiling


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


def test_checkpoints_of_child_runs_count_for_the_run(tmp_path):
    from experiments.context import saved_checkpoints

    parent = RunContext(tmp_path, progress=False)
    assert not parent.has_checkpoint()
    parent.child("sft").loop("train", _count_init, _count_chunk, num_chunks=3, checkpoint_every=2)
    parent.child("rl").child("inner").loop("a/b", _count_init, _count_chunk, num_chunks=1)
    parent.close()
    assert parent.has_checkpoint()
    assert saved_checkpoints(tmp_path) == {"sft/train": 3, "rl/inner/a/b": 1}


def test_a_cut_last_metrics_line_is_dropped_and_a_broken_one_refused(tmp_path):
    from constrained_rl.config import ConfigError

    ctx = RunContext(tmp_path, progress=False)
    ctx.log(1, {"x": 1.0})
    with ctx.metrics_path.open("a") as file:
        file.write('{"stage": "main", "st')  # a kill in the middle of a write
    assert [r["step"] for r in ctx.read_metrics()] == [1]
    again = RunContext(tmp_path, progress=False)  # the next run on it drops the cut line first
    again.log(2, {"x": 2.0}, stage="other")
    assert [(r["stage"], r["step"]) for r in again.read_metrics()] == [("main", 1), ("other", 2)]
    ctx.metrics_path.write_text('{"stage": "main", "step": 1}\nnot json\n{"stage": "main", "step": 2}\n')
    with pytest.raises(ConfigError, match="metrics.jsonl: line 2 is not a JSON row"):
        again.read_metrics()
    ctx.close()
    again.close()


def test_a_non_finite_metric_stops_the_loop_naming_the_stage_step_and_metric(tmp_path):
    from experiments.context import NonFiniteMetric

    def diverging(state):
        count = state["count"] + 1
        steps = jnp.arange(4.0) + 4 * state["count"]
        return {"count": count}, {"loss": jnp.where(steps >= 6, jnp.inf, steps), "ok": count}

    ctx = RunContext(tmp_path, progress=False)
    with pytest.raises(NonFiniteMetric, match=r"stage 'fit', step 7: metric 'loss' is inf"):
        ctx.loop("fit", _count_init, diverging, num_chunks=3, steps_per_chunk=4)
    assert [r["step"] for r in ctx.read_metrics()] == [4]  # the diverged chunk is not logged
    ctx.close()
