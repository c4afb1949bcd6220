"""The safe-RLHF experiment end to end: SFT -> reward and cost models -> PPO-Lag, RePO, PPO, shaping, their
critic-free variants, and the DPO-family baselines SafeDPO and SACPO.

One command runs every stage of Safe-RLHF's recipe (Dai et al. 2023) and compares the RL fine-tuners on
held-out prompts, the question of RePO (Peng et al. 2024, arXiv 2410.19933): does a per-prompt
constraint make (nearly) every prompt safe where an average constraint leaves some prompts unsafe?

Stages (each resumable: a finished stage is restored from its checkpoint and skipped):

1. ``data``: SFT demonstrations, PKU-SafeRLHF-schema comparisons and held-out evaluation prompts are written
   to ``<run>/data``: generated on the synthetic task (``constrained_rl.data.synthetic_safety``), or from a
   user's ``preference_data`` (:func:`write_input_data`: a share of its prompts held out, SFT on its safe
   responses or on ``sft_data``); a bad file or a prompt longer than ``max_prompt_length`` is refused here,
   before anything trains;
2. ``sft`` (:mod:`algorithms.llm.sft`, from the synthetic model or a user's ``base_model``), then
   ``reward_model`` and ``cost_model`` (:mod:`algorithms.llm.score_models`, started from the SFT model), each
   in its own sub-directory ``<run>/{sft,reward_model,cost_model}`` with a Hugging Face export in ``model/``
   that the next stage reads. Any of them can be given instead (a local checkpoint such as Alpaca-7B and
   Safe-RLHF's beaver-7b reward / cost models);
3. one RL stage per method (``safe_rlhf``, ``repo``, ``ppo``, ``shaping``), all seeds vmapped in one
   state, on the shared machinery of :mod:`algorithms.llm.rlhf_ppo`; ``safe_rlhf_group`` and ``repo_group``
   are the same methods without critics (``ppo.advantage = "group"`` for that stage alone); ``safedpo`` and
   ``sacpo`` (:mod:`algorithms.llm.dpo`) learn offline from the SFT model on the score models' comparisons,
   one sub-run per seed. Every method's seed i is exported as a Hugging Face directory
   ``<run>/<method>_seed<i>/model`` (:func:`export_policies`; transformers loads it as it is);
4. evaluation of the SFT model and of every method and seed on the held-out prompts
   (``constrained_rl.llm_evaluation``), with the exact scorers on the synthetic task and the learned
   reward / cost models elsewhere; ``results.csv``, ``results.md`` (mean +- std over seeds) and plots.
   Each method is evaluated as soon as it has trained, and what it held is released
   (:func:`release_memory`) before the next one starts: only its table rows stay.

With devices (``--num-devices N``, ``--distributed``: ``ctx.mesh``) every stage lays its models out fully
sharded over them (``parallel.model_rules``: the runner's ``"data"`` axis plays the fsdp role): SFT and
the score models through ``common.fit``, the RL stages through :func:`place_setup` (reference, reward
and cost models) and the stage's state (actor, critics and their AdamW moments, each seed's split like
one model's, the seed axis whole); each step's prompts are split over the same devices. See
docs/parallelism.md for the layout and the memory of six 7B models.

``scorer = "ground_truth"`` trains the RL stage against the synthetic task's exact reward and cost (the
critics then start from the SFT backbone with a fresh head); ``"learned"`` uses the trained score models
and starts the critics from them, as Safe-RLHF does.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from algorithms.llm import common, dpo, repo, rlhf_ppo, safe_rlhf, score_models, sft
from constrained_rl import lagrangian, llm_evaluation, memory, parallel, plotting
from constrained_rl.config import ConfigError, Experiment, require
from constrained_rl.data import preference, synthetic_safety
from constrained_rl.models import hf_checkpoint, score
from constrained_rl.models.llama import LlamaForCausalLM

# RL methods (the rollout loop of rlhf_ppo), their critic-free variants (ppo.advantage group for that method
# alone), and the offline DPO-family baselines (algorithms.llm.dpo)
GROUP_METHODS = {"safe_rlhf_group": "safe_rlhf", "repo_group": "repo"}  # method -> the cost signal it takes
PREFERENCE_METHODS = ("safedpo", "sacpo")
METHODS = ("safe_rlhf", "repo", "ppo", "shaping", *PREFERENCE_METHODS, *GROUP_METHODS)
METHOD_LABELS = {"sft": "SFT", "safe_rlhf": "Safe-RLHF (PPO-Lag)", "repo": "RePO", "ppo": "PPO (reward only)",
                 "shaping": "fixed shaping", "safedpo": "SafeDPO", "sacpo": "SACPO",
                 "safe_rlhf_group": "Safe-RLHF, critic-free", "repo_group": "RePO, critic-free"}
Scorer = Literal["learned", "ground_truth"]

# The RL preset of the synthetic task: a tiny model trained from scratch takes larger steps than a 7B one,
# and its responses are short.
SYNTHETIC_PPO = rlhf_ppo.PPOConfig(actor_learning_rate=3e-4, actor_weight_decay=0.0, critic_learning_rate=1e-3,
                                   kl_coeff=0.01, max_new_tokens=10, warmup_ratio=0.0)


# The settings that belong to one RL method: section -> method, and the section's defaults.
METHOD_SECTIONS = {"safe_rlhf": "safe_rlhf", "repo": "repo", "shaping_multiplier": "shaping", "safedpo": "safedpo",
                   "sacpo": "sacpo"}
QUICK = common.Training(preset="quick")
METHOD_SECTION_DEFAULTS = {"safe_rlhf": safe_rlhf.SafeRLHFConfig, "repo": repo.RePOConfig,
                           "shaping_multiplier": lambda: repo.SHAPING_MULTIPLIER,
                           "safedpo": lambda: dpo.SafeDPOSettings(training=QUICK),
                           "sacpo": lambda: dpo.SACPOSettings(training=QUICK)}


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole experiment; the defaults run every method on the synthetic task on a CPU."""

    # methods to train: RL (safe_rlhf, repo, ppo, shaping), critic-free RL (safe_rlhf_group, repo_group),
    # DPO family (safedpo, sacpo)
    methods: tuple[str, ...] = METHODS
    num_seeds: int = 3  # RL seeds per method (vmapped); SFT and score models are trained once
    seed: int = 0  # data, SFT, score models and the RL seeds' base key
    scorer: Scorer = "learned"  # RL reward / cost: the trained score models, or the synthetic task's exact ones
    # Sources (None = trained here: on the synthetic task, or on preference_data from base_model)
    # a PKU-SafeRLHF-format file (.jsonl / .parquet): the reward and cost models learn from its comparisons,
    # the RL stage samples its prompts, eval_fraction of its prompts are held out for evaluation, and SFT
    # fits its safe responses (sft_data instead when given)
    preference_data: str | None = None
    base_model: str | None = None  # a Hugging Face LM directory SFT starts from (needs preference_data)
    sft_data: str | None = None  # SFT demonstrations (prompt, response); None: from preference_data
    eval_fraction: float = 0.1  # share of preference_data's prompts held out when eval_prompts is None
    actor_model: str | None = None  # a Hugging Face LM directory to start from (skips SFT)
    reward_model: str | None = None  # a score-model directory (skips reward-model training)
    cost_model: str | None = None  # a score-model directory (skips cost-model training)
    prompts: str | None = None  # RL prompts (.jsonl / .parquet with a prompt field); None: preference_data's
    # held-out prompts (prompt, optional category); None: held out from preference_data, or the synthetic task's
    eval_prompts: str | None = None
    # prompt template: auto (the actor's chat template if it has one, else safe-rlhf), chat, a registered name
    # (safe-rlhf, alpaca, plain) or a JSON file
    template: str = "auto"
    # Synthetic data
    synthetic_rows: int = 4096  # SFT rows and preference rows generated each
    synthetic_eval_prompts: int = 200  # held-out prompts generated
    # Stages before RL
    # SFT and score-model optimiser / loop settings; preset None: quick on the synthetic task, else safe_rlhf
    sft: common.Training = common.Training()
    score_models: common.Training = common.Training()  # reward and cost models (one setting for both)
    # RL
    ppo: rlhf_ppo.PPOConfig = SYNTHETIC_PPO  # PPO hyperparameters (PPOConfig() holds Safe-RLHF's 7B ones)
    num_steps: int = 120  # RL steps per method
    steps_per_chunk: int = 10  # RL steps per jitted chunk between host visits
    checkpoint_every: int = 4  # chunks between checkpoints
    prompts_per_step: int = 16  # B: prompts per RL step
    responses_per_prompt: int = 4  # K: responses per prompt (all methods; RePO's per-prompt cost estimate)
    # prompt tokens (left-padded); a longer prompt is refused, never cut. None: 12 on the synthetic task, else the
    # longest training or held-out prompt
    max_prompt_length: int | None = None
    cost_limit: float = 0.0  # d: a response or prompt is safe when its cost is <= d
    # d that Safe-RLHF and RePO train against; None: cost_limit. A margin below cost_limit holds the
    # constrained quantity (a prompt's expected cost, or the average) inside the limit, not on it
    train_cost_limit: float | None = None
    safe_rlhf: safe_rlhf.SafeRLHFConfig = safe_rlhf.SafeRLHFConfig()  # Safe-RLHF's multiplier
    repo: repo.RePOConfig = repo.RePOConfig()  # RePO's multiplier
    shaping_multiplier: lagrangian.MultiplierConfig = dataclasses.field(  # the shaping baseline's lambda (fixed)
        default_factory=lambda: repo.SHAPING_MULTIPLIER)
    # SafeDPO's settings (its training preset quick: the synthetic task; safe_rlhf for real checkpoints)
    safedpo: dpo.SafeDPOSettings = dataclasses.field(default_factory=METHOD_SECTION_DEFAULTS["safedpo"])
    sacpo: dpo.SACPOSettings = dataclasses.field(default_factory=METHOD_SECTION_DEFAULTS["sacpo"])  # SACPO's
    ptx: bool = False  # mix the SFT loss into the actor loss (ppo.ptx_coeff), on the SFT data
    # Evaluation
    eval_responses_per_prompt: int = 4  # sampled responses per held-out prompt
    eval_temperature: float = 1.0  # sampling temperature at evaluation

    def __post_init__(self) -> None:
        require(len(self.methods) >= 1 and all(m in METHODS for m in self.methods), "methods",
                f"must be a non-empty subset of {METHODS}, got {self.methods}")
        require(len(set(self.methods)) == len(self.methods), "methods", f"has repeats: {self.methods}")
        require(self.num_seeds >= 1, "num_seeds", f"must be >= 1, got {self.num_seeds}")
        require(self.scorer in ("learned", "ground_truth"), "scorer",
                f"must be 'learned' or 'ground_truth', got {self.scorer!r}")
        for name in ("synthetic_rows", "synthetic_eval_prompts", "num_steps", "steps_per_chunk",
                     "checkpoint_every", "prompts_per_step", "responses_per_prompt",
                     "eval_responses_per_prompt"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.num_steps % self.steps_per_chunk == 0, "num_steps",
                f"must be a multiple of steps_per_chunk={self.steps_per_chunk}, got {self.num_steps}")
        require(self.shaping_multiplier.kind == "fixed", "shaping_multiplier.kind",
                f"must be fixed: shaping is a constant lambda (got {self.shaping_multiplier.kind!r})")
        require(self.max_prompt_length is None or self.max_prompt_length >= 1, "max_prompt_length",
                f"must be >= 1, got {self.max_prompt_length}")
        require(math.isfinite(self.cost_limit), "cost_limit", f"must be finite, got {self.cost_limit}")
        require(self.train_cost_limit is None or math.isfinite(self.train_cost_limit), "train_cost_limit",
                f"must be finite, got {self.train_cost_limit}")
        require(0.0 < self.eval_fraction < 1.0, "eval_fraction", f"must be in (0, 1), got {self.eval_fraction}")
        for name in ("base_model", "sft_data"):
            require(getattr(self, name) is None or self.preference_data is not None, name,
                    "needs preference_data (the comparisons the score models learn from)")
        require(self.base_model is None or self.actor_model is None, "base_model",
                "and actor_model both give the SFT model: base_model is fine-tuned first, actor_model is used as "
                "it is; give one")
        require(self.preference_data is None or self.base_model is not None or self.actor_model is not None,
                "base_model", "is required with preference_data (or actor_model, an SFT model used as it is)")
        if not self.synthetic and self.preference_data is None:  # prompts given: the models must be too
            require(self.actor_model is not None, "actor_model",
                    "is required when prompts are not the synthetic task's (or base_model with preference_data)")
            require(self.eval_prompts is not None, "eval_prompts",
                    "is required when prompts are not the synthetic task's (or preference_data to hold some out)")
            for kind in ("reward", "cost"):
                require(self.scorer != "learned" or getattr(self, f"{kind}_model") is not None, f"{kind}_model",
                        "is required when prompts are not the synthetic task's (or preference_data to train it)")
        require(self.scorer == "learned" or self.synthetic, "scorer",
                "'ground_truth' needs the synthetic task's prompts")
        require(not self.ptx or self.synthetic or self.preference_data is not None, "ptx",
                "needs SFT demonstrations: give preference_data (and sft_data)")
        require(self.eval_temperature >= 0, "eval_temperature", f"must be >= 0, got {self.eval_temperature}")
        batch = self.prompts_per_step * self.responses_per_prompt
        require(batch % self.ppo.num_minibatches == 0, "ppo.num_minibatches",
                f"must divide the {batch} responses of a step")
        critic_free = self.ppo.advantage == "group" or any(m in GROUP_METHODS for m in self.methods)
        require(not critic_free or self.responses_per_prompt >= 2, "responses_per_prompt",
                "must be >= 2 for a critic-free method: a response is compared with its prompt's others")
        for section in self.inactive_sections:  # a method's settings are refused unless it trains
            require(getattr(self, section) == METHOD_SECTION_DEFAULTS[section](), section,
                    f"settings for method {METHOD_SECTIONS[section]!r}, which is not among methods {self.methods}")

    @property
    def inactive_sections(self) -> tuple[str, ...]:
        """The method sections of the methods not chosen (refused when given; not listed by --help)."""
        return tuple(name for name, method in METHOD_SECTIONS.items()
                     if method not in self.methods and not any(GROUP_METHODS.get(m) == method for m in self.methods))

    @property
    def training_cost_limit(self) -> float:
        """The d of the constrained learners' training (``train_cost_limit``, else ``cost_limit``)."""
        return self.cost_limit if self.train_cost_limit is None else self.train_cost_limit

    @property
    def synthetic(self) -> bool:
        """Whether the prompts (and so the exact scorers) are the synthetic task's."""
        return self.prompts is None and self.preference_data is None


