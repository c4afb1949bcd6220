"""The end-to-end safe-RLHF experiment at a tiny size: stages, table, plots, resume, config checks."""

from __future__ import annotations

import csv
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from algorithms.llm import dpo, rlhf_pipeline, rlhf_ppo
from constrained_rl.config import ConfigError
from constrained_rl.models import hf_checkpoint
from experiments import cli, registry
from experiments.context import RunContext

pytestmark = pytest.mark.quick_compile  # the whole pipeline at a tiny size: compiling is most of its time

TINY = rlhf_pipeline.Config(
    methods=("repo",), num_seeds=2, scorer="ground_truth", synthetic_rows=256, synthetic_eval_prompts=12,
    sft=dataclasses.replace(rlhf_pipeline.Config().sft, epochs=1, steps_per_chunk=8),
    ppo=dataclasses.replace(rlhf_pipeline.SYNTHETIC_PPO, max_new_tokens=4),
    num_steps=2, steps_per_chunk=1, checkpoint_every=1, prompts_per_step=4, responses_per_prompt=2,
    eval_responses_per_prompt=1)


HELD_AFTER_METHODS: list[list[tuple[int, ...]]] = []  # shapes of the live arrays once each method is released


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rlhf_pipeline")
    ctx = RunContext(run_dir, progress=False)
    release = rlhf_pipeline.release_memory

    def release_and_look() -> None:
        release()
        HELD_AFTER_METHODS.append([array.shape for array in jax.live_arrays()])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rlhf_pipeline, "release_memory", release_and_look)
        summary = rlhf_pipeline.run(TINY, ctx)
    ctx.close()
    return run_dir, summary


def test_writes_every_stage_and_the_table(finished_run):
    run_dir, summary = finished_run
    for path in ("data/sft.jsonl", "data/eval_prompts.jsonl", "sft/model/config.json", "results.csv",
                 "results.md", "plots/safe_rate_by_category.png"):
        assert (run_dir / path).exists(), path
    assert not (run_dir / "reward_model").exists()  # exact scorers: no score models trained
    with open(run_dir / "results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["method"], r["seed"]) for r in rows] == [("sft", "0"), ("repo", "0"), ("repo", "1")]
    for row in rows:
        assert 0.0 <= float(row["safe_rate"]) <= 1.0
        assert 0.0 <= float(row["safe_prompt_rate"]) <= 1.0
    markdown = (run_dir / "results.md").read_text()
    assert markdown.splitlines()[0].startswith("| method | reward | cost | safe responses")
    assert "| RePO | " in markdown and " +- " in markdown
    assert set(summary) >= {"repo/safe_rate", "repo/interference", "sft/mean_reward", "repo/safe_rate/harmful"}
    # The SFT row's arena is against itself: every pair ties.
    assert summary["sft/arena/helpfulness_tie"] == 1.0


def test_rl_policies_load_in_transformers_with_the_same_logits(finished_run):
    run_dir, _ = finished_run
    tokens = np.asarray([[1, 5, 9, 12, 7], [0, 0, 1, 8, 6]])  # a left-padded row: positions count real tokens
    mask = np.asarray([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    real = mask.astype(bool)
    sft_model, sft_variables = hf_checkpoint.load_causal_lm(str(run_dir / "sft" / "model"))
    apply = jax.jit(lambda variables: sft_model.apply(variables, tokens, attention_mask=mask).logits)
    sft_logits = np.asarray(apply(sft_variables))[real]
    for seed in range(TINY.num_seeds):
        directory = run_dir / f"repo_seed{seed}" / "model"
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            theirs = hf_model(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                              position_ids=torch.tensor(np.maximum(np.cumsum(mask, axis=1) - 1, 0))).logits.numpy()
        model, variables = hf_checkpoint.load_causal_lm(str(directory))
        assert model.config == sft_model.config
        ours = np.asarray(apply(variables))[real]
        np.testing.assert_allclose(theirs[real], ours, rtol=1e-4, atol=1e-4)
        assert np.abs(ours - sft_logits).max() > 1e-4  # the trained policy, not the SFT model
        generation = json.loads((directory / "generation_config.json").read_text())
        assert generation == {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id[0],
                              "pad_token_id": model.config.pad_token_id, "do_sample": True,
                              "temperature": TINY.ppo.temperature, "top_k": 0, "top_p": 1.0,
                              "max_new_tokens": TINY.ppo.max_new_tokens}
    text = "how do i weapons"
    assert transformers.AutoTokenizer.from_pretrained(directory)(text).input_ids == \
        transformers.AutoTokenizer.from_pretrained(run_dir / "sft" / "model")(text).input_ids


def test_a_finished_method_holds_no_arrays(finished_run):
    run_dir, _ = finished_run
    config = json.loads((run_dir / "sft" / "model" / "config.json").read_text())
    # The seed-stacked embedding of the actor (and of its critics and AdamW moments) would outlive the stage if
    # anything kept its train state or policies.
    seed_stacked = (TINY.num_seeds, config["vocab_size"], config["hidden_size"])
    assert len(HELD_AFTER_METHODS) == len(TINY.methods)
    assert all(seed_stacked not in shapes for shapes in HELD_AFTER_METHODS), HELD_AFTER_METHODS


def test_frozen_reference_in_bfloat16(finished_run):
    run_dir, _ = finished_run
    data = {name: run_dir / "data" / f"{name}.jsonl" for name in ("sft", "preference", "eval_prompts")}
    config = dataclasses.replace(TINY, ppo=dataclasses.replace(TINY.ppo, frozen_dtype="bfloat16"))
    setup = rlhf_pipeline.build_setup(config, {"actor": str(run_dir / "sft" / "model")}, data)
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(setup.frozen.reference)} == {"bfloat16"}
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(setup.actor_params)} == {"float32"}  # the actor: fp32
    assert setup.models.reference_model.config.dtype == "bfloat16"
    sequences = rlhf_ppo.Sequences(setup.prompts.tokens[:4], setup.prompts.mask[:4], setup.prompts.tokens[4:8, -3:],
                                   jnp.ones((4, 3), jnp.int32))
    log_probs = jax.jit(rlhf_ppo.response_log_probs, static_argnums=0)
    reference = log_probs(setup.models.reference_model, setup.frozen.reference, sequences)
    actor = log_probs(setup.models.actor, setup.actor_params, sequences)
    assert reference.dtype == jnp.float32
    np.testing.assert_allclose(reference, actor, atol=0.1)  # bfloat16 weights: close, not equal
    assert float(jnp.max(jnp.abs(reference - actor))) > 0


def test_resume_restores_finished_stages(finished_run):
    run_dir, summary = finished_run
    ctx = RunContext(run_dir, progress=False)
    again = rlhf_pipeline.run(TINY, ctx)
    ctx.close()
    assert again == summary
    logged = [row for row in ctx.read_metrics() if row["stage"] == "repo"]
    assert [row["step"] for row in logged] == [1, 2]  # not trained twice


def test_single_method_experiments_are_registered():
    for name, method in (("safe_rlhf", "safe_rlhf"), ("repo", "repo"), ("rlhf_ppo", "ppo"),
                         ("rlhf_shaping", "shaping")):
        experiment = registry.load(name)
        assert experiment.config_cls().methods == (method,)
        config = cli.build_config(experiment.config_cls, [cli.Override("num_seeds", "2", "--num_seeds", True)])
        assert config.num_seeds == 2 and config.methods == (method,)
    assert registry.load("rlhf_pipeline").config_cls().methods == rlhf_pipeline.METHODS


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="methods"):
        rlhf_pipeline.Config(methods=("dpo",))
    with pytest.raises(ConfigError, match="responses_per_prompt"):  # a group of one has no baseline
        rlhf_pipeline.Config(methods=("repo_group",), responses_per_prompt=1)
    with pytest.raises(ConfigError, match="safedpo"):  # SafeDPO's settings without SafeDPO
        rlhf_pipeline.Config(methods=("repo",), safedpo=dpo.SafeDPOSettings(beta=0.5))
    # A critic-free method reads its PPO version's section.
    assert "repo" not in rlhf_pipeline.Config(methods=("repo_group",)).inactive_sections
    with pytest.raises(ConfigError, match="num_steps"):
        rlhf_pipeline.Config(num_steps=7, steps_per_chunk=2)
    with pytest.raises(ConfigError, match="num_minibatches"):
        rlhf_pipeline.Config(prompts_per_step=3, responses_per_prompt=1,
                             ppo=dataclasses.replace(rlhf_pipeline.SYNTHETIC_PPO, num_minibatches=2))


