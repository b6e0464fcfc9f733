"""The demo corpus built from chatterbot-corpus and chitchat-dataset."""

import json
import re

import pytest

from minimind_jax.data import corpus
from minimind_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from minimind_jax.errors import UserError

CJK = re.compile(r"[\u4e00-\u9fff]")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def conversation_key(record):
    return "\n".join(turn["content"] for turn in record["conversations"])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return corpus.build_corpus(out, max_conversations=300, heldout_fraction=0.1, seed=3)


def test_sft_windows_split_long_chats_into_whole_exchanges():
    turns = [f"t{i}" for i in range(9)]
    windows = corpus.sft_windows(turns, max_turns=4)
    assert [[turn["content"] for turn in window] for window in windows] == [
        ["t0", "t1", "t2", "t3"],
        ["t4", "t5", "t6", "t7"],
    ]
    assert [turn["role"] for turn in windows[0]] == ["user", "assistant", "user", "assistant"]
    assert len(corpus.sft_windows(turns, max_turns=3)) == 4  # rounded down to one exchange per record
    assert corpus.sft_windows(["alone"], max_turns=8) == []


def test_files_are_minimind_sft_and_pretrain_records(built):
    sft, heldout = read_jsonl(built["sft"]), read_jsonl(built["sft_heldout"])
    assert sft and heldout
    for record in sft + heldout:
        turns = record["conversations"]
        assert len(turns) % 2 == 0 and 2 <= len(turns) <= 8
        assert [turn["role"] for turn in turns] == ["user", "assistant"] * (len(turns) // 2)
        assert all(isinstance(turn["content"], str) and turn["content"] for turn in turns)
    pretrain = read_jsonl(built["pretrain"])
    assert [record["text"] for record in pretrain] == [conversation_key(record) for record in sft]


def test_corpus_has_chinese_english_and_multi_turn(built):
    sft = read_jsonl(built["sft"])
    chinese = [r for r in sft if CJK.search(conversation_key(r))]
    assert len(chinese) > 100 and len(sft) - len(chinese) > 100
    assert sum(len(r["conversations"]) > 2 for r in sft) > 50
    # chitchat speakers often send several lines in a row: one turn, joined by newlines
    assert any("\n" in turn["content"] for r in sft for turn in r["conversations"])


def test_heldout_split_is_disjoint_and_near_its_fraction(built):
    stats = json.loads(built["stats"].read_text("utf-8"))
    train = {conversation_key(r) for r in read_jsonl(built["sft"])}
    heldout = {conversation_key(r) for r in read_jsonl(built["sft_heldout"])}
    assert not train & heldout
    for source in ("chatterbot", "chitchat"):
        counts = stats["sources"][source]
        assert counts["conversations"] == 300
        kept = counts["train_conversations"] + counts["heldout_conversations"]
        assert kept + counts.get("dropped_without_reply", 0) == 300
        assert 0.03 < counts["heldout_conversations"] / kept < 0.2  # heldout_fraction=0.1 of ~300


def test_stats_match_the_files(built):
    stats = json.loads(built["stats"].read_text("utf-8"))
    for name in ("sft", "sft_heldout"):
        records = read_jsonl(built[name])
        assert stats["files"][name]["records"] == len(records)
        assert stats["files"][name]["turns"] == sum(len(r["conversations"]) for r in records)
    sources = stats["sources"].values()
    assert sum(s["train_records"] for s in sources) == stats["files"]["sft"]["records"]


def test_same_seed_same_files_other_seed_other_split(built, tmp_path):
    again = corpus.build_corpus(tmp_path / "a", max_conversations=300, heldout_fraction=0.1, seed=3)
    for name in ("pretrain", "sft", "sft_heldout"):
        assert again[name].read_bytes() == built[name].read_bytes()
    other = corpus.build_corpus(tmp_path / "b", max_conversations=300, heldout_fraction=0.1, seed=4)
    assert other["sft_heldout"].read_bytes() != built["sft_heldout"].read_bytes()


def test_corpus_trains_a_tokenizer_that_renders_its_chats(built, tmp_path):
    model = train_sentencepiece([built["pretrain"], built["sft"]], tmp_path / "tok", vocab_size=1200)
    tokenizer = load_tokenizer(model)
    record = read_jsonl(built["sft_heldout"])[0]
    prompt = tokenizer.apply_chat_template(record["conversations"])
    ids = tokenizer.encode(prompt)
    assert ids.count(tokenizer.bos_id) == len(record["conversations"])
    assert tokenizer.decode(ids) == prompt


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown corpus source 'wiki'"):
        corpus.build_corpus(tmp_path, sources=("wiki",))
    with pytest.raises(UserError, match="no language 'klingon'"):
        corpus.build_corpus(tmp_path, sources=("chatterbot",), languages=("klingon",))
    with pytest.raises(UserError, match="heldout_fraction"):
        corpus.build_corpus(tmp_path, heldout_fraction=1.0)
