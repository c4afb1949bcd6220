"""What an exported model directory holds besides its weights, so that transformers uses it directly.

``AutoTokenizer.from_pretrained(directory)`` and ``AutoModelForCausalLM.from_pretrained(directory)`` read

* the tokenizer files: ``tokenizer.json``, ``special_tokens_map.json`` and ``tokenizer_config.json``
  (:func:`write_tokenizer_files` copies them from the model the export was trained from);
* the chat template, as transformers 5 writes one (``tokenizer_utils_base._save_chat_templates``): a single
  template in ``chat_template.jinja`` and not in ``tokenizer_config.json``; of a list of named templates the
  ``default`` one in ``chat_template.jinja``, each other one in ``additional_chat_templates/<name>.jinja``;
* ``generation_config.json`` (:func:`generation_config`): the special-token ids ``generate`` stops at and pads
  with, and, for a policy trained by sampling, the sampling it was trained with. transformers fills every
  field left out from its global defaults, ``top_k = 50`` among them, so a sampled policy's file says
  ``top_k = 0`` (off) and ``top_p = 1.0`` explicitly; a greedy one (temperature 0) says ``do_sample = false``.
  A score model gets none: transformers writes none for a model that cannot generate.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

from constrained_rl.config import ConfigError
from constrained_rl.models import chat_template as chat_template_lib
from constrained_rl.models.llama import LlamaConfig
from constrained_rl.sampling import SamplingConfig

COPIED_TOKENIZER_FILES = ("tokenizer.json", "special_tokens_map.json")
TOKENIZER_CONFIG_FILE = chat_template_lib.TOKENIZER_CONFIG_FILE
CHAT_TEMPLATE_FILE = chat_template_lib.CHAT_TEMPLATE_FILE
ADDITIONAL_TEMPLATES_DIR = "additional_chat_templates"  # transformers' CHAT_TEMPLATE_DIR
GENERATION_CONFIG_FILE = "generation_config.json"
# The sampling fields an export states; a source's other generation settings (repetition penalties and the
# like) are the base model's and are carried over as they are.
SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "max_new_tokens")


def _read_json_object(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _write_json(path: str, value: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=2)
        file.write("\n")


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)


# ---------------------------------------------------------------------------------- tokenizer files


def write_tokenizer_files(source: str, directory: str) -> None:
    """Copies the tokenizer of the checkpoint ``source`` into ``directory``, its chat template as
    ``chat_template.jinja`` (see the module docstring); a source without a template gets none."""
    os.makedirs(directory, exist_ok=True)
    for name in COPIED_TOKENIZER_FILES:
        path = os.path.join(source, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(directory, name))
    config_path = os.path.join(source, TOKENIZER_CONFIG_FILE)
    settings = _read_json_object(config_path) if os.path.isfile(config_path) else None
    template = chat_template_lib.read_chat_template(source, settings or {})
    if settings is not None:
        named = settings.pop("chat_template", None)
        _write_json(os.path.join(directory, TOKENIZER_CONFIG_FILE), settings)
        if isinstance(named, list):  # the non-default templates of the list form (read_chat_template checked it)
            for entry in named:
                if entry["name"] != "default":
                    _write_additional_template(directory, entry["name"], entry["template"])
    if template is not None:
        _write_text(os.path.join(directory, CHAT_TEMPLATE_FILE), template)
    extra = os.path.join(source, ADDITIONAL_TEMPLATES_DIR)
    if os.path.isdir(extra):
        shutil.copytree(extra, os.path.join(directory, ADDITIONAL_TEMPLATES_DIR), dirs_exist_ok=True)


def _write_additional_template(directory: str, name: str, template: str) -> None:
    if os.path.basename(name) != name or name in ("", ".", ".."):
        raise ConfigError(f"{TOKENIZER_CONFIG_FILE}: chat template name {name!r} is not a plain file name")
    folder = os.path.join(directory, ADDITIONAL_TEMPLATES_DIR)
    os.makedirs(folder, exist_ok=True)
    _write_text(os.path.join(folder, f"{name}.jinja"), template)


# -------------------------------------------------------------------------------- generation config


def sampling_fields(sampling: SamplingConfig) -> dict[str, Any]:
    """transformers' names for how ``sampling`` draws tokens (temperature 0: greedy)."""
    if sampling.temperature == 0:
        return {"do_sample": False, "max_new_tokens": sampling.max_new_tokens}
    return {"do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k,
            "top_p": sampling.top_p, "max_new_tokens": sampling.max_new_tokens}


def generation_config(config: LlamaConfig, source: str | None = None, sampling: SamplingConfig | None = None
                      ) -> dict[str, Any]:
    """``generation_config.json`` of an exported causal LM.

    The source checkpoint's file (when it has one) with the special-token ids of ``config`` on top; with
    ``sampling`` (a policy trained on its own samples) its sampling fields replace the source's.
    """
    fields: dict[str, Any] = {}
    path = None if source is None else os.path.join(source, GENERATION_CONFIG_FILE)
    if path is not None and os.path.isfile(path):
        fields = _read_json_object(path)
        fields.pop("transformers_version", None)  # written by transformers about itself
        fields.pop("_from_model_config", None)
    eos = list(config.eos_token_id)
    fields.update({"bos_token_id": config.bos_token_id,
                   "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
                   "pad_token_id": config.pad_token_id})
    if sampling is not None:
        for name in SAMPLING_FIELDS:
            fields.pop(name, None)
        fields.update(sampling_fields(sampling))
    return {name: value for name, value in fields.items() if value is not None}


def write_generation_config(directory: str, config: LlamaConfig, source: str | None = None,
                            sampling: SamplingConfig | None = None) -> None:
    """Writes :func:`generation_config` as ``directory/generation_config.json``."""
    os.makedirs(directory, exist_ok=True)
    _write_json(os.path.join(directory, GENERATION_CONFIG_FILE), generation_config(config, source, sampling))
