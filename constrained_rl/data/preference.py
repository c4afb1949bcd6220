"""Preference, SFT and prompt data in the PKU-SafeRLHF schema, and their tokenization.

PKU-SafeRLHF (Ji et al. 2023, "BeaverTails" / Safe-RLHF, Dai et al. 2023) stores one comparison per row:

    prompt, response_0, response_1,
    better_response_id   in {0, 1}   the more helpful response
    safer_response_id    in {0, 1}   the more harmless response
    is_response_0_safe   bool
    is_response_1_safe   bool

plus optional extra fields (a harm category, severity, ...), kept as ``extras``. Files are JSONL (one JSON
object per line) or parquet. Every row is validated; all bad rows are counted and the first few reported
in one :class:`~constrained_rl.config.ConfigError`, by 1-based line number for JSONL and 0-based row index
for parquet.

Tokenization turns rows into right-padded numpy arrays, following Safe-RLHF's layout: the prompt is
formatted with a template (data, not code), encoded, and the response plus an end-of-sequence token
follow it. Prompt and response are encoded separately, so the boundary between them is exact for any
tokenizer. The tokenizer is any object with ``encode(text) -> list[int]`` and ``pad_id`` / ``eos_id``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from constrained_rl.config import ConfigError

# Safe-RLHF's conversation template (PROMPT_BEGIN + PROMPT_USER + PROMPT_ASSISTANT).
SAFE_RLHF_PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"

# How many bad rows one error message lists before summarising the rest as a count.
MAX_REPORTED_ROWS = 5

# Hand-written, illustrative files in this schema (not PKU-SafeRLHF; see examples/README.md): 48 comparisons
# and 16 held-out prompts with a category.
EXAMPLES = pathlib.Path(__file__).parent / "examples"
EXAMPLE_PREFERENCE_FILE = EXAMPLES / "safety_preference.jsonl"
EXAMPLE_EVAL_PROMPTS_FILE = EXAMPLES / "safety_eval_prompts.jsonl"


class Tokenizer(Protocol):
    """The minimal tokenizer the helpers need: a text encoder and two special ids."""

    @property
    def pad_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


# ---------------------------------------------------------------------------------------------------
# Row validation


def _check_text(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    return None


def _check_nonempty_text(value: Any) -> str | None:
    problem = _check_text(value)
    if problem is None and not value.strip():
        return "must be a non-empty string"
    return problem


def _check_response_id(value: Any) -> str | None:
    # bool is a subclass of int: true/false is a type error here, not an id.
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an integer 0 or 1, got {type(value).__name__}"
    if value not in (0, 1):
        return f"must be 0 or 1, got {value}"
    return None


def _check_flag(value: Any) -> str | None:
    if not isinstance(value, bool):
        return f"must be a boolean, got {type(value).__name__}"
    return None


FieldCheck = Callable[[Any], "str | None"]

PREFERENCE_SCHEMA: dict[str, FieldCheck] = {
    "prompt": _check_nonempty_text,
    "response_0": _check_text,
    "response_1": _check_text,
    "better_response_id": _check_response_id,
    "safer_response_id": _check_response_id,
    "is_response_0_safe": _check_flag,
    "is_response_1_safe": _check_flag,
}
SFT_SCHEMA: dict[str, FieldCheck] = {"prompt": _check_nonempty_text, "response": _check_text}
PROMPT_SCHEMA: dict[str, FieldCheck] = {"prompt": _check_nonempty_text}


def row_problems(row: Any, schema: Mapping[str, FieldCheck]) -> list[str]:
    """Everything wrong with one row under ``schema``; empty when the row is valid."""
    if not isinstance(row, dict):
        return [f"expected a JSON object, got {type(row).__name__}"]
    problems = []
    for field, check in schema.items():
        if field not in row:
            problems.append(f"missing field '{field}'")
        elif row[field] is None:
            problems.append(f"field '{field}' is null")
        else:
            problem = check(row[field])
            if problem is not None:
                problems.append(f"field '{field}' {problem}")
    return problems


# ---------------------------------------------------------------------------------------------------
# Reading


def _jsonl_rows(path: pathlib.Path) -> Iterator[tuple[str, Any]]:
    """Yields (location, parsed row or a parse-error marker) for every non-blank line."""
    with path.open(encoding="utf-8") as stream:
        for line_number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {line_number}", json.loads(line)
            except json.JSONDecodeError as error:
                yield f"line {line_number}", _ParseError(f"invalid JSON ({error.msg})")


class _ParseError(NamedTuple):
    message: str


def _parquet_rows(path: pathlib.Path, schema: Mapping[str, FieldCheck]) -> Iterator[tuple[str, Any]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise ConfigError(f"{path}: not a readable parquet file ({error})") from error
    missing = [field for field in schema if field not in table.column_names]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {', '.join(repr(f) for f in missing)}")
    for index, row in enumerate(table.to_pylist()):
        yield f"row {index}", row


def read_records(path: str | pathlib.Path, schema: Mapping[str, FieldCheck]) -> list[dict[str, Any]]:
    """Reads and validates every row of a ``.jsonl`` or ``.parquet`` file against ``schema``.

    Raises:
      ConfigError: the file is missing, has an unknown suffix, holds no rows, or has invalid rows (the
        message counts them and lists the first few with their line number or row index).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        located_rows = _jsonl_rows(path)
    elif suffix == ".parquet":
        located_rows = _parquet_rows(path, schema)
    else:
        raise ConfigError(f"{path}: unknown data format '{suffix}' (expected .jsonl or .parquet)")

    rows, bad = [], []
    for location, row in located_rows:
        problems = [row.message] if isinstance(row, _ParseError) else row_problems(row, schema)
        if problems:
            bad.append(f"{location}: {', '.join(problems)}")
        else:
            rows.append(row)
    if bad:
        total = len(rows) + len(bad)
        shown = bad[:MAX_REPORTED_ROWS]
        raise ConfigError(f"{path}: {len(bad)} invalid row(s) of {total}; first {len(shown)}: {'; '.join(shown)}")
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