def cost_signal(method: str, config: Config) -> rlhf_ppo.CostSignal:
    """The cost handling of ``method``: the only thing that differs between the RL learners (a critic-free
    method takes its PPO version's)."""
    method = GROUP_METHODS.get(method, method)
    if method == "safe_rlhf":
        return safe_rlhf.cost_signal(config.safe_rlhf, config.training_cost_limit)
    if method == "repo":
        return repo.cost_signal(config.repo, config.training_cost_limit)
    return repo.baseline_signal(config.shaping_multiplier if method == "shaping" else repo.PPO_MULTIPLIER)


# --------------------------------------------------------------------------------------------------
# Stages before RL


def write_synthetic_data(config: Config, ctx: Any) -> dict[str, Path]:
    """The synthetic task's files in ``<run>/data`` (written once; the same seed gives the same files)."""
    data_dir = Path(ctx.run_dir) / "data"
    paths = {name: data_dir / f"{name}.jsonl" for name in ("sft", "preference", "eval_prompts")}
    if not all(path.exists() for path in paths.values()):
        task = synthetic_safety.SyntheticSafetyTask()
        synthetic_safety.write_task_files(task, data_dir, config.synthetic_rows, config.synthetic_rows,
                                          config.synthetic_eval_prompts, config.seed)
    return paths


