"""Conversion .pth <-> ours: MiniMind's key names and shapes, bit-exact round trips (Orbax too, through the
CLI), and bad files refused in one line naming the problem."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import minimind_jax
from minimind_jax.bench.torch_reference import MiniMindTorch
from minimind_jax.errors import UserError
from minimind_jax.model.config import PRESETS, ModelConfig, load_preset, num_params
from minimind_jax.weights.mapping import expected_shapes, infer_config, state_dict_keys
from minimind_jax.weights.pth import read_state_dict
from tests.conftest import REPO_ROOT, require_shared
from tests.support.models import random_torch_model, tiny

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "torch_reference"
ERA_OF = {"minimind2": "2510", "minimind3": "v3"}


@pytest.mark.parametrize("name", PRESETS)
def test_full_size_key_names_order_and_shapes_match_minimind(name):
    config = load_preset(name)
    presets = json.loads((FIXTURES / f"presets_{ERA_OF[config.arch]}.json").read_text())
    recorded = [(key, tuple(shape)) for key, shape in presets[name]["state_dict"]]
    ours = [(key, expected_shapes(config)[key]) for key in state_dict_keys(config)]
    assert ours == recorded
    assert num_params(config) == presets[name]["params"]


@pytest.mark.parametrize("preset", ["minimind2-moe", "minimind3"])
def test_round_trip_is_bit_exact_and_loads_strictly(tmp_path, preset):
    config = tiny(preset)
    reference = random_torch_model(config, seed=4)
    for dtype, torch_dtype in (("float32", torch.float32), ("float16", torch.float16)):
        source = tmp_path / f"in_{dtype}.pth"
        torch.save({k: v.to(torch_dtype) for k, v in reference.state_dict().items()}, source)
        model = minimind_jax.load(source)
        target = minimind_jax.save_pth(model, tmp_path / f"out_{dtype}.pth", dtype=dtype)
        before = torch.load(source, weights_only=True)
        after = torch.load(target, weights_only=True)
        assert list(after) == list(before) == state_dict_keys(config)
        for key in before:
            assert after[key].dtype == torch_dtype and torch.equal(after[key], before[key]), key
        MiniMindTorch(config).load_state_dict({k: v.float() for k, v in after.items()}, strict=True)


def test_orbax_checkpoint_round_trip_through_the_cli(tmp_path):
    config = tiny("minimind2-small")
    source = tmp_path / "pretrain_64.pth"
    torch.save(random_torch_model(config, seed=5).state_dict(), source)
    run = lambda *args: subprocess.run(
        [sys.executable, "main.py", "convert", *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True
    )
    forward = run(source, tmp_path / "ckpt")
    assert forward.returncode == 0, forward.stderr
    back = run(tmp_path / "ckpt", tmp_path / "back.pth", "--dtype", "float32")
    assert back.returncode == 0, back.stderr
    original, returned = torch.load(source, weights_only=True), torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(original) == list(returned) and all(torch.equal(original[k], returned[k]) for k in original)
    bad = run(tmp_path / "missing.pth", tmp_path / "x")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.pth'}: no such file"]


# ---- bad input: one line naming the problem, never a partial load ----


@pytest.fixture
def small_state(tmp_path):
    config = tiny("minimind2-small")
    return config, random_torch_model(config, seed=6).state_dict()


def _load_error(path) -> str:
    with pytest.raises(UserError) as error:
        minimind_jax.load(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    return message


def test_truncated_and_corrupt_files(tmp_path, small_state):
    _, state = small_state
    whole = tmp_path / "whole.pth"
    torch.save(state, whole)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert "truncated or corrupt" in _load_error(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    assert "not a .pth file" in _load_error(garbage)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "payload": Payload()}, path)
    assert "refused" in _load_error(path)
    assert not marker.exists()


def test_not_a_minimind_state_dict(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    assert "not a MiniMind state dict" in _load_error(path)


@pytest.mark.parametrize("change", ["missing", "extra", "shape", "untied"])
def test_missing_extra_wrong_shape_or_untied_keys(tmp_path, small_state, change):
    config, state = small_state
    state = dict(state)
    if change == "missing":
        del state["model.layers.1.mlp.up_proj.weight"]
    elif change == "extra":
        state["model.layers.0.self_attn.extra.weight"] = torch.zeros(4)
    elif change == "shape":
        state["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 100)
    else:
        state["lm_head.weight"] = state["lm_head.weight"] + 1
    path = tmp_path / f"{change}.pth"
    torch.save(state, path)
    expected = {
        "missing": "missing 1 key(s): model.layers.1.mlp.up_proj.weight",
        "extra": "unexpected 1 key(s): model.layers.0.self_attn.extra.weight",
        "shape": "model.layers.0.mlp.down_proj.weight has shape [64, 100], expected [64, 192]",
        "untied": "lm_head.weight differs from model.embed_tokens.weight",
    }[change]
    assert expected in _load_error(path)


def test_ambiguous_head_count_is_explained():
    six_heads = ModelConfig(hidden_size=60, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3)
    state = {key: np.zeros(shape) for key, shape in expected_shapes(six_heads).items()}
    with pytest.raises(UserError, match="MiniMind's default is 8 heads: pass num_attention_heads"):
        infer_config(state)
    assert infer_config(state, num_attention_heads=6).num_key_value_heads == 3


def test_golden_fp16_file_is_read_as_fp16():
    path = require_shared("golden", "2510", "moe_fp16.pth")
    state = read_state_dict(path)
    assert all(v.dtype == np.float16 for v in state.values())
    config = infer_config(state)
    assert (config.arch, config.use_moe, config.hidden_size, config.num_hidden_layers) == ("minimind2", True, 64, 2)


def test_resume_dict_is_accepted(tmp_path, small_state):
    _, state = small_state
    path = tmp_path / "full_sft_64_resume.pth"
    torch.save(
        {
            "model": state,
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 1,
            "step": 10,
            "world_size": 1,
            "wandb_id": None,
            "scaler": {},
        },
        path,
    )
    model = minimind_jax.load(path)
    np.testing.assert_array_equal(np.asarray(model.embed_tokens[...]), state["model.embed_tokens.weight"].numpy())