def write_records(path: str | pathlib.Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Writes rows (dicts) as JSONL or parquet, chosen by the file suffix; the inverse of :func:`read_records`."""
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as stream:
            for row in rows:
                stream.write(json.dumps(row) + "\n")
    elif suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.Table.from_pylist([dict(row) for row in rows]), path)
    else:
        raise ConfigError(f"{path}: unknown data format '{suffix}' (expected .jsonl or .parquet)")


def _extra_columns(rows: Sequence[Mapping[str, Any]], schema: Mapping[str, FieldCheck]) -> dict[str, list[Any]]:
    """Columns for the fields outside ``schema`` that every row carries."""
    shared = set(rows[0]).intersection(*rows[1:]) - set(schema)
    return {field: [row[field] for row in rows] for field in sorted(shared)}


@dataclasses.dataclass(frozen=True)
class PreferenceData:
    """PKU-SafeRLHF comparisons as columns; ``extras`` holds the optional fields every row had."""

    prompt: list[str]
    response_0: list[str]
    response_1: list[str]
    better_response_id: np.ndarray  # [N] int32 in {0, 1}
    safer_response_id: np.ndarray  # [N] int32 in {0, 1}
    is_response_0_safe: np.ndarray  # [N] bool
    is_response_1_safe: np.ndarray  # [N] bool
    extras: dict[str, list[Any]] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt)

    def response(self, which: np.ndarray) -> list[str]:
        """Per row, response_0 where ``which`` is 0 and response_1 where it is 1."""
        return [pair[int(i)] for pair, i in zip(zip(self.response_0, self.response_1), which)]


@dataclasses.dataclass(frozen=True)
class SFTData:
    """(prompt, response) demonstrations as columns."""

    prompt: list[str]
    response: list[str]
    extras: dict[str, list[Any]] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt)


@dataclasses.dataclass(frozen=True)
class PromptData:
    """Prompts alone (RL rollouts, evaluation), with their optional fields such as a category."""

    prompt: list[str]
    extras: dict[str, list[Any]] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt)


def preference_data_from_rows(rows: Sequence[Mapping[str, Any]]) -> PreferenceData:
    """Columns from already validated rows."""

    def column(field: str) -> list[Any]:
        return [row[field] for row in rows]

    return PreferenceData(
        prompt=column("prompt"),
        response_0=column("response_0"),
        response_1=column("response_1"),
        better_response_id=np.asarray(column("better_response_id"), dtype=np.int32),
        safer_response_id=np.asarray(column("safer_response_id"), dtype=np.int32),
        is_response_0_safe=np.asarray(column("is_response_0_safe"), dtype=bool),
        is_response_1_safe=np.asarray(column("is_response_1_safe"), dtype=bool),
        extras=_extra_columns(rows, PREFERENCE_SCHEMA),
    )


def read_preference_data(path: str | pathlib.Path) -> PreferenceData:
    """Reads a PKU-SafeRLHF-schema ``.jsonl`` or ``.parquet`` file; see :func:`read_records` for errors."""
    return preference_data_from_rows(read_records(path, PREFERENCE_SCHEMA))


def read_sft_data(path: str | pathlib.Path) -> SFTData:
    """Reads (prompt, response) rows from ``.jsonl`` or ``.parquet``."""
    rows = read_records(path, SFT_SCHEMA)
    return SFTData(
        prompt=[row["prompt"] for row in rows],
        response=[row["response"] for row in rows],
        extras=_extra_columns(rows, SFT_SCHEMA),
    )


def read_prompt_data(path: str | pathlib.Path) -> PromptData:
    """Reads prompt rows (any extra fields, e.g. ``category``, are kept) from ``.jsonl`` or ``.parquet``."""
    rows = read_records(path, PROMPT_SCHEMA)
    return PromptData(prompt=[row["prompt"] for row in rows], extras=_extra_columns(rows, PROMPT_SCHEMA))


def split_by_prompt(rows: Sequence[Mapping[str, Any]], eval_fraction: float, seed: int
                    ) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(training rows, held-out rows): a seeded ``eval_fraction`` of the distinct prompts (at least one, and at
    least one left to train on) with every row that asks them. PKU-SafeRLHF repeats a prompt over several
    comparisons, so a split by rows would let held-out prompts be trained on."""
    prompts = sorted({row["prompt"] for row in rows})
    if len(prompts) < 2:
        raise ConfigError(f"the file has {len(prompts)} distinct prompt(s); holding some out for evaluation "
                          "needs at least 2")
    count = min(max(1, round(eval_fraction * len(prompts))), len(prompts) - 1)
    held = {prompts[i] for i in np.random.default_rng(seed).permutation(len(prompts))[:count]}
    return ([row for row in rows if row["prompt"] not in held], [row for row in rows if row["prompt"] in held])


def demonstration_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """SFT rows (``prompt``, ``response``) from PKU-SafeRLHF comparisons: per row the more helpful response when
    it is safe, else the safer one when that is safe; a row whose responses are both unsafe gives none (the
    model is never fitted to an unsafe answer)."""
    demonstrations = []
    for row in rows:
        better, safer = int(row["better_response_id"]), int(row["safer_response_id"])
        chosen = next((i for i in (better, safer) if row[f"is_response_{i}_safe"]), None)
        if chosen is not None:
            demonstrations.append({"prompt": row["prompt"], "response": row[f"response_{chosen}"]})
    return demonstrations


# ---------------------------------------------------------------------------------------------------
# Tokenization


class TokenBatch(NamedTuple):
    """Right-padded prompt + response sequences, batch axis 0.

    ``loss_mask[i, t]`` is True where token t belongs to the response (its final eos included). A
    next-token loss scores ``logits[:, :-1]`` against ``tokens[:, 1:]`` weighted by ``loss_mask[:, 1:]``;
    a score model reads its head at index ``attention_mask.sum(-1) - 1`` (the last valid token).
    """

    tokens: np.ndarray  # [N, L] int32, pad_id after the sequence
    attention_mask: np.ndarray  # [N, L] bool, True on real tokens
    loss_mask: np.ndarray  # [N, L] bool, True on response tokens


class PromptBatch(NamedTuple):
    """Left-padded prompts (so generation appends at the same index for every row), batch axis 0."""

    tokens: np.ndarray  # [N, L] int32, pad_id before the prompt
    attention_mask: np.ndarray  # [N, L] bool


class PreferenceBatch(NamedTuple):
    """Token pairs for the reward model (better vs worse) and the cost model (safer vs unsafer).

    Safety signs follow the cost model of Safe-RLHF (Dai et al. 2023): +1 for an unsafe response, -1 for
    a safe one, so the sign loss ``-log sigmoid(sign * cost)`` pushes unsafe costs above 0 and safe ones
    below 0.
    """

    better: TokenBatch
    worse: TokenBatch
    safer: TokenBatch
    unsafer: TokenBatch
    safer_sign: np.ndarray  # [N] int32 in {-1, +1}
    unsafer_sign: np.ndarray  # [N] int32 in {-1, +1}


PromptFormat = Any  # a "{prompt}" string, or a template object with format_prompt / add_special_tokens


def format_prompt(template: PromptFormat, prompt: str) -> str:
    """``template`` applied to ``prompt``: ``{prompt}`` filled in a string (a string without it is a config
    error), or a template object's ``format_prompt`` (``constrained_rl.models.tokenizer.load_template``)."""
    if not isinstance(template, str):
        return template.format_prompt(prompt)
    if "{prompt}" not in template:
        raise ConfigError(f"prompt_template: must contain '{{prompt}}', got {template!r}")
    return template.replace("{prompt}", prompt)


def encode_prompt(tokenizer: Tokenizer, template: PromptFormat, prompt: str) -> list[int]:
    """Token ids of the formatted prompt; a chat template's text carries its own special tokens, so the
    tokenizer adds none (``add_special_tokens`` False on the template), as transformers does."""
    add_special_tokens = getattr(template, "add_special_tokens", True)
    return tokenizer.encode(format_prompt(template, prompt), add_special_tokens=add_special_tokens)


def _pad_rows(rows: Sequence[Sequence[int]], length: int, pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((len(rows), length), pad_id, dtype=np.int32)
    valid = np.zeros((len(rows), length), dtype=bool)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if left else slice(0, len(row))
        tokens[i, span] = row
        valid[i, span] = True
    return tokens, valid


def _check_max_length(max_length: int | None) -> None:
    if max_length is not None and max_length < 1:
        raise ConfigError(f"max_length: must be >= 1, got {max_length}")


def _too_long(lengths: Sequence[int], limit: int, what: str, setting: str) -> ConfigError:
    """The refusal of rows longer than ``limit``: how many, the longest, and the setting to raise."""
    over = [length for length in lengths if length > limit]
    return ConfigError(f"{setting}: {len(over)} of {len(lengths)} {what} are longer than {limit} tokens "
                       f"(the longest has {max(over)}); raise {setting} to at least {max(over)} "
                       "(nothing is cut silently)")


def encode_dialogues(tokenizer: Tokenizer, prompts: Sequence[str], responses: Sequence[str],
                     template: PromptFormat = SAFE_RLHF_PROMPT_TEMPLATE) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, response ids + eos) per row; prompt and response are encoded separately, so the
    boundary between them is exact for any tokenizer."""
    if len(prompts) != len(responses):
        raise ConfigError(f"responses: {len(responses)} responses for {len(prompts)} prompts")
    prompt_ids = [encode_prompt(tokenizer, template, prompt) for prompt in prompts]
    # A response continues its prompt: no second BOS from the tokenizer's post-processor.
    response_ids = [tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_id]
                    for response in responses]
    return prompt_ids, response_ids


def tokenize_sft(
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int | None,
    template: PromptFormat = SAFE_RLHF_PROMPT_TEMPLATE,
    setting: str = "max_length",
) -> TokenBatch:
    """Encodes ``template(prompt) + response + eos`` per row, right-padded to ``max_length``.

    ``max_length`` None: the longest row (nothing is cut). Otherwise sequences longer than ``max_length``
    are cut on the right, as Safe-RLHF does (a cut removes the eos), but a row whose prompt leaves no room
    for a response token is refused (ConfigError naming ``setting``): its prompt would be cut.
    """
    _check_max_length(max_length)
    prompt_ids, response_ids = encode_dialogues(tokenizer, prompts, responses, template)
    full = [p + r for p, r in zip(prompt_ids, response_ids)]
    if max_length is None:
        max_length = max((len(row) for row in full), default=1)
    prompt_lengths = [len(p) for p in prompt_ids]
    if any(length >= max_length for length in prompt_lengths):
        raise _too_long([length + 1 for length in prompt_lengths], max_length,
                        "prompts (with one response token)", setting)
    tokens, attention_mask = _pad_rows([row[:max_length] for row in full], max_length, tokenizer.pad_id, left=False)
    loss_mask = attention_mask & (np.arange(max_length)[None, :] >= np.asarray(prompt_lengths)[:, None])
    return TokenBatch(tokens, attention_mask, loss_mask)


def tokenize_prompts(
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_length: int | None,
    template: PromptFormat = SAFE_RLHF_PROMPT_TEMPLATE,
    setting: str = "max_prompt_length",
) -> PromptBatch:
    """Encodes formatted prompts, left-padded to ``max_length`` (None: the longest prompt).

    A prompt longer than ``max_length`` is refused (ConfigError: how many, the longest, the ``setting`` to
    raise), never cut: a left cut would hide the prompt's beginning from the policy.
    """
    _check_max_length(max_length)
    rows = [encode_prompt(tokenizer, template, prompt) for prompt in prompts]
    lengths = [len(row) for row in rows]
    if max_length is None:
        max_length = max(lengths, default=1)
    if any(length > max_length for length in lengths):
        raise _too_long(lengths, max_length, "prompts", setting)
    return PromptBatch(*_pad_rows(rows, max_length, tokenizer.pad_id, left=True))


def safety_sign(is_safe: np.ndarray) -> np.ndarray:
    """+1 for unsafe, -1 for safe (the cost model's sign target: cost > 0 means unsafe)."""
    return np.where(np.asarray(is_safe, dtype=bool), -1, 1).astype(np.int32)


def tokenize_preference(
    tokenizer: Tokenizer,
    data: PreferenceData,
    max_length: int | None,
    template: PromptFormat = SAFE_RLHF_PROMPT_TEMPLATE,
    setting: str = "max_length",
) -> PreferenceBatch:
    """Tokenizes the helpfulness pair (better, worse) and the harmlessness pair (safer, unsafer) per row.

    ``max_length`` None: the longest of all responses' rows, so that the four batches share one width.
    """
    better, safer = data.better_response_id, data.safer_response_id
    if max_length is None:
        max_length = max(max(len(p) + len(r) for p, r in zip(*encode_dialogues(tokenizer, data.prompt, responses,
                                                                                 template)))
                         for responses in (data.response_0, data.response_1))

    def encode(which: np.ndarray) -> TokenBatch:
        return tokenize_sft(tokenizer, data.prompt, data.response(which), max_length, template, setting)

    is_safe = np.stack([data.is_response_0_safe, data.is_response_1_safe], axis=1)
    rows = np.arange(len(data))
    return PreferenceBatch(
        better=encode(better),
        worse=encode(1 - better),
        safer=encode(safer),
        unsafer=encode(1 - safer),
        safer_sign=safety_sign(is_safe[rows, safer]),
        unsafer_sign=safety_sign(is_safe[rows, 1 - safer]),
    )
