"""Time and memory of one LM RL step, PPO (six models) against critic-free (four models), RePO and Safe-RLHF.

All four variants run the shared machinery of ``algorithms.llm.rlhf_ppo`` on the same batch:

* ``safe_rlhf`` / ``repo``: token-level GAE with a reward and a cost critic (``ppo.advantage gae``);
* ``safe_rlhf_group`` / ``repo_group``: no critics, group-relative advantages over each prompt's K
  responses (``ppo.advantage group``, GRPO-style).

RePO's per-prompt gate against Safe-RLHF's average constraint should cost next to nothing (a segment mean
over the K responses of each prompt and a gather); dropping the critics saves their two forward passes in
scoring, their two backward passes in the update, and their parameters and AdamW moments in memory.

    python -m benchmarks.rlhf_step_time                       # the synthetic task's sizes (B 16, K 4, 10 tokens)
    python -m benchmarks.rlhf_step_time --prompts 32 --responses 4 --new-tokens 16 --repeats 20

Each variant runs in its own process (so its peak resident memory is its own). Phases, each jitted on its
own and timed after a warm-up call (median of ``--repeats``):
  generation  KV-cache sampling of K responses per prompt (``constrained_rl.sampling.generate``);
  scoring     reward and cost scores, actor and reference log-probs, the critics' values (if any);
  update      multiplier, advantages, gate, and the PPO update of the actor (and critics);
  step        the whole step as one program (what training runs).
Memory: the train state (parameters and AdamW moments of every trained model), XLA's own account of the
compiled step (arguments + outputs + temporaries - aliased buffers), and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from algorithms.llm import common, repo, rlhf_ppo, safe_rlhf
from constrained_rl.data import synthetic_safety
from constrained_rl.data.preference import tokenize_prompts
from constrained_rl.models import llama
from constrained_rl.sampling import generate

VARIANTS = ("safe_rlhf", "repo", "safe_rlhf_group", "repo_group")


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tree_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def measure(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One variant's phase times (seconds) and memory (bytes)."""
    task = synthetic_safety.SyntheticSafetyTask()
    actor = llama.LlamaForCausalLM(common.synthetic_llama_config(task.tokenizer))
    params = llama.init_params(actor, jax.random.PRNGKey(0))
    critic_free = variant.endswith("_group")
    ppo = rlhf_ppo.PPOConfig(max_new_tokens=args.new_tokens, advantage="group" if critic_free else "gae")
    scorers = (rlhf_ppo.exact_scorer(synthetic_safety.ground_truth_reward),
               rlhf_ppo.exact_scorer(synthetic_safety.ground_truth_cost))
    if critic_free:
        models, critics = rlhf_ppo.RLHFModels(actor, None, None, *scorers), (None, None)
    else:
        critic, reward_critic = rlhf_ppo.critic_from_backbone(actor, params, jax.random.PRNGKey(1))
        _, cost_critic = rlhf_ppo.critic_from_backbone(actor, params, jax.random.PRNGKey(4))
        models, critics = rlhf_ppo.RLHFModels(actor, critic, critic, *scorers), (reward_critic, cost_critic)
    frozen = rlhf_ppo.FrozenParams(params, task.tables, task.tables)
    rows = synthetic_safety.generate_eval_prompt_rows(task, 4 * args.prompts, seed=0)
    batch = tokenize_prompts(task.tokenizer, [row["prompt"] for row in rows], 12)
    pool = rlhf_ppo.PromptPool(jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask, jnp.int32))
    spec = rlhf_ppo.StepSpec(args.prompts, args.responses, 0.0)
    sampling = rlhf_ppo.sampling_config(models, ppo)
    base = variant.removesuffix("_group")
    signal = (safe_rlhf.cost_signal(safe_rlhf.SafeRLHFConfig(), 0.0) if base == "safe_rlhf"
              else repo.cost_signal(repo.RePOConfig(), 0.0))
    prompt_tokens, prompt_mask, group_ids = rlhf_ppo.sample_prompts(jax.random.PRNGKey(2), pool, args.prompts,
                                                                    args.responses)
    key = jax.random.PRNGKey(3)
    state = rlhf_ppo.init_state(ppo, signal, params, *critics, key, 100)
    generate_fn = jax.jit(lambda s: generate(models.actor, s.actor, prompt_tokens, prompt_mask, key, sampling))
    sequences = rlhf_ppo.join(prompt_tokens, prompt_mask, generate_fn(state))
    score_fn = jax.jit(lambda s: rlhf_ppo.score_rollout(models, s, frozen, sequences, group_ids))
    rollout = score_fn(state)
    update_fn = jax.jit(lambda s: rlhf_ppo.make_update(models, ppo, signal, spec, 100)(s, rollout, None))
    step = rlhf_ppo.make_rl_step(models, ppo, signal, spec, 100)
    step_fn = jax.jit(lambda s: step(s, frozen, pool, None))
    analysis = step_fn.lower(state).compile().memory_analysis()
    phases = {"generation": median_seconds(lambda: generate_fn(state), args.repeats),
              "scoring": median_seconds(lambda: score_fn(state), args.repeats),
              "update": median_seconds(lambda: update_fn(state), args.repeats),
              "step": median_seconds(lambda: step_fn(state), args.repeats)}
    step_bytes = None
    if analysis is not None:
        step_bytes = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                      + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    return {"variant": variant, "models": 4 if critic_free else 6, **phases, "state_bytes": tree_bytes(state),
            "step_program_bytes": step_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step (B)")
    parser.add_argument("--responses", type=int, default=4, help="responses per prompt (K)")
    parser.add_argument("--new-tokens", type=int, default=10, help="max new tokens per response")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per phase")
    parser.add_argument("--variant", choices=VARIANTS, help="measure this variant alone and print JSON")
    args = parser.parse_args()
    if args.variant is not None:
        print(json.dumps(measure(args.variant, args)))
        return
    flags = ["--prompts", str(args.prompts), "--responses", str(args.responses), "--new-tokens",
             str(args.new_tokens), "--repeats", str(args.repeats)]
    results = {}
    for variant in VARIANTS:
        output = subprocess.run([sys.executable, "-m", "benchmarks.rlhf_step_time", *flags, "--variant", variant],
                                check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    print(f"{platform.machine()}, {jax.devices()[0].platform}, batch {args.prompts} prompts x {args.responses} "
          f"responses, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'variant':>16} models  generation   scoring    update      step   state MB  step MB  peak RSS MB")
    for variant, r in results.items():
        step_mb = "-" if r["step_program_bytes"] is None else f"{r['step_program_bytes'] / 2**20:7.1f}"
        print(f"{variant:>16} {r['models']:>6} " + " ".join(f"{1e3 * r[p]:8.1f}ms" for p in
                                                            ("generation", "scoring", "update", "step"))
              + f" {r['state_bytes'] / 2**20:9.2f} {step_mb:>8} {r['peak_rss_bytes'] / 2**20:11.0f}")
    for base in ("safe_rlhf", "repo"):
        gae, group = results[base], results[f"{base}_group"]
        print(f"{base}: critic-free / PPO step {group['step'] / gae['step']:.2f}x, update "
              f"{group['update'] / gae['update']:.2f}x, state {group['state_bytes'] / gae['state_bytes']:.2f}x")
    print(f"repo / safe_rlhf step (PPO): {results['repo']['step'] / results['safe_rlhf']['step']:.2f}x")


if __name__ == "__main__":
    main()
