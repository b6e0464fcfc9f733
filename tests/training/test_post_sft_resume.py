"""LoRA, DPO and distillation resume exactly: a run cut after its first update and resumed logs the losses of
the uninterrupted run, and writes the same weights; with accumulation they update where MiniMind's pretraining
loop does (2510 golden inputs, ../shared/golden/post_sft)."""

import json

import numpy as np
import pytest
import torch

from minimind_jax.cli.main import main
from minimind_jax.training.accumulation import update_plan
from tests.conftest import require_shared
from tests.support.post_sft import command


@pytest.mark.parametrize("mode", ["lora", "dpo", "distill"])
def test_a_resumed_run_is_the_uninterrupted_run(mode, tmp_path, capsys):
    inputs = require_shared("golden/post_sft/2510/inputs")
    whole_argv, weights = command(mode, inputs, tmp_path / "whole")
    assert main(whole_argv) == 0
    cut_argv, _ = command(mode, inputs, tmp_path / "cut")
    assert main([*cut_argv, "--max_steps", "1"]) == 0
    assert main([*cut_argv, "--from_resume", "1"]) == 0
    capsys.readouterr()

    def losses(directory):
        (metrics,) = directory.glob("logs/*/metrics.jsonl")
        return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]

    assert len(losses(tmp_path / "whole")) == 3
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    whole = torch.load(tmp_path / "whole" / weights, weights_only=True)
    cut = torch.load(tmp_path / "cut" / weights, weights_only=True)
    assert list(cut) == list(whole)
    for key, value in whole.items():
        np.testing.assert_array_equal(cut[key].numpy(), value.numpy(), err_msg=key)


@pytest.mark.parametrize("mode, batch_size, iters, acc", [("lora", 3, 3, 2), ("dpo", 1, 4, 3), ("distill", 3, 3, 2)])
def test_accumulating_runs_update_at_the_era_boundaries(mode, batch_size, iters, acc, tmp_path, capsys):
    """Batches per epoch that are not a multiple of --accumulation_steps: the updates come at the micro-steps of
    2510's rule (checked against MiniMind's own train_pretrain.py in test_accumulation_vs_minimind.py), whose
    loop these trainers share."""
    argv, _ = command(mode, require_shared("golden/post_sft/2510/inputs"), tmp_path / "out")
    argv += ["--batch_size", str(batch_size), "--accumulation_steps", str(acc), "--mesh", "data=1"]
    assert main(argv) == 0
    capsys.readouterr()
    (metrics,) = (tmp_path / "out").glob("logs/*/metrics.jsonl")
    logged = [json.loads(line)["micro_step"] for line in metrics.read_text().splitlines()]
    assert logged == list(update_plan("minimind2", iters, epochs=3, accumulation_steps=acc).micro_steps)
