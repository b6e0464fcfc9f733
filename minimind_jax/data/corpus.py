"""Real chat data for demos, benchmarks and tests, from conversation corpora that ship as PyPI packages.

- `chatterbot-corpus` (BSD-3-Clause): short Chinese and English conversations in YAML, mostly one exchange.
- `chitchat-dataset` (MIT): English chats between two people (BYU Chit-Chat Challenge), many of them long.

`build_corpus` writes MiniMind-format jsonl files: pretrain (`{"text": ...}`), SFT
(`{"conversations": [{"role": "user"|"assistant", "content": ...}, ...]}`) and a held-out SFT split. The
split is decided per conversation by a seeded hash of its text, so it does not depend on file order and
identical conversations always land on the same side.

    python -m minimind_jax.data.corpus OUT_DIR     # writes the files and prints their statistics
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import random
import sys
from collections.abc import Iterable, Iterator, Sequence

import yaml

from minimind_jax.errors import UserError

SOURCES = ("chatterbot", "chitchat")
CHATTERBOT_LANGUAGES = ("chinese", "english")


@dataclasses.dataclass(frozen=True)
class Conversation:
    """Turns alternate between two speakers, the first one playing the user."""

    origin: str  # where it came from, e.g. "chatterbot/chinese/ai.yml#3"
    turns: tuple[str, ...]


def chatterbot_conversations(languages: Sequence[str] = CHATTERBOT_LANGUAGES) -> Iterator[Conversation]:
    """Every conversation of chatterbot-corpus in `languages` (folder names such as "chinese", "english")."""
    from chatterbot_corpus import corpus  # imported here: only this source needs the package

    data_dir = pathlib.Path(corpus.DATA_DIRECTORY)
    for language in languages:
        files = sorted((data_dir / language).glob("*.yml"))
        if not files:
            raise UserError(f"chatterbot-corpus has no language {language!r} (see {data_dir})")
        for path in files:
            # BaseLoader keeps every scalar a string: the safe loader would turn "Yes" into True.
            document = yaml.load(path.read_text("utf-8"), Loader=yaml.BaseLoader) or {}
            for index, turns in enumerate(document.get("conversations") or []):
                yield Conversation(f"chatterbot/{language}/{path.name}#{index}", tuple(turns))


def chitchat_conversations() -> Iterator[Conversation]:
    """Every conversation of chitchat-dataset; consecutive lines of one speaker form one turn."""
    import chitchat_dataset  # imported here: only this source needs the package

    path = pathlib.Path(chitchat_dataset.__file__).parent / "dataset.json"
    chats = json.loads(path.read_text("utf-8"))
    for chat_id, chat in chats.items():
        turns = ["\n".join(line["text"] for line in group) for group in chat["messages"] if group]
        yield Conversation(f"chitchat/{chat_id}", tuple(turns))


def sft_windows(turns: Sequence[str], max_turns: int) -> list[list[dict]]:
    """SFT conversations of at most `max_turns` turns (rounded down to whole exchanges), user first.

    A last user turn that got no answer is dropped; so is a conversation with no exchange at all.
    """
    exchanges = len(turns) // 2
    per_window = max(1, max_turns // 2)
    windows = []
    for start in range(0, exchanges, per_window):
        window = turns[2 * start : 2 * min(start + per_window, exchanges)]
        windows.append([{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(window)])
    return windows


def _is_heldout(conversation: Conversation, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}\0".encode() + "\0".join(conversation.turns).encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def _write_jsonl(path: pathlib.Path, records: Iterable[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # never leave a half-written file under the final name


def write_preference_pairs(conversations_file: pathlib.Path, target: pathlib.Path) -> int:
    """DPO pairs ({"chosen", "rejected"}) from SFT chats: each first exchange's real reply is chosen, the next
    chat's first reply rejected. Returns how many were written."""
    exchanges = []
    for line in pathlib.Path(conversations_file).read_text("utf-8").splitlines():
        turns = json.loads(line)["conversations"]
        if len(turns) >= 2 and turns[0]["role"] == "user" and turns[1]["role"] == "assistant":
            exchanges.append(turns[:2])
    pairs = [
        {"chosen": [user, reply], "rejected": [user, exchanges[(i + 1) % len(exchanges)][1]]}
        for i, (user, reply) in enumerate(exchanges)
        if reply["content"] != exchanges[(i + 1) % len(exchanges)][1]["content"]
    ]
    _write_jsonl(pathlib.Path(target), pairs)
    return len(pairs)