def write_input_data(config: Config, ctx: Any) -> dict[str, Path]:
    """The stages' files from ``preference_data`` in ``<run>/data`` (nothing without it): ``preference.jsonl``
    (its rows but those of the held-out prompts), ``eval_prompts.jsonl`` (``eval_fraction`` of its distinct
    prompts, with their category; not written when ``eval_prompts`` is given) and ``sft.jsonl`` (``sft_data``'s
    rows, else the safe responses of the training comparisons, ``preference.demonstration_rows``). A bad file
    is refused here, before anything trains."""
    if config.preference_data is None:
        return {}
    rows = preference.read_records(config.preference_data, preference.PREFERENCE_SCHEMA)
    if config.eval_prompts is None:
        rows, held = preference.split_by_prompt(rows, config.eval_fraction, config.seed)
        held_prompts = {row["prompt"]: {k: row[k] for k in ("prompt", "category") if k in row} for row in held}
    demonstrations = (preference.read_records(config.sft_data, preference.SFT_SCHEMA) if config.sft_data
                      else preference.demonstration_rows(rows))
    if not demonstrations:
        raise ConfigError(f"preference_data: {config.preference_data}: no comparison has a safe response to "
                          "fine-tune on; give sft_data")
    data_dir = Path(ctx.run_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {"preference": data_dir / "preference.jsonl", "sft": data_dir / "sft.jsonl"}
    preference.write_records(paths["preference"], rows)
    preference.write_records(paths["sft"], demonstrations)
    if config.eval_prompts is None:
        paths["eval_prompts"] = data_dir / "eval_prompts.jsonl"
        preference.write_records(paths["eval_prompts"], list(held_prompts.values()))
    return paths


def stage_training(config: Config, training: common.Training) -> common.Training:
    """A pre-RL stage's settings with the preset chosen: ``quick`` on the synthetic task, ``safe_rlhf`` (Safe-RLHF's
    published scripts) on real data, unless one is named."""
    return dataclasses.replace(training, preset=training.preset or ("quick" if config.synthetic else "safe_rlhf"))


def train_models(config: Config, ctx: Any, data: dict[str, Path]) -> dict[str, str]:
    """SFT, reward model and cost model directories: given ones as they are, the others trained here, each from
    the previous one's export (SFT from ``base_model`` or the synthetic model, the score models from SFT's)."""
    directories = {"actor": config.actor_model, "reward": config.reward_model, "cost": config.cost_model}
    if directories["actor"] is None:
        source = common.Source(model=config.base_model or common.SYNTHETIC, data=str(data["sft"]),
                               template=config.template, seed=config.seed)
        directories["actor"] = sft.train(sft.Config(source=source, training=stage_training(config, config.sft)),
                                         ctx.child("sft")).model_dir
    if config.scorer == "learned":
        for kind in ("reward", "cost"):
            if directories[kind] is None:
                source = common.Source(model=directories["actor"], data=str(data["preference"]),
                                           template=config.template, seed=config.seed)
                settings = score_models.Config(source=source, training=stage_training(config, config.score_models))
                trained = score_models.train(kind, settings, ctx.child(score_models.STAGES[kind]))
                directories[kind] = trained.model_dir
    return directories


# --------------------------------------------------------------------------------------------------
# Models and prompts for RL


class Setup(NamedTuple):
    """Everything the RL and evaluation stages share."""

    models: rlhf_ppo.RLHFModels
    frozen: rlhf_ppo.FrozenParams
    actor_params: Any  # the SFT model (initial actor and reference)
    reward_critic_params: Any
    cost_critic_params: Any
    prompts: rlhf_ppo.PromptPool
    eval_prompts: rlhf_ppo.PromptPool
    eval_categories: np.ndarray  # [G] int category index of each held-out prompt
    category_names: tuple[str, ...]
    eval_scorers: tuple[rlhf_ppo.Scorer, rlhf_ppo.Scorer]  # (reward, cost) used for evaluation
    eval_scorer_params: tuple[Any, Any]
    ptx: rlhf_ppo.PTXData | None
    actor_source: common.ModelSource | None = None  # the SFT model's tokenizer and template (policy exports)


SYNTHETIC_MAX_PROMPT_LENGTH = 12  # the synthetic task's prompts have 8-9 tokens


def prompt_length(config: Config, model_source: common.ModelSource, prompts: list[str]) -> int:
    """Prompt tokens of the RL and evaluation pools: ``max_prompt_length``, else 12 on the synthetic task, else
    the longest of ``prompts``; refused when a prompt is longer or prompt and response overrun the model."""
    if config.max_prompt_length is not None:
        length = config.max_prompt_length
    elif config.synthetic:
        length = SYNTHETIC_MAX_PROMPT_LENGTH
    else:
        length = preference.tokenize_prompts(model_source.tokenizer, prompts, None,
                                             model_source.template).tokens.shape[1]
    positions = model_source.config.max_position_embeddings
    if length + config.ppo.max_new_tokens > positions:
        raise ConfigError(f"max_prompt_length: {length} prompt tokens and ppo.max_new_tokens="
                          f"{config.ppo.max_new_tokens} exceed the model's max_position_embeddings={positions}")
    return length


def read_prompts(config: Config, data: dict[str, Path]) -> tuple[list[str], preference.PromptData]:
    """The RL prompts (``prompts``, else the distinct prompts of the training comparisons) and the held-out ones
    (``eval_prompts``, else the data's)."""
    train_prompts = (preference.read_prompt_data(config.prompts).prompt if config.prompts is not None
                     else sorted(set(preference.read_preference_data(data["preference"]).prompt)))
    return train_prompts, preference.read_prompt_data(config.eval_prompts or data["eval_prompts"])


def check_prompts(config: Config, data: dict[str, Path]) -> None:
    """Before anything trains: every RL and held-out prompt fits ``max_prompt_length`` (refused, never cut) as
    the SFT model will tokenize it. SFT exports keep their source's tokenizer, template and positions, so the
    source (``actor_model``, ``base_model`` or the synthetic model) answers for the trained model."""
    model = config.actor_model or config.base_model or common.SYNTHETIC
    model_source = common.open_model_source(common.Source(model=model, template=config.template), "float32")
    train_prompts, eval_data = read_prompts(config, data)
    prompts = train_prompts + eval_data.prompt
    length = prompt_length(config, model_source, prompts)
    preference.tokenize_prompts(model_source.tokenizer, prompts, length, model_source.template)


def _prompt_pool(tokenizer: Any, prompts: list[str], length: int, template: Any) -> rlhf_ppo.PromptPool:
    batch = preference.tokenize_prompts(tokenizer, prompts, length, template)
    return rlhf_ppo.PromptPool(jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask, jnp.int32))


