"""Hugging Face checkpoints (``config.json`` + safetensors) to and from our Llama parameters.

A checkpoint directory holds ``config.json`` and either one ``model.safetensors`` or shards listed by
``model.safetensors.index.json`` (``{"weight_map": {tensor name: shard file}}``). Tensors are matched to our
parameter tree by :data:`NAME_RULES`, a table from our parameter paths to Hugging Face tensor names; torch
``nn.Linear`` stores ``weight`` as ``[out, in]`` while flax ``Dense`` stores ``kernel`` as ``[in, out]``, so
linear kernels are transposed on the way in and out. Parameters are returned as host numpy arrays in the
config's ``param_dtype``: place them on devices with ``jax.device_put(variables, shardings)``.

Every problem with a file raises ``ConfigError("<file>: <what is wrong>")`` naming the file and tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from constrained_rl.config import ConfigError
from constrained_rl.models.llama import MODEL_TYPES, LlamaConfig, LlamaForCausalLM, RopeScaling

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_MODEL_TYPES = MODEL_TYPES
# The transformers class prefix of each family: Qwen2ForCausalLM, MistralForSequenceClassification, ...
ARCHITECTURE_PREFIXES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
# Defaults of transformers' config classes (MistralConfig, Qwen2Config, Qwen3Config) for the fields whose
# default differs from LlamaConfig's and changes what the model computes, used when config.json omits them.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 4096, "max_position_embeddings": 4096 * 32},
    "qwen2": {"max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None,
              "sliding_window": 4096, "max_window_layers": 28},
    "qwen3": {"max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None,
              "sliding_window": 4096, "max_window_layers": 28, "head_dim": 128},
}
# The rope_parameters keys transformers' validation expects for each rope type (it warns about others).
ROPE_FIELDS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"),
    "longrope": ("factor", "original_max_position_embeddings", "attention_factor", "short_factor",
                 "long_factor"),
}
# Optional yarn fields whose RopeScaling default is transformers' default (beta_fast 32, beta_slow 1, truncate).
OPTIONAL_ROPE_FIELDS = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")

# Our parameter path (under "params", "/"-joined) -> (Hugging Face tensor name, transpose?).
NAME_RULES: tuple[tuple[str, str, bool], ...] = (
    (r"^model/embed_tokens/embedding$", r"model.embed_tokens.weight", False),
    (r"^model/layers_(\d+)/(self_attn|mlp)/(\w+_proj)/kernel$", r"model.layers.\1.\2.\3.weight", True),
    (r"^model/layers_(\d+)/(self_attn|mlp)/(\w+_proj)/bias$", r"model.layers.\1.\2.\3.bias", False),
    (r"^model/layers_(\d+)/(input_layernorm|post_attention_layernorm)/weight$", r"model.layers.\1.\2.weight",
     False),
    (r"^model/layers_(\d+)/self_attn/(q_norm|k_norm)/weight$", r"model.layers.\1.self_attn.\2.weight", False),
    (r"^model/norm/weight$", r"model.norm.weight", False),
    (r"^lm_head/kernel$", r"lm_head.weight", True),
    (r"^score_head/kernel$", r"score_head.weight", True),
    (r"^score_head/bias$", r"score_head.bias", False),
)
# Tensors a checkpoint may hold that the model being loaded does not use: the other kind of head (an LM
# checkpoint loaded as a score-model backbone and vice versa; ``score.*`` is transformers' sequence-
# classification head), rotary buffers older exports kept, and the score normaliser statistics Safe-RLHF
# score models save.
IGNORABLE_TENSORS = r"(^lm_head\.|^score_head\.|^score\.|rotary_emb\.inv_freq$|^normalizer\.)"


def hf_tensor_name(path: str) -> tuple[str, bool]:
    """Hugging Face name of our parameter ``path`` and whether the tensor is stored transposed."""
    for pattern, template, transpose in NAME_RULES:
        if re.match(pattern, path):
            return re.sub(pattern, template, path), transpose
    raise ValueError(f"no Hugging Face name for parameter {path!r}")


# (our parameter path) -> (tensor name, transpose?): hf_tensor_name, or a layout's own names on top of it
TensorName = Callable[[str], tuple[str, bool]]


# ----------------------------------------------------------------------------------------------- config


def _rope_scaling(hf: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling as transformers 5 reads them: the older ``rope_scaling`` dict when present,
    else ``rope_parameters``; theta from that dict, else the top-level ``rope_theta``, else 10000."""
    scaling = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = float(scaling.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    partial = scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"{source}: partial_rotary_factor {partial} is not supported (rotary embeddings over "
                          f"the whole head only)")
    if rope_type == "default":
        return theta, None
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    try:
        return theta, RopeScaling(rope_type=rope_type, **{k: v for k, v in scaling.items() if k in fields})
    except (ConfigError, TypeError) as error:
        raise ConfigError(f"{source}: {error}") from None


