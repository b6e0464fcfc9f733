"""Rows and batches: packing keeps every loss-bearing (input, target) pair of the unpacked run and never
lets a segment cross another; batches are sharded global arrays; iterator state resumes exactly."""

import json

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from minimind_jax.data import examples, pipeline
from minimind_jax.errors import UserError
from tests.support.data import random_chats, write_jsonl

MAX_LEN = 96


@pytest.fixture(scope="module", params=["minimind2", "minimind3"])
def dataset(request, tmp_path_factory, small_tokenizer):
    """~60 chats of varied length, some truncated at MAX_LEN, in the cache of the era under test."""
    directory = tmp_path_factory.mktemp("chats")
    chats = random_chats(60, seed=7, max_turns=3, max_words=8)
    path = write_jsonl(directory / "chats.jsonl", chats)
    config = examples.ExampleConfig("sft", request.param, MAX_LEN, system_prompt_ratio=0, drop_empty_think_ratio=0)
    return examples.load_dataset(
        path, small_tokenizer, config, cache_dir=directory / "cache", num_workers=0, progress=False
    )


def all_batches(iterator) -> list[dict]:
    return [{key: np.asarray(value) for key, value in batch.items()} for batch in iterator]


def assert_same_batches(got: list[dict], expected: list[dict]):
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"step {step} {key}")


def test_dataset_has_what_the_tests_need(dataset):
    lengths = dataset.segment_lengths
    assert len(dataset) >= 50 and lengths.min() < dataset.seq_len // 3 and lengths.max() == dataset.seq_len


def test_unpacked_rows_are_minimind_rows(dataset):
    row = pipeline.unpacked_row(dataset, 3)
    example = dataset.example(3)
    for key in example:
        np.testing.assert_array_equal(row[key], example[key])
    np.testing.assert_array_equal(row["segment_ids"], np.ones(dataset.seq_len))  # pads included
    np.testing.assert_array_equal(row["positions"], np.arange(dataset.seq_len))


def loss_pairs(row: dict, start: int, stop: int) -> list[tuple[int, int, int]]:
    """(position in segment, input context hash, target) for each loss-bearing position of row[start:stop]."""
    pairs = []
    for t in range(start, stop):
        if row["loss_mask"][t]:
            context = tuple(row["inputs"][start : t + 1].tolist())
            pairs.append((t - start, hash(context), int(row["targets"][t])))
    return pairs


def test_packing_keeps_every_loss_pair_and_no_segment_crosses(dataset):
    rows = pipeline.plan_rows(dataset, seed=0, packing=True)
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(dataset)))  # each example exactly once
    assert len(rows) < len(dataset)
    packed_pairs, unpacked_pairs = {}, {}
    for indices in rows:
        row = pipeline.packed_row(dataset, indices)
        segments, positions = row["segment_ids"], row["positions"]
        used = int((segments > 0).sum())
        # Segments are 1, 2, ... in contiguous runs, then only pad (segment 0, no loss, no tokens).
        assert (segments[:used] > 0).all() and (segments[used:] == 0).all()
        assert not row["loss_mask"][used:].any() and not row["inputs"][used:].any()
        starts = np.flatnonzero(np.diff(segments[:used], prepend=0))
        assert segments[starts].tolist() == list(range(1, len(indices) + 1))
        for start, stop, index in zip(starts, list(starts[1:]) + [used], indices):
            # Positions restart at 0 and the segment holds exactly the example's real positions.
            np.testing.assert_array_equal(positions[start:stop], np.arange(stop - start))
            assert stop - start == dataset.segment_lengths[index]
            packed_pairs[int(index)] = loss_pairs(row, start, stop)
    for index in range(len(dataset)):
        unpacked_pairs[index] = loss_pairs(pipeline.unpacked_row(dataset, index), 0, dataset.seq_len)
        assert unpacked_pairs[index]  # no example without loss
    assert packed_pairs == unpacked_pairs


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(st.lists(st.integers(1, 32), min_size=1, max_size=200), st.integers(0, 2**16))
def test_best_fit_packs_every_example_once_within_the_row(lengths, seed):
    lengths = np.asarray(lengths)
    order = np.random.default_rng(seed).permutation(len(lengths))
    rows = pipeline.pack_examples(lengths, order, 32)
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(lengths)))
    assert all(lengths[row].sum() <= 32 for row in rows)
    # A row is opened only for an example no open row can take, so any two rows hold more than 32 together.
    fills = sorted(lengths[row].sum() for row in rows)
    assert len(rows) == 1 or fills[0] + fills[1] > 32


