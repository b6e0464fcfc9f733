"""Examples and loss masks equal MiniMind's (goldens from its own SFTDataset/PretrainDataset), bad input is
skipped and counted (or an error in strict mode), and the preprocessing cache is built once and reused."""

import codecs
import json
import logging
import os
import pathlib
import re

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from minimind_jax.data import examples, records
from minimind_jax.data.preference import load_preference_data
from minimind_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from minimind_jax.errors import UserError
from tests.conftest import require_shared
from tests.support.data import GOOD, golden_records, random_chats, write_jsonl

ERAS = {"2510": "minimind2", "v3": "minimind3"}
GOLDEN_SFT_LEN = 128  # max length the goldens were recorded with
GOLDEN_PRETRAIN_LEN = 64


def era_tokenizer(era: str):
    return load_tokenizer(require_shared("minimind", era))


# ---------------------------------------------------------------------------------------------------------
# Parity with MiniMind's own datasets


@pytest.mark.parametrize("era", ERAS)
def test_sft_examples_equal_minimind_goldens(era):
    arch, tokenizer = ERAS[era], era_tokenizer(era)
    records = golden_records(era, "sft_masks.jsonl")
    assert len(records) == 40
    for record in records:
        prompt = examples.chat_prompt(tokenizer, record["conversations"], arch=arch)
        assert prompt == record["prompt"]
        if arch == "minimind2":
            X, Y, loss_mask = examples.minimind2_sft(tokenizer, prompt, GOLDEN_SFT_LEN)
            assert (X, Y, loss_mask) == (record["X"], record["Y"], record["loss_mask"])
            assert X + Y[-1:] == record["input_ids"]
        else:
            input_ids, labels = examples.minimind3_sft(tokenizer, prompt, GOLDEN_SFT_LEN)
            assert (input_ids, labels) == (record["input_ids"], record["labels"])
    # The set covers a truncated chat and a system turn, as the goldens promise.
    assert any(record["input_ids"][-1] != 0 for record in records)


@pytest.mark.parametrize("era", ERAS)
def test_pretrain_examples_equal_minimind_goldens(era):
    arch, tokenizer = ERAS[era], era_tokenizer(era)
    for record in golden_records(era, "pretrain_masks.jsonl"):
        if arch == "minimind2":
            X, Y, loss_mask = examples.minimind2_pretrain(tokenizer, record["text"], GOLDEN_PRETRAIN_LEN)
            assert (X, Y, loss_mask) == (record["X"], record["Y"], record["loss_mask"])
        else:
            input_ids, labels = examples.minimind3_pretrain(tokenizer, record["text"], GOLDEN_PRETRAIN_LEN)
            assert (input_ids, labels) == (record["input_ids"], record["labels"])


def golden_internal(record: dict, arch: str) -> dict:
    if arch == "minimind2":
        return examples.from_minimind2(record["X"], record["Y"], record["loss_mask"])
    return examples.from_minimind3(record["input_ids"], record["labels"])


@pytest.mark.parametrize("kind", ["sft", "pretrain"])
@pytest.mark.parametrize("era", ERAS)
def test_cached_examples_equal_goldens_in_internal_form(era, kind, tmp_path):
    arch = ERAS[era]
    name, max_len = (
        ("sft_masks.jsonl", GOLDEN_SFT_LEN) if kind == "sft" else ("pretrain_masks.jsonl", GOLDEN_PRETRAIN_LEN)
    )
    records = golden_records(era, name)
    config = examples.ExampleConfig(kind, arch, max_len, system_prompt_ratio=0, drop_empty_think_ratio=0)
    dataset = examples.load_dataset(
        require_shared("golden", era, name),
        require_shared("minimind", era),
        config,
        cache_dir=tmp_path,
        num_workers=0,
        progress=False,
    )
    assert len(dataset) == len(records)
    for index, record in enumerate(records):
        expected = golden_internal(record, arch)
        got = dataset.example(index)
        assert set(got) == {"inputs", "targets", "loss_mask"}
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"record {index} {key}")
        assert got["inputs"].shape == (config.seq_len,) and got["loss_mask"].dtype == np.float32


