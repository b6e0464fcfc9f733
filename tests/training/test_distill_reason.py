"""`main.py distill_reason` against MiniMind's own train_distill_reason.py (2510, tests/fixtures/distill_reason)."""

import json
import pathlib
import re

import numpy as np
import torch

from minimind_jax.cli.main import main
from tests.conftest import require_shared
from tests.support.parity import assert_near_truth

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "distill_reason"
LOG_LINE = re.compile(r"loss:([\d.]+) lr:([\d.]+)")


def as_numpy(path):
    return {key: value.float().numpy() for key, value in torch.load(path, weights_only=True).items()}


def test_distill_reason_run_is_minimind_train_distill_reason(tmp_path):
    """The fixture's run: MiniMind's losses (tag tokens weighed 10x) and LRs, and its reason_32.pth within its
    own noise floor (its 1-thread run against its 2-thread one)."""
    inputs = require_shared("golden/post_sft/2510/inputs")
    out = tmp_path / "out"
    argv = ["distill_reason", "--tokenizer_path", str(require_shared("minimind/2510")),
            "--from_weight", str(inputs / "full_sft_32.pth"), "--data_path", str(FIXTURES / "reason.jsonl"),
            "--hidden_size", "32", "--num_hidden_layers", "2", "--batch_size", "8", "--epochs", "3",
            "--learning_rate", "1e-3", "--max_seq_len", "64", "--log_interval", "1", "--save_interval", "1",
            "--save_dir", str(out), "--cache_dir", str(tmp_path / "cache"), "--no_progress", "--mesh", "data=1"]  # fmt: skip
    assert main(argv) == 0
    found = [LOG_LINE.search(line) for line in (FIXTURES / "minimind.log").read_text().splitlines()]
    losses, lrs = [float(m[1]) for m in found], [float(m[2]) for m in found]
    records = [json.loads(line) for line in (out / "logs" / "reason_32" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([round(r["last_micro_loss"], 6) for r in records], losses, rtol=1e-4)
    assert [round(r["lr"], 12) for r in records] == lrs
    expected = as_numpy(FIXTURES / "minimind_reason_32.pth")
    written = as_numpy(out / "reason_32.pth")
    assert list(written) == list(expected)
    assert_near_truth(written, as_numpy(FIXTURES / "minimind_1thread_reason_32.pth"), expected)


def test_distill_reason_is_2510_only(capsys):
    assert main(["distill_reason", "--arch", "minimind3", "--data_path", "x.jsonl"]) == 1
    assert "v3 has none" in capsys.readouterr().err
