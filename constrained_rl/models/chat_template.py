"""Chat templates: the jinja2 programs instruct checkpoints ship to turn messages into model text.

A checkpoint's template lives in ``chat_template.jinja`` or in the ``chat_template`` field of
``tokenizer_config.json`` (a string, or a list of ``{"name", "template"}`` entries of which ``default``
is used); the separate file wins, as in transformers. It is rendered the way transformers'
``apply_chat_template`` renders it (``transformers.utils.chat_template_utils``):

* a sandboxed jinja2 environment (``ImmutableSandboxedEnvironment``) with ``trim_blocks`` and
  ``lstrip_blocks``, and the ``loopcontrols`` extension (``{% break %}``, ``{% continue %}``);
* globals ``raise_exception(message)`` (raises a template error), ``strftime_now(format)`` (the local
  time now), ``namespace`` and ``dict``; a ``tojson`` filter that is ``json.dumps`` without HTML escaping;
* variables ``messages`` (a list of ``{"role", "content"}``), ``add_generation_prompt``, ``tools`` and
  ``documents`` (none here), and the named special tokens (``bos_token``, ``eos_token``, ``unk_token``,
  ``sep_token``, ``pad_token``, ``cls_token``, ``mask_token``) as strings.

The rendered text already holds the template's special tokens, so it is tokenized without the
tokenizer's own ones (transformers' ``add_special_tokens=False``).

:class:`ChatTemplate` fits a template to the prompt / response data of this project: the prompt is the
user message (after an optional system message) rendered with the generation prompt; the response is
the assistant message, i.e. the text the full dialogue adds after that prompt, up to the end-of-turn
token (the trainers append the tokenizer's eos id themselves, which is where generation stops).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from constrained_rl.config import ConfigError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# The named special tokens transformers passes to every template (PreTrainedTokenizerBase's attributes).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Text that stands in for the user message when the response part of a dialogue is cut out.
_PROBE_PROMPT = "Probe prompt."

Message = Mapping[str, str]


# ------------------------------------------------------------------------------------------ reading


def token_content(value: Any) -> str | None:
    """A special token written as a string or as an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _named_template(value: Any, path: str) -> str:
    """The template of a ``chat_template`` field: a string, or the ``default`` of a list of named ones."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(e, dict) and {"name", "template"} <= set(e) for e in value):
        named = {entry["name"]: entry["template"] for entry in value}
        if "default" in named:
            return named["default"]
        raise ConfigError(f"{path}: chat_template lists templates {sorted(named)} but none named 'default'")
    raise ConfigError(f"{path}: chat_template must be a string or a list of {{name, template}} objects")


def read_chat_template(directory: str, settings: Mapping[str, Any]) -> str | None:
    """The chat template of a checkpoint directory (``settings``: its parsed tokenizer config), or None."""
    jinja_path = os.path.join(directory, CHAT_TEMPLATE_FILE)
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as file:
            return file.read()
    if settings.get("chat_template") is None:
        return None
    return _named_template(settings["chat_template"], os.path.join(directory, TOKENIZER_CONFIG_FILE))


def special_token_variables(settings: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens of a tokenizer config, as the strings templates see."""
    tokens = {name: token_content(settings.get(name)) for name in SPECIAL_TOKEN_NAMES}
    return {name: content for name, content in tokens.items() if content is not None}


# ---------------------------------------------------------------------------------------- rendering


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 - the name templates call it with
    return datetime.datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled in transformers' sandboxed environment; a syntax error is a ConfigError."""
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ConfigError(f"chat template: syntax error on line {error.lineno} ({error.message})") from None


def render(source: str, messages: Sequence[Message], *, add_generation_prompt: bool = False,
           special_tokens: Mapping[str, str] | None = None, **variables: Any) -> str:
    """``source`` rendered on ``messages`` as ``tokenizer.apply_chat_template(messages, tokenize=False)``.

    Messages' keys with value None are dropped (as transformers does). A template's own error
    (``raise_exception``, an undefined operation) is a ConfigError naming the message.
    """
    chat = [{key: value for key, value in dict(message).items() if value is not None} for message in messages]
    try:
        return compile_template(source).render(
            messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
            **{**dict(special_tokens or {}), **variables})
    except jinja2.exceptions.TemplateError as error:
        raise ConfigError(f"chat template: {error}") from None


# ---------------------------------------------------------------------------- prompts and responses


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat template applied to (prompt, response) rows: the same interface as ``PromptTemplate``.

    ``format_prompt(p)`` renders ``[system?, user: p]`` with the generation prompt; ``format_response(r)``
    is what ``[system?, user, assistant: r]`` adds after it, cut before its last ``eos_token`` (the
    trainers append the eos id). A template whose dialogue does not begin with its own generation
    prompt cannot be split into prompt and response and is refused.
    """

    name: str  # where the template came from (a directory)
    source: str  # the jinja2 text
    special_tokens: tuple[tuple[str, str], ...] = ()  # (bos_token, "<s>"), ... passed to the template
    system_prompt: str | None = None  # a system message before every prompt; none: the template's default

    add_special_tokens = False  # the rendered text carries its special tokens (transformers does the same)

    def __post_init__(self) -> None:
        compile_template(self.source)
        self.format_response("")  # refuses a template that cannot be split into prompt and response

    @property
    def tokens(self) -> dict[str, str]:
        return dict(self.special_tokens)

    def messages(self, prompt: str, response: str | None = None) -> list[dict[str, str]]:
        """``[system?, user: prompt, assistant: response?]``."""
        chat = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        chat.append({"role": "user", "content": prompt})
        if response is not None:
            chat.append({"role": "assistant", "content": response})
        return chat

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        return render(self.source, messages, add_generation_prompt=add_generation_prompt,
                      special_tokens=self.tokens)

    def format_prompt(self, prompt: str) -> str:
        return self.render(self.messages(prompt), add_generation_prompt=True)

    def format_response(self, response: str) -> str:
        """The assistant turn's text after the generation prompt, without its final end-of-turn token."""
        prompt_text = self.format_prompt(_PROBE_PROMPT)
        dialogue = self.render(self.messages(_PROBE_PROMPT, response))
        if not dialogue.startswith(prompt_text):
            raise ConfigError(f"chat template of {self.name}: the rendered dialogue does not begin with the "
                              "rendered prompt (add_generation_prompt=True), so a response cannot be cut out "
                              "of it; give --template a string template instead")
        suffix = dialogue[len(prompt_text):]
        eos = self.tokens.get("eos_token")
        if eos and eos in suffix and not suffix[suffix.rindex(eos) + len(eos):].strip():
            suffix = suffix[:suffix.rindex(eos)]  # what follows the eos is whitespace before the next turn
        return suffix

    def format_dialogue(self, prompt: str, response: str) -> str:
        return self.format_prompt(prompt) + self.format_response(response)


def load_chat_template(directory: str, settings: Mapping[str, Any], system_prompt: str | None = None
                       ) -> ChatTemplate | None:
    """The chat template of a checkpoint directory with its special tokens, or None when it has none.

    ``settings``: the directory's tokenizer config (special_tokens_map.json and tokenizer_config.json).
    """
    source = read_chat_template(directory, settings)
    if source is None:
        return None
    tokens = tuple(sorted(special_token_variables(settings).items()))
    return ChatTemplate(name=directory, source=source, special_tokens=tokens, system_prompt=system_prompt)