def test_internal_form_of_each_era():
    # 2510 feeds X; v3 feeds every id and its last position predicts nothing.
    ids, learned = [1, 5, 6, 2, 0], [0, 0, 1, 1, 0]
    v2 = examples.example_from_tokens(np.array(ids), np.array(learned), "minimind2")
    assert v2["inputs"].tolist() == [1, 5, 6, 2] and v2["targets"].tolist() == [5, 6, 2, 0]
    assert v2["loss_mask"].tolist() == [0, 1, 1, 0]
    v3 = examples.example_from_tokens(np.array(ids), np.array(learned), "minimind3")
    assert v3["inputs"].tolist() == ids and v3["targets"].tolist() == [5, 6, 2, 0, 0]
    assert v3["loss_mask"].tolist() == [0, 1, 1, 0, 0]
    labels = [-100, -100, 6, 2, -100]
    assert {k: v.tolist() for k, v in examples.from_minimind3(ids, labels).items()} == {
        k: v.tolist() for k, v in v3.items()
    }
    padded = examples.example_from_tokens(np.array(ids[:4]), np.array(learned[:4]), "minimind3", max_seq_len=6)
    assert padded["inputs"].tolist() == [1, 5, 6, 2, 0, 0] and padded["loss_mask"].tolist() == [0, 1, 1, 0, 0, 0]


# ---------------------------------------------------------------------------------------------------------
# v3 augmentations


def test_v3_augmentations_follow_minimind():
    tokenizer = era_tokenizer("v3")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    plain = examples.chat_prompt(tokenizer, chat, arch="minimind3")
    assert examples.EMPTY_THINK in plain and "<|im_start|>system" not in plain
    rng = np.random.default_rng(0)
    both = examples.chat_prompt(
        tokenizer, chat, arch="minimind3", rng=rng, system_prompt_ratio=1.0, drop_empty_think_ratio=1.0
    )
    system = both.split("<|im_start|>system\n")[1].split("<|im_end|>")[0]
    assert system in examples.SYSTEM_PROMPTS
    assert examples.EMPTY_THINK not in both and both.endswith(plain.replace(examples.EMPTY_THINK, ""))
    # A chat that already has a system turn, or uses tools, keeps its own.
    with_system = [{"role": "system", "content": "be brief"}] + chat
    assert examples.chat_prompt(
        tokenizer, with_system, arch="minimind3", rng=rng, system_prompt_ratio=1.0
    ) == examples.chat_prompt(tokenizer, with_system, arch="minimind3")
    tool_chat = [{"role": "user", "content": "weather?", "tools": json.dumps([{"name": "f"}])}] + chat[1:]
    assert examples.augment_conversations(tool_chat, rng, 1.0) == tool_chat
    # The draws are a pure function of (seed, line).
    config = examples.ExampleConfig("sft", "minimind3", 64, system_prompt_ratio=0.5, drop_empty_think_ratio=0.5, seed=3)
    encoder = examples.RecordEncoder(tokenizer, config)
    prompts = {line: encoder.prompt({"conversations": chat}, line) for line in range(40)}
    assert prompts == {line: encoder.prompt({"conversations": chat}, line) for line in range(40)}
    assert len(set(prompts.values())) > 2


def test_era_defaults_and_options():
    v3 = examples.ExampleConfig("sft", "minimind3", 64)
    assert (v3.system_prompt_ratio, v3.drop_empty_think_ratio, v3.augmented, v3.seq_len) == (0.2, 0.8, True, 64)
    v2 = examples.ExampleConfig("sft", "minimind2", 64)
    assert (v2.system_prompt_ratio, v2.augmented, v2.seq_len) == (0.0, False, 63)
    with pytest.raises(UserError, match="minimind3 option"):
        examples.ExampleConfig("sft", "minimind2", 64, system_prompt_ratio=0.2)
    with pytest.raises(UserError, match="max_seq_len"):
        examples.ExampleConfig("sft", "minimind2", 2)


# ---------------------------------------------------------------------------------------------------------
# Bad input

