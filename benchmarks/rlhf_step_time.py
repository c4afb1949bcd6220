"""Time of one LM RL step split into generation, scoring and update; RePO's step against PPO-Lag's.

Both learners run the shared machinery of ``algorithms.llm.rlhf_ppo`` and differ only in their cost signal, so
RePO's per-prompt gate (a segment mean over the K responses of each prompt and a gather) should cost next
to nothing: the target is RePO's full step within 1.05x of Safe-RLHF's on the same batch.

    python -m benchmarks.rlhf_step_time                       # the synthetic task's tiny Llama
    python -m benchmarks.rlhf_step_time --prompts 32 --responses 4 --new-tokens 16 --repeats 20

Phases, each jitted on its own and timed after a warm-up call (median of ``--repeats``):
  generation  KV-cache sampling of K responses per prompt (``constrained_rl.sampling.generate``);
  scoring     reward and cost scores, actor and reference log-probs, both critics' values;
  update      multiplier, token signals, GAE, gate, and the PPO update of actor and critics;
  step        the whole step as one program (what training runs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from algorithms.llm import common, repo, rlhf_ppo, safe_rlhf
from constrained_rl.data import synthetic_safety
from constrained_rl.data.preference import tokenize_prompts
from constrained_rl.models import llama
from constrained_rl.sampling import generate


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step (B)")
    parser.add_argument("--responses", type=int, default=4, help="responses per prompt (K)")
    parser.add_argument("--new-tokens", type=int, default=10, help="max new tokens per response")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per phase")
    args = parser.parse_args()

    task = synthetic_safety.SyntheticSafetyTask()
    actor = llama.LlamaForCausalLM(common.synthetic_llama_config(task.tokenizer))
    params = llama.init_params(actor, jax.random.PRNGKey(0))
    critic, critic_params = rlhf_ppo.critic_from_backbone(actor, params, jax.random.PRNGKey(1))
    models = rlhf_ppo.RLHFModels(actor, critic, critic, rlhf_ppo.exact_scorer(synthetic_safety.ground_truth_reward),
                                 rlhf_ppo.exact_scorer(synthetic_safety.ground_truth_cost))
    frozen = rlhf_ppo.FrozenParams(params, task.tables, task.tables)
    rows = synthetic_safety.generate_eval_prompt_rows(task, 4 * args.prompts, seed=0)
    batch = tokenize_prompts(task.tokenizer, [row["prompt"] for row in rows], 12)
    pool = rlhf_ppo.PromptPool(jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask, jnp.int32))
    ppo = rlhf_ppo.PPOConfig(max_new_tokens=args.new_tokens)
    spec = rlhf_ppo.StepSpec(args.prompts, args.responses, 0.0)
    sampling = rlhf_ppo.sampling_config(models, ppo)
    signals = {"safe_rlhf": safe_rlhf.cost_signal(safe_rlhf.SafeRLHFConfig(), 0.0),
               "repo": repo.cost_signal(repo.RePOConfig(), 0.0)}

    prompt_tokens, prompt_mask, group_ids = rlhf_ppo.sample_prompts(jax.random.PRNGKey(2), pool, args.prompts,
                                                                    args.responses)
    key = jax.random.PRNGKey(3)
    print(f"device {jax.devices()[0].platform}, batch {args.prompts} prompts x {args.responses} responses, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    totals = {}
    for name, signal in signals.items():
        state = rlhf_ppo.init_state(ppo, signal, params, critic_params, critic_params, key, 100)
        generate_fn = jax.jit(lambda s: generate(models.actor, s.actor, prompt_tokens, prompt_mask, key, sampling))
        generation = generate_fn(state)
        sequences = rlhf_ppo.join(prompt_tokens, prompt_mask, generation)
        score_fn = jax.jit(lambda s: rlhf_ppo.score_rollout(models, s, frozen, sequences, group_ids))
        rollout = score_fn(state)
        update_fn = jax.jit(lambda s: rlhf_ppo.make_update(models, ppo, signal, spec, 100)(s, rollout, None))
        step_fn = jax.jit(lambda s: rlhf_ppo.make_rl_step(models, ppo, signal, spec, 100)(s, frozen, pool, None))
        phases = {"generation": median_seconds(lambda: generate_fn(state), args.repeats),
                  "scoring": median_seconds(lambda: score_fn(state), args.repeats),
                  "update": median_seconds(lambda: update_fn(state), args.repeats),
                  "step": median_seconds(lambda: step_fn(state), args.repeats)}
        totals[name] = phases
        print(f"{name:>10}: " + "  ".join(f"{phase} {1e3 * t:8.1f} ms" for phase, t in phases.items()))
    print(f"update ratio repo / safe_rlhf: {totals['repo']['update'] / totals['safe_rlhf']['update']:.3f}")
    print(f"step ratio repo / safe_rlhf:   {totals['repo']['step'] / totals['safe_rlhf']['step']:.3f}  "
          "(target <= 1.05)")


if __name__ == "__main__":
    main()
