"""From cached examples to global sharded batches: rows (MiniMind's padded ones or packed), a Grain loader
with host-side prefetch, and an iterator state that resumes exactly, mid-epoch included.

A batch is a dict of [B, T] arrays: `inputs`, `targets` (int32), `loss_mask` (float32), `segment_ids` and
`positions` (int32).
- Unpacked rows are MiniMind's: one example, right-padded, segment id 1 everywhere (pads included: MiniMind
  trains without an attention mask, so its MoE routing sees the pads too), positions 0..T-1.
- Packed rows hold several examples, segment ids 1, 2, ... and positions restarting at 0 for each; the
  trailing pad has segment 0 and loss_mask 0. An example fills only its real positions.

Packing is planned once per run from the seed (best fit over the seeded shuffle of the examples); each epoch
then shuffles the rows with (seed, epoch). So every epoch has the same number of steps, known before training
(MiniMind's `iters`, which its LR schedule needs), and any batch can be rebuilt from (seed, step) alone.

Run `python -m minimind_jax.data.pipeline --bench ...` for preprocessing throughput and packing efficiency.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np

from minimind_jax.data.examples import ExampleConfig, TokenizedDataset, load_dataset
from minimind_jax.errors import UserError

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------------------
# Rows


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
    """A row with nothing in it (segment 0, no loss): fills a short last batch to the full batch size."""
    row = {key: np.zeros(seq_len, np.int32) for key in BATCH_KEYS}
    row["loss_mask"] = np.zeros(seq_len, np.float32)
    return row


def unpacked_row(dataset: TokenizedDataset, index: int) -> dict[str, np.ndarray]:
    """MiniMind's row for one example: padded to T, one segment covering the pads too."""
    row = dataset.example(index)
    row["segment_ids"] = np.ones(dataset.seq_len, np.int32)
    row["positions"] = np.arange(dataset.seq_len, dtype=np.int32)
    return row


def packed_row(dataset: TokenizedDataset, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Several examples back to back, each with its own segment id and positions from 0; pad after them."""
    row = empty_row(dataset.seq_len)
    start = 0
    for segment, index in enumerate(indices, start=1):
        part = dataset.example(int(index), padded=False)
        stop = start + len(part["inputs"])
        for key in ("inputs", "targets", "loss_mask"):
            row[key][start:stop] = part[key]
        row["segment_ids"][start:stop] = segment
        row["positions"][start:stop] = np.arange(stop - start)
        start = stop
    return row


def pack_examples(segment_lengths: np.ndarray, order: np.ndarray, row_len: int) -> list[np.ndarray]:
    """Best fit, in `order`: each example goes to the open row with the least space that still holds it,
    or starts a new row. Returns the example indices of each row, in the order the rows were opened."""
    rows: list[list[int]] = []
    space = []  # remaining space per row
    rows_with_space = [[] for _ in range(row_len + 1)]  # row ids by their remaining space
    has_space = np.zeros(row_len + 1, bool)
    for index in order:
        length = int(segment_lengths[index])
        if not 0 < length <= row_len:
            raise ValueError(f"example {index} fills {length} positions; a row has {row_len}")
        fit = length + int(np.argmax(has_space[length:]))
        if has_space[fit]:
            row = rows_with_space[fit].pop()
            has_space[fit] = bool(rows_with_space[fit])
        else:
            row, fit = len(rows), row_len
            rows.append([])
            space.append(row_len)
        rows[row].append(int(index))
        left = fit - length
        space[row] = left
        if left:
            rows_with_space[left].append(row)
            has_space[left] = True
    return [np.asarray(row, np.int64) for row in rows]


def plan_rows(dataset: TokenizedDataset, *, seed: int, packing: bool, shuffle: bool = True) -> list[np.ndarray] | None:
    """The examples of each row for this run: None when unpacked (row r is example r), else a packing."""
    if not packing:
        return None
    order = np.random.default_rng([seed, 0xDA7A]).permutation(len(dataset)) if shuffle else np.arange(len(dataset))
    return pack_examples(dataset.segment_lengths, order, dataset.seq_len)


def packing_stats(dataset: TokenizedDataset, rows: list[np.ndarray] | None) -> dict[str, float]:
    """How full the rows are: `token_fraction` (non-pad positions / all positions) and `loss_fraction`
    (loss-bearing positions / all positions), over every row of an epoch."""
    num_rows = len(dataset) if rows is None else len(rows)
    positions = num_rows * dataset.seq_len
    return {
        "rows": num_rows,
        "examples": len(dataset),
        "examples_per_row": len(dataset) / num_rows,
        "token_fraction": float(dataset.segment_lengths.sum()) / positions,
        "loss_fraction": float(dataset.num_learned.sum()) / positions,
    }


# ---------------------------------------------------------------------------------------------------------
# Batches


def process_rows(sharding: jax.sharding.Sharding, num_rows: int) -> np.ndarray:
    """The rows of a global batch of `num_rows` that this process's devices hold under `sharding` (split on
    its first axis), in the order jax.make_array_from_process_local_data takes them: all rows when the batch
    is replicated over the processes."""
    spans = {
        (index[0].start or 0, num_rows if index[0].stop is None else index[0].stop)
        for index in sharding.addressable_devices_indices_map((num_rows,)).values()
    }
    return np.concatenate([np.arange(start, stop) for start, stop in sorted(spans)])


def global_batch(sharding: jax.sharding.Sharding, local: dict[str, np.ndarray], num_rows: int) -> dict[str, Any]:
    """jax.Arrays of `num_rows` rows from this process's rows (`process_rows`) of each array in `local`."""
    return {
        key: jax.make_array_from_process_local_data(sharding, value, (num_rows, *value.shape[1:]))
        for key, value in local.items()
    }


