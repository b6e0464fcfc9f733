"""RL's data: the prompts of an `rlaif*.jsonl` file, rendered as each era's RLAIFDataset renders them, and
replay files of recorded rollouts (`--rollouts`).

A replay record is one prompt: {"prompt": the rendered prompt (chat template and generation prompt applied),
"completions": G lists of ids, each up to and including the first eos or exactly max_gen_len ids without it,
"rewards": G floats (optional)}. Any other key reaches a --reward_fn as a record field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from minimind_jax.data.examples import augment_conversations
from minimind_jax.data.records import (
    BadRecord,
    SkipReport,
    check_data_file,
    conversations_key,
    decode_line,
    iter_lines,
    read_jsonl,
)
from minimind_jax.data.tokenizer import Tokenizer
from minimind_jax.errors import UserError

V3_SYSTEM_PROMPT_RATIO = 0.2  # pre_processing_chat's chance of a random system prompt


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One prompt of the run's data: its messages (rlaif) or its rendered text (replay), where it came from,
    the record's other fields, and a replay's completions and rewards."""

    line: int
    messages: tuple[dict, ...] | None = None
    text: str | None = None
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    completions: tuple[tuple[int, ...], ...] | None = None
    rewards: tuple[float, ...] | None = None


def render_prompt(record: PromptRecord, tokenizer: Tokenizer, arch: str, rng: np.random.Generator,
                  thinking_ratio: float) -> str:  # fmt: skip
    """The prompt the policy continues. 2510: the turns but the last, roles by position (user first), under the
    template's default system turn. v3: the conversation (a random system prompt 20% of the time) but the
    last turn, with thinking open (generation prompt `<think>\\n`) with probability thinking_ratio."""
    if record.text is not None:
        return record.text
    if arch == "minimind2":
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": turn["content"]}
                    for i, turn in enumerate(record.messages)]  # fmt: skip
        return tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    messages = augment_conversations(list(record.messages), rng, V3_SYSTEM_PROMPT_RATIO)
    return tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                         open_thinking=bool(rng.random() < thinking_ratio))  # fmt: skip


def load_prompts(path: str, *, strict: bool = False) -> list[PromptRecord]:
    """The chats of an rlaif jsonl (`conversations`, or `messages`); malformed lines are skipped and counted."""
    check_data_file(path)
    report, records = SkipReport(str(path)), []
    for line_no, record in read_jsonl(path, kind="sft", strict=strict, report=report):
        messages = record[conversations_key(record)]
        if len(messages) < 2:  # the last turn is the reference answer; a prompt needs one turn before it
            report.add(line_no, "fewer than 2 turns", malformed=False)
            continue
        fields = {k: v for k, v in record.items() if k not in ("conversations", "messages")}
        records.append(PromptRecord(line_no, messages=tuple(messages), fields=fields))
    report.warn()
    if not records:
        raise UserError(f"{path}: no usable prompt ({report.summary() if report.num_skipped else 'the file is empty'})")
    return records


def load_replay(
    path: str, *, num_generations: int, max_gen_len: int, vocab_size: int, eos_id: int
) -> list[PromptRecord]:
    """The records of a replay file, checked in full before anything runs: any bad line is an error naming
    it (a replay is a fixed experiment; skipping a prompt would change every update after it)."""
    check_data_file(path)
    records = []
    for line_no, line in iter_lines(path):
        try:
            record = decode_line(line)
            records.append(_replay_record(line_no, record, num_generations, max_gen_len, vocab_size, eos_id))
        except BadRecord as bad:
            raise UserError(f"{path}:{line_no}: {bad}") from None
    if not records:
        raise UserError(f"{path}: no replay record (the file is empty)")
    return records


def _replay_record(line_no, record, num_generations, max_gen_len, vocab_size, eos_id) -> PromptRecord:
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BadRecord("'prompt' must be a non-empty string (the rendered prompt)")
    completions = record.get("completions")
    if not isinstance(completions, list) or len(completions) != num_generations:
        found = len(completions) if isinstance(completions, list) else "no list of"
        raise BadRecord(f"{found} completions; --num_generations {num_generations} needs {num_generations}")
    for index, ids in enumerate(completions):
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise BadRecord(f"completion {index} is not a non-empty list of token ids")
        outside = [i for i in ids if not 0 <= i < vocab_size]
        if outside:
            raise BadRecord(f"completion {index} holds id {outside[0]}, outside the vocabulary (0..{vocab_size - 1})")
        if len(ids) > max_gen_len:
            raise BadRecord(f"completion {index} has {len(ids)} ids, more than --max_gen_len {max_gen_len}")
        if eos_id in ids[:-1]:
            raise BadRecord(f"completion {index} goes on after eos ({eos_id}): end it at the first eos")
        if ids[-1] != eos_id and len(ids) != max_gen_len:
            raise BadRecord(f"completion {index} has {len(ids)} ids and no eos: a completion without eos has "
                            f"exactly --max_gen_len {max_gen_len} ids")  # fmt: skip
    rewards = record.get("rewards")
    if rewards is not None:
        if not (
            isinstance(rewards, list)
            and len(rewards) == num_generations
            and all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in rewards)
        ):
            raise BadRecord(f"'rewards' must be {num_generations} finite numbers")  # fmt: skip
        rewards = tuple(float(r) for r in rewards)
    fields = {k: v for k, v in record.items() if k not in ("prompt", "completions", "rewards")}
    return PromptRecord(line_no, text=prompt, fields=fields, completions=tuple(map(tuple, completions)),
                        rewards=rewards)  # fmt: skip
