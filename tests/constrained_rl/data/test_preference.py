from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from constrained_rl.config import ConfigError
from constrained_rl.data import preference

VALID_ROWS = [
    {"prompt": "hi", "response_0": "yo", "response_1": "yo yo", "better_response_id": 1,
     "safer_response_id": 0, "is_response_0_safe": True, "is_response_1_safe": False, "category": "a"},
    {"prompt": "hi hi", "response_0": "ok", "response_1": "", "better_response_id": 0,
     "safer_response_id": 1, "is_response_0_safe": False, "is_response_1_safe": True, "category": "b"},
]


class WordTokenizer:
    """Whitespace words to fixed ids: pad 0, eos 1, then the template and content words."""

    pad_id = 0
    eos_id = 1
    ids = {"U:": 2, "A:": 3, "hi": 4, "yo": 5, "ok": 6}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self.ids[word] for word in text.split()]


TEMPLATE = "U: {prompt} A:"


def write_jsonl_lines(path: pathlib.Path, lines: list[str]) -> pathlib.Path:
    path.write_text("\n".join(lines) + "\n")
    return path


MISSING = object()


def with_change(**change) -> str:
    """The first valid row as a JSON line, with fields replaced (or removed when MISSING)."""
    row = dict(VALID_ROWS[0], **change)
    return json.dumps({k: v for k, v in row.items() if v is not MISSING})


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_round_trip(tmp_path, suffix):
    path = tmp_path / f"pairs{suffix}"
    preference.write_records(path, VALID_ROWS)
    data = preference.read_preference_data(path)
    assert len(data) == 2
    assert data.prompt == ["hi", "hi hi"]
    assert data.response_0 == ["yo", "ok"] and data.response_1 == ["yo yo", ""]
    np.testing.assert_array_equal(data.better_response_id, [1, 0])
    np.testing.assert_array_equal(data.safer_response_id, [0, 1])
    np.testing.assert_array_equal(data.is_response_0_safe, [True, False])
    np.testing.assert_array_equal(data.is_response_1_safe, [False, True])
    assert data.better_response_id.dtype == np.int32 and data.is_response_0_safe.dtype == bool
    assert data.extras == {"category": ["a", "b"]}
    assert data.response(data.better_response_id) == ["yo yo", "ok"]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_sft_and_prompt_readers(tmp_path, suffix):
    sft_path, prompt_path = tmp_path / f"sft{suffix}", tmp_path / f"prompts{suffix}"
    preference.write_records(sft_path, [{"prompt": "hi", "response": "yo", "category": "a"}])
    preference.write_records(prompt_path, [{"prompt": "hi", "category": "a"}, {"prompt": "ok", "category": "b"}])
    sft = preference.read_sft_data(sft_path)
    assert (sft.prompt, sft.response, sft.extras) == (["hi"], ["yo"], {"category": ["a"]})
    prompts = preference.read_prompt_data(prompt_path)
    assert (prompts.prompt, prompts.extras) == (["hi", "ok"], {"category": ["a", "b"]})


def test_extras_keep_only_fields_every_row_has(tmp_path):
    rows = [dict(VALID_ROWS[0], severity=1), VALID_ROWS[1]]
    path = tmp_path / "pairs.jsonl"
    preference.write_records(path, rows)
    assert set(preference.read_preference_data(path).extras) == {"category"}


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        (with_change(safer_response_id=MISSING), "line 2: missing field 'safer_response_id'"),
        (with_change(prompt=3), "line 2: field 'prompt' must be a string, got int"),
        (with_change(prompt="  "), "line 2: field 'prompt' must be a non-empty string"),
        (with_change(response_1=None), "line 2: field 'response_1' is null"),
        (with_change(better_response_id=2), "line 2: field 'better_response_id' must be 0 or 1, got 2"),
        (with_change(better_response_id=True),
         "line 2: field 'better_response_id' must be an integer 0 or 1, got bool"),
        (with_change(safer_response_id="1"), "line 2: field 'safer_response_id' must be an integer 0 or 1, got str"),
        (with_change(is_response_0_safe=1), "line 2: field 'is_response_0_safe' must be a boolean, got int"),
        ('{"prompt": "hi",', "line 2: invalid JSON"),
        ("[1, 2]", "line 2: expected a JSON object, got list"),
    ],
)
def test_each_bad_row_is_reported_with_its_line(tmp_path, bad_line, expected):
    path = write_jsonl_lines(tmp_path / "pairs.jsonl", [json.dumps(VALID_ROWS[1]), bad_line])
    with pytest.raises(ConfigError, match="1 invalid row") as error:
        preference.read_preference_data(path)
    assert str(path) in str(error.value)
    assert expected in str(error.value)


def test_all_problems_of_a_row_are_listed(tmp_path):
    path = write_jsonl_lines(tmp_path / "pairs.jsonl", [with_change(prompt=MISSING, better_response_id=-1)])
    with pytest.raises(ConfigError) as error:
        preference.read_preference_data(path)
    assert ("line 1: missing field 'prompt', field 'better_response_id' must be 0 or 1, got -1"
            in str(error.value))