class BatchIterator:
    """Global batches over `epochs` epochs; see `make_batches`.

    len() is the number of steps per epoch. `get_state()` is a JSON-serialisable dict; `set_state` makes the
    next batch the one that followed when the state was taken.
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        *,
        batch_size: int,
        seed: int,
        epochs: int,
        packing: bool,
        shuffle: bool,
        sharding: jax.sharding.Sharding | None,
        drop_remainder: bool,
        prefetch: int,
        num_threads: int,
    ):
        process_count, process_index = jax.process_count(), jax.process_index()
        if batch_size < 1 or (sharding is None and batch_size % process_count):
            raise UserError(f"--batch_size {batch_size} must be a positive multiple of the {process_count} processes")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.epochs = epochs
        self.packing = packing
        self.shuffle = shuffle
        self.sharding = sharding
        self.drop_remainder = drop_remainder
        self._prefetch = prefetch
        self._num_threads = num_threads
        # The rows of each global batch this process reads: those its devices hold, or without a sharding its
        # contiguous share.
        share = batch_size // process_count
        self._local_rows = (
            np.arange(process_index * share, (process_index + 1) * share)
            if sharding is None
            else process_rows(sharding, batch_size)
        )
        self.rows = plan_rows(dataset, seed=seed, packing=packing, shuffle=shuffle)
        self.num_rows = len(dataset) if self.rows is None else len(self.rows)
        steps, remainder = divmod(self.num_rows, batch_size)
        self.steps_per_epoch = steps if drop_remainder or not remainder else steps + 1
        if not self.steps_per_epoch:
            raise UserError(f"--batch_size {batch_size} is larger than the {self.num_rows} rows of {dataset.data_path}")
        self.stats = packing_stats(dataset, self.rows)
        self._orders: dict[int, np.ndarray] = {}
        self._orders_lock = threading.Lock()
        self._next_step = 0
        self._iterator = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def step(self) -> int:
        """Global index of the next batch (0-based, across epochs)."""
        return self._next_step

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._next_step // self.steps_per_epoch

    def row_order(self, epoch: int) -> np.ndarray:
        """The rows of `epoch` in the order they are served."""
        with self._orders_lock:
            if epoch not in self._orders:
                if len(self._orders) >= 2:  # prefetch spans at most one epoch boundary
                    del self._orders[min(self._orders)]
                rng = np.random.default_rng([self.seed, epoch])
                self._orders[epoch] = rng.permutation(self.num_rows) if self.shuffle else np.arange(self.num_rows)
            return self._orders[epoch]

    def row(self, row: int) -> dict[str, np.ndarray]:
        if self.rows is None:
            return unpacked_row(self.dataset, row)
        return packed_row(self.dataset, self.rows[row])

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step` (only those are read), as numpy [local rows, T]."""
        epoch, index = divmod(step, self.steps_per_epoch)
        chosen = self.row_order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        # A short last batch is filled with empty rows.
        rows = [
            self.row(int(chosen[i])) if i < len(chosen) else empty_row(self.dataset.seq_len) for i in self._local_rows
        ]
        return {key: np.stack([row[key] for row in rows]) for key in BATCH_KEYS}

    def _start(self) -> Iterator[dict[str, np.ndarray]]:
        steps = grain.MapDataset.range(self._next_step, self.total_steps).map(self.host_batch)
        options = grain.ReadOptions(num_threads=self._num_threads, prefetch_buffer_size=self._prefetch)
        return iter(steps.to_iter_dataset(options))

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._next_step >= self.total_steps:
            raise StopIteration
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        self._next_step += 1
        if self.sharding is None:
            return batch
        return global_batch(self.sharding, batch, self.batch_size)

    def _identity(self) -> dict[str, Any]:
        """What must match for a saved position to mean the same batches."""
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "packing": self.packing,
            "shuffle": self.shuffle,
            "drop_remainder": self.drop_remainder,
            "num_examples": len(self.dataset),
            "steps_per_epoch": self.steps_per_epoch,
        }

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "next_step": self._next_step, **self._identity()}

    def set_state(self, state: dict[str, Any]) -> None:
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise UserError(
                    f"data iterator state: {key} was {state.get(key)!r} when saved, now {value!r}; "
                    "resume with the same data and batch settings"
                )
        self._next_step = int(state["next_step"])
        self.close()

    def close(self) -> None:
        """Stop the background threads; iterating again starts them afresh at the current step."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None


def make_batches(
    dataset: TokenizedDataset,
    *,
    batch_size: int,
    seed: int,
    epochs: int = 1,
    packing: bool = False,
    shuffle: bool = True,
    sharding: jax.sharding.Sharding | None = None,
    drop_remainder: bool = True,
    prefetch: int = 4,
    num_threads: int = 2,
) -> BatchIterator:
    """Batches of `batch_size` rows (global, over all processes) for `epochs` epochs.

    sharding: for the batch, e.g. NamedSharding(mesh, P(("data", "fsdp"), None)); batches are then global
    jax.Arrays built from each process's rows. None yields this process's numpy rows.
    drop_remainder=False keeps a short last batch, filled with empty rows (no loss) to the full size; then
    len() is MiniMind's `iters` (ceil(rows / batch_size)).
    prefetch, num_threads: batches built ahead by background threads.
    """
    return BatchIterator(
        dataset,
        batch_size=batch_size,
        seed=seed,
        epochs=epochs,
        packing=packing,
        shuffle=shuffle,
        sharding=sharding,
        drop_remainder=drop_remainder,
        prefetch=prefetch,
        num_threads=num_threads,
    )


# ---------------------------------------------------------------------------------------------------------
# Benchmark


def benchmark(
    data_path: str,
    tokenizer_path: str,
    config: ExampleConfig,
    *,
    num_workers: int | None = None,
    batch_size: int = 16,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Preprocessing throughput (records/s, cold then cached) and how full unpacked and packed rows are."""
    with tempfile.TemporaryDirectory(dir=cache_dir) as fresh:
        start = time.perf_counter()
        dataset = load_dataset(
            data_path, tokenizer_path, config, cache_dir=fresh, num_workers=num_workers, progress=False
        )
        cold_s = time.perf_counter() - start
        records = len(dataset) + dataset.report.num_skipped + dataset.report.num_dropped
        start = time.perf_counter()
        cached = load_dataset(data_path, tokenizer_path, config, cache_dir=fresh, progress=False)
        for index in range(len(cached)):
            cached.example(index)
        cached_s = time.perf_counter() - start
        figures = {
            "records": records,
            "examples": len(dataset),
            "cold_records_per_s": records / cold_s,
            "cached_examples_per_s": len(cached) / cached_s,
        }
        for packing in (False, True):
            start = time.perf_counter()
            batches = make_batches(cached, batch_size=batch_size, seed=0, packing=packing, drop_remainder=False)
            figures["packed" if packing else "unpacked"] = {**batches.stats, "steps_per_epoch": len(batches)}
            list(batches)
            figures["packed" if packing else "unpacked"]["epoch_s"] = time.perf_counter() - start
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimind_jax.data.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", required=True, help="run the preprocessing benchmark")
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--tokenizer_path", required=True)
    parser.add_argument("--arch", default="minimind2", choices=("minimind2", "minimind3"))
    parser.add_argument("--kind", default="sft", choices=("sft", "pretrain"))
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=None)
    args = parser.parse_args(argv)
    config = ExampleConfig(args.kind, args.arch, args.max_seq_len, system_prompt_ratio=0.0, drop_empty_think_ratio=0.0)
    figures = benchmark(
        args.data_path, args.tokenizer_path, config, num_workers=args.num_workers, batch_size=args.batch_size
    )
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
