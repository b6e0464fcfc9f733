"""`main.py dpo` against MiniMind's own train_dpo.py, per era (../shared/golden/post_sft), and its pairs."""

import json
import re

import numpy as np
import pytest
import torch

from minimind_jax.cli.main import main
from minimind_jax.data.preference import PairBatches, load_preference_data
from minimind_jax.data.tokenizer import load_tokenizer
from tests.conftest import require_shared
from tests.support.parity import assert_near_truth

ERAS = {"2510": "minimind2", "v3": "minimind3"}
LOG_LINE = re.compile(r"loss:\s*([\d.]+).*?(?:lr|learning_rate):\s*([\d.]+)")


def as_numpy(path):
    return {key: value.float().numpy() for key, value in torch.load(path, weights_only=True).items()}


@pytest.mark.parametrize("era", ERAS)
def test_dpo_run_is_minimind_train_dpo(era, tmp_path, capsys):
    """The golden run's flags: MiniMind's losses and LRs, and its dpo_32.pth within MiniMind's own noise
    floor (its 1-thread run against its 2-thread one)."""
    directory = require_shared(f"golden/post_sft/{era}")
    inputs, out = directory / "inputs", tmp_path / "out"
    argv = ["dpo", "--arch", ERAS[era], "--tokenizer_path", str(require_shared(f"minimind/{era}")),
            "--from_weight", str(inputs / "full_sft_32.pth"), "--data_path", str(inputs / "dpo.jsonl"),
            "--hidden_size", "32", "--num_hidden_layers", "2", "--batch_size", "4", "--save_weight", "dpo",
            "--beta", "0.1", "--epochs", "3", "--learning_rate", "1e-3", "--max_seq_len", "64", "--log_interval", "1",
            "--save_interval", "1", "--save_dir", str(out), "--no_progress", "--mesh", "data=1"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    found = [LOG_LINE.search(line) for line in (directory / "minimind" / "dpo.log").read_text().splitlines()]
    losses, lrs = [float(m[1]) for m in found if m], [float(m[2]) for m in found if m]
    records = [json.loads(line) for line in (out / "logs" / "dpo_32" / "metrics.jsonl").read_text().splitlines()]
    loss_digits, lr_digits = (4, 8) if era == "v3" else (6, 12)  # as MiniMind prints them
    np.testing.assert_allclose([round(r["last_micro_loss"], loss_digits) for r in records], losses, rtol=1e-4)
    assert [round(r["lr"], lr_digits) for r in records] == lrs
    assert records[0]["reward_margin"] == 0 and records[0]["reward_accuracy"] == 0  # the policy starts as the reference
    assert records[-1]["reward_margin"] > 0
    expected = as_numpy(directory / "minimind" / "dpo_32.pth")
    written = as_numpy(out / "dpo_32.pth")
    assert list(written) == list(expected)
    assert_near_truth(written, as_numpy(directory / "minimind_1thread" / "dpo_32.pth"), expected)


@pytest.mark.parametrize("era", ERAS)
def test_pairs_keep_together_and_fill_the_last_batch(era):
    tokenizer = load_tokenizer(require_shared(f"minimind/{era}"))
    data = load_preference_data(require_shared(f"golden/post_sft/{era}/inputs/dpo.jsonl"), tokenizer, ERAS[era], 64)
    assert len(data) == 4 and data.inputs.shape == (4, 2, 63)
    assert np.all(data.loss_mask.sum(-1) > 0)
    assert np.array_equal(data.inputs[:, :, 1:], data.targets[:, :, :-1])  # targets are the next ids
    batches = PairBatches(data, batch_size=3, seed=0, epochs=1)
    first, last = next(batches), next(batches)
    assert first["inputs"].shape == (6, 63) and first["pair_weight"].tolist() == [1] * 6
    assert last["pair_weight"].tolist() == [1, 1, 0, 0, 0, 0] and not last["loss_mask"][2:].any()
    order = [int(np.flatnonzero((data.inputs[:, 0] == row).all(-1))[0]) for row in first["inputs"][0::2]]
    for slot, pair in enumerate(order):  # each chosen row is followed by its own rejected row
        assert np.array_equal(first["inputs"][2 * slot + 1], data.inputs[pair, 1])
