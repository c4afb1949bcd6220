"""A RePO step on 8 faked devices, fully sharded, matches one device.

The whole RL step (prompt sampling, KV-cache generation, exact synthetic scorers, teacher-forced
log-probs and values, RePO's per-prompt gate and the multiplier's ascent on the mean rectified
violation, PPO minibatch updates of actor and critics) runs unchanged under jit. Only placement
differs: the train state (actor, critics, their AdamW moments) and the frozen reference are laid out by
the Llama partition rules on a 4 x 2 ("fsdp", "tp") mesh; everything else is replicated. Two steps
must give the single-device parameters, multiplier and metrics.
"""

from __future__ import annotations

from tests.multidevice.harness import TINY_LLAMA, assert_trees_close, fake_devices

fake_devices()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from algorithms.llm import repo, rlhf_ppo  # noqa: E402
from constrained_rl import lagrangian, parallel  # noqa: E402
from constrained_rl.data import synthetic_safety  # noqa: E402
from constrained_rl.data.preference import tokenize_prompts  # noqa: E402
from constrained_rl.models import llama  # noqa: E402

STEPS = 2
# Adam normalises each step, so a near-zero gradient entry whose sign differs by float reassociation can
# move its weight by up to a few learning rates of 1e-3: hence an absolute tolerance well under that.
RTOL, ATOL = 2e-4, 2e-4


def main() -> None:
    assert jax.device_count() == 8
    task = synthetic_safety.SyntheticSafetyTask()
    tokenizer = task.tokenizer
    special = dict(bos_token_id=tokenizer.bos_id, eos_token_id=(tokenizer.eos_id,), pad_token_id=tokenizer.pad_id)
    config = llama.LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 1, "vocab_size": tokenizer.vocab_size,
                                  **special})
    actor = llama.LlamaForCausalLM(config)
    params = llama.init_params(actor, jax.random.PRNGKey(0))
    critic, critic_params = rlhf_ppo.critic_from_backbone(actor, params, jax.random.PRNGKey(1))
    models = rlhf_ppo.RLHFModels(actor, critic, critic,
                                 rlhf_ppo.exact_scorer(synthetic_safety.ground_truth_reward),
                                 rlhf_ppo.exact_scorer(synthetic_safety.ground_truth_cost))
    questions = [f"tell me about {word}" for word in ("weapons", "rivers", "poison", "gardens")] * 2
    prompts = tokenize_prompts(tokenizer, questions, 10)
    pool = rlhf_ppo.PromptPool(jnp.asarray(prompts.tokens), jnp.asarray(prompts.attention_mask, jnp.int32))
    ppo = rlhf_ppo.PPOConfig(actor_learning_rate=1e-3, critic_learning_rate=1e-3, max_new_tokens=4,
                             warmup_ratio=0.0, actor_lr_schedule="constant", ppo_epochs=1, num_minibatches=2)
    multiplier = lagrangian.MultiplierConfig(kind="log_ascent", init=1.0, max=5.0, learning_rate=0.5)
    signal = repo.cost_signal(repo.RePOConfig(multiplier=multiplier), cost_limit=0.0)
    step = rlhf_ppo.make_rl_step(models, ppo, signal, rlhf_ppo.StepSpec(8, 2, 0.0), STEPS)
    chunk = rlhf_ppo.make_chunk(step, STEPS)
    state = rlhf_ppo.init_state(ppo, signal, params, critic_params, critic_params, jax.random.PRNGKey(2), STEPS)
    frozen = rlhf_ppo.FrozenParams(params, task.tables, task.tables)
    expected_state, expected_metrics = chunk(state, frozen, pool, None)
    moved = lagrangian.multiplier(expected_state.multiplier) - 1.0
    assert abs(float(moved)) > 1e-4, "the multiplier did not move"

    mesh = parallel.make_mesh(("fsdp", "tp"), (4, 2))
    sharded_state = parallel.shard_params(state, mesh)
    gate = sharded_state.actor["params"]["model"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert gate.sharding.spec == P("fsdp", "tp"), gate.sharding.spec
    moment = sharded_state.actor_optimizer[1][0].mu["params"]["model"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert moment.sharding.spec == P("fsdp", "tp"), moment.sharding.spec  # AdamW moments shard alike
    sharded_frozen = frozen._replace(reference=parallel.shard_params(frozen.reference, mesh))
    got_state, got_metrics = chunk(sharded_state, sharded_frozen, parallel.replicate(pool, mesh), None)

    assert_trees_close("repo_state", got_state, expected_state, rtol=RTOL, atol=ATOL)
    assert_trees_close("repo_metrics", got_metrics, expected_metrics, rtol=RTOL, atol=ATOL)


if __name__ == "__main__":
    main()
