"""Tokenizer backends, chat templates and `main.py tokenizer`.

MiniMind's own tokenizers and the transformers-rendered prompts come from ../shared (skipped without it);
everything else trains or builds small tokenizers here.
"""

import functools
import json
import logging
import pickle

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

import main
from minimind_jax.data import tokenizer as tokenizer_lib
from minimind_jax.data.tokenizer import SPECIAL_TOKENS, assistant_markers, load_tokenizer, train_sentencepiece
from minimind_jax.errors import UserError
from tests.conftest import require_shared

ERAS = ("2510", "v3")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER_TOOL_JSON = (
    '{"type": "function", "function": {"name": "get_weather", "description": "查询天气", "parameters": '
    '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}'
)
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + WEATHER_TOOL_JSON
    + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call><|im_end|>\n"
)
TOOL_CHAT = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "北京天气？"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Need the tool.",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}],
    },
    {"role": "tool", "content": '{"temp": 20}'},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\n20度，晴。"},
]
TOOL_CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
TOOL_RESPONSES_TEXT = (
    '<|im_start|>user\n<tool_response>\n{"temp": 20}\n</tool_response>\n<tool_response>\nsunny\n'
    "</tool_response><|im_end|>\n"
)


# ---------------------------------------------------------------------------------------------------------
# MiniMind's tokenizers (../shared)


@functools.cache
def minimind_tokenizer(era):
    return load_tokenizer(require_shared("minimind", era))


def golden_records(era):
    path = require_shared("golden", era, "sft_masks.jsonl")
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


@pytest.mark.parametrize("era", ERAS)
def test_prompts_and_ids_match_minimind_for_every_golden_record(era):
    tokenizer = minimind_tokenizer(era)
    records = golden_records(era)
    assert len(records) == 40
    for index, record in enumerate(records):
        prompt = tokenizer.apply_chat_template(record["conversations"])
        assert prompt == record["prompt"], f"record {index}"
        length = len(record["input_ids"])
        ids = tokenizer.encode(prompt)[:length]
        ids += [tokenizer.pad_id] * (length - len(ids))
        assert ids == record["input_ids"], f"record {index}"


@pytest.mark.parametrize("era", ERAS)
def test_encode_batch_matches_encode(era):
    tokenizer = minimind_tokenizer(era)
    prompts = [record["prompt"] for record in golden_records(era)[:6]]
    assert tokenizer.encode_batch(prompts) == [tokenizer.encode(prompt) for prompt in prompts]


@pytest.mark.parametrize("era, arch, newline", [("2510", "minimind2", 201), ("v3", "minimind3", 234)])
def test_minimind_ids_arch_and_assistant_markers(era, arch, newline):
    tokenizer = minimind_tokenizer(era)
    assert tokenizer.arch == arch
    assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (6400, 0, 1, 2)
    assistant = {"2510": [1, 1078, 538, 501], "v3": [1, 1388, 570, 811]}[era]  # MINIMIND_SPEC.md
    assert assistant_markers(tokenizer) == {
        "<|im_start|>assistant": assistant,
        "<|im_start|>assistant\n": assistant + [newline],
        "<|im_end|>": [2],
        "<|im_end|>\n": [2, newline],
    }


@pytest.mark.parametrize("era", ERAS)
def test_minimind_decode_round_trips_and_skips_special_tokens(era):
    tokenizer = minimind_tokenizer(era)
    text = "<|im_start|>user\n你好，MiniMind!  Tabs\tand\nnewlines 😀<|im_end|>\n"
    ids = tokenizer.encode(text)
    assert ids[0] == 1 and 2 in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\n你好，MiniMind!  Tabs\tand\nnewlines 😀\n"


@pytest.mark.parametrize("era", ERAS)
@settings(max_examples=100, deadline=None)
@given(text=st.text())
def test_minimind_round_trips_random_unicode(era, text):
    tokenizer = minimind_tokenizer(era)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_v3_think_tags_are_tokens_but_not_special():
    tokenizer = minimind_tokenizer("v3")
    ids = tokenizer.encode("<think>\nx\n</think>")
    assert ids[0] == 25 and ids[-1] == 26
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nx\n</think>"