@pytest.mark.parametrize("packing", [False, True])
def test_batches_cover_an_epoch_with_loss_in_every_batch(dataset, packing):
    batches = pipeline.make_batches(dataset, batch_size=4, seed=1, epochs=1, packing=packing, drop_remainder=False)
    got = all_batches(batches)
    assert len(got) == len(batches) == -(-batches.num_rows // 4)
    for batch in got:
        assert batch["inputs"].shape == (4, dataset.seq_len) and batch["inputs"].dtype == np.int32
        assert batch["loss_mask"].dtype == np.float32 and batch["loss_mask"].sum() > 0
    # Every loss-bearing position of the epoch is served once.
    assert sum(batch["loss_mask"].sum() for batch in got) == dataset.num_learned.sum()
    # The stats are what was served: real (non-pad) positions and loss positions over all row positions.
    stats, positions = batches.stats, batches.num_rows * dataset.seq_len
    real = sum((batch["segment_ids"] > 0).sum() for batch in got) if packing else dataset.segment_lengths.sum()
    assert np.isclose(stats["token_fraction"], real / positions)
    assert np.isclose(stats["loss_fraction"], sum(batch["loss_mask"].sum() for batch in got) / positions)


def test_packing_is_fuller(dataset):
    unpacked = pipeline.make_batches(dataset, batch_size=2, seed=0).stats
    packed = pipeline.make_batches(dataset, batch_size=2, seed=0, packing=True).stats
    assert packed["token_fraction"] > unpacked["token_fraction"] and packed["rows"] < unpacked["rows"]
    assert packed["token_fraction"] <= 1 and packed["examples_per_row"] > 1


def test_short_last_batch_is_filled_with_empty_rows(dataset):
    batches = pipeline.make_batches(dataset, batch_size=8, seed=0, shuffle=False, drop_remainder=False)
    last = all_batches(batches)[-1]
    real = len(dataset) % 8
    assert real and (last["segment_ids"][real:] == 0).all() and not last["loss_mask"][real:].any()
    np.testing.assert_array_equal(last["inputs"][0], dataset.example(len(dataset) - real)["inputs"])
    assert len(pipeline.make_batches(dataset, batch_size=8, seed=0)) == len(dataset) // 8


def test_epochs_are_reshuffled_and_reproducible(dataset):
    first = all_batches(pipeline.make_batches(dataset, batch_size=4, seed=5, epochs=2))
    again = all_batches(pipeline.make_batches(dataset, batch_size=4, seed=5, epochs=2))
    assert_same_batches(first, again)
    per_epoch = len(first) // 2
    assert any((a["inputs"] != b["inputs"]).any() for a, b in zip(first[:per_epoch], first[per_epoch:]))
    other_seed = all_batches(pipeline.make_batches(dataset, batch_size=4, seed=6, epochs=1))
    assert any((a["inputs"] != b["inputs"]).any() for a, b in zip(first, other_seed))


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("stop_at", [3, "epoch_end", "second_epoch"])
def test_resume_gives_exactly_the_remaining_batches(dataset, packing, stop_at):
    make = lambda: pipeline.make_batches(
        dataset, batch_size=4, seed=2, epochs=2, packing=packing, drop_remainder=False, prefetch=3
    )
    reference = all_batches(make())
    per_epoch = len(reference) // 2
    taken = {3: 3, "epoch_end": per_epoch, "second_epoch": per_epoch + 2}[stop_at]
    interrupted = make()
    for _ in range(taken):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.get_state()))
    assert interrupted.epoch == taken // per_epoch
    resumed = make()
    resumed.set_state(state)
    assert_same_batches(all_batches(resumed), reference[taken:])
    # The interrupted iterator itself also carries on with the same batches.
    assert_same_batches(all_batches(interrupted), reference[taken:])


