"""Training examples exactly as MiniMind builds them, for both eras, and an on-disk cache of them.

Three forms of one example:
- MiniMind's own (for parity with its code): 2510 `X, Y, loss_mask` (each L-1 long); v3 `input_ids, labels`
  (L long, -100 where nothing is learned).
- Compact, as cached: `tokens` (the ids before padding, n <= L) and `learned` (1 where that token is a
  training target). Both eras learn the same tokens; they differ in what the model is fed.
- Internal, what the train step sees: `inputs`, `targets` (int32) and `loss_mask` (float32), all length T.
  2510 feeds X (T = L-1); v3 feeds all L ids and masks the last target (T = L).

`load_dataset` tokenizes a jsonl file once, in parallel, into flat memory-mapped arrays under a cache
directory keyed by the data file, the tokenizer files and the example settings. Malformed lines are skipped
and counted, and one warning sums them up (`strict=True` makes the first one an error instead)."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tqdm

from minimind_jax.data.records import (
    KINDS,
    MAX_LINE_BYTES,
    BadRecord,
    DroppedRecord,
    SkipReport,
    check_data_file,
    conversations_key,
    iter_lines,
    parse_record,
)
from minimind_jax.data.tokenizer import Tokenizer, assistant_markers, load_tokenizer
from minimind_jax.errors import UserError
from minimind_jax.model.config import ARCHS
from minimind_jax.runtime import default_cache_dir

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
CACHE_FORMAT = 2  # 2: records that keep their chat under `messages` are read, not skipped
CACHE_ARRAYS = ("tokens", "learned", "lengths", "num_learned", "lines")
EMPTY_THINK = "<think>\n\n</think>\n\n"
# MiniMind v3's pool of system prompts for its random system-prompt injection (dataset/lm_dataset.py).
SYSTEM_PROMPTS = (
    "你是一个知识丰富的AI，尽力为用户提供准确的信息。",
    "你是minimind，一个小巧但有用的语言模型。",
    "你是一个专业的AI助手，请提供有价值的回答。",
    "你是minimind，请尽力帮助用户解决问题。",
    "你是一个可靠的AI，请给出准确的回答。",
    "You are a helpful AI assistant.",
    "You are minimind, a lightweight intelligent assistant.",
    "You are a friendly chatbot. Please answer the user's questions carefully.",
    "You are a knowledgeable AI. Try your best to provide accurate information.",
    "You are minimind, a small but useful language model.",
)


# ---------------------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class ExampleConfig:
    """How records become examples. The ratios are v3's random augmentations (None: MiniMind's values).

    system_prompt_ratio: chance of prepending a random system prompt to a chat that has none (v3: 0.2).
    drop_empty_think_ratio: chance of removing the empty `<think>\\n\\n</think>\\n\\n` block (v3: 0.8).
    Both are drawn once per record from (seed, line number) when the cache is built.
    """

    kind: str
    arch: str
    max_seq_len: int
    system_prompt_ratio: float | None = None
    drop_empty_think_ratio: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"data kind must be one of {KINDS}, got {self.kind!r}")
        if self.arch not in ARCHS:
            raise UserError(f"--arch must be one of {ARCHS}, got {self.arch!r}")
        if self.max_seq_len < 3:
            raise UserError(f"--max_seq_len must be at least 3, got {self.max_seq_len}")
        v3 = self.arch == "minimind3"
        for name, v3_default in (("system_prompt_ratio", 0.2), ("drop_empty_think_ratio", 0.8)):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, v3_default if v3 else 0.0)
            elif not 0.0 <= value <= 1.0:
                raise UserError(f"{name} must be in [0, 1], got {value}")
            elif value and not v3:
                raise UserError(f"{name} is a minimind3 option; minimind2 (2510) has no random augmentation")

    @property
    def seq_len(self) -> int:
        """T, the length of a row fed to the model: L-1 (2510 feeds X) or L (v3 feeds all ids)."""
        return self.max_seq_len if self.arch == "minimind3" else self.max_seq_len - 1

    @property
    def augmented(self) -> bool:
        return self.kind == "sft" and bool(self.system_prompt_ratio or self.drop_empty_think_ratio)

    def held_out(self) -> ExampleConfig:
        """The same examples without the training augmentation: held-out data is scored as it is written, so
        every eval of one file on one model gives one number."""
        return dataclasses.replace(self, system_prompt_ratio=0.0, drop_empty_think_ratio=0.0)


# ---------------------------------------------------------------------------------------------------------
# The chat prompt, per era


def _json_field(value: Any, name: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise BadRecord(f"'{name}' is not valid JSON") from None


def augment_conversations(
    conversations: list[dict], rng: np.random.Generator, system_prompt_ratio: float
) -> list[dict]:
    """v3: with probability system_prompt_ratio, prepend a random system prompt (not to tool-use chats)."""
    if any(message.get("tools") for message in conversations):
        return conversations
    if conversations[0].get("role") != "system" and rng.random() < system_prompt_ratio:
        prompt = SYSTEM_PROMPTS[int(rng.integers(len(SYSTEM_PROMPTS)))]
        return [{"role": "system", "content": prompt}] + conversations
    return conversations


def _render(tokenizer, messages: list[dict], tools: Any) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=False)
    except UserError as error:  # this record's fields do not fit the template
        raise BadRecord("chat template failed to render", str(error)) from None


def chat_prompt(
    tokenizer,
    conversations: list[dict],
    *,
    arch: str,
    rng: np.random.Generator | None = None,
    system_prompt_ratio: float = 0.0,
    drop_empty_think_ratio: float = 0.0,
) -> str:
    """The rendered chat string MiniMind trains on (its SFTDataset's prompt), augmentations drawn from rng."""
    if arch == "minimind2":
        first = conversations[0]
        tools = first.get("functions") if first.get("role") == "system" else None
        return _render(tokenizer, list(conversations), tools or None)
    if rng is not None and system_prompt_ratio:
        conversations = augment_conversations(conversations, rng, system_prompt_ratio)
    messages, tools = [], None
    for message in conversations:
        message = dict(message)
        if message.get("role") == "system" and message.get("tools"):
            tools = _json_field(message["tools"], "tools")
        if message.get("tool_calls"):
            message["tool_calls"] = _json_field(message["tool_calls"], "tool_calls")
        messages.append(message)
    prompt = _render(tokenizer, messages, tools)
    if rng is not None and drop_empty_think_ratio and EMPTY_THINK in prompt and rng.random() < drop_empty_think_ratio:
        prompt = prompt.replace(EMPTY_THINK, "")
    return prompt


# ---------------------------------------------------------------------------------------------------------
# MiniMind's own forms


def pad_to(ids: Sequence[int], length: int, value: int = 0) -> list[int]:
    return list(ids) + [value] * (length - len(ids))


def _occurrences(ids: np.ndarray, pattern: Sequence[int]) -> np.ndarray:
    """Start positions of every whole occurrence of `pattern` in `ids`."""
    span = len(ids) - len(pattern) + 1
    if span <= 0:
        return np.zeros(0, np.int64)
    hits = np.ones(span, bool)
    for offset, token in enumerate(pattern):
        hits &= ids[offset : offset + span] == token
    return np.flatnonzero(hits)


def _assistant_spans(ids: Sequence[int], bos: Sequence[int], eos: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(start, end) per assistant turn, found as MiniMind's scan finds them: start just after a `bos`, end at
    the next `eos` at or after start (len(ids) when there is none); the scan resumes after that eos."""
    ids = np.asarray(ids)
    n = len(ids)
    eos_at = _occurrences(ids, eos)
    resume = 0
    for bos_start in _occurrences(ids, bos):
        if bos_start < resume:
            continue
        start = int(bos_start) + len(bos)
        following = eos_at[np.searchsorted(eos_at, start) :]
        end = int(following[0]) if len(following) else n
        yield start, end
        resume = end + len(eos) if end < n else n


def minimind2_sft_mask(ids_L: Sequence[int], bos: Sequence[int], eos: Sequence[int]) -> list[int]:
    """2510's per-id mask: after `<|im_start|>assistant`, skip one id (the `\\n`), then mark through the id
    after `<|im_end|>`. mask[j] = 1 means ids[j] is learned as a target."""
    mask = np.zeros(len(ids_L), np.int64)
    for start, end in _assistant_spans(ids_L, bos, eos):
        mask[start + 1 : end + len(eos) + 1] = 1
    return mask.tolist()


def minimind3_sft_labels(ids_L: Sequence[int], bos: Sequence[int], eos: Sequence[int]) -> list[int]:
    """v3's labels: ids from after `<|im_start|>assistant\\n` through `<|im_end|>\\n`, -100 elsewhere."""
    ids = np.asarray(ids_L, np.int64)
    labels = np.full(len(ids), IGNORE_INDEX, np.int64)
    for start, end in _assistant_spans(ids, bos, eos):
        labels[start : end + len(eos)] = ids[start : end + len(eos)]
    return labels.tolist()


def sft_markers(tokenizer, arch: str) -> tuple[list[int], list[int]]:
    """The (bos, eos) id sequences that delimit an assistant turn in the era's mask rule."""
    markers = assistant_markers(tokenizer)
    if arch == "minimind3":
        return list(markers["<|im_start|>assistant\n"]), list(markers["<|im_end|>\n"])
    return list(markers["<|im_start|>assistant"]), list(markers["<|im_end|>"])


def minimind2_sft(
    tokenizer, prompt: str, max_seq_len: int, markers: tuple[list[int], list[int]] | None = None
) -> tuple[list[int], list[int], list[int]]:
    """2510 SFTDataset: (X, Y, loss_mask), each max_seq_len-1 long. markers: sft_markers(), if known."""
    ids_L = pad_to(tokenizer.encode(prompt)[:max_seq_len], max_seq_len, tokenizer.pad_id)
    mask = minimind2_sft_mask(ids_L, *(markers or sft_markers(tokenizer, "minimind2")))
    return ids_L[:-1], ids_L[1:], mask[1:]


def minimind3_sft(
    tokenizer, prompt: str, max_seq_len: int, markers: tuple[list[int], list[int]] | None = None
) -> tuple[list[int], list[int]]:
    """v3 SFTDataset: (input_ids, labels), each max_seq_len long. markers: sft_markers(), if known."""
    ids_L = pad_to(tokenizer.encode(prompt)[:max_seq_len], max_seq_len, tokenizer.pad_id)
    return ids_L, minimind3_sft_labels(ids_L, *(markers or sft_markers(tokenizer, "minimind3")))


def minimind2_pretrain(tokenizer, text: str, max_seq_len: int) -> tuple[list[int], list[int], list[int]]:
    """2510 PretrainDataset: tok(text) truncated and padded to L, no BOS/EOS; loss_mask = Y != pad."""
    ids_L = pad_to(tokenizer.encode(text)[:max_seq_len], max_seq_len, tokenizer.pad_id)
    return ids_L[:-1], ids_L[1:], [int(y != tokenizer.pad_id) for y in ids_L[1:]]


def minimind3_pretrain(tokenizer, text: str, max_seq_len: int) -> tuple[list[int], list[int]]:
    """v3 PretrainDataset: [bos] + tok(text)[:L-2] + [eos], padded; every pad id is labelled -100."""
    ids = [tokenizer.bos_id] + tokenizer.encode(text)[: max_seq_len - 2] + [tokenizer.eos_id]
    ids_L = pad_to(ids, max_seq_len, tokenizer.pad_id)
    return ids_L, [IGNORE_INDEX if i == tokenizer.pad_id else i for i in ids_L]


def from_minimind2(X: Sequence[int], Y: Sequence[int], loss_mask: Sequence[int]) -> dict[str, np.ndarray]:
    """2510's (X, Y, loss_mask) in the internal form: the model is fed X."""
    return {
        "inputs": np.asarray(X, np.int32),
        "targets": np.asarray(Y, np.int32),
        "loss_mask": np.asarray(loss_mask, np.float32),
    }


def from_minimind3(input_ids: Sequence[int], labels: Sequence[int]) -> dict[str, np.ndarray]:
    """v3's (input_ids, labels) in the internal form: all ids are fed; position t predicts ids[t+1] where
    labels[t+1] != -100, and the last position predicts nothing (MiniMind shifts after the forward)."""
    input_ids = np.asarray(input_ids, np.int32)
    labels = np.asarray(labels)
    targets = np.zeros_like(input_ids)
    targets[:-1] = input_ids[1:]
    loss_mask = np.zeros(len(input_ids), np.float32)
    loss_mask[:-1] = labels[1:] != IGNORE_INDEX
    return {"inputs": input_ids, "targets": targets, "loss_mask": loss_mask}


# ---------------------------------------------------------------------------------------------------------
# Compact form (what the cache stores) and back


def example_from_tokens(
    tokens: np.ndarray, learned: np.ndarray, arch: str, max_seq_len: int | None = None
) -> dict[str, np.ndarray]:
    """Internal form from the compact one, through MiniMind's own forms.

    max_seq_len=L gives MiniMind's padded row (length T); None gives only the example's real positions
    (2510: n-1, v3: n), which is what a packed row holds.
    """
    tokens = np.asarray(tokens, np.int32)
    learned = np.asarray(learned, bool)
    if max_seq_len is not None:
        tokens = np.pad(tokens, (0, max_seq_len - len(tokens)))
        learned = np.pad(learned, (0, max_seq_len - len(learned)))
    if arch == "minimind2":
        return from_minimind2(tokens[:-1], tokens[1:], learned[1:])
    return from_minimind3(tokens, np.where(learned, tokens, IGNORE_INDEX))


class RecordEncoder:
    """Turns a checked record into the compact form (tokens, learned) by MiniMind's era rules."""

    def __init__(self, tokenizer, config: ExampleConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.pad_id = tokenizer.pad_id
        self.markers = sft_markers(tokenizer, config.arch)

    def prompt(self, record: dict[str, Any], line_no: int) -> str:
        """The string that gets tokenized: the rendered chat (SFT) or the text (pretrain)."""
        config = self.config
        if config.kind == "pretrain":
            return record["text"]
        rng = np.random.default_rng([config.seed, line_no]) if config.augmented else None
        return chat_prompt(
            self.tokenizer,
            record[conversations_key(record)],
            arch=config.arch,
            rng=rng,
            system_prompt_ratio=config.system_prompt_ratio,
            drop_empty_think_ratio=config.drop_empty_think_ratio,
        )

    def minimind_form(self, prompt: str) -> tuple[list[int], ...]:
        """MiniMind's own output for this prompt: 2510 (X, Y, loss_mask), v3 (input_ids, labels)."""
        L, tok, arch = self.config.max_seq_len, self.tokenizer, self.config.arch
        if self.config.kind == "pretrain":
            return (minimind2_pretrain if arch == "minimind2" else minimind3_pretrain)(tok, prompt, L)
        return (minimind2_sft if arch == "minimind2" else minimind3_sft)(tok, prompt, L, self.markers)

    def compact(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, learned) of a prompt: MiniMind's form with the padding that teaches nothing cut off."""
        form = self.minimind_form(prompt)
        if self.config.arch == "minimind2":
            X, Y, loss_mask = form
            ids_L = np.asarray(list(X) + [Y[-1]], np.int32)
            learned_L = np.asarray([0] + list(loss_mask), np.uint8)
        else:
            input_ids, labels = form
            ids_L = np.asarray(input_ids, np.int32)
            learned_L = (np.asarray(labels) != IGNORE_INDEX).astype(np.uint8)
            learned_L[0] = 0  # the first id is never a target
        kept = np.flatnonzero((ids_L != self.pad_id) | (learned_L == 1))
        n = int(kept[-1]) + 1 if len(kept) else 0
        return ids_L[:n], learned_L[:n]

    def encode(self, record: dict[str, Any], line_no: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, learned) of a checked record; raises DroppedRecord when it has nothing to learn."""
        sft = self.config.kind == "sft"
        if sft and not any(message["role"] == "assistant" for message in record[conversations_key(record)]):
            raise DroppedRecord("no assistant turn")
        prompt = self.prompt(record, line_no)
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # JSON can spell a lone surrogate (\ud800), which no tokenizer accepts
            raise BadRecord("text is not valid Unicode (lone surrogate)") from None
        tokens, learned = self.compact(prompt)
        if not learned.any():
            raise DroppedRecord("assistant tokens truncated away" if sft else "nothing to learn")
        return tokens, learned


# ---------------------------------------------------------------------------------------------------------
# The cache


@dataclasses.dataclass
class EncodedChunk:
    """The compact examples of a run of lines, concatenated, plus what was skipped there."""

    tokens: np.ndarray  # int32, all examples back to back
    learned: np.ndarray  # uint8, aligned with tokens
    lengths: np.ndarray  # int32 [num_examples]
    num_learned: np.ndarray  # int32 [num_examples], loss-bearing positions per example
    line_numbers: np.ndarray  # int64 [num_examples]
    events: list[tuple[int, str, bool, str]]  # (line, reason, malformed, message) per skipped or dropped line
    num_bytes: int


def encode_chunk(encoder: RecordEncoder, chunk: list[tuple[int, bytes | None]]) -> EncodedChunk:
    tokens, learned, lengths, num_learned, line_numbers, events = [], [], [], [], [], []
    num_bytes = 0
    for line_no, line in chunk:
        num_bytes += len(line) if line is not None else MAX_LINE_BYTES
        try:
            record = parse_record(line, encoder.config.kind)
            ids, mask = encoder.encode(record, line_no)
        except BadRecord as bad:
            events.append((line_no, bad.reason, True, str(bad)))
            continue
        except DroppedRecord as dropped:
            events.append((line_no, dropped.reason, False, dropped.reason))
            continue
        tokens.append(ids)
        learned.append(mask)
        lengths.append(len(ids))
        num_learned.append(int(mask.sum()))
        line_numbers.append(line_no)
    return EncodedChunk(
        tokens=np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
        learned=np.concatenate(learned) if learned else np.zeros(0, np.uint8),
        lengths=np.asarray(lengths, np.int32),
        num_learned=np.asarray(num_learned, np.int32),
        line_numbers=np.asarray(line_numbers, np.int64),
        events=events,
        num_bytes=num_bytes,
    )


_worker_encoder: RecordEncoder | None = None


def _init_worker(tokenizer_path: str, config: ExampleConfig) -> None:
    global _worker_encoder
    _worker_encoder = RecordEncoder(load_tokenizer(tokenizer_path), config)


def _encode_chunk_in_worker(chunk: list[tuple[int, bytes | None]]) -> EncodedChunk:
    return encode_chunk(_worker_encoder, chunk)


def _line_chunks(path: pathlib.Path, lines_per_chunk: int) -> Iterator[list[tuple[int, bytes | None]]]:
    chunk = []
    for item in iter_lines(path):
        chunk.append(item)
        if len(chunk) == lines_per_chunk:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encoded_chunks(
    path: pathlib.Path, tokenizer, config: ExampleConfig, num_workers: int, lines_per_chunk: int
) -> Iterator[EncodedChunk]:
    """Encoded chunks in file order. Workers get at most 2 chunks each in flight, so RAM stays bounded."""
    chunks = _line_chunks(path, lines_per_chunk)
    if num_workers == 0:
        encoder = RecordEncoder(tokenizer, config)
        for chunk in chunks:
            yield encode_chunk(encoder, chunk)
        return
    # spawn, not fork: the parent may already run JAX's threads.
    pool = concurrent.futures.ProcessPoolExecutor(
        num_workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(str(tokenizer.path), config),
    )
    try:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.submit(_encode_chunk_in_worker, chunk))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


def fingerprint_files(files: Sequence[str | os.PathLike]) -> str:
    """sha256 over the names and contents of files."""
    digest = hashlib.sha256()
    for file in map(pathlib.Path, files):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def cache_key(data_path: str | os.PathLike, tokenizer, config: ExampleConfig) -> str:
    """Changes whenever the data file, the tokenizer files or any setting that shapes the examples does."""
    data_path = pathlib.Path(data_path).resolve()
    stat = data_path.stat()
    settings = dataclasses.asdict(config)
    if not config.augmented:
        settings["seed"] = 0  # the seed only matters when something is drawn
    fields = {
        "format": CACHE_FORMAT,
        "data": [str(data_path), stat.st_size, stat.st_mtime_ns],
        "tokenizer": fingerprint_files(tokenizer.files),
        "config": settings,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def build_cache(
    data_path: pathlib.Path,
    tokenizer,
    config: ExampleConfig,
    target: pathlib.Path,
    *,
    num_workers: int,
    strict: bool,
    progress: bool,
    lines_per_chunk: int = 512,
) -> None:
    """Tokenize data_path into `target`, written in a temporary directory and renamed into place at the end,
    so an interrupted build never leaves a cache that looks complete. Worker processes load their own copy
    of the tokenizer from `tokenizer.path`."""
    token_dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # e.g. --cache_dir names a file
        raise UserError(
            f"{target.parent}: cannot be the data cache directory ({error.strerror}); give another --cache_dir"
        ) from None
    temp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    report = SkipReport(str(data_path))
    num_examples = num_tokens = 0
    try:
        with contextlib.ExitStack() as stack:
            files = {name: stack.enter_context(open(temp / f"{name}.bin", "wb")) for name in CACHE_ARRAYS}
            bar = stack.enter_context(
                tqdm.tqdm(
                    total=data_path.stat().st_size,
                    unit="B",
                    unit_scale=True,
                    disable=not progress,
                    desc=f"tokenizing {data_path.name}",
                )
            )
            for chunk in _encoded_chunks(data_path, tokenizer, config, num_workers, lines_per_chunk):
                for line_no, reason, malformed, message in chunk.events:
                    if strict and malformed:
                        raise UserError(f"{data_path}:{line_no}: {message}")
                    report.add(line_no, reason, malformed)
                files["tokens"].write(chunk.tokens.astype(token_dtype).tobytes())
                files["learned"].write(chunk.learned.tobytes())
                files["lengths"].write(chunk.lengths.tobytes())
                files["num_learned"].write(chunk.num_learned.tobytes())
                files["lines"].write(chunk.line_numbers.tobytes())
                num_examples += len(chunk.lengths)
                num_tokens += len(chunk.tokens)
                bar.update(chunk.num_bytes)
        meta = {
            "format": CACHE_FORMAT,
            "data_path": str(data_path),
            "config": dataclasses.asdict(config),
            "token_dtype": token_dtype.name,
            "num_examples": num_examples,
            "num_tokens": num_tokens,
            "report": report.to_dict(),
        }
        (temp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1))
        try:
            os.rename(temp, target)
        except OSError:
            if not (target / "meta.json").exists():  # not another process finishing the same cache first
                raise
            shutil.rmtree(temp)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _read_array(path: pathlib.Path, dtype) -> np.ndarray:
    """A read-only memory map of a flat array file (an empty array for an empty file)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class TokenizedDataset:
    """A built cache, memory-mapped: O(1) access to any example, RAM bounded by the per-example arrays."""

    def __init__(self, directory: str | os.PathLike, *, from_cache: bool = True):
        self.directory = pathlib.Path(directory)
        meta = json.loads((self.directory / "meta.json").read_text())
        self.config = ExampleConfig(**meta["config"])
        self.data_path = meta["data_path"]
        self.report = SkipReport.from_dict(meta["report"])
        self.from_cache = from_cache
        self._tokens = _read_array(self.directory / "tokens.bin", meta["token_dtype"])
        self._learned = _read_array(self.directory / "learned.bin", np.uint8)
        self.lengths = np.fromfile(self.directory / "lengths.bin", np.int32)
        self.num_learned = np.fromfile(self.directory / "num_learned.bin", np.int32)  # loss positions per example
        self.line_numbers = _read_array(self.directory / "lines.bin", np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def arch(self) -> str:
        return self.config.arch

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    @property
    def segment_lengths(self) -> np.ndarray:
        """Positions each example fills in a packed row: 2510 n-1 (it feeds X), v3 n."""
        return self.lengths - 1 if self.arch == "minimind2" else self.lengths

    def compact(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32, learned uint8) of one example."""
        start, stop = self.offsets[index], self.offsets[index + 1]
        return np.asarray(self._tokens[start:stop], np.int32), np.asarray(self._learned[start:stop])

    def example(self, index: int, *, padded: bool = True) -> dict[str, np.ndarray]:
        """Internal form: MiniMind's padded row (length T), or only the real positions with padded=False."""
        tokens, learned = self.compact(index)
        return example_from_tokens(tokens, learned, self.arch, self.config.max_seq_len if padded else None)


def shortest_sft_prompt(tokenizer, arch: str) -> int:
    """Tokens before the first learned one in the shortest chats there are (an empty reply, with or without an
    empty system turn): with max_seq_len up to this, every SFT record is truncated to nothing to learn."""
    encoder = RecordEncoder(
        tokenizer, ExampleConfig("sft", arch, max_seq_len=1024, system_prompt_ratio=0.0, drop_empty_think_ratio=0.0)
    )
    reply = {"role": "assistant", "content": ""}
    firsts = []
    for turns in ([reply], [{"role": "system", "content": ""}, reply]):
        _, learned = encoder.compact(encoder.prompt({"conversations": turns}, line_no=0))
        firsts.append(int(np.argmax(learned)))
    return min(firsts)


def load_dataset(
    data_path: str | os.PathLike,
    tokenizer: Tokenizer | str | os.PathLike,
    config: ExampleConfig,
    *,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int | None = None,
    strict: bool = False,
    progress: bool = True,
) -> TokenizedDataset:
    """The examples of a jsonl file, from the cache when it is there, else tokenized (in parallel) into it.

    tokenizer: a Tokenizer or its path. cache_dir: default ~/.cache/minimind_jax.
    num_workers: processes for tokenizing (None: one per CPU; 0: in this process).
    """
    data_path = pathlib.Path(data_path)
    check_data_file(data_path)
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    if config.kind == "sft" and config.max_seq_len <= (shortest := shortest_sft_prompt(tokenizer, config.arch)):
        raise UserError(
            f"--max_seq_len {config.max_seq_len} leaves no room for a reply: the chat template puts at "
            f"least {shortest} tokens before the first learned one"
        )
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / f"{data_path.stem}-{config.kind}-{cache_key(data_path, tokenizer, config)}"
    from_cache = (target / "meta.json").exists()
    if not from_cache:
        workers = (os.cpu_count() or 1) if num_workers is None else num_workers
        build_cache(
            data_path.resolve(), tokenizer, config, target, num_workers=workers, strict=strict, progress=progress
        )
    dataset = TokenizedDataset(target, from_cache=from_cache)
    first_bad = dataset.report.first_malformed()
    if strict and first_bad:  # a cache built without strict may hold skipped lines
        raise UserError(f"{data_path}:{first_bad[0]}: {first_bad[1]}")
    dataset.report.warn()
    if not len(dataset):
        raise UserError(f"{data_path}: no usable {config.kind} records")
    return dataset
