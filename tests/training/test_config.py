"""The run presets in configs/ parse into the trainer's settings exactly as MiniMind's scripts default them; a bad
setting, from a flag, a run config or the Python API, is one error line before any work."""

import argparse
import re

import pytest
import yaml

import main
from minimind_jax.cli.train import add_arguments, config_from_args
from minimind_jax.errors import UserError
from minimind_jax.model.config import CONFIG_DIR
from minimind_jax.training.config import TrainConfig


def parsed(command: str, *argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser, command)
    return config_from_args(parser.parse_args(list(argv)), command)


@pytest.mark.parametrize("command", ["pretrain", "sft"])
def test_minimind2_small_preset_is_minimind_defaults_with_real_paths(command):
    path = CONFIG_DIR / f"{command}_minimind2-small.yaml"
    cfg = parsed(command, "--config", str(path))
    written = yaml.safe_load(path.read_text())["train"]
    assert {name: getattr(cfg, name) for name in written} == written
    # Every MiniMind default the preset writes out is the one the CLI would use without it.
    bare = parsed(command)
    for name, value in written.items():
        if name not in ("data_path", "tokenizer_path", "packing", "arch"):
            assert getattr(bare, name) == value, name
    assert cfg.mode == command and cfg.run_name == f"{cfg.save_weight}_512"


def test_command_line_flags_override_the_preset():
    cfg = parsed(
        "sft", "--config", str(CONFIG_DIR / "sft_minimind2-small.yaml"), "--learning_rate", "1e-5", "--packing", "0"
    )
    assert cfg.learning_rate == 1e-5 and cfg.packing == 0 and cfg.batch_size == 16


BAD_TRAINER_SETTINGS = [  # (flag, value): every choice and range TrainConfig checks
    ("--dtype", "fp16"),
    ("--dtype", "float16"),
    ("--arch", "minimind4"),
    ("--remat", "yes"),
    ("--attention_impl", "flash"),
    ("--loss_norm", "mean"),
    ("--use_moe", "2"),
    ("--from_resume", "-1"),
    ("--packing", "2"),
    ("--scan_layers", "3"),
    ("--learning_rate", "-1"),
    ("--learning_rate", "0"),
    ("--learning_rate", "nan"),
    ("--grad_clip", "0"),
    ("--epochs", "0"),
    ("--batch_size", "0"),
    ("--accumulation_steps", "0"),
    ("--log_interval", "0"),
    ("--save_interval", "0"),
    ("--max_seq_len", "0"),
    ("--hidden_size", "0"),
    ("--num_hidden_layers", "0"),
    ("--max_steps", "0"),
    ("--keep_checkpoints", "0"),
    ("--loss_chunk_size", "-1"),
    ("--warmup_steps", "-1"),
    ("--num_workers", "-1"),
    ("--seed", "-1"),
    ("--system_prompt_ratio", "1.5"),
    ("--drop_empty_think_ratio", "-0.1"),
    ("--num_attention_heads", "0"),
    ("--max_consecutive_skips", "0"),
    ("--hidden_size", "40"),  # head_dim 5: RoPE needs pairs
    ("--num_attention_heads", "3"),  # not a multiple of the 2 KV heads
]


@pytest.mark.parametrize("command", ["sft", "pretrain"])
@pytest.mark.parametrize("flag, value", BAD_TRAINER_SETTINGS)
def test_a_bad_trainer_flag_is_one_error_line_before_any_work(command, flag, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main.main([command, flag, value]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert flag.lstrip("-") in captured.err and value in captured.err
    assert captured.out == "" and list(tmp_path.iterdir()) == []  # stopped before reading data or writing


def test_the_run_config_file_and_the_python_api_get_the_same_checks(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  learning_rate: 1e-5\n  dtype: bfloat16\n")  # YAML reads 1e-5 as a string
    assert parsed("sft", "--config", str(path)).learning_rate == 1e-5
    for text, message in [
        ("train:\n  dtype: float16\n", "--dtype must be one of float32, bfloat16, got 'float16'"),
        ("train:\n  epochs: 1.5\n", "--epochs must be an integer >= 1, got 1.5"),
        ("learning_rate: fast\n", "--learning_rate must be a number > 0, got 'fast'"),
        ("- epochs\n", f"{path}: a run config is a mapping of settings, got list"),
    ]:
        path.write_text(text)
        with pytest.raises(UserError, match=re.escape(message)):
            parsed("sft", "--config", str(path))
    with pytest.raises(UserError, match="--remat must be one of none, full, dots, got 'yes'"):
        TrainConfig(remat="yes")
    with pytest.raises(UserError, match="--use_moe must be one of 0, 1, got 2"):
        TrainConfig(use_moe=2)
    assert TrainConfig(use_moe=True, num_workers=0, max_steps=None).use_moe  # bools and None where allowed
