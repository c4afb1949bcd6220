"""Plumbing shared by the LLM trainers (SFT, reward model, cost model).

* where the model comes from: a tiny Llama built in code for the synthetic safety task
  (``constrained_rl.data.synthetic_safety``), or a local Hugging Face directory (config.json, safetensors,
  tokenizer.json);
* where the data comes from: generated on the fly for the synthetic task, or a ``.jsonl`` / ``.parquet``
  file, tokenized to right-padded arrays and split into a training and a held-out part;
* hyperparameters: presets (Safe-RLHF's published settings, and a quick one for the synthetic task on a
  CPU) that explicitly set fields override;
* the optimiser: AdamW behind a global-norm clip, linear warmup then cosine decay to 0 (Safe-RLHF's
  ``--lr_scheduler_type cosine --lr_warmup_ratio 0.03``);
* the loop: the whole tokenized dataset lives on the device; each update draws its rows from a
  per-epoch permutation inside a jitted ``lax.scan``, the held-out split is evaluated after every chunk,
  and :meth:`experiments.context.RunContext.loop` logs, checkpoints and resumes;
* devices: with a mesh (``ctx.mesh``) the parameters and AdamW moments are fully sharded over it
  (``parallel.shard_models``), the data sit on every device and each update's rows are split;
* the Hugging Face export the RL stage reads: config.json + safetensors + tokenizer files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from constrained_rl import parallel
from constrained_rl.config import ConfigError, require
from constrained_rl.data import synthetic_safety
from constrained_rl.models import hf_checkpoint, hf_export, llama
from constrained_rl.models import tokenizer as tokenizer_lib
from constrained_rl.schedules import learning_rate_schedule  # also common.learning_rate_schedule

SYNTHETIC = "synthetic"
MODEL_DIR = "model"  # the Hugging Face export inside the run directory

PyTree = Any
Arrays = dict[str, np.ndarray]
Dtype = Literal["float32", "bfloat16"]
PresetName = Literal["safe_rlhf", "quick"]


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the model and the data come from."""

    model: str = SYNTHETIC  # "synthetic" (tiny Llama for the synthetic task) or a local Hugging Face directory
    data: str = SYNTHETIC  # "synthetic" (generated) or a .jsonl / .parquet file
    eval_data: str | None = None  # held-out file; none = hold out eval_fraction of the data
    eval_fraction: float = 0.1  # share of the rows held out when eval_data is none
    synthetic_rows: int = 4096  # rows generated when data is "synthetic" (held-out part included)
    # prompt template: auto (the model's chat template if it has one, else safe-rlhf), chat, safe-rlhf, alpaca,
    # plain, or a JSON file
    template: str = "auto"
    seed: int = 0  # data generation, the split, the initialisation and the shuffling

    def __post_init__(self) -> None:
        require(0.0 < self.eval_fraction < 1.0, "eval_fraction", f"must be in (0, 1), got {self.eval_fraction}")
        require(self.synthetic_rows >= 2, "synthetic_rows", f"must be >= 2, got {self.synthetic_rows}")


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """The settings a preset fixes (explicit Training fields override them)."""

    epochs: int  # passes over the training rows
    learning_rate: float  # peak AdamW step size
    batch_size: int  # rows per update
    max_length: int  # tokens per sequence
    weight_decay: float  # AdamW decoupled weight decay
    dtype: str  # computation dtype