def _categories(data: preference.PromptData) -> tuple[np.ndarray, tuple[str, ...]]:
    if "category" not in data.extras:
        return np.zeros(len(data), np.int32), ("all",)
    labels = [str(c) for c in data.extras["category"]]
    names = tuple(c for c in synthetic_safety.CATEGORIES if c in labels) + tuple(
        sorted(set(labels) - set(synthetic_safety.CATEGORIES)))
    return np.asarray([names.index(c) for c in labels], np.int32), names


def frozen_reference(actor: LlamaForCausalLM, variables: Any, dtype: str) -> tuple[LlamaForCausalLM | None, Any]:
    """The reference's module and parameters: the SFT model itself (module None: the actor's, the parameters
    shared with the initial actor), or a copy stored and run in ``dtype``."""
    if dtype == "float32":
        return None, variables
    module = LlamaForCausalLM(dataclasses.replace(actor.config, dtype=dtype, param_dtype=dtype))
    return module, jax.tree_util.tree_map(lambda x: np.asarray(x).astype(jnp.dtype(dtype)), variables)


def frozen_score_model(directory: str, loaded: tuple[score.LlamaForScore, Any], dtype: str
                       ) -> tuple[score.LlamaForScore, Any]:
    """The reward or cost model the RL stage scores with: ``loaded`` (float32, shared with the critic it
    starts), or the checkpoint read again, stored and run in ``dtype``."""
    if dtype == "float32":
        return loaded
    return score.load_score_model(directory, dtype=dtype, param_dtype=dtype)