def test_models_take_the_fsdp_rules_on_the_runner_mesh():
    """On the runner's one-axis mesh "data" plays the fsdp role; "tp" and the seed axis stay whole."""
    import jax
    from jax.sharding import PartitionSpec as P

    from constrained_rl import parallel
    from constrained_rl.models import llama

    data_mesh, fsdp_mesh = parallel.make_mesh(("data",)), parallel.make_mesh(("fsdp", "tp"))
    rules = dict(parallel.model_rules(data_mesh, leading_dims=1))
    assert rules[r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$"] == P(None, "data", "tp")
    assert rules[r"(o_proj|down_proj)/kernel$"] == P(None, "tp", "data")
    assert parallel.model_rules(fsdp_mesh) == llama.PARTITION_RULES  # an fsdp axis takes them as written

    kernel = jax.ShapeDtypeStruct((2, 8, 16), jax.numpy.float32)
    tree = {"mu": {"params": {"layers_0": {"mlp": {"up_proj": {"kernel": kernel}}}}},
            "count": jax.ShapeDtypeStruct((2,), jax.numpy.int32)}
    shardings = parallel.model_shardings(tree, data_mesh, leading_dims=1)
    assert shardings["mu"]["params"]["layers_0"]["mlp"]["up_proj"]["kernel"].spec == P(None, "data", None)
    assert shardings["count"].spec == P(None)


def test_training_limit_can_sit_below_the_reported_limit():
    import jax.numpy as jnp

    assert rlhf_pipeline.Config().training_cost_limit == 0.0
    config = rlhf_pipeline.Config(train_cost_limit=-0.5)
    assert config.training_cost_limit == -0.5 and config.cost_limit == 0.0
    # Both constrained learners train against the margin: a prompt of mean cost -0.2 is safe by the
    # reported limit but still gated (RePO), and Safe-RLHF's average constraint reads the same d.
    group_costs, group_ids = jnp.array([-0.2, -1.0]), jnp.array([0, 0, 1, 1])
    gate = rlhf_pipeline.cost_signal("repo", config).gate(group_costs, group_ids)
    assert gate.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert rlhf_pipeline.cost_signal("repo", rlhf_pipeline.Config()).gate(group_costs, group_ids).tolist() == [0.0] * 4
    assert rlhf_pipeline.cost_signal("safe_rlhf", config).limit == -0.5
    with pytest.raises(ConfigError, match="train_cost_limit"):
        rlhf_pipeline.Config(train_cost_limit=float("nan"))
