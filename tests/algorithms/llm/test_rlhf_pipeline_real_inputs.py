"""rlhf_pipeline from a user's base checkpoint and a PKU-SafeRLHF-format file, in one command: SFT from the
base, reward and cost models from the file, RL, evaluation on held-out prompts of the same file; bad inputs
refused before anything trains."""

from __future__ import annotations

import csv
import json

import pytest
import transformers

from algorithms.llm import rlhf_pipeline, score_models, sft
from constrained_rl.config import ConfigError
from constrained_rl.data import preference, synthetic_safety
from experiments import run
from tests.constrained_rl.models.hf_reference import TINY, randomise_norms_and_biases

pytestmark = pytest.mark.quick_compile  # 1-2 steps of tiny models per stage: compiling is most of the time

# A chat template over the synthetic task's words: the base checkpoint's template reaches every stage.
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + eos_token + '\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# One or two updates per stage (the real-data preset safe_rlhf: lr 2e-5; float32 compiles faster on a CPU).
TINY_FLAGS = ["--methods", "repo", "--num_seeds", "1", "--eval_fraction", "0.25",
              "--sft.epochs", "1", "--sft.batch_size", "8", "--sft.dtype", "float32",
              "--score_models.epochs", "1", "--score_models.batch_size", "8", "--score_models.dtype", "float32",
              "--num_steps", "1", "--steps_per_chunk", "1",
              "--prompts_per_step", "2", "--responses_per_prompt", "2", "--ppo.max_new_tokens", "3",
              "--eval_responses_per_prompt", "1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny random Llama saved as transformers saves it (config.json, safetensors, tokenizer files with a chat
    template) and a PKU-SafeRLHF-format file of 24 comparisons."""
    root = tmp_path_factory.mktemp("inputs")
    task = synthetic_safety.SyntheticSafetyTask()
    tokenizer = task.tokenizer
    config = transformers.LlamaConfig(**{**TINY, "vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.bos_id,
                                         "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
                                         "num_hidden_layers": 1})
    base = root / "base"
    randomise_norms_and_biases(transformers.LlamaForCausalLM(config)).save_pretrained(base)
    task.save_tokenizer(base / "tokenizer.json")
    (base / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": synthetic_safety.BOS, "eos_token": synthetic_safety.EOS, "pad_token": synthetic_safety.PAD,
         "chat_template": TEMPLATE}))
    files = synthetic_safety.write_task_files(task, root / "data", 1, 24, 1, seed=3)
    return str(base), str(files["preference"])


def test_one_command_from_a_base_checkpoint_and_a_preference_file(inputs, tmp_path, monkeypatch):
    base, data = inputs
    sources = {}  # stage -> the model directories it started from
    sft_train, score_train, build_setup = sft.train, score_models.train, rlhf_pipeline.build_setup

    def record_sft(config, ctx):
        sources["sft"] = config.source.model
        return sft_train(config, ctx)

    def record_score_model(kind, config, ctx):
        sources[kind] = config.source.model
        return score_train(kind, config, ctx)

    def record_rl(config, directories, files):
        sources["rl"] = dict(directories)
        return build_setup(config, directories, files)

    monkeypatch.setattr(sft, "train", record_sft)
    monkeypatch.setattr(score_models, "train", record_score_model)
    monkeypatch.setattr(rlhf_pipeline, "build_setup", record_rl)
    run_dir = tmp_path / "run"
    assert run.main(["rlhf_pipeline", "--base_model", base, "--preference_data", data, *TINY_FLAGS,
                     "--run-dir", str(run_dir)]) == 0
    # Each stage starts from the previous stage's export.
    sft_dir = str(run_dir / "sft" / "model")
    assert sources["sft"] == base
    assert sources["reward"] == sources["cost"] == sft_dir
    assert sources["rl"] == {"actor": sft_dir, "reward": str(run_dir / "reward_model" / "model"),
                             "cost": str(run_dir / "cost_model" / "model")}
    # Held-out prompts are asked by no training comparison, and SFT fits safe responses only.
    rows = preference.read_records(data, preference.PREFERENCE_SCHEMA)
    trained = preference.read_preference_data(run_dir / "data" / "preference.jsonl")
    held = preference.read_prompt_data(run_dir / "data" / "eval_prompts.jsonl")
    assert held.prompt and not set(held.prompt) & set(trained.prompt)
    assert len(trained) + sum(row["prompt"] in held.prompt for row in rows) == len(rows)
    assert set(held.extras["category"]) <= set(synthetic_safety.CATEGORIES)
    demonstrations = preference.read_sft_data(run_dir / "data" / "sft.jsonl")
    assert demonstrations.response == [row["response"] for row in preference.demonstration_rows(
        [row for row in rows if row["prompt"] not in held.prompt])]
    # The base's chat template is carried through every export; the RL policy loads in transformers.
    for stage in ("sft", "reward_model", "cost_model", "repo_seed0"):
        assert (run_dir / stage / "model" / "chat_template.jinja").read_text() == TEMPLATE, stage
    transformers.AutoModelForCausalLM.from_pretrained(run_dir / "repo_seed0" / "model")
    with open(run_dir / "results.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert [row["method"] for row in table] == ["sft", "repo"]


def test_demonstrations_are_the_helpful_response_when_safe_else_the_safe_one():
    rows = [dict(prompt="a", response_0="r0", response_1="r1", better_response_id=b, safer_response_id=s,
                 is_response_0_safe=safe0, is_response_1_safe=safe1)
            for b, s, safe0, safe1 in ((1, 1, True, True), (1, 0, True, False), (0, 1, False, False))]
    assert preference.demonstration_rows(rows) == [{"prompt": "a", "response": "r1"},
                                                   {"prompt": "a", "response": "r0"}]


@pytest.mark.parametrize("flags, message", [
    (["--preference_data", "missing.jsonl"], "missing.jsonl: file not found"),
    (["--max_prompt_length", "4"], "max_prompt_length"),
    (["--actor_model", "x"], "base_model"),
])
def test_bad_inputs_are_refused_before_anything_trains(inputs, tmp_path, capsys, flags, message):
    base, data = inputs
    run_dir = tmp_path / "run"
    arguments = ["rlhf_pipeline", "--base_model", base, "--preference_data", data, *TINY_FLAGS, *flags]
    assert run.main([*arguments, "--run-dir", str(run_dir)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error:") and message in error[0], error
    assert not (run_dir / "sft").exists()


def test_sources_that_do_not_fit_are_refused_by_the_config():
    refused = {"actor_model": dict(prompts="p.jsonl", eval_prompts="e.jsonl"),  # real prompts, no model
               "sft_data": dict(sft_data="s.jsonl"),  # demonstrations without preference data
               "scorer": dict(preference_data="d.jsonl", base_model="b", scorer="ground_truth"),
               "eval_fraction": dict(preference_data="d.jsonl", base_model="b", eval_fraction=1.0)}
    for field, settings in refused.items():
        with pytest.raises(ConfigError, match=field):
            rlhf_pipeline.Config(**settings)
    assert not rlhf_pipeline.Config(preference_data="d.jsonl", base_model="b").synthetic
