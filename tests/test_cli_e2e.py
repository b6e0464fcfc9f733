"""The run presets in configs/ parse into the trainer's settings exactly as MiniMind's scripts default them."""
import argparse

import pytest
import yaml

from minimind_jax.config import CONFIG_DIR
from minimind_jax.train_cli import add_arguments, config_from_args
from minimind_jax.trainer import TrainConfig


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
    cfg = parsed("sft", "--config", str(CONFIG_DIR / "sft_minimind2-small.yaml"), "--learning_rate", "1e-5",
                 "--packing", "0")
    assert cfg.learning_rate == 1e-5 and cfg.packing == 0 and cfg.batch_size == 16


def test_cli_restarts_once_with_a_malloc_that_keeps_freed_memory(monkeypatch):
    import os
    import sys

    from minimind_jax import malloc

    restarts = []
    monkeypatch.setattr(malloc.os, "execv", lambda executable, argv: restarts.append((executable, argv)))
    for name in [*malloc.KEEP_FREED_MEMORY_ENV, malloc.OPT_OUT_ENV]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(malloc.sys, "orig_argv", ["python3", "-u", "main.py", "sft", "--epochs", "1"])
    malloc.keep_freed_memory()
    assert restarts == [(sys.executable, [sys.executable, "-u", "main.py", "sft", "--epochs", "1"])]
    assert {name: os.environ[name] for name in malloc.KEEP_FREED_MEMORY_ENV} == malloc.KEEP_FREED_MEMORY_ENV
    malloc.keep_freed_memory()  # the restarted process finds the variables set: no second restart
    assert len(restarts) == 1

    for name in malloc.KEEP_FREED_MEMORY_ENV:  # a user's own setting stands
        monkeypatch.delenv(name)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    malloc.keep_freed_memory()
    assert len(restarts) == 1 and os.environ["MALLOC_ARENA_MAX"] == "4"
