"""`main.py pretrain` against MiniMind's own train_pretrain.py (both eras, tests/fixtures/accumulation): 7 records
in batches of 2 (4 micro-batches an epoch, the last of 1 record), --accumulation_steps 3, 2 epochs, so every
accumulation boundary of the era shows: v3's epoch-end remainders, 2510's first update after 2 micro-batches,
its remainder carried into the next epoch and its last 2 micro-batches never applied."""

import json
import pathlib

import numpy as np
import pytest
import torch

from minimind_jax.cli.main import main
from tests.conftest import require_shared

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "accumulation"


def as_numpy(path) -> dict[str, np.ndarray]:
    return {key: value.float().numpy() for key, value in torch.load(path, weights_only=True).items()}


def pretrain_argv(era: str, arch: str, tmp_path: pathlib.Path, out: pathlib.Path) -> list[str]:
    fixtures = FIXTURES / era
    return ["pretrain", "--arch", arch, "--tokenizer_path", str(require_shared("minimind", era)),
            "--from_weight", str(fixtures / "init_32.pth"), "--data_path", str(fixtures / "pretrain.jsonl"),
            "--hidden_size", "32", "--num_hidden_layers", "2", "--batch_size", "2", "--accumulation_steps", "3",
            "--epochs", "2", "--max_seq_len", "32", "--learning_rate", "5e-4", "--loss_norm", "minimind",
            "--log_interval", "1", "--save_interval", "1000", "--save_dir", str(out),
            "--cache_dir", str(tmp_path / "cache"), "--mesh", "data=1", "--no_progress"]  # fmt: skip


@pytest.mark.parametrize("era, arch", [("2510", "minimind2"), ("v3", "minimind3")])
def test_updates_and_weights_are_minimind_train_pretrain(era, arch, tmp_path):
    """The same updates at the same LRs as MiniMind's run, and its final model (in memory: v3's own .pth was
    written before its last update) within one fp16 ulp on all but a few entries, as MiniMind's own fp32 run
    is of its float64 run (tests/fixtures/accumulation/README.md)."""
    fixtures = FIXTURES / era
    minimind = json.loads((fixtures / "updates.json").read_text())
    out = tmp_path / "out"
    argv = pretrain_argv(era, arch, tmp_path, out)
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "logs" / "pretrain_32" / "metrics.jsonl").read_text().splitlines()]
    assert [r["micro_step"] for r in records] == [u["global_step"] for u in minimind["updates"]]
    np.testing.assert_allclose([r["lr"] for r in records], [u["lr"] for u in minimind["updates"]], rtol=1e-12)
    ours, expected = as_numpy(out / "pretrain_32.pth"), as_numpy(fixtures / "minimind_final_32.pth")
    beyond, total = 0, 0
    for key, want in expected.items():
        ulp = np.spacing(np.abs(want).astype(np.float16)).astype(np.float32)
        beyond += int((np.abs(ours[key] - want) > ulp).sum())
        total += want.size
    print(f"{era}: {beyond} of {total} weights beyond one fp16 ulp of MiniMind's")
    assert beyond <= 1e-4 * total  # measured: 0 (2510) and 2 (v3) of 440k; before the era boundaries, 97%


@pytest.mark.parametrize("era, arch, stop", [("2510", "minimind2", 1), ("v3", "minimind3", 1), ("v3", "minimind3", 2)])
def test_a_run_resumed_between_uneven_updates_is_the_uninterrupted_run(era, arch, stop, tmp_path):
    """Stopped after update `stop` (2510: before the update that carries epoch 1's remainder; v3: in the middle
    of epoch 1, before its flush, or after the flush), then --from_resume 1: the same .pth, bit for bit, as the
    run that was never stopped."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(pretrain_argv(era, arch, tmp_path, whole)) == 0
    assert main([*pretrain_argv(era, arch, tmp_path, resumed), "--max_steps", str(stop)]) == 0
    assert main([*pretrain_argv(era, arch, tmp_path, resumed), "--from_resume", "1"]) == 0
    got, want = as_numpy(resumed / "pretrain_32.pth"), as_numpy(whole / "pretrain_32.pth")
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
