"""Tokenizers from Hugging Face ``tokenizer.json`` files, left-padded batches, and prompt templates as data.

A tokenizer directory holds ``tokenizer.json`` (read by the ``tokenizers`` library) and optionally
``tokenizer_config.json`` / ``special_tokens_map.json``, whose ``bos_token``, ``eos_token``, ``pad_token`` and
``add_bos_token`` fields are honoured. Special tokens the ``tokenizer.json`` post-processor adds are kept;
a BOS is prepended only when ``add_bos_token`` asks for one and the post-processor did not add it.

A prompt template turns a raw prompt (and response) into model text: a string template
(:class:`PromptTemplate`, such as Safe-RLHF's) for base models, or the checkpoint's own chat template
(:class:`constrained_rl.models.chat_template.ChatTemplate`), which ``"auto"`` picks whenever the checkpoint
has one. Both expose ``format_prompt``, ``format_response`` and ``add_special_tokens`` (whether the
tokenizer adds its special tokens to the formatted text: a chat template writes them itself).

Prompts are padded on the LEFT so that every row's last position is its last prompt token: generation then
appends new tokens at the same slot for the whole batch (see ``constrained_rl.sampling``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import tokenizers

from constrained_rl.config import ConfigError, require
from constrained_rl.models import chat_template as chat_template_lib

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILES = ("special_tokens_map.json", "tokenizer_config.json")  # later files override earlier ones


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """How a raw prompt (and response) becomes model text; ``{prompt}`` / ``{response}`` are filled in."""

    name: str  # registry name
    prompt_format: str  # text before the response, with a {prompt} field
    response_format: str = "{response}"  # text appended after the formatted prompt, with a {response} field

    add_special_tokens = True  # the tokenizer's own special tokens (a BOS) go around the formatted text

    def __post_init__(self) -> None:
        require("{prompt}" in self.prompt_format, "template.prompt_format", "must contain {prompt}")
        require("{response}" in self.response_format, "template.response_format", "must contain {response}")

    def format_prompt(self, prompt: str) -> str:
        return self.prompt_format.replace("{prompt}", prompt)

    def format_response(self, response: str) -> str:
        return self.response_format.replace("{response}", response)

    def format_dialogue(self, prompt: str, response: str) -> str:
        return self.format_prompt(prompt) + self.format_response(response)


TEMPLATES: dict[str, PromptTemplate] = {
    # Safe-RLHF / PKU-Alignment Alpaca-7B conversation format (Dai et al. 2023); the response follows
    # "ASSISTANT:" directly.
    "safe-rlhf": PromptTemplate("safe-rlhf", "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"),
    # Stanford Alpaca's instruction format without an input field (Taori et al. 2023).
    "alpaca": PromptTemplate(
        "alpaca",
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{prompt}\n\n### Response:\n"),
    "plain": PromptTemplate("plain", "{prompt}"),
}


AUTO = "auto"  # the checkpoint's chat template when it has one, else safe-rlhf
CHAT = "chat"  # the checkpoint's chat template (refused when it has none)
Template = PromptTemplate | chat_template_lib.ChatTemplate


def load_template(name_or_path: str, directory: str | None = None) -> Template:
    """The prompt template named by ``name_or_path`` for the checkpoint ``directory`` (None: no checkpoint).

    ``auto``: the checkpoint's chat template if it has one, else ``safe-rlhf``; ``chat``: the checkpoint's
    chat template; a registered name (safe-rlhf, alpaca, plain); or a JSON file with the
    ``PromptTemplate`` fields.
    """
    if name_or_path in (AUTO, CHAT):
        chat = None if directory is None else chat_template_lib.load_chat_template(
            directory, _special_tokens(directory))
        if chat is not None:
            return chat
        if name_or_path == CHAT:
            where = "the synthetic model" if directory is None else directory
            raise ConfigError(f"template: 'chat' but {where} has no chat template "
                              f"({chat_template_lib.CHAT_TEMPLATE_FILE} or chat_template in tokenizer_config.json)")
        return TEMPLATES["safe-rlhf"]
    if name_or_path in TEMPLATES:
        return TEMPLATES[name_or_path]
    if not os.path.isfile(name_or_path):
        raise ConfigError(f"template: {name_or_path!r} is neither a known template "
                          f"({', '.join((AUTO, CHAT, *TEMPLATES))}) nor a JSON file")
    data = _read_json(name_or_path)
    fields = {f.name for f in dataclasses.fields(PromptTemplate)}
    if not isinstance(data, dict) or "prompt_format" not in data or set(data) - fields:
        raise ConfigError(f"{name_or_path}: expected a JSON object with prompt_format (and optionally name, "
                          "response_format)")
    try:
        return PromptTemplate(**{"name": os.path.basename(name_or_path), **data})
    except ConfigError as error:
        raise ConfigError(f"{name_or_path}: {error}") from None


class EncodedBatch(NamedTuple):
    """tokens ``[B, T]`` int32 and attention_mask ``[B, T]`` int32 (1 = real token), numpy."""

    tokens: np.ndarray
    attention_mask: np.ndarray


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the model's special-token ids and batch padding."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None = None, add_bos: bool = False) -> None:
        self.backend = backend
        self.bos_id, self.eos_id = bos_id, eos_id
        # Without a pad token any id works (masked out everywhere); EOS keeps decoded text clean.
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self._prepend_bos = add_bos and bos_id is not None and self._post_processor_bos() != bos_id

    def _post_processor_bos(self) -> int | None:
        ids = self.backend.encode("a").ids
        return ids[0] if ids else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text; ``add_special_tokens=False`` for a continuation (a response after its
        prompt), which must not get a second BOS from the tokenizer's post-processor."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return [self.bos_id, *ids] if (self._prepend_bos and add_special_tokens) else ids

    def encode_batch(self, texts: Sequence[str], *, length: int | None = None, padding_side: str = "left",
                     truncation_side: str = "left") -> EncodedBatch:
        """Pads (and, with ``length``, truncates) a batch to ``length`` or to its longest text.

        Prompts: padding_side "left" (the default) and truncation_side "left", which keeps each prompt's end
        (the template's "ASSISTANT:") and drops its beginning. A fixed ``length`` keeps jitted shapes stable.
        """
        require(padding_side in ("left", "right"), "padding_side", f"{padding_side!r} not in (left, right)")
        require(truncation_side in ("left", "right"), "truncation_side",
                f"{truncation_side!r} not in (left, right)")
        encoded = [e.ids for e in self.backend.encode_batch(list(texts))]
        if self._prepend_bos:
            encoded = [[self.bos_id, *ids] for ids in encoded]
        width = length if length is not None else max((len(ids) for ids in encoded), default=0)
        tokens = np.full((len(encoded), width), self.pad_id, np.int32)
        mask = np.zeros((len(encoded), width), np.int32)
        for row, ids in enumerate(encoded):
            ids = ids[len(ids) - width:] if truncation_side == "left" and len(ids) > width else ids[:width]
            start = width - len(ids) if padding_side == "left" else 0
            tokens[row, start:start + len(ids)] = ids
            mask[row, start:start + len(ids)] = 1
        return EncodedBatch(tokens, mask)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, tokens: np.ndarray, mask: np.ndarray | None = None,
                     skip_special_tokens: bool = True) -> list[str]:
        """Decodes each row of ``[B, T]`` tokens, keeping only positions where ``mask`` is 1."""
        tokens = np.asarray(tokens)
        mask = np.ones_like(tokens) if mask is None else np.asarray(mask)
        return [self.decode(row[keep.astype(bool)], skip_special_tokens) for row, keep in zip(tokens, mask)]


def _special_tokens(directory: str) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for filename in CONFIG_FILES:
        path = os.path.join(directory, filename)
        if os.path.isfile(path):
            data = _read_json(path)
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: expected a JSON object")
            settings.update(data)
    return settings


def _token_id(backend: tokenizers.Tokenizer, settings: Mapping[str, Any], field: str, directory: str
              ) -> int | None:
    content = chat_template_lib.token_content(settings.get(field))
    if content is None:
        return None
    token_id = backend.token_to_id(content)
    if token_id is None:
        raise ConfigError(f"{os.path.join(directory, CONFIG_FILES[1])}: {field} {content!r} is not in the "
                          f"vocabulary of {TOKENIZER_FILE}")
    return token_id


def load_tokenizer(directory: str) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory (``tokenizer.json`` + optional configs)."""
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: not found")
    try:
        backend = tokenizers.Tokenizer.from_file(path)
    except Exception as error:  # the Rust library raises a bare Exception for malformed files
        raise ConfigError(f"{path}: not a valid tokenizer file ({error})") from None
    settings = _special_tokens(directory)
    return Tokenizer(backend, bos_id=_token_id(backend, settings, "bos_token", directory),
                     eos_id=_token_id(backend, settings, "eos_token", directory),
                     pad_id=_token_id(backend, settings, "pad_token", directory),
                     add_bos=bool(settings.get("add_bos_token", False)))
