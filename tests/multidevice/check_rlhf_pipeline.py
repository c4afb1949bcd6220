"""The RLHF pipeline's stages on 8 faked devices, every model fully sharded, match one device.

With ``ctx.mesh`` set (what ``--num-devices 8`` gives the runner: one ``"data"`` axis) the pipeline lays
its models out by the Llama partition rules, ``"data"`` playing the fsdp role (``parallel.model_rules``):

* SFT (``common.fit``, shared with the reward and cost models): parameters and AdamW moments split;
* the RL stage: the seed-batched state (actor, both critics, their moments) split within each seed, the
  seed axis replicated; the frozen reference and the reward and cost models (``place_setup``) split.

The same stages without a mesh (one device) must give the same parameters, multiplier and logged
metrics. The models are 1-block Llamas over the synthetic task's words, the stages a few updates long.
"""

from __future__ import annotations

from tests.multidevice.harness import NUM_DEVICES, TINY_LLAMA, assert_trees_close, fake_devices

fake_devices()

import dataclasses  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from algorithms.llm import common, rlhf_pipeline, sft  # noqa: E402
from constrained_rl import parallel  # noqa: E402
from constrained_rl.models import llama, score  # noqa: E402
from experiments.context import RunContext  # noqa: E402

# As in check_repo: Adam normalises each step, so float reassociation may move a weight by a fraction of
# a learning rate (1e-3 here) where a gradient entry is near zero.
RTOL, ATOL = 2e-4, 2e-4
TRAINING = common.Training(preset="quick", epochs=1, batch_size=16, max_length=16, steps_per_chunk=2,
                               checkpoint_every=1, eval_batch_size=8)
RL = rlhf_pipeline.Config(
    methods=("repo",), num_seeds=2, scorer="learned", synthetic_rows=48, synthetic_eval_prompts=8,
    ppo=dataclasses.replace(rlhf_pipeline.SYNTHETIC_PPO, max_new_tokens=4, num_minibatches=2),
    num_steps=2, steps_per_chunk=2, checkpoint_every=1, prompts_per_step=8, responses_per_prompt=2,
    max_prompt_length=10)


def base_model(directory: str) -> str:
    """A fresh 1-block Llama over the synthetic task's words, exported like an SFT model."""
    source = common.open_model_source(common.Source(), "float32")
    sizes = {**TINY_LLAMA, "num_hidden_layers": 1}
    del sizes["vocab_size"]  # the task's words
    config = dataclasses.replace(source.config, **sizes)
    model = llama.LlamaForCausalLM(config)
    sft.export(directory, model, llama.init_params(model, jax.random.PRNGKey(0))["params"],
               source._replace(config=config), "float32")
    return directory


def score_model(sft_dir: str, directory: str, seed: int) -> str:
    """A score model on the SFT backbone with a fresh head (frozen in RL, so untrained is enough here)."""
    model, variables = score.load_score_model(sft_dir, key=jax.random.PRNGKey(seed))
    score.save_score_model(directory, model, variables)
    return directory


def assert_split(name: str, array: jax.Array, spec: P) -> None:
    """``array`` is laid out as ``spec`` over every device, each holding a part of it only."""
    if array.sharding.spec != spec or len(array.sharding.device_set) != NUM_DEVICES:
        raise AssertionError(f"{name}: {array.sharding} is not {spec} over {NUM_DEVICES} devices")
    shard = array.addressable_shards[0].data
    if shard.size * NUM_DEVICES != array.size:
        raise AssertionError(f"{name}: a device holds {shard.shape} of {array.shape}")


def gate(params: dict) -> jax.Array:
    return params["params"]["model"]["layers_0"]["mlp"]["gate_proj"]["kernel"]


def metric_rows(ctx: RunContext) -> dict:
    return {(row["stage"], row["step"]): {k: v for k, v in row.items() if k not in ("stage", "step")}
            for row in ctx.read_metrics()}


def main() -> None:
    assert jax.device_count() == NUM_DEVICES
    mesh = parallel.local_mesh(NUM_DEVICES)
    root = tempfile.mkdtemp()
    source = common.Source(model=base_model(os.path.join(root, "base")), synthetic_rows=48)
    contexts = {name: RunContext(os.path.join(root, name), progress=False, mesh=mesh if name == "sharded" else None)
                for name in ("sharded", "single")}

    # SFT: the parameters and their moments split over "data" (the fsdp role), one device's result.
    children = {name: ctx.child("sft") for name, ctx in contexts.items()}
    trained = {name: sft.train(sft.Config(source=source, training=TRAINING), ctx) for name, ctx in children.items()}
    assert_split("sft/gate_proj", trained["sharded"].params["model"]["layers_0"]["mlp"]["gate_proj"]["kernel"],
                 P("data", None))
    assert_trees_close("sft_params", trained["sharded"].params, trained["single"].params, rtol=RTOL, atol=ATOL)
    summaries = [{k: v for k, v in t.summary.items() if k != "model_dir"} for t in trained.values()]
    assert_trees_close("sft_summary", *summaries, rtol=RTOL, atol=ATOL)
    assert_trees_close("sft_metrics", *map(metric_rows, children.values()), rtol=RTOL, atol=ATOL)

    # RL from the same models: the six of them laid out on the mesh.
    sft_dir = trained["single"].model_dir
    directories = {"actor": sft_dir, "reward": score_model(sft_dir, os.path.join(root, "reward"), 1),
                   "cost": score_model(sft_dir, os.path.join(root, "cost"), 2)}
    data = rlhf_pipeline.write_synthetic_data(RL, contexts["single"])
    setup = rlhf_pipeline.build_setup(RL, directories, data)
    placed = rlhf_pipeline.place_setup(setup, mesh)
    for name, params in zip(placed.frozen._fields, placed.frozen):
        assert_split(f"frozen/{name}", gate(params), P("data", None))
    assert placed.frozen.reference is placed.actor_params  # one copy of the SFT model
    assert placed.frozen.reward_model is placed.reward_critic_params
    states = {"sharded": rlhf_pipeline.train_method("repo", RL, placed, contexts["sharded"]),
              "single": rlhf_pipeline.train_method("repo", RL, setup, contexts["single"])}
    state = states["sharded"]
    for name in ("actor", "reward_critic", "cost_critic"):
        assert_split(f"rl/{name}", gate(getattr(state, name)), P(None, "data", None))
    moment = state.actor_optimizer[1][0].mu
    assert_split("rl/actor_adam_mu", gate(moment), P(None, "data", None))  # AdamW moments shard alike
    for leaf in jax.tree.leaves((state.step, state.key, state.multiplier, state.cost_window)):
        assert leaf.sharding.is_fully_replicated, leaf.sharding
    assert_trees_close("rl_state", states["sharded"], states["single"], rtol=RTOL, atol=ATOL)
    assert_trees_close("rl_metrics", metric_rows(contexts["sharded"]), metric_rows(contexts["single"]),
                       rtol=RTOL, atol=ATOL)


if __name__ == "__main__":
    main()