BAD_SFT_LINES = {
    "malformed JSON": '{"conversations": [',
    "not a JSON object": "[1, 2]",
    "no 'conversations' (or 'messages') key": {"text": "a pretrain record"},
    "unknown role": {"conversations": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
    "non-string content": {"conversations": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
    "not UTF-8": b'{"conversations": "\xff\xfe"}',
    "line over 10 MB": '{"conversations": "' + "x" * records.MAX_LINE_BYTES + '"}',
}


def bad_sft_file(tmp_path) -> tuple[pathlib.Path, dict[str, int]]:
    """GOOD records around one line of each bad kind, plus two dropped chats; returns the path and the
    line number of each reason."""
    lines, where = [GOOD], {}
    for reason, line in BAD_SFT_LINES.items():
        lines.append(line)
        where[reason] = len(lines)
        lines.append(GOOD)
    lines.append({"conversations": [{"role": "user", "content": "no answer"}]})
    where["no assistant turn"] = len(lines)
    lines.append(
        {"conversations": [{"role": "user", "content": "cat " * 200}, {"role": "assistant", "content": "mat"}]}
    )
    where["assistant tokens truncated away"] = len(lines)
    lines.append("")  # a blank line is no record at all
    return write_jsonl(tmp_path / "bad.jsonl", lines), where


def test_bad_lines_are_skipped_counted_and_summed_up_once(tmp_path, small_tokenizer, caplog):
    path, where = bad_sft_file(tmp_path)
    config = examples.ExampleConfig("sft", "minimind2", 32)
    with caplog.at_level(logging.WARNING, logger="minimind_jax.data"):
        dataset = examples.load_dataset(
            path, small_tokenizer, config, cache_dir=tmp_path / "cache", num_workers=0, progress=False
        )
    assert len(dataset) == len(BAD_SFT_LINES) + 1
    report = dataset.report
    assert report.skipped == {reason: 1 for reason in BAD_SFT_LINES}
    assert report.dropped == {"no assistant turn": 1, "assistant tokens truncated away": 1}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "\n" not in message
    for reason, line in where.items():
        assert f"{reason} (e.g. {path.resolve()}:{line})" in message
    # The cache remembers what it skipped: strict mode refuses it too.
    with pytest.raises(UserError, match=f"bad.jsonl:{where['malformed JSON']}: malformed JSON$"):
        examples.load_dataset(path, small_tokenizer, config, cache_dir=tmp_path / "cache", strict=True, progress=False)
    # Every kept example is a GOOD one, and the line numbers say where each came from.
    assert set(dataset.line_numbers.tolist()) == {1} | {
        line + 1 for reason, line in where.items() if reason in BAD_SFT_LINES
    }


@pytest.mark.parametrize("reason", list(BAD_SFT_LINES))
def test_strict_mode_names_the_first_bad_line(tmp_path, small_tokenizer, reason):
    path = write_jsonl(tmp_path / "one_bad.jsonl", [GOOD, GOOD, BAD_SFT_LINES[reason], GOOD])
    config = examples.ExampleConfig("sft", "minimind2", 32)
    with pytest.raises(UserError) as error:
        examples.load_dataset(
            path, small_tokenizer, config, cache_dir=tmp_path / "cache", num_workers=0, strict=True, progress=False
        )
    assert str(error.value) == f"{path.resolve()}:3: {reason}"
    assert not list((tmp_path / "cache").iterdir())  # no cache, and no temporary left behind
    with pytest.raises(UserError, match=re.escape(f"one_bad.jsonl:3: {reason}")):
        list(records.read_jsonl(path, kind="sft", strict=True))


def test_bad_tool_calls_are_skipped(tmp_path, small_tokenizer):
    call = lambda tool_calls: {
        "conversations": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": tool_calls},
        ]
    }
    good_call = call(json.dumps([{"name": "weather", "arguments": {"city": "x"}}]))
    path = write_jsonl(tmp_path / "tools.jsonl", [good_call, call("[not json"), call([1])])
    config = examples.ExampleConfig("sft", "minimind3", 128)
    dataset = examples.load_dataset(
        path, small_tokenizer, config, cache_dir=tmp_path / "cache", num_workers=0, progress=False
    )
    assert dataset.line_numbers.tolist() == [1]
    assert dataset.report.skipped == {"'tool_calls' is not valid JSON": 1, "chat template failed to render": 1}
    with pytest.raises(UserError, match=r"tools.jsonl:2: 'tool_calls' is not valid JSON$"):
        examples.load_dataset(
            path, small_tokenizer, config, cache_dir=tmp_path / "strict", num_workers=0, strict=True, progress=False
        )
    path = write_jsonl(tmp_path / "render.jsonl", [good_call, call([1])])
    with pytest.raises(UserError, match=r"render.jsonl:2: chat template failed to render \(.+\)$"):
        examples.load_dataset(
            path, small_tokenizer, config, cache_dir=tmp_path / "strict", num_workers=0, strict=True, progress=False
        )


def test_bad_pretrain_records(tmp_path, small_tokenizer):
    path = write_jsonl(
        tmp_path / "pretrain.jsonl",
        [{"text": "the cat"}, {"conversations": []}, {"text": ["not", "text"]}, {"text": ""}, {"text": "a mat"}],
    )
    report = records.SkipReport(str(path))
    read = list(records.read_jsonl(path, kind="pretrain", report=report))
    assert [line for line, _ in read] == [1, 4, 5]
    assert report.skipped == {"no 'text' key": 1, "'text' is not a string": 1}
    for arch in ERAS.values():
        dataset = examples.load_dataset(
            path,
            small_tokenizer,
            examples.ExampleConfig("pretrain", arch, 16),
            cache_dir=tmp_path / arch,
            num_workers=0,
            progress=False,
        )
        # 2510 learns nothing from an empty text; v3 still learns its EOS after the BOS.
        expected_lines = [1, 5] if arch == "minimind2" else [1, 4, 5]
        assert dataset.line_numbers.tolist() == expected_lines
        assert dataset.report.dropped == ({"nothing to learn": 1} if arch == "minimind2" else {})


def test_read_jsonl_tells_kinds_apart(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, {"text": "t"}, {"other": 1}])
    report = records.SkipReport(str(path))
    read = list(records.read_jsonl(path, kind=None, report=report))
    assert [records.record_kind(record) for _, record in read] == ["sft", "pretrain"]
    assert report.skipped == {"neither 'conversations' (or 'messages'), 'text' nor 'chosen'/'rejected' keys": 1}