def build_setup(config: Config, directories: dict[str, str], data: dict[str, Path]) -> Setup:
    """Loads the models, tokenizes prompts, and picks the training and evaluation scorers."""
    model_source = common.open_model_source(
        common.Source(model=directories["actor"], template=config.template), "float32")
    actor, actor_variables = hf_checkpoint.load_causal_lm(directories["actor"])
    key = jax.random.PRNGKey(config.seed)
    task = synthetic_safety.SyntheticSafetyTask() if config.synthetic else None
    learned = {}
    for kind in ("reward", "cost"):
        if directories.get(kind) is not None:
            learned[kind] = score.load_score_model(directories[kind])
    frozen_dtype = config.ppo.frozen_dtype
    if config.scorer == "learned":
        critics = learned["reward"], learned["cost"]  # the critics start from the score models (float32)
        (reward_model, reward_params), (cost_model, cost_params) = (
            frozen_score_model(directories[kind], learned[kind], frozen_dtype) for kind in ("reward", "cost"))
        train_scorers = (rlhf_ppo.score_model_scorer(reward_model), rlhf_ppo.score_model_scorer(cost_model))
        scorer_params = (reward_params, cost_params)
    else:
        require(task is not None, "scorer", "'ground_truth' needs the synthetic task's prompts")
        train_scorers = (rlhf_ppo.exact_scorer(synthetic_safety.ground_truth_reward),
                         rlhf_ppo.exact_scorer(synthetic_safety.ground_truth_cost))
        critics = tuple(rlhf_ppo.critic_from_backbone(actor, actor_variables, critic_key)
                        for critic_key in jax.random.split(key))
        scorer_params = (task.tables, task.tables)
    if config.ppo.advantage == "group":  # critic-free: four models, nothing to start critics from
        critics = (None, None), (None, None)
    if task is not None:
        eval_scorers = (rlhf_ppo.exact_scorer(synthetic_safety.ground_truth_reward),
                        rlhf_ppo.exact_scorer(synthetic_safety.ground_truth_cost))
        eval_params = (task.tables, task.tables)
    else:
        eval_scorers, eval_params = train_scorers, scorer_params
    reference, reference_params = frozen_reference(actor, actor_variables, frozen_dtype)
    models = rlhf_ppo.RLHFModels(actor, critics[0][0], critics[1][0], *train_scorers, reference=reference)
    train_prompts, eval_data = read_prompts(config, data)
    categories, names = _categories(eval_data)
    template = model_source.template
    max_prompt_length = prompt_length(config, model_source, train_prompts + eval_data.prompt)
    ptx = None
    if config.ptx:
        sft_data = preference.read_sft_data(data["sft"])
        arrays = sft.tokenize(model_source, sft_data, max_prompt_length + config.ppo.max_new_tokens)
        ptx = rlhf_ppo.PTXData(*(jnp.asarray(arrays[k]) for k in ("tokens", "attention_mask", "loss_mask")))
    return Setup(
        models=models,
        frozen=rlhf_ppo.FrozenParams(reference_params, *scorer_params),
        actor_params=actor_variables,
        reward_critic_params=critics[0][1],
        cost_critic_params=critics[1][1],
        prompts=_prompt_pool(model_source.tokenizer, train_prompts, max_prompt_length, template),
        eval_prompts=_prompt_pool(model_source.tokenizer, eval_data.prompt, max_prompt_length, template),
        eval_categories=categories,
        category_names=names,
        eval_scorers=eval_scorers,
        eval_scorer_params=eval_params,
        ptx=ptx,
        actor_source=model_source)