def test_2510_generation_prompt_and_enable_thinking():
    """Expected strings read off the 2510 template: the default system turn when the chat has none, then
    `<|im_start|>assistant\\n`, plus an empty think block only when enable_thinking is False."""
    tokenizer = minimind_tokenizer("2510")
    chat = [{"role": "user", "content": "hi"}]
    head = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    assert tokenizer.apply_chat_template(chat) == head
    assert tokenizer.apply_chat_template(chat, add_generation_prompt=True) == head + "<|im_start|>assistant\n"
    assert (
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, enable_thinking=True)
        == head + "<|im_start|>assistant\n"
    )
    assert (
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, enable_thinking=False)
        == head + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_2510_tools_tool_calls_and_tool_responses():
    """Expected string read off the 2510 template: with tools the system turn is the system content, a blank
    line and the tools preamble (each tool as json.dumps with ensure_ascii=False); the first system message is
    not repeated; tool calls follow the assistant content; consecutive tool messages share one user turn;
    2510 ignores reasoning_content and keeps inline think text as it is."""
    tokenizer = minimind_tokenizer("2510")
    expected = (
        "<|im_start|>system\nYou are a weather bot.\n\n"
        + TOOLS_PREAMBLE
        + "<|im_start|>user\n北京天气？<|im_end|>\n"
        + "<|im_start|>assistant\n"
        + TOOL_CALL_TEXT
        + "<|im_end|>\n"
        + TOOL_RESPONSES_TEXT
        + "<|im_start|>assistant\n<think>\nEasy.\n</think>\n\n20度，晴。<|im_end|>\n"
        + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    rendered = tokenizer.apply_chat_template(
        TOOL_CHAT, tools=[WEATHER_TOOL], add_generation_prompt=True, enable_thinking=False
    )
    assert rendered == expected


def test_2510_tool_calls_after_content_with_string_arguments():
    """Read off the 2510 template: a newline separates the content from the first call and calls from each
    other; string arguments are inserted verbatim; without tools there is no tools preamble."""
    tokenizer = minimind_tokenizer("2510")
    chat = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"name": "a", "arguments": '{"x": 1}'},
                {"function": {"name": "b", "arguments": {"y": [1, 2]}}},
            ],
        },
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
        '<|im_start|>assistant\nLet me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {"y": [1, 2]}}\n</tool_call><|im_end|>\n'
    )
    assert tokenizer.apply_chat_template(chat) == expected


def test_v3_generation_prompt_closed_or_open_thinking():
    """Read off the v3 template: no default system turn; the generation prompt closes an empty think block
    unless open_thinking is true, which leaves `<think>\\n` open."""
    tokenizer = minimind_tokenizer("v3")
    chat = [{"role": "user", "content": "hi"}]
    head = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.apply_chat_template(chat, add_generation_prompt=True) == head + "<think>\n\n</think>\n\n"
    assert tokenizer.apply_chat_template(chat, add_generation_prompt=True, open_thinking=True) == head + "<think>\n"
    assert (
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, open_thinking=False)
        == head + "<think>\n\n</think>\n\n"
    )
    assert tokenizer.apply_chat_template(chat) == "<|im_start|>user\nhi<|im_end|>\n"


