"""LoRA, DPO and distillation resume exactly: a run cut after its first update and resumed logs the losses of
the uninterrupted run, and writes the same weights (2510 golden inputs, ../shared/golden/post_sft)."""

import json

import numpy as np
import pytest
import torch

from minimind_jax.cli.main import main
from tests.conftest import require_shared


def command(mode: str, inputs, out) -> tuple[list[str], str]:
    """(argv, the weight file it writes) for a 3-update run of `mode` on the golden inputs."""
    common = ["--arch", "minimind2", "--tokenizer_path", str(require_shared("minimind/2510")), "--epochs", "3",
              "--learning_rate", "1e-3", "--max_seq_len", "64", "--log_interval", "1", "--save_interval", "1",
              "--save_dir", str(out), "--no_progress", "--mesh", "data=2"]  # fmt: skip
    model = ["--hidden_size", "32", "--num_hidden_layers", "2", "--from_weight", str(inputs / "full_sft_32.pth")]
    if mode == "lora":
        argv = [*model, "--batch_size", "8", "--data_path", str(inputs / "sft.jsonl"), "--lora_name", "lora_t",
                "--from_lora", str(inputs / "lora_init_32.pth")]  # fmt: skip
        return ["lora", *common, *argv], "lora_t_32.pth"
    if mode == "dpo":
        return ["dpo", *common, *model, "--batch_size", "4", "--data_path", str(inputs / "dpo.jsonl")], "dpo_32.pth"
    argv = [*model, "--teacher_hidden_size", "64", "--teacher_num_layers", "2", "--batch_size", "8",
            "--from_teacher_weight", str(inputs / "full_sft_64.pth"), "--data_path", str(inputs / "sft.jsonl")]  # fmt: skip
    return ["distill", *common, *argv], "full_dist_32.pth"


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
