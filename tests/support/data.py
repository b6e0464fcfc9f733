"""Jsonl records for the data tests: random chats, a well-formed chat, files written as they are, goldens."""

import json
import pathlib
import random

from tests.conftest import require_shared

WORDS = (
    "the cat sat on a mat and we talk about small models that learn to chat in many words "
    "hello how are you today fine thanks what is your name i am a tiny model"
).split()
GOOD = {"conversations": [{"role": "user", "content": "hi cat"}, {"role": "assistant", "content": "the mat"}]}


def write_jsonl(path: pathlib.Path, records) -> pathlib.Path:
    """Records (dicts, or raw str/bytes lines written as they are) to a jsonl file."""
    with open(path, "wb") as f:
        for record in records:
            if isinstance(record, dict):
                record = json.dumps(record, ensure_ascii=False)
            if isinstance(record, str):
                record = record.encode("utf-8")
            f.write(record + b"\n")
    return path


def random_chats(count: int, seed: int = 0, max_turns: int = 3, max_words: int = 12) -> list[dict]:
    """Chats of random words with 1..max_turns user/assistant exchanges; some have a system turn."""
    rng = random.Random(seed)
    say = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))
    chats = []
    for _ in range(count):
        turns = [{"role": "system", "content": say()}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, max_turns)):
            turns += [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]
        chats.append({"conversations": turns})
    return chats


def golden_records(era: str, name: str) -> list[dict]:
    path = require_shared("golden", era, name)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
