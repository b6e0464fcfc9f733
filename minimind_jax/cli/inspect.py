"""`python main.py inspect`: which tokens of jsonl records are learned, token by token.

SFT records (`conversations`) and pretrain records (`text`) are told apart by their keys and built exactly as
training builds them (MiniMind's era rules, v3's random augmentations off). Learned tokens, the training
targets, are shown on green; context-only tokens on grey. Into a pipe, or with NO_COLOR set, there are no colours:
each run of learned tokens is put between ⟦ and ⟧ instead. `--json` prints one object per record instead:
`{"prompt", "input_ids", "loss_mask"}`, the mask aligned with the ids (1 where the id is a target).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from minimind_jax.data import examples, preference, records
from minimind_jax.data.tokenizer import load_tokenizer
from minimind_jax.errors import UserError
from minimind_jax.model.config import ARCHS

RESET = "\x1b[0m"
# Two shades each, alternating, so that token boundaries show.
LEARNED_STYLES = ("\x1b[30;42m", "\x1b[30;102m")
CONTEXT_STYLES = ("\x1b[97;100m", "\x1b[30;47m")
LEARNED_MARKS = ("⟦", "⟧")  # around each run of learned tokens, where there are no colours


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--data_path", required=True, help="jsonl of SFT (conversations) or pretrain (text) records")
    parser.add_argument("--tokenizer_path", required=True, help="MiniMind tokenizer directory or SentencePiece .model")
    parser.add_argument("--max_seq_len", type=int, default=512, help="L, as in training")
    parser.add_argument(
        "--arch", choices=ARCHS, default=None, help="the era whose mask rules apply (default: the tokenizer's era)"
    )
    parser.add_argument(
        "--index", type=int, default=None, help="only this record (0-based, counting well-formed records)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per record instead of colours")


def learned_view(encoders: dict[str, examples.RecordEncoder], record: dict[str, Any], line_no: int) -> dict[str, Any]:
    """The record as training sees it: prompt, ids (padding that teaches nothing cut off), which ids are
    targets, and why training would drop it (None when it would not)."""
    kind = records.record_kind(record)
    if kind == "dpo":
        return {side: pair_side_view(encoders["sft"], record[side], line_no) for side in preference.SIDES}
    encoder = encoders[kind]
    try:
        encoder.encode(record, line_no)  # first: it raises BadRecord for a prompt no tokenizer takes
        dropped = None
    except records.DroppedRecord as drop:
        dropped = drop.reason
    prompt = encoder.prompt(record, line_no)
    tokens, learned = encoder.compact(prompt)
    return {"prompt": prompt, "input_ids": tokens.tolist(), "loss_mask": learned.tolist(), "dropped": dropped}


def pair_side_view(encoder: examples.RecordEncoder, messages: list[dict], line_no: int) -> dict[str, Any]:
    """One side of a DPO pair as train_dpo.py's DPODataset builds it (data/preference.py)."""
    config, tokenizer = encoder.config, encoder.tokenizer
    try:
        row = preference.preference_row(tokenizer, messages, config.arch, config.max_seq_len,
                                        examples.sft_markers(tokenizer, config.arch), rng=None)  # fmt: skip
    except records.DroppedRecord as drop:
        return {"prompt": "", "input_ids": [], "loss_mask": [], "dropped": drop.reason}
    ids, learned = row["inputs"] + row["targets"][-1:], [0] + list(row["loss_mask"])
    end = len(ids)
    while end and ids[end - 1] == tokenizer.pad_id and not learned[end - 1]:  # padding that teaches nothing
        end -= 1
    prompt = tokenizer.decode(ids[:end])
    return {"prompt": prompt, "input_ids": ids[:end], "loss_mask": learned[:end], "dropped": None}


def token_pieces(tokenizer, ids: Sequence[int]) -> Iterator[tuple[str, int, int]]:
    """(text, first, stop) per run of ids that decodes to whole characters: one token, unless a character
    is split over several byte tokens."""
    first = 0
    for stop in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[first:stop])
        if not text.endswith("\ufffd") or stop == len(ids):
            yield text, first, stop
            first = stop


