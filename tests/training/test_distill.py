"""`main.py distill` against MiniMind's own train_distillation.py, per era (../shared/golden/post_sft)."""

import json
import re

import numpy as np
import pytest
import torch

from minimind_jax.cli.main import main
from tests.conftest import require_shared
from tests.support.parity import assert_near_truth

ERAS = {"2510": "minimind2", "v3": "minimind3"}
LOG_LINE = re.compile(r"loss:\s*([\d.]+).*?ce:\s*([\d.]+).*?distill:\s*([\d.]+).*?(?:lr|learning_rate):\s*([\d.]+)")


def as_numpy(path):
    return {key: value.float().numpy() for key, value in torch.load(path, weights_only=True).items()}


@pytest.mark.parametrize("era", ERAS)
def test_distill_run_is_minimind_train_distillation(era, tmp_path):
    """The golden run's flags, MiniMind's own names for them: its losses (total, CE, distillation) and LRs, and
    its full_dist_32.pth within MiniMind's own noise floor (its 1-thread run against its 2-thread one)."""
    directory = require_shared(f"golden/post_sft/{era}")
    inputs, out = directory / "inputs", tmp_path / "out"
    teacher = inputs / ("full_sft_64.pth" if era == "2510" else "full_sft_64_moe.pth")
    moe_flags = ["--use_moe", "0"] if era == "2510" else ["--student_use_moe", "0", "--teacher_use_moe", "1"]
    argv = ["distill", "--arch", ERAS[era], "--tokenizer_path", str(require_shared(f"minimind/{era}")),
            "--from_student_weight", str(inputs / "full_sft_32.pth"), "--from_teacher_weight", str(teacher),
            "--student_hidden_size", "32", "--student_num_layers", "2", "--teacher_hidden_size", "64",
            "--teacher_num_layers", "2", *moe_flags, "--batch_size", "8", "--data_path", str(inputs / "sft.jsonl"),
            "--save_weight", "full_dist", "--alpha", "0.5", "--temperature", "1.5", "--epochs", "3",
            "--learning_rate", "1e-3", "--max_seq_len", "64", "--log_interval", "1", "--save_interval", "1",
            "--save_dir", str(out), "--cache_dir", str(tmp_path / "cache"), "--no_progress", "--mesh", "data=1"]  # fmt: skip
    assert main(argv) == 0
    found = [LOG_LINE.search(line) for line in (directory / "minimind" / "distill.log").read_text().splitlines()]
    expected_log = np.array([[float(value) for value in m.groups()] for m in found if m])
    records = [json.loads(line) for line in (out / "logs" / "full_dist_32" / "metrics.jsonl").read_text().splitlines()]
    ours = np.array([[r["last_micro_loss"], r["ce"], r["distill"]] for r in records])
    digits = 4 if era == "v3" else 6  # v3 prints 4 decimals (2510: 6 for the loss, 4 for its parts)
    np.testing.assert_allclose(np.round(ours[:, 0], digits), expected_log[:, 0], rtol=1e-4)
    np.testing.assert_allclose(np.round(ours[:, 1:], 4), expected_log[:, 1:3], rtol=1e-4, atol=1e-4)
    assert [round(r["lr"], 8 if era == "v3" else 12) for r in records] == expected_log[:, 3].tolist()
    expected = as_numpy(directory / "minimind" / "full_dist_32.pth")
    written = as_numpy(out / "full_dist_32.pth")
    assert list(written) == list(expected)
    assert_near_truth(written, as_numpy(directory / "minimind_1thread" / "full_dist_32.pth"), expected)