def place_setup(setup: Setup, mesh: jax.sharding.Mesh) -> Setup:
    """``setup`` laid out on ``mesh``: every model fully sharded (``parallel.shard_models``: the reference,
    reward and cost models, the actor and critics' initial parameters), prompts, PTX data and the exact
    scorers' tables on every device. A model that several fields share (the SFT model is both the initial
    actor and the reference; learned score models start the critics) is placed once and stays shared."""
    placed: dict[int, Any] = {}

    def place(tree: Any, models: bool = True) -> Any:
        if id(tree) not in placed:
            placed[id(tree)] = parallel.shard_models(tree, mesh) if models else parallel.replicate(tree, mesh)
        return placed[id(tree)]

    return setup._replace(
        frozen=rlhf_ppo.FrozenParams(*(place(params) for params in setup.frozen)),
        actor_params=place(setup.actor_params),
        reward_critic_params=place(setup.reward_critic_params),
        cost_critic_params=place(setup.cost_critic_params),
        prompts=place(setup.prompts, models=False),
        eval_prompts=place(setup.eval_prompts, models=False),
        eval_scorer_params=tuple(place(params) for params in setup.eval_scorer_params),
        ptx=place(setup.ptx, models=False))


def _check_prompt_pool(config: Config, setup: Setup) -> None:
    available = setup.prompts.tokens.shape[0]
    if config.prompts_per_step > available:
        raise ConfigError(f"prompts_per_step: {config.prompts_per_step} exceeds the {available} distinct "
                          "training prompts")


# --------------------------------------------------------------------------------------------------
# RL stages


def seed_keys(config: Config, method: str) -> jax.Array:
    """One key per seed, distinct per method."""
    base = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1 + METHODS.index(method))
    return jax.random.split(base, config.num_seeds)


def train_method(method: str, config: Config, setup: Setup, ctx: Any) -> rlhf_ppo.TrainState:
    """Stage ``method``: ``num_steps`` RL steps for every seed at once; returns the seed-batched state.

    With ``ctx.mesh`` (``setup`` placed by :func:`place_setup`) the state is created directly in its
    layout: actor, critics and their AdamW moments fully sharded over the mesh, each seed's like one
    model's, the seed axis, multiplier, cost window and keys replicated (``parallel.model_rules``).
    """
    signal = cost_signal(method, config)
    spec = rlhf_ppo.StepSpec(config.prompts_per_step, config.responses_per_prompt, config.training_cost_limit)
    ppo, models, critics = config.ppo, setup.models, (setup.reward_critic_params, setup.cost_critic_params)
    if method in GROUP_METHODS:  # this method alone without critics
        ppo = dataclasses.replace(ppo, advantage="group")
    if ppo.advantage == "group":
        models, critics = dataclasses.replace(models, reward_critic=None, cost_critic=None), (None, None)
    step = rlhf_ppo.make_rl_step(models, ppo, signal, spec, config.num_steps, ctx.mesh)
    chunk = rlhf_ppo.make_chunk(step, config.steps_per_chunk, num_seeds=config.num_seeds)
    window = config.safe_rlhf.cost_window

    def init_seeds(actor: Any, reward_critic: Any, cost_critic: Any, keys: jax.Array) -> rlhf_ppo.TrainState:
        return jax.vmap(lambda key: rlhf_ppo.init_state(ppo, signal, actor, reward_critic, cost_critic, key,
                                                        config.num_steps, window))(keys)

    arguments = (setup.actor_params, *critics, seed_keys(config, method))

    def init_state() -> rlhf_ppo.TrainState:
        if ctx.mesh is None:
            return init_seeds(*arguments)
        # Never whole on one device: S copies of the actor and critics with two moments each.
        layout = parallel.model_shardings(jax.eval_shape(init_seeds, *arguments), ctx.mesh, leading_dims=1)
        return jax.jit(init_seeds, out_shardings=layout)(*arguments)

    return ctx.loop(method, init_state, lambda s: chunk(s, setup.frozen, setup.prompts, setup.ptx),
                    config.num_steps // config.steps_per_chunk, steps_per_chunk=config.steps_per_chunk,
                    checkpoint_every=config.checkpoint_every,
                    progress_keys=("reward", "cost", "violating_prompts", "multiplier"),
                    placement=lambda state, mesh: parallel.shard_models(state, mesh, leading_dims=1))