@pytest.mark.parametrize("arch", ["minimind2", "minimind3"])
def test_messages_records_are_the_same_as_conversations(tmp_path, small_tokenizer, arch):
    """The common Hugging Face form keeps the chat under `messages`; it makes the same examples."""
    chats = random_chats(40, seed=6)
    as_messages = [{"messages": chat["conversations"]} for chat in chats]
    config = examples.ExampleConfig("sft", arch, 128)
    datasets = [
        examples.load_dataset(
            write_jsonl(tmp_path / f"{name}.jsonl", records),
            small_tokenizer,
            config,
            cache_dir=tmp_path / name,
            num_workers=0,
            progress=False,
        )
        for name, records in (("conversations", chats), ("messages", as_messages))
    ]
    assert len(datasets[1]) == len(datasets[0]) > 30  # a few are too long to learn from
    for name in ("lengths", "line_numbers", "num_learned", "_tokens", "_learned"):
        np.testing.assert_array_equal(getattr(datasets[1], name), getattr(datasets[0], name))
    report = records.SkipReport("x")
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": []}, as_messages[0]])
    assert [records.record_kind(record) for _, record in records.read_jsonl(path, kind=None, report=report)] == ["sft"]
    assert report.skipped == {"'messages' is not a non-empty list": 1}


