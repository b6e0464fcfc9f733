"""LoRA and distillation train on packed rows too: the first update's loss is the unpacked one, since both
weigh the same loss tokens and packed examples attend only within themselves (2510 golden inputs)."""

import json

import numpy as np
import pytest

from minimind_jax.cli.main import main
from tests.conftest import require_shared
from tests.support.post_sft import command


@pytest.mark.parametrize("mode", ["lora", "distill"])
def test_packed_rows_give_the_unpacked_loss(mode, tmp_path, capsys):
    inputs = require_shared("golden/post_sft/2510/inputs")
    losses = {}
    for packing in ("0", "1"):
        argv, _ = command(mode, inputs, tmp_path / packing)
        assert main([*argv, "--packing", packing, "--max_steps", "1"]) == 0
        (metrics,) = (tmp_path / packing).glob("logs/*/metrics.jsonl")
        losses[packing] = [json.loads(line) for line in metrics.read_text().splitlines()][0]
    capsys.readouterr()
    np.testing.assert_allclose(losses["1"]["loss"], losses["0"]["loss"], rtol=1e-5)