def test_v3_reasoning_content_and_inline_think():
    """Read off the v3 template: reasoning_content is stripped of newlines and put in the think block; without
    it, text before `</think>` in the content becomes the reasoning and the rest (left-stripped) the content;
    a system message after the first is an ordinary turn."""
    tokenizer = minimind_tokenizer("v3")
    chat = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "\n\n2", "reasoning_content": "\n\nadd them\n"},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\n\nadd again\n\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    expected = (
        "<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nadd them\n</think>\n\n2<|im_end|>\n"
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nadd again\n</think>\n\n4<|im_end|>\n"
        "<|im_start|>user\n3+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n6<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(chat) == expected


def test_v3_tools_tool_calls_and_tool_responses():
    """Read off the v3 template: same tools preamble as 2510; the assistant turn always has a think block
    (here from reasoning_content); no newline before the first call when the content is empty."""
    tokenizer = minimind_tokenizer("v3")
    expected = (
        "<|im_start|>system\nYou are a weather bot.\n\n"
        + TOOLS_PREAMBLE
        + "<|im_start|>user\n北京天气？<|im_end|>\n"
        + "<|im_start|>assistant\n<think>\nNeed the tool.\n</think>\n\n"
        + TOOL_CALL_TEXT
        + "<|im_end|>\n"
        + TOOL_RESPONSES_TEXT
        + "<|im_start|>assistant\n<think>\nEasy.\n</think>\n\n20度，晴。<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(TOOL_CHAT, tools=[WEATHER_TOOL]) == expected


def test_minimind_corrupt_tokenizer_json_names_the_file(tmp_path):
    source = require_shared("minimind", "2510")
    (tmp_path / "tokenizer_config.json").write_bytes((source / "tokenizer_config.json").read_bytes())
    (tmp_path / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes()[:1000])
    with pytest.raises(UserError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Chat-template environment and HF-backend errors, on a tiny tokenizer.json built here


def write_tiny_hf_tokenizer(directory, chat_template):
    """A byte-level BPE with MiniMind's three special tokens, plus a tokenizer_config.json."""
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(["hello world", "你好世界"] * 10, trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    bpe.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
    return directory


def render_tiny(tmp_path, chat_template, messages=(), **kwargs):
    tokenizer = load_tokenizer(write_tiny_hf_tokenizer(tmp_path / "tok", chat_template))
    return tokenizer.apply_chat_template(list(messages), **kwargs)


def test_tiny_hf_tokenizer_has_no_arch_and_keeps_special_ids(tmp_path):
    tokenizer = load_tokenizer(write_tiny_hf_tokenizer(tmp_path / "tok", "{{ bos_token }}"))
    assert tokenizer.arch is None
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert tokenizer.encode("hello<|im_end|>")[-1] == 2
    assert load_tokenizer(tmp_path / "tok" / "tokenizer.json").vocab_size == tokenizer.vocab_size
    assert tokenizer.files == (tmp_path / "tok" / "tokenizer.json", tmp_path / "tok" / "tokenizer_config.json")


def test_template_environment_matches_transformers(tmp_path):
    """trim_blocks/lstrip_blocks (no newline after a block tag, no indent before one), transformers' tojson
    (no HTML escaping, keyword options), loop controls, the `generation` block, bos/eos tokens as variables
    and `documents` defined as None."""
    template = (
        "{% for m in messages %}\n"
        "    {% if m.skip %}{% continue %}{% endif %}\n"
        "{% generation %}{{ m | tojson }}{% endgeneration %}\n"
        "{% endfor %}\n"
        "{{ tools | tojson(indent=1, sort_keys=True) }}|{{ bos_token }}{{ eos_token }}|{{ documents is none }}"
    )
    rendered = render_tiny(
        tmp_path, template, [{"content": "<a> & 'b' 你"}, {"skip": True}], tools=[{"z": 1, "a": "é"}]
    )
    assert rendered == ('{"content": "<a> & \'b\' 你"}[\n {\n  "a": "é",\n  "z": 1\n }\n]|<|im_start|><|im_end|>|True')


def test_template_strftime_now(tmp_path):
    rendered = render_tiny(tmp_path, "{{ strftime_now('%Y') }}")
    assert rendered.isdigit() and len(rendered) == 4


def test_template_is_sandboxed(tmp_path):
    with pytest.raises(UserError, match="chat template failed to render"):
        render_tiny(tmp_path, "{{ messages.append(1) }}")


def test_template_errors_name_the_config_file(tmp_path):
    with pytest.raises(UserError, match=r"tokenizer_config\.json: chat template failed to render: no tools"):
        render_tiny(tmp_path, "{{ raise_exception('no tools') }}")
    with pytest.raises(UserError, match=r"tokenizer_config\.json: chat_template does not parse"):
        write_tiny_hf_tokenizer(tmp_path / "bad", "{% if %}")
        load_tokenizer(tmp_path / "bad")
    with pytest.raises(UserError, match="has no chat_template"):
        render_tiny(tmp_path, None, [{"role": "user", "content": "x"}])


def test_missing_and_corrupt_config_name_the_file(tmp_path):
    directory = write_tiny_hf_tokenizer(tmp_path / "tok", "")
    (directory / "tokenizer_config.json").write_text('{"chat_template": "x",\n oops}', "utf-8")
    with pytest.raises(UserError, match=r"tokenizer_config\.json: invalid JSON at line 2"):
        load_tokenizer(directory)
    (directory / "tokenizer_config.json").unlink()
    with pytest.raises(UserError, match=r"tokenizer_config\.json: file not found"):
        load_tokenizer(directory)
    with pytest.raises(UserError, match="no such tokenizer"):
        load_tokenizer(tmp_path / "absent")
    with pytest.raises(UserError, match=r"found none"):
        load_tokenizer(tmp_path)


def test_hf_tokenizer_pickles(tmp_path):
    tokenizer = load_tokenizer(write_tiny_hf_tokenizer(tmp_path / "tok", "{{ messages[0].content }}!"))
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode("hello 你好") == tokenizer.encode("hello 你好")
    assert clone.apply_chat_template([{"content": "x"}]) == "x!"


# ---------------------------------------------------------------------------------------------------------
# SentencePiece


ENGLISH = [
    "How does a computer work?",
    "Computers perform very large numbers of calculations.",
    "What is your favourite book?  I like reading science fiction.",
    "The weather is sunny today, with a light wind from the west.",
    "Tell me a joke about programmers and their keyboards.",
]
CHINESE = [
    "你好，你今天怎么样？",
    "我很好，谢谢你。",
    "你最喜欢什么颜色？蓝色。",
    "计算机是怎么工作的？",
    "今天天气很好。",
]


def write_jsonl(path, records, extra_lines=()):
    lines = [json.dumps(record, ensure_ascii=False) for record in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", "utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    pretrain = write_jsonl(directory / "pretrain.jsonl", [{"text": f"{e}\n{c}"} for e, c in zip(ENGLISH, CHINESE)] * 4)
    chats = [
        {"conversations": [{"role": "user", "content": c}, {"role": "assistant", "content": e}]}
        for e, c in zip(ENGLISH, CHINESE)
    ]
    sft = write_jsonl(directory / "sft.jsonl", chats * 4, extra_lines=["{not json", '{"other": 1}', "", "[1, 2]"])
    return pretrain, sft


@pytest.fixture(scope="module")
def sp_model(corpus, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("sp") / "tiny"
    return train_sentencepiece(corpus, prefix, vocab_size=400, default_system_prompt="你是minimind。")


@pytest.fixture(scope="module")
def sp_tokenizer(sp_model):
    return load_tokenizer(sp_model)


def test_sentencepiece_reserves_minimind_special_ids(sp_tokenizer):
    assert (sp_tokenizer.pad_id, sp_tokenizer.bos_id, sp_tokenizer.eos_id) == (0, 1, 2)
    assert [sp_tokenizer.decode([i]) for i in range(3)] == list(SPECIAL_TOKENS)
    assert sp_tokenizer.arch is None
    assert 300 < sp_tokenizer.vocab_size <= 400
    ids = sp_tokenizer.encode("a<|im_start|>b<|endoftext|><|im_end|>")
    assert [i for i in ids if i < 3] == [1, 0, 2]
    assert sp_tokenizer.decode(ids, skip_special_tokens=True) == "ab"


def test_sentencepiece_assistant_markers(sp_tokenizer):
    markers = assistant_markers(sp_tokenizer)
    newline = sp_tokenizer.encode("\n")
    assert len(newline) == 1
    assert markers["<|im_end|>"] == [2]
    assert markers["<|im_end|>\n"] == [2] + newline
    assert markers["<|im_start|>assistant\n"] == markers["<|im_start|>assistant"] + newline
    assert markers["<|im_start|>assistant"][0] == 1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "How does a computer work?",
        "你好，世界！Hello,   world.\n\n\tTabs, trailing spaces   ",
        "  leading spaces and \u2581 the SentencePiece space symbol \u2581\u2581",
        "rare: 龘 ∑ 😀 \x00 \r\n",
    ],
)
def test_sentencepiece_round_trip(sp_tokenizer, text):
    assert sp_tokenizer.decode(sp_tokenizer.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_sentencepiece_round_trips_random_unicode(sp_tokenizer, text):
    assert sp_tokenizer.decode(sp_tokenizer.encode(text)) == text


@settings(max_examples=50, deadline=None)
@given(texts=st.lists(st.text(alphabet="ab 你好\u2581\n<|im_end|>"), max_size=4))
def test_sentencepiece_encode_batch_matches_encode(sp_tokenizer, texts):
    assert sp_tokenizer.encode_batch(texts) == [sp_tokenizer.encode(text) for text in texts]


def test_sentencepiece_decode_drops_ids_outside_vocab(sp_tokenizer):
    ids = sp_tokenizer.encode("你好")
    assert sp_tokenizer.decode(ids + [sp_tokenizer.vocab_size, 6399, -1]) == "你好"


def test_sentencepiece_chatml_template(sp_tokenizer):
    """Expected strings read off CHATML_TEMPLATE: the default system prompt saved at training time is used
    only when the chat has no system turn; the generation prompt is `<|im_start|>assistant\\n`."""
    chat = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi!"}]
    assert sp_tokenizer.apply_chat_template(chat) == (
        "<|im_start|>system\n你是minimind。<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\nHi!<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}] + chat[:1]
    assert sp_tokenizer.apply_chat_template(with_system, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = sp_tokenizer.encode(sp_tokenizer.apply_chat_template(chat))
    assert ids.count(1) == 3 and ids.count(2) == 3


def test_sentencepiece_chatml_tools(sp_tokenizer):
    """Read off CHATML_TEMPLATE: tools go in the system turn as in MiniMind 2510; calls and responses too."""
    expected = (
        "<|im_start|>system\nYou are a weather bot.\n\n"
        + TOOLS_PREAMBLE
        + "<|im_start|>user\n北京天气？<|im_end|>\n"
        + "<|im_start|>assistant\n"
        + TOOL_CALL_TEXT
        + "<|im_end|>\n"
        + TOOL_RESPONSES_TEXT
        + "<|im_start|>assistant\n<think>\nEasy.\n</think>\n\n20度，晴。<|im_end|>\n"
        + "<|im_start|>assistant\n"
    )
    assert sp_tokenizer.apply_chat_template(TOOL_CHAT, tools=[WEATHER_TOOL], add_generation_prompt=True) == expected
    with pytest.raises(UserError, match=r"tiny_config\.json: chat template failed to render: unknown role robot"):
        sp_tokenizer.apply_chat_template([{"role": "robot", "content": "x"}])


def test_sentencepiece_loads_from_directory_and_without_sidecar(sp_model, tmp_path):
    assert load_tokenizer(sp_model.parent).encode("你好") == load_tokenizer(sp_model).encode("你好")
    bare = tmp_path / "bare.model"
    bare.write_bytes(sp_model.read_bytes())
    tokenizer = load_tokenizer(bare)
    assert tokenizer.files == (bare,)
    assert load_tokenizer(sp_model).files == (sp_model, sp_model.with_name("tiny_config.json"))
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_sentencepiece_training_is_deterministic(corpus, sp_model, tmp_path):
    again = train_sentencepiece(corpus, tmp_path / "tiny", vocab_size=400, default_system_prompt="你是minimind。")
    assert again.read_bytes() == sp_model.read_bytes()


def test_sentencepiece_training_reports_skipped_lines(corpus, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=tokenizer_lib.__name__):
        model = train_sentencepiece(corpus, tmp_path / "t", vocab_size=350)
    trained_on = json.loads(tokenizer_lib.sentencepiece_config_path(model).read_text("utf-8"))["trained_on"]
    assert trained_on["skipped_lines"] == 3
    assert trained_on["sentences"] == 20 + 20 * 2  # pretrain texts + SFT turns
    assert "sft.jsonl:21: malformed JSON" in caplog.text and "sft.jsonl:24: not a JSON object" in caplog.text
    assert "sft.jsonl:22: neither" in caplog.text


def test_sentencepiece_training_skips_a_line_over_the_data_pipelines_cap(tmp_path):
    from minimind_jax.data.records import MAX_LINE_BYTES

    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": "x" * MAX_LINE_BYTES}) + "\n" + json.dumps({"text": "short"}) + "\n")
    skipped = []
    assert list(tokenizer_lib.iter_jsonl_texts([path], skipped)) == ["short"]
    assert skipped == [f"{path}:1: line over {MAX_LINE_BYTES // 2**20} MB"]


def test_sentencepiece_trains_on_messages_records_as_on_conversations(corpus, tmp_path):
    chats = [json.loads(line) for line in corpus[1].read_text("utf-8").splitlines()[:20]]
    as_messages = write_jsonl(tmp_path / "messages.jsonl", [{"messages": chat["conversations"]} for chat in chats])
    texts = list(tokenizer_lib.iter_jsonl_texts([as_messages]))
    assert texts == [turn["content"] for chat in chats for turn in chat["conversations"]] and len(texts) == 40


def test_sentencepiece_pickles(sp_tokenizer):
    clone = pickle.loads(pickle.dumps(sp_tokenizer))
    assert clone.encode("你好 world\u2581") == sp_tokenizer.encode("你好 world\u2581")
    assert clone.apply_chat_template([{"role": "user", "content": "x"}]).startswith("<|im_start|>system\n你是")


def test_sentencepiece_bad_input(tmp_path, corpus):
    with pytest.raises(UserError, match=r"absent\.jsonl: cannot read"):
        train_sentencepiece([tmp_path / "absent.jsonl"], tmp_path / "x")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"other": 1}])
    with pytest.raises(UserError, match=r"empty\.jsonl: no text found"):
        train_sentencepiece([empty], tmp_path / "x")
    with pytest.raises(UserError, match="SentencePiece training on .* failed"):
        train_sentencepiece(corpus, tmp_path / "x", vocab_size=10)
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(UserError, match=r"corrupt\.model: not a SentencePiece model"):
        load_tokenizer(corrupt)


# ---------------------------------------------------------------------------------------------------------
# main.py tokenizer


def test_cli_train_and_encode(corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    out.mkdir()
    argv = ["tokenizer", "train", "--vocab_size", "380", "--out", str(out)]
    assert main.main(argv + ["--input", str(corpus[0]), "--input", str(corpus[1])]) == 0
    printed = capsys.readouterr().out
    vocab_size = load_tokenizer(out).vocab_size
    assert f"wrote {out / 'tokenizer.model'}" in printed and f"vocab_size {vocab_size}" in printed
    assert "and tokenizer_config.json" in printed and "skipped 3 bad records" in printed

    assert main.main(["tokenizer", "encode", "--tokenizer_path", str(out), "--text", "你好<|im_end|>"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].endswith(", 2]")
    assert main.main(["tokenizer", "encode", "--tokenizer", str(out), "--text", "你好<|im_end|>"]) == 0  # old name
    assert capsys.readouterr().out == printed
    with pytest.raises(SystemExit):
        main.main(["tokenizer", "encode", "--help"])
    help_text = capsys.readouterr().out
    assert "--tokenizer_path" in help_text and "--tokenizer" not in help_text.replace("--tokenizer_path", "")


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert main.main(["tokenizer", "train", "--input", str(tmp_path / "no.jsonl"), "--out", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no.jsonl: cannot read" in error