def test_a_byte_order_mark_does_not_cost_the_first_record(tmp_path, small_tokenizer):
    """Editors on Windows save UTF-8 with a BOM; it is dropped, as the utf-8-sig codec drops it."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + write_jsonl(tmp_path / "plain.jsonl", [GOOD, GOOD]).read_bytes())
    report = records.SkipReport(str(path))
    assert [line for line, _ in records.read_jsonl(path, kind=None, report=report)] == [1, 2] and not report.skipped
    dataset = examples.load_dataset(
        path,
        small_tokenizer,
        examples.ExampleConfig("sft", "minimind2", 32),
        cache_dir=tmp_path / "cache",
        num_workers=0,
        progress=False,
    )
    assert dataset.line_numbers.tolist() == [1, 2] and not dataset.report.skipped


def test_a_bom_alone_is_an_empty_file(tmp_path):
    path = tmp_path / "bom_only.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + b"\n")
    report = records.SkipReport(str(path))
    assert list(records.read_jsonl(path, kind=None, report=report)) == [] and not report.skipped


def test_a_lone_surrogate_anywhere_a_record_is_tokenized_makes_it_bad(tmp_path):
    r"""JSON can spell a lone surrogate (\ud800), which no tokenizer takes: found when the record is read,
    for every kind, so no reader (inspect, eval, DPO) hands it to a tokenizer."""
    reply = {"role": "assistant", "content": "yo"}
    lone = {"role": "user", "content": "hi \ud800"}
    pair = {"chosen": [lone, reply], "rejected": [{"role": "user", "content": "hi"}, reply]}
    lines = [
        {"conversations": [lone, reply]},
        {"text": "a \udfff b"},
        pair,
        {"conversations": [{**reply, "reasoning_content": "\ud83d"}]},
        {"conversations": [{"role": "user", "content": "an emoji \U0001f600 is fine"}, reply]},
    ]
    path = tmp_path / "surrogates.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))  # ensure_ascii: \ud800 as an escape
    report = records.SkipReport(str(path))
    assert [line for line, _ in records.read_jsonl(path, kind=None, report=report)] == [5]
    assert report.skipped == {"text is not valid Unicode (lone surrogate)": 4}


def test_a_directory_as_data_says_so(tmp_path, small_tokenizer):
    for read in (
        lambda: list(records.read_jsonl(tmp_path, kind=None)),
        lambda: examples.load_dataset(tmp_path, small_tokenizer, examples.ExampleConfig("sft", "minimind2", 32)),
        lambda: load_preference_data(tmp_path, load_tokenizer(small_tokenizer), "minimind2", 32),
    ):
        with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path))}: is a directory, not a jsonl file$"):
            read()


def test_no_usable_record_is_an_error(tmp_path, small_tokenizer):
    path = write_jsonl(tmp_path / "empty.jsonl", ["{oops"])
    with pytest.raises(UserError, match="no usable sft records"):
        examples.load_dataset(
            path,
            small_tokenizer,
            examples.ExampleConfig("sft", "minimind2", 32),
            cache_dir=tmp_path / "cache",
            num_workers=0,
            progress=False,
        )


# ---------------------------------------------------------------------------------------------------------
# The cache


def test_second_load_reads_the_cache_without_tokenizing(tmp_path, small_tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "chats.jsonl", random_chats(30))
    config = examples.ExampleConfig("sft", "minimind3", 48)
    calls = []
    encode = examples.RecordEncoder.encode
    monkeypatch.setattr(examples.RecordEncoder, "encode", lambda self, *a: calls.append(1) or encode(self, *a))
    first = examples.load_dataset(
        path, small_tokenizer, config, cache_dir=tmp_path / "cache", num_workers=0, progress=False
    )
    assert not first.from_cache and len(calls) == 30
    second = examples.load_dataset(
        path, small_tokenizer, config, cache_dir=tmp_path / "cache", num_workers=0, progress=False
    )
    assert second.from_cache and len(calls) == 30 and second.directory == first.directory
    assert isinstance(second._tokens, np.memmap) and isinstance(second._learned, np.memmap)
    for index in range(len(first)):
        for key, value in first.example(index).items():
            np.testing.assert_array_equal(second.example(index)[key], value)
    # Another length, or a changed file, is another cache.
    other = examples.load_dataset(
        path,
        small_tokenizer,
        examples.ExampleConfig("sft", "minimind3", 40),
        cache_dir=tmp_path / "cache",
        num_workers=0,
        progress=False,
    )
    assert not other.from_cache and other.directory != first.directory
    os.utime(path, ns=(0, 0))
    touched = examples.load_dataset(
        path, small_tokenizer, config, cache_dir=tmp_path / "cache", num_workers=0, progress=False
    )
    assert not touched.from_cache and len(calls) == 30 + 30 + 30
    # So is another tokenizer.
    other_tokenizer = train_sentencepiece(
        [write_jsonl(tmp_path / "corpus.jsonl", random_chats(50))], tmp_path / "t2", vocab_size=280
    )
    assert examples.cache_key(path, load_tokenizer(other_tokenizer), config) != examples.cache_key(
        path, load_tokenizer(small_tokenizer), config
    )


def test_parallel_build_equals_single_process(tmp_path, small_tokenizer):
    lines = random_chats(200, seed=4)
    lines[5] = "{broken"
    lines[50] = {"conversations": [{"role": "user", "content": "no answer"}]}
    path = write_jsonl(tmp_path / "many.jsonl", lines)
    config = examples.ExampleConfig(
        "sft", "minimind3", 256, system_prompt_ratio=0.5, drop_empty_think_ratio=0.5, seed=1
    )
    inline = examples.load_dataset(
        path, small_tokenizer, config, cache_dir=tmp_path / "a", num_workers=0, progress=False
    )
    examples.build_cache(
        path.resolve(),
        load_tokenizer(small_tokenizer),
        config,
        tmp_path / "b" / "x",
        num_workers=2,
        strict=False,
        progress=False,
        lines_per_chunk=16,
    )
    parallel = examples.TokenizedDataset(tmp_path / "b" / "x")
    assert len(parallel) == 198
    for name in ("lengths", "line_numbers", "num_learned", "_tokens", "_learned"):
        np.testing.assert_array_equal(getattr(parallel, name), getattr(inline, name))
    assert parallel.report.to_dict() == inline.report.to_dict()


def test_compact_form_keeps_learned_padding_and_drops_the_rest(small_tokenizer):
    tokenizer = load_tokenizer(small_tokenizer)
    encoder = examples.RecordEncoder(tokenizer, examples.ExampleConfig("sft", "minimind2", 64))
    prompt = encoder.prompt(GOOD, 1)
    tokens, learned = encoder.encode(GOOD, 1)
    ids = tokenizer.encode(prompt)
    assert tokens.tolist() == ids and learned[0] == 0
    # The learned tokens are the answer, its <|im_end|> and the newline after it.
    assert tokenizer.decode(tokens[learned == 1]) == "the mat<|im_end|>\n"
    # Without the final newline MiniMind's 2510 mask reaches one pad past <|im_end|>: that pad is kept.
    tokens, learned = encoder.compact(prompt.removesuffix("\n"))
    assert tokens[-1] == tokenizer.pad_id and learned[-1] == 1


def scanned_mask(ids, bos, eos, learn_from, learn_to):
    """The spec's rule, position by position: at each bos match, learn [start+learn_from, end+len(eos)+learn_to)
    where end is the next eos at or after start, then continue after that eos."""
    learned, i = [0] * len(ids), 0
    while i < len(ids):
        if ids[i : i + len(bos)] != bos:
            i += 1
            continue
        start = end = i + len(bos)
        while end < len(ids) and ids[end : end + len(eos)] != eos:
            end += 1
        for j in range(start + learn_from, min(end + len(eos) + learn_to, len(ids))):
            learned[j] = 1
        i = end + len(eos) if end < len(ids) else len(ids)
    return learned


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    st.lists(st.integers(0, 3), max_size=40),
    st.lists(st.integers(0, 3), min_size=1, max_size=3),
    st.lists(st.integers(0, 3), min_size=1, max_size=2),
)
def test_mask_rules_equal_a_position_by_position_scan(ids, bos, eos):
    assert examples.minimind2_sft_mask(ids, bos, eos) == scanned_mask(ids, bos, eos, 1, 1)
    labels = examples.minimind3_sft_labels(ids, bos, eos)
    assert [int(label != examples.IGNORE_INDEX) for label in labels] == scanned_mask(ids, bos, eos, 0, 0)
    assert all(label in (examples.IGNORE_INDEX, token) for label, token in zip(labels, ids))