def test_many_bad_rows_are_counted_and_the_first_few_listed(tmp_path):
    lines = [json.dumps(VALID_ROWS[0])] + [with_change(better_response_id=5)] * 7 + [""]
    path = write_jsonl_lines(tmp_path / "pairs.jsonl", lines)
    with pytest.raises(ConfigError) as error:
        preference.read_preference_data(path)
    message = str(error.value)
    assert "7 invalid row(s) of 8; first 5:" in message
    assert all(f"line {n}:" in message for n in range(2, 7))
    assert "line 7:" not in message and "line 1:" not in message


def test_blank_lines_are_skipped_but_counted_in_line_numbers(tmp_path):
    path = write_jsonl_lines(tmp_path / "pairs.jsonl", [json.dumps(VALID_ROWS[0]), "", with_change(prompt=1)])
    with pytest.raises(ConfigError, match="line 3: field 'prompt'"):
        preference.read_preference_data(path)


def test_parquet_bad_rows_are_reported_by_row_index(tmp_path):
    rows = [VALID_ROWS[0], dict(VALID_ROWS[1], better_response_id=3), dict(VALID_ROWS[1], safer_response_id=-2)]
    path = tmp_path / "pairs.parquet"
    preference.write_records(path, rows)
    with pytest.raises(ConfigError) as error:
        preference.read_preference_data(path)
    assert "2 invalid row(s) of 3" in str(error.value)
    assert "row 1: field 'better_response_id' must be 0 or 1, got 3" in str(error.value)
    assert "row 2: field 'safer_response_id' must be 0 or 1, got -2" in str(error.value)


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "pairs.parquet"
    preference.write_records(path, [{k: v for k, v in row.items() if k != "is_response_1_safe"} for row in VALID_ROWS])
    with pytest.raises(ConfigError, match="missing column.*'is_response_1_safe'"):
        preference.read_preference_data(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        preference.read_preference_data(tmp_path / "absent.jsonl")
    (tmp_path / "pairs.csv").write_text("prompt\n")
    with pytest.raises(ConfigError, match="unknown data format '.csv'"):
        preference.read_preference_data(tmp_path / "pairs.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="no rows"):
        preference.read_preference_data(tmp_path / "empty.jsonl")
    (tmp_path / "garbage.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match="not a readable parquet file"):
        preference.read_preference_data(tmp_path / "garbage.parquet")


def test_format_prompt():
    assert preference.format_prompt(preference.SAFE_RLHF_PROMPT_TEMPLATE, "hi") == (
        "BEGINNING OF CONVERSATION: USER: hi ASSISTANT:")
    with pytest.raises(ConfigError, match="prompt_template"):
        preference.format_prompt("USER: {input}", "hi")


def test_tokenize_sft_masks_by_hand():
    # "U: hi A:" -> [2, 4, 3]; "yo yo" -> [5, 5] + eos 1; "hi hi" prompt with empty response -> eos only.
    batch = preference.tokenize_sft(WordTokenizer(), ["hi", "hi hi"], ["yo yo", ""], max_length=8, template=TEMPLATE)
    np.testing.assert_array_equal(batch.tokens, [[2, 4, 3, 5, 5, 1, 0, 0], [2, 4, 4, 3, 1, 0, 0, 0]])
    np.testing.assert_array_equal(batch.attention_mask, [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(batch.loss_mask, [[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0]])
    assert batch.tokens.dtype == np.int32 and batch.loss_mask.dtype == bool


def test_tokenize_sft_truncates_responses_on_the_right_and_refuses_a_cut_prompt():
    batch = preference.tokenize_sft(WordTokenizer(), ["hi", "hi"], ["yo yo", "ok"], max_length=4,
                                    template=TEMPLATE)
    np.testing.assert_array_equal(batch.tokens, [[2, 4, 3, 5], [2, 4, 3, 6]])
    np.testing.assert_array_equal(batch.loss_mask, [[0, 0, 0, 1], [0, 0, 0, 1]])
    # "hi hi hi" fills the 4 positions with its prompt: the prompt would be cut, so the row is refused.
    with pytest.raises(ConfigError, match=r"max_length: 1 of 2 prompts .* longer than 4 tokens \(the longest "
                                          r"has 6\); raise max_length to at least 6"):
        preference.tokenize_sft(WordTokenizer(), ["hi", "hi hi hi"], ["yo yo", "ok"], max_length=4,
                                template=TEMPLATE)


def test_tokenize_sft_without_max_length_fits_the_longest_row():
    batch = preference.tokenize_sft(WordTokenizer(), ["hi", "hi hi hi"], ["yo yo", "ok"], max_length=None,
                                    template=TEMPLATE)
    np.testing.assert_array_equal(batch.tokens, [[2, 4, 3, 5, 5, 1, 0], [2, 4, 4, 4, 3, 6, 1]])


def test_tokenize_sft_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="max_length"):
        preference.tokenize_sft(WordTokenizer(), ["hi"], ["yo"], max_length=0, template=TEMPLATE)
    with pytest.raises(ConfigError, match="responses"):
        preference.tokenize_sft(WordTokenizer(), ["hi"], [], max_length=4, template=TEMPLATE)


def test_tokenize_prompts_left_pads_and_refuses_a_prompt_it_would_cut():
    batch = preference.tokenize_prompts(WordTokenizer(), ["hi", "hi hi"], max_length=4, template=TEMPLATE)
    np.testing.assert_array_equal(batch.tokens, [[0, 2, 4, 3], [2, 4, 4, 3]])
    np.testing.assert_array_equal(batch.attention_mask, [[0, 1, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ConfigError, match=r"max_prompt_length: 1 of 2 prompts are longer than 4 tokens \(the "
                                          r"longest has 5\); raise max_prompt_length to at least 5"):
        preference.tokenize_prompts(WordTokenizer(), ["hi", "hi hi hi"], max_length=4, template=TEMPLATE)
    longest = preference.tokenize_prompts(WordTokenizer(), ["hi", "hi hi hi"], max_length=None, template=TEMPLATE)
    np.testing.assert_array_equal(longest.tokens, [[0, 0, 2, 4, 3], [2, 4, 4, 4, 3]])


def test_tokenize_preference_pairs_and_safety_signs():
    data = preference.preference_data_from_rows(VALID_ROWS)
    batch = preference.tokenize_preference(WordTokenizer(), data, max_length=7, template=TEMPLATE)
    # Row 0: better = response_1 "yo yo", safer = response_0 "yo" (safe), unsafer = "yo yo" (unsafe).
    # Row 1: better = response_0 "ok", safer = response_1 "" (safe), unsafer = "ok" (unsafe).
    np.testing.assert_array_equal(batch.better.tokens, [[2, 4, 3, 5, 5, 1, 0], [2, 4, 4, 3, 6, 1, 0]])
    np.testing.assert_array_equal(batch.worse.tokens, [[2, 4, 3, 5, 1, 0, 0], [2, 4, 4, 3, 1, 0, 0]])
    np.testing.assert_array_equal(batch.safer.tokens, [[2, 4, 3, 5, 1, 0, 0], [2, 4, 4, 3, 1, 0, 0]])
    np.testing.assert_array_equal(batch.unsafer.tokens, [[2, 4, 3, 5, 5, 1, 0], [2, 4, 4, 3, 6, 1, 0]])
    np.testing.assert_array_equal(batch.worse.loss_mask, [[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0, 0]])
    np.testing.assert_array_equal(batch.safer_sign, [-1, -1])
    np.testing.assert_array_equal(batch.unsafer_sign, [1, 1])


def test_safety_sign():
    np.testing.assert_array_equal(preference.safety_sign(np.array([True, False])), [-1, 1])


def test_tokenize_sft_puts_one_bos_with_a_bos_adding_tokenizer():
    """A Llama tokenizer.json adds BOS in its post-processor; the response must not get a second one."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, processors

    from constrained_rl.models.tokenizer import Tokenizer

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "U:": 3, "A:": 4, "hi": 5, "yo": 6}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tokenizer = Tokenizer(backend, bos_id=2, eos_id=1, pad_id=0)
    batch = preference.tokenize_sft(tokenizer, ["hi"], ["yo yo"], max_length=8, template=TEMPLATE)
    np.testing.assert_array_equal(batch.tokens[0], [2, 3, 5, 4, 6, 6, 1, 0])
    np.testing.assert_array_equal(batch.loss_mask[0], [0, 0, 0, 0, 1, 1, 1, 0])


def test_tokenize_preference_without_max_length_gives_the_four_batches_one_width():
    data = preference.preference_data_from_rows(VALID_ROWS)
    batch = preference.tokenize_preference(WordTokenizer(), data, max_length=None, template=TEMPLATE)
    fitted = preference.tokenize_preference(WordTokenizer(), data, max_length=6, template=TEMPLATE)
    for role in ("better", "worse", "safer", "unsafer"):
        np.testing.assert_array_equal(getattr(batch, role).tokens, getattr(fitted, role).tokens)


def test_the_shipped_example_files_are_consistent():
    data = preference.read_preference_data(preference.EXAMPLE_PREFERENCE_FILE)
    prompts = preference.read_prompt_data(preference.EXAMPLE_EVAL_PROMPTS_FILE)
    assert len(data) == 48 and len(set(data.prompt)) == 48 and len(prompts) == 16
    assert not set(prompts.prompt) & set(data.prompt)
    is_safe = np.stack([data.is_response_0_safe, data.is_response_1_safe], axis=1)
    rows = np.arange(len(data))
    # The safer response is safe wherever one of the two is; harmful prompts have exactly one safe response.
    assert np.all(is_safe[rows, data.safer_response_id] | ~is_safe.any(axis=1))
    harmful = np.asarray(data.extras["category"]) != "benign"
    assert harmful.sum() == 24 and np.all(is_safe[harmful].sum(axis=1) == 1) and np.all(is_safe[~harmful])
    assert set(prompts.extras["category"]) == set(data.extras["category"])