@pytest.mark.parametrize("packing", [False, True])
def test_each_process_gets_its_share_of_the_global_batch(dataset, packing, monkeypatch):
    whole = all_batches(pipeline.make_batches(dataset, batch_size=4, seed=4, packing=packing))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    shares = []
    for process in range(2):
        monkeypatch.setattr(jax, "process_index", lambda process=process: process)
        shares.append(all_batches(pipeline.make_batches(dataset, batch_size=4, seed=4, packing=packing)))
    joined = [{key: np.concatenate([a[key], b[key]]) for key in a} for a, b in zip(*shares)]
    assert shares[0][0]["inputs"].shape == (2, dataset.seq_len)
    assert_same_batches(joined, whole)
    with pytest.raises(UserError, match="multiple of the 2 processes"):
        pipeline.make_batches(dataset, batch_size=3, seed=4)


def test_state_from_other_settings_is_refused(dataset):
    state = pipeline.make_batches(dataset, batch_size=4, seed=2).get_state()
    with pytest.raises(UserError, match="batch_size was 4 when saved, now 2"):
        pipeline.make_batches(dataset, batch_size=2, seed=2).set_state(state)
    with pytest.raises(UserError, match="packing"):
        pipeline.make_batches(dataset, batch_size=4, seed=2, packing=True).set_state(state)


def test_batch_size_errors(dataset):
    with pytest.raises(UserError, match="larger than"):
        pipeline.make_batches(dataset, batch_size=len(dataset) + 1, seed=0)


@pytest.mark.parametrize("packing", [False, True])
def test_sharded_global_batches(dataset, packing):
    devices = np.asarray(jax.devices()[:8]).reshape(4, 2)
    sharding = NamedSharding(Mesh(devices, ("data", "fsdp")), P(("data", "fsdp"), None))
    host = all_batches(pipeline.make_batches(dataset, batch_size=8, seed=3, packing=packing))
    sharded = list(pipeline.make_batches(dataset, batch_size=8, seed=3, packing=packing, sharding=sharding))
    for batch, expected in zip(sharded, host):
        for key, value in batch.items():
            assert isinstance(value, jax.Array) and value.sharding == sharding
            assert value.shape == (8, dataset.seq_len)
            assert len(value.addressable_shards) == 8 and value.addressable_shards[0].data.shape == (1, dataset.seq_len)
            np.testing.assert_array_equal(np.asarray(value), expected[key])
    assert len(sharded) == len(host)


def test_benchmark_reports_measured_figures(tmp_path, small_tokenizer):
    path = write_jsonl(tmp_path / "chats.jsonl", random_chats(40, seed=9))
    config = examples.ExampleConfig("sft", "minimind2", MAX_LEN)
    figures = pipeline.benchmark(
        str(path), str(small_tokenizer), config, num_workers=0, batch_size=4, cache_dir=str(tmp_path)
    )
    assert figures["records"] == 40 and figures["examples"] <= 40
    assert figures["cold_records_per_s"] > 0 and figures["cached_examples_per_s"] > 0
    assert figures["packed"]["token_fraction"] > figures["unpacked"]["token_fraction"]
    assert set(figures) == {"records", "examples", "cold_records_per_s", "cached_examples_per_s", "unpacked", "packed"}


class _Placement:
    """A sharding as process_rows sees it: the batch slice of each of this process's devices."""

    def __init__(self, *slices):
        self.slices = slices

    def addressable_devices_indices_map(self, shape):
        return {device: (rows,) for device, rows in enumerate(self.slices)}


def test_process_rows_are_the_rows_this_process_devices_hold():
    assert pipeline.process_rows(_Placement(slice(4, 6), slice(6, 8)), 8).tolist() == [4, 5, 6, 7]
    # devices in any order, rows apart: in row order, as make_array_from_process_local_data takes them
    assert pipeline.process_rows(_Placement(slice(12, 14), slice(2, 4)), 16).tolist() == [2, 3, 12, 13]
    assert pipeline.process_rows(_Placement(slice(None), slice(None)), 3).tolist() == [0, 1, 2]  # replicated
    mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    assert pipeline.process_rows(NamedSharding(mesh, P(("data", "fsdp"))), 16).tolist() == list(range(16))