@dataclasses.dataclass(frozen=True)
class Training:
    """Optimiser and loop settings; a field left none takes the preset's value."""

    preset: PresetName | None = None  # none: "quick" for the synthetic model, "safe_rlhf" otherwise
    epochs: int | None = None  # passes over the training rows
    learning_rate: float | None = None  # peak AdamW step size
    batch_size: int | None = None  # rows per update
    # tokens per sequence; longer ones are cut on the right. None: the preset's for the synthetic data, the
    # longest row of a file (refused above the model's max_position_embeddings)
    max_length: int | None = None
    weight_decay: float | None = None  # AdamW decoupled weight decay (not on norms and biases)
    dtype: Dtype | None = None  # computation dtype; parameters and optimiser state stay float32
    warmup_ratio: float = 0.03  # share of the updates with linear warmup before the cosine decay to 0
    adam_b1: float = 0.9  # AdamW first-moment decay
    adam_b2: float = 0.95  # AdamW second-moment decay
    max_grad_norm: float = 1.0  # global gradient-norm clip
    eval_batch_size: int = 64  # rows per held-out forward pass
    steps_per_chunk: int = 50  # updates per jitted chunk (the held-out split is evaluated after each)
    checkpoint_every: int = 10  # chunks between orbax checkpoints

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, f"must be >= 1, got {value}")
        require(self.learning_rate is None or self.learning_rate > 0, "learning_rate",
                f"must be > 0, got {self.learning_rate}")
        require(self.weight_decay is None or self.weight_decay >= 0, "weight_decay",
                f"must be >= 0, got {self.weight_decay}")
        require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        require(0.0 <= self.adam_b1 < 1.0, "adam_b1", f"must be in [0, 1), got {self.adam_b1}")
        require(0.0 <= self.adam_b2 < 1.0, "adam_b2", f"must be in [0, 1), got {self.adam_b2}")
        require(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        require(self.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        require(self.steps_per_chunk >= 1, "steps_per_chunk", f"must be >= 1, got {self.steps_per_chunk}")
        require(self.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")


def resolve_hyperparameters(training: Training, source: Source,
                            presets: Mapping[str, Hyperparameters]) -> Hyperparameters:
    """The preset named by ``training.preset`` (or chosen by the model source), with explicit fields on top."""
    name = training.preset or ("quick" if source.model == SYNTHETIC else "safe_rlhf")
    chosen = presets[name]
    explicit = {f.name: getattr(training, f.name) for f in dataclasses.fields(Hyperparameters)
                if getattr(training, f.name) is not None}
    return dataclasses.replace(chosen, **explicit)


# ------------------------------------------------------------------------------------------ model


class ModelSource(NamedTuple):
    """A resolved model source: its tokenizer, prompt template and architecture."""

    tokenizer: Any  # has encode(text) -> ids, pad_id, eos_id
    template: tokenizer_lib.Template  # a string template or the checkpoint's chat template
    config: llama.LlamaConfig  # with the computation dtype, float32 parameters
    directory: str | None  # the Hugging Face directory, None for the synthetic model
    task: synthetic_safety.SyntheticSafetyTask | None  # the synthetic task, None for a directory


def synthetic_llama_config(tokenizer: synthetic_safety.WordTokenizer, dtype: str = "float32") -> llama.LlamaConfig:
    """A tiny Llama (2 blocks, width 64, 4 query / 2 key-value heads) over the synthetic task's words."""
    return llama.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_id, eos_token_id=(tokenizer.eos_id,), pad_token_id=tokenizer.pad_id,
        dtype=dtype, param_dtype="float32")


def open_model_source(source: Source, dtype: str) -> ModelSource:
    """Tokenizer, template and architecture of ``source.model``; a bad directory is a ConfigError."""
    if source.model == SYNTHETIC:
        template = tokenizer_lib.load_template(source.template)
        task = synthetic_safety.SyntheticSafetyTask()
        return ModelSource(task.tokenizer, template, synthetic_llama_config(task.tokenizer, dtype), None, task)
    if not os.path.isdir(source.model):
        raise ConfigError(f"model: {source.model!r} is neither 'synthetic' nor a directory")
    tokenizer = tokenizer_lib.load_tokenizer(source.model)
    template = tokenizer_lib.load_template(source.template, source.model)
    if tokenizer.eos_id is None:
        raise ConfigError(f"{source.model}: the tokenizer names no eos_token (tokenizer_config.json), which "
                          "ends every response")
    config = hf_checkpoint.load_config(source.model, dtype=dtype, param_dtype="float32")
    return ModelSource(tokenizer, template, config, source.model, None)


def save_tokenizer(directory: str, model_source: ModelSource) -> None:
    """Writes the tokenizer files (and chat template) next to an exported model so that ``load_tokenizer`` and
    transformers' ``AutoTokenizer`` read it (``hf_export.write_tokenizer_files``)."""
    os.makedirs(directory, exist_ok=True)
    if model_source.directory is not None:
        hf_export.write_tokenizer_files(model_source.directory, directory)
        return
    model_source.task.save_tokenizer(os.path.join(directory, "tokenizer.json"))
    special = {"bos_token": synthetic_safety.BOS, "eos_token": synthetic_safety.EOS,
               "pad_token": synthetic_safety.PAD, "unk_token": synthetic_safety.UNK, "add_bos_token": False}
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as file:
        json.dump(special, file, indent=2)


# ------------------------------------------------------------------------------------------- data


def format_responses(template: tokenizer_lib.Template, responses: list[str]) -> list[str]:
    """Each response as the template writes an assistant turn (the identity for the built-in templates)."""
    return [template.format_response(response) for response in responses]


def sequence_length(training: Training, source: Source, hyper: Hyperparameters) -> int | None:
    """Tokens per training sequence: the explicit ``training.max_length``, the preset's on the synthetic
    data, or None for a file (the trainers then use its longest row: nothing is cut)."""
    if training.max_length is not None or source.data == SYNTHETIC:
        return hyper.max_length
    return None


def check_positions(arrays: Arrays, config: llama.LlamaConfig, setting: str = "max_length") -> None:
    """Refuses token arrays wider than the model's positions (ConfigError naming the setting that cuts)."""
    width = max((value.shape[-1] for name, value in arrays.items() if name.endswith("tokens")), default=0)
    if width > config.max_position_embeddings:
        raise ConfigError(f"{setting}: the longest row has {width} tokens, more than the model's "
                          f"max_position_embeddings={config.max_position_embeddings}; set {setting} to at most "
                          f"{config.max_position_embeddings} to cut longer rows on the right")


def split_rows(arrays: Arrays, eval_fraction: float, seed: int) -> tuple[Arrays, Arrays]:
    """A seeded random split of row-aligned arrays into (train, held out); both parts keep >= 1 row."""
    num_rows = len(next(iter(arrays.values())))
    num_eval = min(max(1, round(eval_fraction * num_rows)), num_rows - 1)
    order = np.random.default_rng(seed).permutation(num_rows)
    pick = lambda rows: {name: value[rows] for name, value in arrays.items()}  # noqa: E731
    return pick(order[num_eval:]), pick(order[:num_eval])


def load_arrays(source: Source, model_source: ModelSource, max_length: int | None,
                read_file: Callable[[str], Any], generate: Callable[[Any, int, int], Any],
                tokenize: Callable[[Any, int], Arrays]) -> tuple[Arrays, Arrays]:
    """Training and held-out arrays: ``tokenize(read_file(path) or generate(task, rows, seed), max_length)``.

    Without ``source.eval_data`` a seeded ``eval_fraction`` of the rows is held out. ``max_length`` None:
    each part as wide as its longest row, refused above the model's positions.
    """
    if source.data == SYNTHETIC:
        # The task's texts are tokenized with the model's tokenizer: an export of the synthetic model
        # (an SFT run) carries the task's word tokenizer.
        task = model_source.task or synthetic_safety.SyntheticSafetyTask()
        data = generate(task, source.synthetic_rows, source.seed)
    else:
        data = read_file(source.data)
    arrays = tokenize(data, max_length)
    check_positions(arrays, model_source.config)
    if source.eval_data is None:
        if len(next(iter(arrays.values()))) < 2:
            raise ConfigError(f"data: {source.data}: needs at least 2 rows to hold some out")
        return split_rows(arrays, source.eval_fraction, source.seed)
    held_out = tokenize(read_file(source.eval_data), max_length)
    check_positions(held_out, model_source.config)
    return arrays, held_out


def num_rows(arrays: PyTree) -> int:
    return int(jax.tree.leaves(arrays)[0].shape[0])


def take_rows(arrays: PyTree, rows: jax.Array) -> PyTree:
    return jax.tree.map(lambda x: x[rows], arrays)


def epoch_batch_rows(key: jax.Array, step: jax.Array, total_rows: int, batch_size: int) -> jax.Array:
    """Row indices ``[batch_size]`` of update ``step``: slice ``step mod E`` of epoch ``step // E``'s permutation.

    ``E = total_rows // batch_size`` updates per epoch (the remainder rows of each permutation wait for
    another epoch). The permutation of epoch e is drawn with ``fold_in(key, e)``, so the batch is a pure
    function of (key, step) and a resumed run sees the same batches.
    """
    per_epoch = total_rows // batch_size
    order = jax.random.permutation(jax.random.fold_in(key, step // per_epoch), total_rows)
    return jax.lax.dynamic_slice_in_dim(order, (step % per_epoch) * batch_size, batch_size)


def eval_batches(arrays: Arrays, batch_size: int) -> tuple[Arrays, np.ndarray]:
    """Held-out arrays reshaped to ``[num_batches, batch_size, ...]`` (the last batch padded with row 0)
    and the matching row mask (1 on real rows)."""
    count = num_rows(arrays)
    batch_size = min(batch_size, count)
    batches = math.ceil(count / batch_size)
    rows = np.concatenate([np.arange(count), np.zeros(batches * batch_size - count, np.int64)])
    mask = (np.arange(batches * batch_size) < count).astype(np.float32).reshape(batches, batch_size)
    shaped = {name: value[rows].reshape(batches, batch_size, *value.shape[1:]) for name, value in arrays.items()}
    return shaped, mask


# ------------------------------------------------------------------------------------- optimiser


def _decay_mask(params: PyTree) -> PyTree:
    # Safe-RLHF (like most LLM recipes) decays matrices only, not norm weights and biases.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(hyper: Hyperparameters, training: Training, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clip, then AdamW on the warmup + cosine schedule."""
    schedule = learning_rate_schedule(hyper.learning_rate, total_steps, training.warmup_ratio)
    return optax.chain(
        optax.clip_by_global_norm(training.max_grad_norm),
        optax.adamw(schedule, b1=training.adam_b1, b2=training.adam_b2, eps=1e-8,
                    weight_decay=hyper.weight_decay, mask=_decay_mask),
    )


# ------------------------------------------------------------------------------------------ loop

# loss_fn(params, batch, row_mask) -> (loss, metrics); metrics hold "loss" and any accuracies.
LossFn = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class TrainState(NamedTuple):
    params: PyTree
    optimizer_state: optax.OptState
    step: jax.Array  # updates done
    key: jax.Array  # draws each epoch's permutation


class Schedule(NamedTuple):
    """How many updates a run makes, in chunks of equal length (the last chunk may run into a new epoch)."""

    steps_per_epoch: int
    steps_per_chunk: int
    num_chunks: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_chunk * self.num_chunks


def make_schedule(train_rows: int, hyper: Hyperparameters, training: Training) -> Schedule:
    per_epoch = train_rows // hyper.batch_size
    if per_epoch < 1:
        raise ConfigError(f"batch_size: {hyper.batch_size} exceeds the {train_rows} training rows")
    total = per_epoch * hyper.epochs
    per_chunk = min(training.steps_per_chunk, total)
    return Schedule(per_epoch, per_chunk, math.ceil(total / per_chunk))


def make_evaluate(loss_fn: LossFn) -> Callable[[PyTree, Arrays, jax.Array], dict[str, jax.Array]]:
    """``evaluate(params, batches, mask)``: each metric averaged over the real held-out rows.

    Each batch's metric is weighted by its number of real rows (for the token-level SFT loss this weights
    by rows, not tokens, across batches).
    """

    def evaluate(params: PyTree, batches: Arrays, mask: jax.Array) -> dict[str, jax.Array]:
        def one(_, inputs):
            batch, row_mask = inputs
            _, metrics = loss_fn(params, batch, row_mask)
            return None, (metrics, jnp.sum(row_mask))

        _, (metrics, weights) = jax.lax.scan(one, None, (batches, mask))
        return jax.tree.map(lambda m: jnp.sum(m * weights) / jnp.sum(weights), metrics)

    return evaluate


def make_chunk(loss_fn: LossFn, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               batch_size: int, steps_per_chunk: int, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """Jitted ``chunk(state, train, eval_batches, eval_mask) -> (state, metrics)``.

    ``steps_per_chunk`` updates in ``lax.scan`` (per-step metrics), then the held-out metrics
    (``eval/<name>``) of the new parameters. The data are arguments, not constants baked into the program.
    With ``mesh`` each update's rows are split over its batch axis (``parallel.constrain_rows``).
    """
    evaluate = make_evaluate(loss_fn)

    def update(train: Arrays, state: TrainState) -> tuple[TrainState, dict[str, jax.Array]]:
        rows = epoch_batch_rows(state.key, state.step, num_rows(train), batch_size)
        batch = parallel.constrain_rows(take_rows(train, rows), mesh)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, batch, jnp.ones(batch_size, jnp.float32))
        updates, optimizer_state = optimizer.update(grads, state.optimizer_state, state.params)
        metrics = {**metrics, "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state.step)}
        new_state = TrainState(optax.apply_updates(state.params, updates), optimizer_state, state.step + 1,
                               state.key)
        return new_state, metrics

    @jax.jit
    def chunk(state: TrainState, train: Arrays, batches: Arrays, mask: jax.Array):
        state, metrics = jax.lax.scan(lambda s, _: update(train, s), state, None, length=steps_per_chunk)
        held_out = evaluate(state.params, batches, mask)
        return state, {**metrics, **{f"eval/{name}": value for name, value in held_out.items()}}

    return chunk


class FitResult(NamedTuple):
    state: TrainState
    initial_eval: dict[str, float]  # held-out metrics of the initial parameters
    final_eval: dict[str, float]  # held-out metrics of the trained parameters
    schedule: Schedule


def fit(ctx: Any, stage: str, loss_fn: LossFn, params: PyTree, train: Arrays, held_out: Arrays,
        hyper: Hyperparameters, training: Training, key: jax.Array,
        progress_keys: tuple[str, ...] = ("loss", "eval/loss")) -> FitResult:
    """Trains ``params`` on ``loss_fn`` as stage ``stage`` of ``ctx.loop``; evaluates before and after."""
    schedule = make_schedule(num_rows(train), hyper, training)
    lr_schedule = learning_rate_schedule(hyper.learning_rate, schedule.total_steps, training.warmup_ratio)
    optimizer = make_optimizer(hyper, training, schedule.total_steps)
    mesh = getattr(ctx, "mesh", None)
    chunk = make_chunk(loss_fn, optimizer, lr_schedule, hyper.batch_size, schedule.steps_per_chunk, mesh)
    evaluate = jax.jit(make_evaluate(loss_fn))
    held_out_batches = eval_batches(held_out, training.eval_batch_size)
    if mesh is None:
        device_train, (batches, mask), params = jax.device_put((train, held_out_batches, params))
    else:  # the model fully sharded over the mesh (parallel.model_rules), the data on every device
        device_train, (batches, mask) = parallel.replicate((train, held_out_batches), mesh)
        params = parallel.shard_models(params, mesh)

    def init_state() -> TrainState:
        return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), key)

    initial_eval = _host(evaluate(params, batches, mask))
    state = ctx.loop(stage, init_state, lambda s: chunk(s, device_train, batches, mask), schedule.num_chunks,
                     steps_per_chunk=schedule.steps_per_chunk, checkpoint_every=training.checkpoint_every,
                     progress_keys=progress_keys, placement=parallel.shard_models)
    return FitResult(state, initial_eval, _host(evaluate(state.params, batches, mask)), schedule)


def _host(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    return {name: float(value) for name, value in jax.device_get(dict(metrics)).items()}


class Trained(NamedTuple):
    """What a trainer hands on: the model, its trained parameters, where it was exported, the summary."""

    model: Any  # the flax module
    params: PyTree  # trained parameters
    model_dir: str  # the Hugging Face export
    summary: dict[str, Any]  # held-out metrics before / after, sizes


def summarize(result: FitResult, train: Arrays, held_out: Arrays, model_dir: str) -> dict[str, Any]:
    """The run summary: held-out metrics before and after training, sizes and where the model went."""
    return {
        **{f"eval/{name}": value for name, value in result.final_eval.items()},
        **{f"eval/initial_{name}": value for name, value in result.initial_eval.items()},
        "train_rows": num_rows(train),
        "eval_rows": num_rows(held_out),
        "updates": result.schedule.total_steps,
        "model_dir": model_dir,
    }