def train_preference_method(method: str, config: Config, directories: dict[str, str], data: dict[str, Path],
                            ctx: Any) -> Any:
    """Stage ``method`` (SafeDPO or SACPO, :mod:`algorithms.llm.dpo`) from the SFT model on the comparisons the
    score models learn from, once per seed (seed i shuffles and holds out with ``seed + i``) in
    ``<run>/<method>_seed<i>``; returns the actors' variables stacked on a leading seed axis."""
    require("preference" in data, "methods", f"{method} learns from comparisons: give preference_data (or "
            "train it with the experiment of the same name)")
    actors = []
    for index in range(config.num_seeds):
        source = common.Source(model=directories["actor"], data=str(data["preference"]), template=config.template,
                               seed=config.seed + index)
        trained = dpo.train(method, getattr(config, method), source, ctx.child(f"{method}_seed{index}"))
        actors.append({"params": trained.params})
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *actors)


# --------------------------------------------------------------------------------------------------
# Evaluation


def make_evaluator(config: Config, setup: Setup) -> Callable[[Any, jax.Array], dict[str, jax.Array]]:
    """Jitted ``(actor params, key) -> scores`` of sampled responses to the held-out prompts."""
    sampling = dataclasses.replace(rlhf_ppo.sampling_config(setup.models, config.ppo),
                                   temperature=config.eval_temperature)
    reward_scorer, cost_scorer = setup.eval_scorers
    reward_params, cost_params = setup.eval_scorer_params

    @jax.jit
    def evaluate(actor_params: Any, key: jax.Array) -> dict[str, jax.Array]:
        dialogues = llm_evaluation.generate_responses(
            setup.models.actor, actor_params, setup.eval_prompts.tokens, setup.eval_prompts.mask, key, sampling,
            config.eval_responses_per_prompt)
        scored = (dialogues.tokens, dialogues.attention_mask, dialogues.response_mask)
        return {"rewards": reward_scorer(reward_params, *scored), "costs": cost_scorer(cost_params, *scored),
                "prompt_ids": dialogues.prompt_ids}

    return evaluate


def report_row(config: Config, setup: Setup, scores: dict[str, np.ndarray], base: dict[str, np.ndarray]
               ) -> dict[str, float]:
    """The table's figures for one policy (one seed) against the SFT responses."""
    categories = jnp.asarray(setup.eval_categories)
    safety = llm_evaluation.safety_report(scores["rewards"], scores["costs"], scores["prompt_ids"], categories,
                                          categories.shape[0], len(setup.category_names), config.cost_limit)
    arena = llm_evaluation.arena_report(scores["rewards"], scores["costs"], base["rewards"], base["costs"],
                                        config.cost_limit)
    row = {name: float(value) for name, value in safety._asdict().items() if name != "category_safe_rate"}
    row.update({f"safe_rate/{name}": float(value)
                for name, value in zip(setup.category_names, np.asarray(safety.category_safe_rate))})
    row.update({f"arena/{name}": float(value) for name, value in arena._asdict().items()})
    return row


