"""Preference pairs for DPO, as each era's DPODataset builds them, and their batches.

A record is {"chosen": [messages], "rejected": [messages]}. Each side is rendered with the chat template,
padded or cut to max_seq_len ids, and fed as inputs ids[:-1] against targets ids[1:] (both eras), with the
era's mask over the assistant turns: 2510 skips the `\\n` after `<|im_start|>assistant` and learns through the
id after `<|im_end|>` (its SFT mask); v3 learns from after `<|im_start|>assistant\\n` through `<|im_end|>\\n`.

A batch of B pairs is 2B rows, each pair's chosen row followed by its rejected row, so that splitting the rows
over devices keeps pairs together; `pair_weight` is 1 on the rows of real pairs (0 on the fill of a short
last batch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from minimind_jax.data.examples import (
    IGNORE_INDEX,
    chat_prompt,
    minimind2_sft_mask,
    minimind3_sft_labels,
    pad_to,
    sft_markers,
)
from minimind_jax.data.pipeline import global_batch, process_rows
from minimind_jax.data.records import BadRecord, DroppedRecord, SkipReport, read_jsonl
from minimind_jax.data.tokenizer import Tokenizer
from minimind_jax.errors import UserError

SIDES = ("chosen", "rejected")
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "pair_weight")
V3_DROP_EMPTY_THINK = 0.8


def preference_row(tokenizer: Tokenizer, messages: list[dict], arch: str, max_seq_len: int, markers,
                   rng: np.random.Generator | None) -> dict:  # fmt: skip
    """One side of a pair: inputs, targets and loss_mask, each max_seq_len - 1 long. rng: v3's
    post_processing_chat, which drops an empty think block 80% of the time (None: never)."""
    prompt = chat_prompt(tokenizer, messages, arch=arch, rng=rng, drop_empty_think_ratio=V3_DROP_EMPTY_THINK)
    ids = pad_to(tokenizer.encode(prompt)[:max_seq_len], max_seq_len, tokenizer.pad_id)
    if arch == "minimind3":  # its DPO mask covers what its SFT labels cover
        mask = [int(label != IGNORE_INDEX) for label in minimind3_sft_labels(ids, *markers)]
    else:
        mask = minimind2_sft_mask(ids, *markers)
    if not any(mask[1:]):
        raise DroppedRecord("nothing to learn")
    return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]}


@dataclasses.dataclass
class PreferenceData:
    """Every pair of a jsonl file, tokenized: [N, 2, T] arrays (chosen, rejected)."""

    path: str
    inputs: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    report: SkipReport

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[-1]


def load_preference_data(path, tokenizer: Tokenizer, arch: str, max_seq_len: int, *, seed: int = 0,
                         strict: bool = False) -> PreferenceData:  # fmt: skip
    """The pairs of `path`; malformed lines are skipped and counted (an error with strict). v3's random
    drop of empty think blocks is drawn per record from (seed, line number)."""
    markers = sft_markers(tokenizer, arch)
    report, rows = SkipReport(str(path)), []
    for line_no, record in read_jsonl(path, kind="dpo", strict=strict, report=report):
        try:
            rng = np.random.default_rng([seed, line_no]) if arch == "minimind3" else None
            rows.append([preference_row(tokenizer, record[side], arch, max_seq_len, markers, rng) for side in SIDES])
        except (BadRecord, DroppedRecord) as skipped:
            if strict and isinstance(skipped, BadRecord):
                raise UserError(f"{path}:{line_no}: {skipped}") from None
            report.add(line_no, skipped.reason, malformed=isinstance(skipped, BadRecord))
    report.warn()
    if not rows:
        raise UserError(f"{path}: no usable preference pair ({report.summary()})")
    stack = lambda key, dtype: np.asarray([[side[key] for side in pair] for pair in rows], dtype)
    return PreferenceData(str(path), stack("inputs", np.int32), stack("targets", np.int32),
                          stack("loss_mask", np.float32), report)  # fmt: skip


class PairBatches:
    """Global batches of `batch_size` pairs over `epochs` epochs, shuffled per epoch from `seed`; the last
    batch of an epoch is filled with empty pairs (pair_weight 0), as MiniMind's DataLoader keeps it short.
    len() is the batches per epoch; get_state()/set_state() resume at a batch boundary."""

    def __init__(self, data: PreferenceData, *, batch_size: int, seed: int, epochs: int = 1, shuffle: bool = True,
                 sharding: jax.sharding.Sharding | None = None):  # fmt: skip
        self.data, self.batch_size, self.seed, self.epochs = data, batch_size, seed, epochs
        self.shuffle, self.sharding = shuffle, sharding
        self.steps_per_epoch = math.ceil(len(data) / batch_size)
        self.total_steps = self.steps_per_epoch * epochs
        self.step = 0  # the next batch, counted over all epochs
        self.stats: dict[str, float] = {}

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def get_state(self) -> dict[str, Any]:
        return {"next_step": self.step}

    def set_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["next_step"])

    def __iter__(self):
        return self

    def close(self) -> None:
        """As make_batches' iterator has it; the pairs are in memory, with no worker to stop."""

    def __next__(self) -> dict:
        if self.step >= self.total_steps:
            raise StopIteration
        epoch, index = divmod(self.step, self.steps_per_epoch)
        order = np.arange(len(self.data))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
        chosen = order[index * self.batch_size : (index + 1) * self.batch_size]
        self.step += 1
        fill = self.batch_size - len(chosen)
        rows = lambda array: np.concatenate([array[chosen], np.zeros((fill, *array.shape[1:]), array.dtype)])
        pairs = {key: rows(getattr(self.data, key)) for key in ("inputs", "targets", "loss_mask")}
        t = self.data.seq_len
        weight = np.repeat((np.arange(self.batch_size) < len(chosen)).astype(np.float32), 2)
        batch = {key: value.reshape(2 * self.batch_size, t) for key, value in pairs.items()}
        batch.update(
            segment_ids=np.ones((2 * self.batch_size, t), np.int32),
            positions=np.broadcast_to(np.arange(t, dtype=np.int32), (2 * self.batch_size, t)).copy(),
            pair_weight=weight,
        )
        if self.sharding is None:
            return batch
        local = process_rows(self.sharding, 2 * self.batch_size)  # a pair's rows sit on one device
        return global_batch(self.sharding, {key: value[local] for key, value in batch.items()}, 2 * self.batch_size)
