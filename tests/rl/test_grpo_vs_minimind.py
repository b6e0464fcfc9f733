"""`main.py grpo --rollouts` against MiniMind's own train_grpo.py on the same recorded rollouts
(../shared/golden/rl, both eras, v3's cispo and grpo, rewards computed and given), judged by the rules of its
README: per update the loss, mean reward and learning rate, and the written weights within MiniMind's own
noise floor."""

import json
import pathlib
import shlex

import numpy as np
import pytest
import torch

from minimind_jax.cli.main import main
from tests.conftest import GOLDEN, require_shared

CASES = [("2510", "reasoning_computed"), ("v3", "cispo_computed"), ("v3", "grpo_given")]


def golden_flags(era: str, case: str) -> list[str]:
    """The case's command line from flags.env (paths relative to the era's folder)."""
    for line in (GOLDEN / "rl" / era / "flags.env").read_text().splitlines():
        name, _, value = line.partition("=")
        if name == case.upper():
            return shlex.split(shlex.split(value)[0])
    raise KeyError(case)


def fraction_beyond_one_fp16_ulp(ours: dict, theirs: dict) -> float:
    """The README's measure: each entry's distance in fp16 units in the last place after rounding both to fp16,
    and the fraction of all entries (every key) more than one apart."""
    beyond = total = 0
    for key, want in theirs.items():
        x, y = (np.asarray(t.half().double().numpy()) for t in (ours[key], want))
        scale = np.maximum(np.maximum(np.abs(x), np.abs(y)), 2.0**-14)
        beyond += int((np.abs(x - y) / 2.0 ** (np.floor(np.log2(scale)) - 10) > 1).sum())
        total += want.numel()
    return beyond / total


@pytest.mark.parametrize("era, case", CASES)
def test_grpo_updates_are_minimind(era, case, tmp_path, monkeypatch):
    folder = require_shared("golden", "rl", era)
    monkeypatch.chdir(folder)  # the flags name the inputs relative to it
    out = tmp_path / "out"
    argv = ["grpo", *golden_flags(era, case), "--tokenizer_path", str(require_shared("minimind", era)),
            "--save_dir", str(out), "--checkpoint_dir", str(out / "checkpoints"), "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    ours = [json.loads(line) for line in (out / "logs" / "grpo_32" / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (folder / "minimind" / case / "metrics.jsonl").read_text().splitlines()]
    assert len(ours) == len(theirs) == 2
    for update, (mine, minimind) in enumerate(zip(ours, theirs), 1):
        assert mine["policy_loss"] == pytest.approx(minimind["policy_loss"], rel=1e-4, abs=1e-6), update
        assert mine["reward"] == pytest.approx(minimind["reward"], abs=1e-5), update
        assert mine["learning_rate"] == pytest.approx(minimind["learning_rate"], rel=1e-6), update
        for name in ("advantages_mean", "avg_response_len", "advantages_std", "kl_ref"):
            if name in minimind:
                assert mine[name] == pytest.approx(minimind[name], abs=1e-6), (update, name)
    weights = torch.load(out / "grpo_32.pth", weights_only=True)
    expected = torch.load(folder / "minimind" / case / "grpo_32.pth", weights_only=True)
    assert list(weights) == list(expected)
    limit = json.loads((folder / "noise.json").read_text())[case]["limit"]
    fraction = fraction_beyond_one_fp16_ulp(weights, expected)
    print(f"{era} {case}: {fraction:.2e} of the weights beyond one fp16 ulp (limit {limit:.0e})")
    assert fraction <= limit