def build_corpus(
    out_dir,
    *,
    sources: Sequence[str] = SOURCES,
    languages: Sequence[str] = CHATTERBOT_LANGUAGES,
    heldout_fraction: float = 0.05,
    seed: int = 0,
    max_turns: int = 8,
    max_conversations: int | None = None,
) -> dict[str, pathlib.Path]:
    """Write pretrain.jsonl, sft.jsonl, sft_heldout.jsonl and stats.json under `out_dir`; returns their paths.

    Long conversations are cut into SFT records of at most `max_turns` turns. Each pretrain text is one such
    record's turns joined by newlines; held-out conversations appear in neither pretrain nor sft.
    `max_conversations` keeps only the first that many conversations of each source (for quick runs).
    Records are shuffled with `seed`; the same arguments always give the same files.
    """
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise UserError(f"unknown corpus source {unknown[0]!r}; choose from {SOURCES}")
    if not 0 <= heldout_fraction < 1:
        raise UserError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    readers = {"chatterbot": lambda: chatterbot_conversations(languages), "chitchat": chitchat_conversations}

    splits = {"train": [], "heldout": []}
    counts = collections.defaultdict(collections.Counter)
    for source in sources:
        for number, conversation in enumerate(readers[source]()):
            if max_conversations is not None and number >= max_conversations:
                break
            counts[source]["conversations"] += 1
            if not all(isinstance(turn, str) for turn in conversation.turns):
                counts[source]["dropped_malformed"] += 1
                continue
            windows = sft_windows(conversation.turns, max_turns)
            if not windows:
                counts[source]["dropped_without_reply"] += 1
                continue
            counts[source]["unanswered_last_turns_dropped"] += len(conversation.turns) % 2
            split = "heldout" if _is_heldout(conversation, heldout_fraction, seed) else "train"
            counts[source][f"{split}_conversations"] += 1
            counts[source][f"{split}_records"] += len(windows)
            splits[split] += windows

    rng = random.Random(seed)
    for records in splits.values():
        rng.shuffle(records)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"{name}.jsonl" for name in ("pretrain", "sft", "sft_heldout")}
    paths["stats"] = out_dir / "stats.json"
    _write_jsonl(paths["sft"], ({"conversations": turns} for turns in splits["train"]))
    _write_jsonl(paths["sft_heldout"], ({"conversations": turns} for turns in splits["heldout"]))
    _write_jsonl(
        paths["pretrain"], ({"text": "\n".join(turn["content"] for turn in turns)} for turns in splits["train"])
    )

    stats = {
        "sources": {source: dict(counter) for source, counter in counts.items()},
        "files": {
            name: {
                "records": len(splits[split]),
                "turns": sum(len(turns) for turns in splits[split]),
                "characters": sum(len(turn["content"]) for turns in splits[split] for turn in turns),
            }
            for name, split in (("sft", "train"), ("sft_heldout", "heldout"))
        },
        "settings": {
            "sources": list(sources),
            "languages": list(languages),
            "heldout_fraction": heldout_fraction,
            "seed": seed,
            "max_turns": max_turns,
            "max_conversations": max_conversations,
        },
    }
    paths["stats"].write_text(json.dumps(stats, ensure_ascii=False, indent=2) + "\n", "utf-8")
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m minimind_jax.data.corpus OUT_DIR")
    written = build_corpus(sys.argv[1])
    print(written["stats"].read_text("utf-8"))
