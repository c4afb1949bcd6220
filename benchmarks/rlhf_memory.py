"""Host memory of rlhf_pipeline's RL stages run one after another, with and without the frozen models in bfloat16.

A random Llama over the synthetic task's words (``--width``, ``--layers``) is the SFT model, and the reward and
cost models are its backbone with fresh heads (learned scorers, so all six models are there). Two RL methods
train one after another (``--methods``, one seed, a few steps); at the start and end of each stage the script
records the bytes that live jax arrays hold (each buffer once), the resident memory (VmRSS) and its peak so
far (VmHWM). Variants, each in its own process so that each peak is its own:

* ``release``: the pipeline as it is (each method released before the next: ``rlhf_pipeline.release_memory``);
* ``no_release``: the same with the release switched off (freed memory stays with the allocator);
* ``bf16``: ``ppo.frozen_dtype bfloat16`` (reference, reward and cost models stored and run in bfloat16).

    python -m benchmarks.rlhf_memory [--width 512 --layers 4 --methods ppo,repo --variants release,bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax

VARIANTS = ("release", "no_release", "bf16")


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def tree_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def measure(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    from algorithms.llm import common, rlhf_pipeline, sft
    from constrained_rl import memory
    from constrained_rl.models import llama, score
    from experiments.context import RunContext

    root = tempfile.mkdtemp()
    source = common.open_model_source(common.Source(), "float32")
    config = dataclasses.replace(source.config, hidden_size=args.width, intermediate_size=args.width * 11 // 4,
                                 num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                                 head_dim=args.width // 8)
    model = llama.LlamaForCausalLM(config)
    variables = llama.init_params(model, jax.random.PRNGKey(0))
    directories = {"actor_model": os.path.join(root, "sft")}
    sft.export(directories["actor_model"], model, variables["params"], source, "float32")
    for index, kind in enumerate(("reward_model", "cost_model")):
        scorer, scorer_variables = score.load_score_model(directories["actor_model"], key=jax.random.PRNGKey(index))
        directories[kind] = os.path.join(root, kind)
        score.save_score_model(directories[kind], scorer, scorer_variables)
    model_mb = tree_bytes(variables) / 2**20
    del variables, scorer_variables

    stages: list[dict[str, Any]] = []

    def mark(stage: str, when: str) -> None:
        stages.append({"stage": stage, "when": when, "live_mb": memory.live_array_bytes() / 2**20,
                       "rss_mb": _status_mb("VmRSS"), "peak_mb": _status_mb("VmHWM")})

    class Probe(RunContext):
        def loop(self, stage, *rest, **options):
            mark(stage, "start")
            state = super().loop(stage, *rest, **options)
            mark(stage, "end")
            return state

    if variant == "no_release":
        rlhf_pipeline.release_memory = lambda: None
    ppo = dataclasses.replace(rlhf_pipeline.SYNTHETIC_PPO, max_new_tokens=args.new_tokens,
                              frozen_dtype="bfloat16" if variant == "bf16" else "float32")
    run_config = rlhf_pipeline.Config(
        methods=tuple(args.methods.split(",")), num_seeds=1, scorer="learned", synthetic_rows=256,
        synthetic_eval_prompts=8, ppo=ppo, num_steps=args.steps, steps_per_chunk=1, checkpoint_every=args.steps,
        prompts_per_step=args.prompts, responses_per_prompt=2, eval_responses_per_prompt=1, **directories)
    ctx = Probe(os.path.join(root, "run"), progress=False)
    frozen_mb = []
    build_setup = rlhf_pipeline.build_setup

    def build_and_measure(*arguments):
        setup = build_setup(*arguments)
        frozen_mb.append(tree_bytes(setup.frozen) / 2**20)
        return setup

    rlhf_pipeline.build_setup = build_and_measure
    started = time.perf_counter()
    rlhf_pipeline.run(run_config, ctx)
    return {"variant": variant, "model_mb": model_mb, "frozen_mb": frozen_mb[0], "stages": stages,
            "seconds": time.perf_counter() - started, "peak_mb": _status_mb("VmHWM")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512, help="hidden size of the random model")
    parser.add_argument("--layers", type=int, default=4, help="decoder blocks")
    parser.add_argument("--methods", default="ppo,repo", help="RL methods, trained in this order")
    parser.add_argument("--steps", type=int, default=2, help="RL steps per method")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (2 responses each)")
    parser.add_argument("--new-tokens", type=int, default=4, help="max new tokens per response")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="the variants to run, in this order")
    parser.add_argument("--variant", choices=VARIANTS, help="measure this variant alone and print JSON")
    args = parser.parse_args()
    if args.variant is not None:
        print(json.dumps(measure(args.variant, args)))
        return
    flags = ["--width", str(args.width), "--layers", str(args.layers), "--methods", args.methods,
             "--steps", str(args.steps), "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens)]
    print(f"{'variant':>10} {'stage':>6} {'when':>5} {'live MB':>8} {'RSS MB':>7} {'peak MB':>8}")
    for variant in args.variants.split(","):
        output = subprocess.run([sys.executable, "-m", "benchmarks.rlhf_memory", *flags, "--variant", variant],
                                check=True, capture_output=True, text=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        for row in result["stages"]:
            print(f"{variant:>10} {row['stage']:>6} {row['when']:>5} {row['live_mb']:8.0f} {row['rss_mb']:7.0f} "
                  f"{row['peak_mb']:8.0f}")
        print(f"{variant:>10} model {result['model_mb']:.0f} MB, frozen models {result['frozen_mb']:.0f} MB, "
              f"peak {result['peak_mb']:.0f} MB, {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