def coloured(tokenizer, view: dict[str, Any]) -> str:
    """The ids as text, each token on its shade of green (learned) or grey (context); `\\n` shown as ↵."""
    out = []
    for n, (text, _, stop) in enumerate(token_pieces(tokenizer, view["input_ids"])):
        style = (LEARNED_STYLES if view["loss_mask"][stop - 1] else CONTEXT_STYLES)[n % 2]
        parts = text.split("\n")
        lines = [part + "↵" for part in parts[:-1]] + parts[-1:]
        out.append("\n".join(f"{style}{line}{RESET}" if line else "" for line in lines))
    return "".join(out)


def marked(tokenizer, view: dict[str, Any]) -> str:
    """The ids as text without colours: each run of learned tokens between LEARNED_MARKS; `\\n` shown as ↵."""
    out, learning = [], False
    for text, _, stop in token_pieces(tokenizer, view["input_ids"]):
        learned = bool(view["loss_mask"][stop - 1])
        if learned != learning:
            out.append(LEARNED_MARKS[0] if learned else LEARNED_MARKS[1])
            learning = learned
        out.append(text.replace("\n", "↵\n"))
    return "".join(out) + (LEARNED_MARKS[1] if learning else "")


def use_colour() -> bool:
    """Colours for a terminal only, and not when NO_COLOR is set (no-color.org)."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def legend(colour: bool) -> str:
    if colour:
        return f"{LEARNED_STYLES[0]} learned (a training target) {RESET} {CONTEXT_STYLES[0]} context only {RESET}"
    return f"{LEARNED_MARKS[0]}learned (a training target){LEARNED_MARKS[1]} context only"


def run(args: argparse.Namespace) -> int:
    if args.index is not None and args.index < 0:
        raise UserError(f"--index must be 0 or more, got {args.index}")
    tokenizer = load_tokenizer(args.tokenizer_path)
    arch = args.arch or tokenizer.arch
    if arch is None:
        raise UserError(f"{args.tokenizer_path}: not a MiniMind vocabulary of a known era; give --arch")
    encoders = {
        kind: examples.RecordEncoder(
            tokenizer,
            examples.ExampleConfig(kind, arch, args.max_seq_len, system_prompt_ratio=0, drop_empty_think_ratio=0),
        )
        for kind in records.KINDS
    }
    report = records.SkipReport(args.data_path)
    colour, legend_shown = use_colour(), False
    count = 0
    for index, (line_no, record) in enumerate(records.read_jsonl(args.data_path, kind=None, report=report)):
        count = index + 1
        if args.index is not None and index != args.index:
            continue
        try:
            view = learned_view(encoders, record, line_no)
        except records.BadRecord as bad:
            if args.index is not None:
                raise UserError(f"{args.data_path}:{line_no}: {bad}") from None
            report.add(line_no, bad.reason, malformed=True)
            continue
        kind = records.record_kind(record)
        sides = view if kind == "dpo" else {"": view}
        if args.json:
            fields = ("prompt", "input_ids", "loss_mask")
            shown = {side: {key: part[key] for key in fields} for side, part in sides.items()}
            print(json.dumps(shown if kind == "dpo" else shown[""], ensure_ascii=False))
        else:
            if not legend_shown:
                print(legend(colour))
                legend_shown = True
            for side, part in sides.items():
                note = f", dropped in training: {part['dropped']}" if part["dropped"] else ""
                print(
                    f"\n── record {index}{' ' + side if side else ''} ({args.data_path}:{line_no}, {kind}, {arch}): "
                    f"{len(part['input_ids'])} tokens, {sum(part['loss_mask'])} learned{note}"
                )
                print(coloured(tokenizer, part) if colour else marked(tokenizer, part))
        if args.index is not None:
            break
    report.warn()
    if count == 0:
        raise UserError(f"{args.data_path}: {'no well-formed records' if report.num_skipped else 'empty, no records'}")
    if args.index is not None and count <= args.index:
        raise UserError(f"{args.data_path}: no record {args.index}; it has {count} well-formed records")
    return 0