def _family_fields(hf: Mapping[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """The attention fields as the family's transformers model reads them.

    llama: attention_bias, mlp_bias (a sliding_window key is ignored, as LlamaForCausalLM ignores it).
    mistral: sliding_window on every layer (null = none).
    qwen2/qwen3: a window only with use_sliding_window, on the layers ``layer_types`` names, or else on
    layers >= max_window_layers (Qwen2Config's rule); qwen3 also attention_bias. Qwen2 has q/k/v biases.
    """
    defaults = FAMILY_DEFAULTS[model_type]
    if model_type == "llama":
        return {"attention_bias": hf.get("attention_bias", False), "mlp_bias": hf.get("mlp_bias", False)}
    if model_type == "mistral":
        if hf.get("layer_types") is not None:
            raise ConfigError(f"{source}: layer_types is not supported for mistral (MistralForCausalLM ignores "
                              f"it; per-layer windows are Ministral's)")
        return {"sliding_window": hf.get("sliding_window", defaults["sliding_window"])}
    fields = {"attention_bias": hf.get("attention_bias", False)} if model_type == "qwen3" else {}
    window = hf.get("sliding_window", defaults["sliding_window"]) if hf.get("use_sliding_window") else None
    layers = hf.get("layer_types")
    if window is None and "sliding_attention" in (layers or ()):
        raise ConfigError(f"{source}: layer_types names sliding_attention layers but use_sliding_window is false "
                          f"or sliding_window null (transformers' {model_type} has no window for them)")
    if layers is None and window is not None:
        first_sliding = hf.get("max_window_layers", defaults["max_window_layers"])
        layers = ["sliding_attention" if i >= first_sliding else "full_attention"
                  for i in range(int(hf.get("num_hidden_layers", LlamaConfig.num_hidden_layers)))]
    if window is None or "sliding_attention" not in (layers or ()):
        return {**fields, "sliding_window": None, "layer_types": None}
    all_sliding = set(layers) == {"sliding_attention"}
    return {**fields, "sliding_window": window, "layer_types": None if all_sliding else tuple(layers)}


def config_from_hf_dict(hf: Mapping[str, Any], source: str = CONFIG_FILE, *, dtype: str = "float32",
                        param_dtype: str = "float32") -> LlamaConfig:
    """A :class:`LlamaConfig` from the fields of a Hugging Face ``config.json`` (model_type llama, mistral,
    qwen2 or qwen3); fields the family's transformers model does not read are ignored, and fields
    config.json omits take transformers' defaults for that family (:data:`FAMILY_DEFAULTS`)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported (supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)})")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    theta, scaling = _rope_scaling(hf, source)
    family = _family_fields(hf, model_type, source)
    fields = {f.name for f in dataclasses.fields(LlamaConfig)} - {"rope_theta", "rope_scaling", "dtype",
                                                                   "param_dtype", "model_type", *family}
    values = {k: v for k, v in FAMILY_DEFAULTS[model_type].items() if k in fields}
    values.update({k: hf[k] for k in fields if k in hf})
    try:
        return LlamaConfig(rope_theta=theta, rope_scaling=scaling, dtype=dtype, param_dtype=param_dtype,
                           model_type=model_type, **family, **values)
    except (ConfigError, TypeError) as error:
        raise ConfigError(f"{source}: {error}") from None


def _rope_scaling_dict(scaling: RopeScaling | None) -> dict[str, Any] | None:
    """The fields of ``scaling`` its rope type uses (:data:`ROPE_FIELDS`; transformers warns about others),
    optional ones left out when unset or at the default transformers applies too."""
    if scaling is None:
        return None
    defaults = {f.name: f.default for f in dataclasses.fields(RopeScaling)}
    out: dict[str, Any] = {"rope_type": scaling.rope_type}
    for name in ROPE_FIELDS[scaling.rope_type]:
        value = getattr(scaling, name)
        if value is not None and not (name in OPTIONAL_ROPE_FIELDS and value == defaults[name]):
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def hf_architecture(config: LlamaConfig, head: str = "ForCausalLM") -> str:
    """The transformers class name of ``config``'s family with ``head``: "Qwen2ForCausalLM", ..."""
    return ARCHITECTURE_PREFIXES[config.model_type] + head


def _family_dict(config: LlamaConfig) -> dict[str, Any]:
    """The attention fields of config.json in the keys the family's transformers config reads."""
    if config.model_type == "llama":
        return {"attention_bias": config.attention_bias, "mlp_bias": config.mlp_bias}
    if config.model_type == "mistral":
        return {"sliding_window": config.sliding_window}
    layers = [("full_attention" if config.layer_window(i) is None else "sliding_attention")
              for i in range(config.num_hidden_layers)]
    leading_full = next((i for i, kind in enumerate(layers) if kind == "sliding_attention"), len(layers))
    fields = {"use_sliding_window": config.sliding_window is not None, "sliding_window": config.sliding_window,
              "max_window_layers": leading_full, "layer_types": layers}
    return {**fields, "attention_bias": config.attention_bias} if config.model_type == "qwen3" else fields


def config_to_hf_dict(config: LlamaConfig, architecture: str | None = None) -> dict[str, Any]:
    """The ``config.json`` fields transformers needs to rebuild ``config`` (``architecture`` None = the
    family's causal LM, :func:`hf_architecture`).

    Rotary scaling is written both as ``rope_parameters`` (transformers 5) and as ``rope_theta`` /
    ``rope_scaling`` (earlier versions).
    """
    scaling = _rope_scaling_dict(config.rope_scaling)
    rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta, **(scaling or {})}
    eos = config.eos_token_id
    return {
        "architectures": [architecture or hf_architecture(config)],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope_parameters,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        **_family_dict(config),
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else list(eos) or None,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": config.param_dtype,
    }


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: not found")
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None


def read_config_json(directory: str) -> dict[str, Any]:
    """The raw ``config.json`` of a checkpoint directory, as a dict."""
    path = os.path.join(directory, CONFIG_FILE)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def load_config(directory: str, *, dtype: str = "float32", param_dtype: str = "float32") -> LlamaConfig:
    """The :class:`LlamaConfig` of a checkpoint directory, with our computation and storage dtypes."""
    return config_from_hf_dict(read_config_json(directory), os.path.join(directory, CONFIG_FILE),
                               dtype=dtype, param_dtype=param_dtype)


# ---------------------------------------------------------------------------------------------- tensors


def tensor_files(directory: str) -> dict[str, str]:
    """Tensor name -> safetensors file path, from the single file or the shard index."""
    single, index = os.path.join(directory, WEIGHTS_FILE), os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{index}: no weight_map")
        files = {name: os.path.join(directory, shard) for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not os.path.isfile(shard):
                raise ConfigError(f"{shard}: not found (listed in {INDEX_FILE})")
        return files
    if not os.path.isfile(single):
        raise ConfigError(f"{single}: not found (nor {INDEX_FILE})")
    try:
        with safe_open(single, framework="numpy") as file:
            return {name: single for name in file.keys()}
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise ConfigError(f"{single}: not a readable safetensors file ({error})") from None


class _TensorReader:
    """Reads tensors one at a time from the files of a checkpoint, keeping each file open once."""

    def __init__(self, files: Mapping[str, str], stack: ExitStack) -> None:
        self._files, self._stack, self._open = files, stack, {}

    def read(self, name: str) -> np.ndarray:
        path = self._files[name]
        if path not in self._open:
            try:
                self._open[path] = self._stack.enter_context(safe_open(path, framework="numpy"))
            except Exception as error:
                raise ConfigError(f"{path}: not a readable safetensors file ({error})") from None
        try:
            return self._open[path].get_tensor(name)
        except Exception as error:
            raise ConfigError(f"{path}: cannot read tensor {name!r} ({error})") from None


def _param_shapes(model: nn.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat "/"-joined path (under "params") -> abstract parameter, without allocating anything."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return traverse_util.flatten_dict(abstract["params"], sep="/")


def load_params(directory: str, model: nn.Module, fresh: Mapping[str, np.ndarray] | None = None, *,
                tensor_name: TensorName = hf_tensor_name) -> dict[str, Any]:
    """Variables ``{"params": ...}`` of ``model`` read from a checkpoint directory.

    Each parameter is looked up by ``tensor_name`` (default: :data:`NAME_RULES`), checked against the shape
    the model expects, transposed where needed and cast to ``model.config.param_dtype``. A parameter the
    checkpoint lacks is taken from ``fresh`` (flat path -> array) when given there, else it is an error.
    Tensors the model does not use are an error unless they match :data:`IGNORABLE_TENSORS`.
    """
    files = tensor_files(directory)
    dtype = jnp.dtype(model.config.param_dtype)
    fresh = dict(fresh or {})
    flat, used = {}, set()
    with ExitStack() as stack:
        reader = _TensorReader(files, stack)
        for path, abstract in _param_shapes(model).items():
            name, transpose = tensor_name(path)
            if name not in files:
                if path in fresh:
                    flat[path] = np.asarray(fresh[path], dtype)
                    continue
                raise ConfigError(f"{_where(directory, files)}: tensor {name!r} missing")
            tensor = reader.read(name)
            expected = abstract.shape[::-1] if transpose else abstract.shape
            if tuple(tensor.shape) != tuple(expected):
                raise ConfigError(f"{files[name]}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(expected)}")
            flat[path] = np.ascontiguousarray((tensor.T if transpose else tensor).astype(dtype))
            used.add(name)
    unexpected = sorted(n for n in files if n not in used and not re.search(IGNORABLE_TENSORS, n))
    if unexpected:
        raise ConfigError(f"{files[unexpected[0]]}: unexpected tensor {unexpected[0]!r} (the model has no such "
                          f"parameter; unsupported architecture variant?)")
    return {"params": traverse_util.unflatten_dict(flat, sep="/")}


def _where(directory: str, files: Mapping[str, str]) -> str:
    single = os.path.join(directory, WEIGHTS_FILE)
    return single if single in set(files.values()) else os.path.join(directory, INDEX_FILE)


def hf_tensors(variables: Mapping[str, Any], dtype: str | None = None, *,
               tensor_name: TensorName = hf_tensor_name) -> dict[str, np.ndarray]:
    """Hugging Face name -> numpy tensor for every parameter (linear kernels transposed back)."""
    out = {}
    for path, value in traverse_util.flatten_dict(variables["params"], sep="/").items():
        name, transpose = tensor_name(path)
        array = np.asarray(jax.device_get(value))
        if dtype is not None:
            array = array.astype(jnp.dtype(dtype))
        out[name] = np.ascontiguousarray(array.T if transpose else array)
    return out


def _shards(tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> Iterator[dict[str, np.ndarray]]:
    """Groups tensors in name order into shards of at most ``max_shard_bytes`` (a bigger tensor goes alone)."""
    shard, size = {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shard and size + nbytes > max_shard_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensors[name]
        size += nbytes
    if shard:
        yield shard


def save_params(directory: str, model: nn.Module, variables: Mapping[str, Any], *,
                extra_config: Mapping[str, Any] | None = None, architecture: str = "LlamaForCausalLM",
                dtype: str | None = None, max_shard_bytes: int | None = None,
                tensor_name: TensorName = hf_tensor_name) -> None:
    """Writes ``config.json`` and the weights in Hugging Face layout, sharded when over ``max_shard_bytes``.

    ``dtype`` converts the stored tensors (default: as they are); ``extra_config`` adds config fields;
    ``tensor_name`` names the tensors (default: :data:`NAME_RULES`).
    """
    os.makedirs(directory, exist_ok=True)
    tensors = hf_tensors(variables, dtype, tensor_name=tensor_name)
    config = {**config_to_hf_dict(model.config, architecture), **dict(extra_config or {})}
    if dtype is not None:
        config["torch_dtype"] = dtype
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2)
    metadata = {"format": "pt"}  # transformers refuses safetensors files without a known format tag
    shards = [tensors] if max_shard_bytes is None else list(_shards(tensors, max_shard_bytes))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, WEIGHTS_FILE), metadata=metadata)
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, filename), metadata=metadata)
        weight_map.update({name: filename for name in shard})
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as file:
        json.dump(index, file, indent=2)


def load_causal_lm(directory: str, *, dtype: str = "float32", param_dtype: str = "float32"
                   ) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """The model and its variables from a Hugging Face ``LlamaForCausalLM`` checkpoint directory."""
    model = LlamaForCausalLM(load_config(directory, dtype=dtype, param_dtype=param_dtype))
    return model, load_params(directory, model)


def save_causal_lm(directory: str, model: LlamaForCausalLM, variables: Mapping[str, Any], *,
                   dtype: str | None = None, max_shard_bytes: int | None = None) -> None:
    """Saves a causal LM so that transformers' class of its family (``LlamaForCausalLM``,
    ``Qwen2ForCausalLM``, ...; ``AutoModelForCausalLM``) loads it with ``from_pretrained(directory)``."""
    save_params(directory, model, variables, architecture=hf_architecture(model.config), dtype=dtype,
                max_shard_bytes=max_shard_bytes)
