"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
GOLDEN = SHARED / "golden"


def require_shared(*parts: str) -> pathlib.Path:
    """Path under ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is only on developer and CI machines)")
    return path


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    """Real chat data in MiniMind's jsonl formats and a SentencePiece tokenizer trained on it (no ../shared)."""
    from minimind_jax.data.corpus import build_corpus
    from minimind_jax.data.tokenizer import train_sentencepiece

    out = tmp_path_factory.mktemp("chat_data")
    paths = build_corpus(out, max_conversations=150, heldout_fraction=0.1, seed=1)
    tokenizer = train_sentencepiece([paths["pretrain"], paths["sft"]], out / "tokenizer", vocab_size=2000)
    return {**paths, "tokenizer": tokenizer}


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> pathlib.Path:
    """A 300-piece SentencePiece tokenizer (ChatML template) trained on random chats, so tests need no ../shared."""
    from minimind_jax.data.tokenizer import train_sentencepiece
    from tests.support.data import random_chats, write_jsonl

    directory = tmp_path_factory.mktemp("tokenizer")
    texts = [
        {"text": " ".join(chat["content"] for chat in record["conversations"]) + " user assistant system"}
        for record in random_chats(300, seed=1)
    ]
    return train_sentencepiece([write_jsonl(directory / "corpus.jsonl", texts)], directory / "tok", vocab_size=300)