TABLE_COLUMNS = (("mean_reward", "reward"), ("mean_cost", "cost"), ("safe_rate", "safe responses"),
                 ("safe_prompt_rate", "safe prompts"), ("worst_category_safe_rate", "worst category"),
                 ("interference", "interference"), ("arena/helpfulness_win", "helpfulness win vs SFT"),
                 ("arena/harmlessness_win", "harmlessness win vs SFT"))


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def write_tables(run_dir: Path, rows: dict[str, list[dict[str, float]]], category_names: tuple[str, ...]) -> str:
    """``results.csv`` (one line per method and seed) and ``results.md`` (mean +- std); returns the markdown."""
    keys = list(next(iter(rows.values()))[0])
    with open(run_dir / "results.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["method", "seed", *keys])
        for method, seeds in rows.items():
            for index, row in enumerate(seeds):
                writer.writerow([method, index, *(f"{row[k]:.6g}" for k in keys)])
    columns = list(TABLE_COLUMNS) + [(f"safe_rate/{c}", f"safe: {c}") for c in category_names]
    lines = ["| method | " + " | ".join(label for _, label in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for method, seeds in rows.items():
        cells = []
        for key, _ in columns:
            mean, std = _mean_std([row[key] for row in seeds])
            cells.append(f"{mean:.3f}" if len(seeds) == 1 else f"{mean:.3f} +- {std:.3f}")
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n"
    (run_dir / "results.md").write_text(markdown, encoding="utf-8")
    return markdown


def plot_categories(run_dir: Path, rows: dict[str, list[dict[str, float]]], category_names: tuple[str, ...]
                    ) -> Path:
    """A grouped bar chart of the safe-response rate per prompt category (mean and std over seeds)."""
    figure, axes = plotting.new_figure((7, 4))
    width = 0.8 / len(rows)
    positions = np.arange(len(category_names))
    for index, (method, seeds) in enumerate(rows.items()):
        stats = [_mean_std([row[f"safe_rate/{c}"] for row in seeds]) for c in category_names]
        axes.bar(positions + index * width, [m for m, _ in stats], width, yerr=[s for _, s in stats],
                 label=METHOD_LABELS[method], capsize=2)
    axes.set_xticks(positions + width * (len(rows) - 1) / 2, category_names)
    axes.set_ylabel("safe-response rate (held-out prompts)")
    axes.set_ylim(0, 1.05)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3, axis="y")
    return plotting.save(figure, run_dir / "plots" / "safe_rate_by_category.png")


def eval_key(config: Config) -> jax.Array:
    """The key of the held-out evaluation (the SFT model's; seed i of a method takes split i of it)."""
    return jax.random.fold_in(jax.random.PRNGKey(config.seed), 1000)


def evaluate_seeds(config: Config, setup: Setup, evaluate: Callable, actor: Any, base: dict[str, np.ndarray]
                   ) -> list[dict[str, float]]:
    """Table rows of one method's seeds (``actor``: variables with a leading seed axis) against the SFT
    responses ``base``, on the held-out prompts."""
    seed_eval_keys = jax.random.split(eval_key(config), config.num_seeds)
    scores = parallel.to_host(jax.vmap(evaluate)(actor, seed_eval_keys))
    return [report_row(config, setup, jax.tree_util.tree_map(lambda x: x[i], scores), base)
            for i in range(config.num_seeds)]


def policy_dir(ctx: Any, method: str, seed: int) -> Path:
    """Where seed ``seed`` of ``method`` is exported: ``<run>/<method>_seed<i>/model`` (SafeDPO and SACPO's
    sub-runs export there too)."""
    return Path(ctx.run_dir) / f"{method}_seed{seed}" / common.MODEL_DIR


def export_policies(method: str, config: Config, setup: Setup, actor: Any, ctx: Any) -> list[str]:
    """Each seed's RL policy as a Hugging Face directory (``sft.export``: weights, tokenizer files, chat
    template, and a generation config with the rollouts' sampling); returns the directories."""
    sampling = rlhf_ppo.sampling_config(setup.models, config.ppo)
    directories = []
    for seed in range(config.num_seeds):
        directory = policy_dir(ctx, method, seed)
        params = jax.tree_util.tree_map(lambda x: x[seed], actor["params"])
        sft.export(str(directory), setup.models.actor, params, setup.actor_source, "float32", sampling)
        directories.append(str(directory))
    return directories


def release_memory() -> None:
    """Between two methods: what the last one held (train state, policies) goes back to the system."""
    memory.release_freed_memory()


def run(config: Config, ctx: Any) -> dict[str, float]:
    """All stages; returns each method's mean figures over seeds."""
    data = write_synthetic_data(config, ctx) if config.synthetic else write_input_data(config, ctx)
    check_prompts(config, data)
    directories = train_models(config, ctx, data)
    setup = build_setup(config, directories, data)
    if ctx.mesh is not None:
        setup = place_setup(setup, ctx.mesh)
    _check_prompt_pool(config, setup)
    evaluate = make_evaluator(config, setup)
    base = parallel.to_host(evaluate(setup.actor_params, eval_key(config)))
    rows = {"sft": [report_row(config, setup, base, base)]}
    # One method at a time: trained, exported, evaluated, then released before the next one trains (only
    # its table rows stay).
    for method in config.methods:
        if method in PREFERENCE_METHODS:
            actor = train_preference_method(method, config, directories, data, ctx)
        else:
            actor = train_method(method, config, setup, ctx).actor
            export_policies(method, config, setup, actor, ctx)
        rows[method] = evaluate_seeds(config, setup, evaluate, actor, base)
        del actor
        release_memory()
    if ctx.is_main:  # one writer in a multi-process run
        run_dir = Path(ctx.run_dir)
        write_tables(run_dir, rows, setup.category_names)
        plot_categories(run_dir, rows, setup.category_names)
    return {f"{method}/{key}": _mean_std([row[key] for row in seeds])[0]
            for method, seeds in rows.items() for key in seeds[0]}


# --------------------------------------------------------------------------------------------------
# One method alone (registry rows safe_rlhf, repo, rlhf_ppo, rlhf_shaping)


def stage_configs(config: Config) -> dict[str, Any]:
    """What the stages run with: the shared settings, and each chosen method's own section (a critic-free
    method reads its PPO version's)."""
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in METHOD_SECTIONS}
    return {"shared": shared, **{section: getattr(config, section) for section in METHOD_SECTIONS
                                 if section not in config.inactive_sections}}


def _single_method(method: str) -> Experiment:
    fields = [("methods", tuple[str, ...], dataclasses.field(default=(method,)))]
    config_cls = dataclasses.make_dataclass(f"{method}_config", fields, bases=(Config,), frozen=True)
    config_cls.__doc__ = f"The pipeline with the {METHOD_LABELS[method]} RL stage only."
    return Experiment(config_cls, run, stage_configs)


RLHF_PIPELINE = Experiment(Config, run, stage_configs)
SAFE_RLHF = _single_method("safe_rlhf")
REPO = _single_method("repo")
PPO = _single_method("ppo")
SHAPING = _single_method("shaping")
