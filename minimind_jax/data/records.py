"""Reading jsonl records: streaming lines (capped in length), checking each record's shape, and
counting what was skipped or dropped."""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

from minimind_jax.errors import UserError

log = logging.getLogger(__name__)


KINDS = ("sft", "pretrain")
ROLES = ("system", "user", "assistant", "tool")
CONVERSATION_KEYS = ("conversations", "messages")  # a chat record's messages: MiniMind's key, then Hugging Face's
MAX_LINE_BYTES = 10 * 2**20
IS_A_DIRECTORY = "is a directory, not a jsonl file"


# ---------------------------------------------------------------------------------------------------------
# Reading jsonl


class BadRecord(Exception):
    """A malformed line: skipped and counted by `reason` (an error with strict=True, which also shows
    `detail`)."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason


class DroppedRecord(Exception):
    """A well-formed record that yields nothing to learn: dropped and counted, never an error."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass
class SkipReport:
    """Counts of skipped (malformed) and dropped records, with the first few line numbers of each reason."""

    path: str
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    lines: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    max_lines_kept: int = 3

    def add(self, line_no: int, reason: str, malformed: bool) -> None:
        counts = self.skipped if malformed else self.dropped
        counts[reason] = counts.get(reason, 0) + 1
        kept = self.lines.setdefault(reason, [])
        if len(kept) < self.max_lines_kept:
            kept.append(line_no)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def first_malformed(self) -> tuple[int, str] | None:
        """(line, reason) of the earliest malformed line, or None."""
        firsts = [(self.lines[reason][0], reason) for reason in self.skipped]
        return min(firsts) if firsts else None

    def summary(self) -> str:
        """One line: every reason with its count and example file:line locations."""
        parts = []
        for label, counts in (("skipped", self.skipped), ("dropped", self.dropped)):
            for reason, count in counts.items():
                where = ", ".join(f"{self.path}:{line}" for line in self.lines[reason])
                parts.append(f"{count} {label}: {reason} (e.g. {where})")
        return f"{self.path}: " + "; ".join(parts)

    def warn(self) -> None:
        if self.num_skipped or self.num_dropped:
            log.warning("%s", self.summary())

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "skipped": self.skipped, "dropped": self.dropped, "lines": self.lines}

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> SkipReport:
        return cls(**fields)


def check_data_file(path: str | os.PathLike) -> None:
    """Raise a one-line UserError unless `path` is a regular file (a pipe could not be read a second time)."""
    if os.path.isdir(path):
        raise UserError(f"{path}: {IS_A_DIRECTORY}")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such data file")


def iter_lines(path: str | os.PathLike, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, raw bytes) per non-blank line, streaming; None for a line over max_line_bytes.
    A UTF-8 byte order mark at the start of the file is dropped (as the utf-8-sig codec does)."""
    try:
        f = open(path, "rb")
    except IsADirectoryError:
        raise UserError(f"{path}: {IS_A_DIRECTORY}") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None
    with f:
        if f.peek(len(codecs.BOM_UTF8)).startswith(codecs.BOM_UTF8):
            f.read(len(codecs.BOM_UTF8))
        line_no = 0
        while True:
            line = f.readline(max_line_bytes + 1)
            if not line:
                return
            line_no += 1
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                # Consume the rest of the over-long line without holding it.
                while line and not line.endswith(b"\n"):
                    line = f.readline(2**20)
                yield line_no, None
            elif line.strip():
                yield line_no, line


def decode_line(line: bytes | None) -> dict[str, Any]:
    """One jsonl line as a JSON object; raises BadRecord."""
    if line is None:
        raise BadRecord(f"line over {MAX_LINE_BYTES // 2**20} MB")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRecord("not UTF-8") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        raise BadRecord("malformed JSON") from None
    except RecursionError:
        raise BadRecord("JSON nested too deeply") from None
    if not isinstance(record, dict):
        raise BadRecord("not a JSON object")
    return record


def conversations_key(record: dict[str, Any]) -> str | None:
    """Where a record keeps its chat: MiniMind's `conversations`, else `messages` (the common Hugging Face
    form, the same list of role/content messages); None when it has neither."""
    return next((key for key in CONVERSATION_KEYS if key in record), None)


def check_record(record: dict[str, Any], kind: str) -> None:
    """Raise BadRecord unless the record has what its kind needs: a string `text` (pretrain), `conversations`
    (or `messages`) that MiniMind's chat template can render (sft: known roles, string contents), or two such
    lists `chosen` and `rejected` (dpo); every string of what is tokenized must be valid Unicode."""
    if kind == "pretrain":
        if "text" not in record:
            raise BadRecord("no 'text' key")
        if not isinstance(record["text"], str):
            raise BadRecord("'text' is not a string")
        check_unicode(record["text"])
        return
    if kind == "dpo":
        for key in ("chosen", "rejected"):
            if key not in record:
                raise BadRecord(f"no '{key}' key")
            _check_messages(record[key], key)
        return
    key = conversations_key(record)
    if key is None:
        raise BadRecord("no 'conversations' (or 'messages') key")
    _check_messages(record[key], key)


def _check_messages(messages: Any, key: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f"'{key}' is not a non-empty list")
    for message in messages:
        if not isinstance(message, dict):
            raise BadRecord("a message is not a JSON object")
        if message.get("role") not in ROLES:
            raise BadRecord("unknown role")
        content = message.get("content")
        # An assistant turn that only calls tools may leave its content empty.
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise BadRecord("non-string content")
    check_unicode(messages)


def check_unicode(value: Any) -> None:
    """Raise BadRecord if a string anywhere in a JSON value is not valid Unicode: JSON can spell a lone
    surrogate (\\ud800), which no tokenizer accepts and no terminal prints."""
    stack = [value]
    while stack:  # a stack, not recursion: the value may be nested as deeply as the JSON parser allows
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRecord("text is not valid Unicode (lone surrogate)") from None
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_record(line: bytes | None, kind: str) -> dict[str, Any]:
    """One jsonl line as a checked record of `kind`; raises BadRecord."""
    record = decode_line(line)
    check_record(record, kind)
    return record


def read_jsonl(
    path: str | os.PathLike, *, kind: str | None, strict: bool = False, report: SkipReport | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each well-formed record, streaming; kind=None tells each record's kind by
    its keys (`record_kind`). Bad lines go to `report` (or raise a UserError naming file:line if strict)."""
    report = report if report is not None else SkipReport(str(path))
    for line_no, line in iter_lines(path):
        try:
            record = decode_line(line)
            check_record(record, kind or record_kind(record))
        except BadRecord as bad:
            if strict:
                raise UserError(f"{path}:{line_no}: {bad}") from None
            report.add(line_no, bad.reason, malformed=True)
            continue
        yield line_no, record


def record_kind(record: dict[str, Any]) -> str:
    """'sft' for a record with `conversations` (or `messages`), 'pretrain' for one with `text`, 'dpo' for a
    preference pair (`chosen` and `rejected`)."""
    if conversations_key(record):
        return "sft"
    if "text" in record:
        return "pretrain"
    if "chosen" in record and "rejected" in record:
        return "dpo"
    raise BadRecord("neither 'conversations' (or 'messages'), 'text' nor 'chosen'/'rejected' keys")
