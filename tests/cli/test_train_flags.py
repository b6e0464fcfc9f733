"""The sft/pretrain flags are TrainConfig's fields: each declared once with its help text, read as the field's type,
MiniMind's own listed first."""

import argparse
import dataclasses
import pathlib
import re

import pytest

from minimind_jax.cli.main import main
from minimind_jax.cli.train import add_arguments, config_from_args, train_flags
from minimind_jax.model.config import CONFIG_DIR
from minimind_jax.training.config import RL_MODES, TrainConfig

FLAG_FIELDS = [field for field in dataclasses.fields(TrainConfig) if "help" in field.metadata]
COMMANDS = ("sft", "pretrain", "lora", "dpo", "grpo", "ppo", "agent")


def command_fields(command: str) -> list[dataclasses.Field]:
    """The flag fields of a command: every command's, and its own (config.flag's `only`)."""
    return [field for field in FLAG_FIELDS if field.metadata["only"] is None or command in field.metadata["only"]]


def listed_flags(capsys, command: str) -> tuple[list[str], str]:
    """The flags `main.py COMMAND --help` lists, in order, and its help text without whitespace (argparse wraps
    lines at spaces and hyphens)."""
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = text[text.index("options:") :]
    return re.findall(r"^\s+--(\w+)", options, flags=re.MULTILINE), "".join(options.split())


def parsed(*argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser, "sft")
    return config_from_args(parser.parse_args(list(argv)), "sft")


def test_only_the_subcommand_and_python_api_settings_are_not_flags():
    assert {field.name for field in dataclasses.fields(TrainConfig)} - {field.name for field in FLAG_FIELDS} == {
        "mode",
        "progress",
    }


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_field_is_listed_in_help_with_its_help_text(capsys, command):
    listed, help_text = listed_flags(capsys, command)
    for field in command_fields(command):
        assert field.metadata["help"].strip(), field.name
        assert field.name in listed, field.name
        assert "".join(field.metadata["help"].split()) in help_text, field.name
    # Besides the fields: the run config, --no_progress for TrainConfig.progress, and RL's --rollout_engine
    # (MiniMind's; torch, our sampler, is the one that runs).
    engine = {"rollout_engine"} if command in RL_MODES else set()
    assert set(listed) == {field.name for field in command_fields(command)} | {"config", "no_progress"} | engine


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_minimind_flags_before_ours(capsys, command):
    listed, _ = listed_flags(capsys, command)
    fields = command_fields(command)
    minimind = [listed.index(field.name) for field in fields if field.metadata["minimind"]]
    ours = [listed.index(field.name) for field in fields if not field.metadata["minimind"]]
    assert {"save_dir", "learning_rate", "from_resume", "use_wandb"} <= {
        field.name for field in FLAG_FIELDS if field.metadata["minimind"]
    }
    assert minimind and ours and max(minimind) < min(ours)


def test_flag_values_reach_the_config_as_the_field_types():
    kinds = {field.name: kind for field, kind in train_flags("sft")}
    assert (kinds["packing"], kinds["max_steps"], kinds["dtype"]) == (int, int, str)  # a bool is given as 0/1
    cfg = parsed(
        "--epochs",
        "3",
        "--learning_rate",
        "2e-5",
        "--save_dir",
        "runs",
        "--max_steps",
        "7",
        "--packing",
        "1",
        "--fast_path",
        "0",
    )
    assert (cfg.epochs, cfg.learning_rate, cfg.save_dir, cfg.max_steps) == (3, 2e-5, "runs", 7)
    assert type(cfg.epochs) is int and type(cfg.learning_rate) is float and type(cfg.max_steps) is int
    assert cfg.packing == 1 and cfg.fast_path == 0
    assert parsed().max_steps is None and parsed().packing == 0  # not given: the dataclass default


def test_switches_take_no_value_and_minimind_device_flags_are_ignored():
    cfg = parsed("--strict", "--use_wandb", "--no_progress", "--device", "cuda:0", "--use_compile", "1")
    assert cfg.strict is True and cfg.use_wandb is True and cfg.progress is False
    assert parsed().strict is False and parsed().use_wandb is False and parsed().progress is True


def test_config_takes_a_shipped_preset_by_name_from_outside_the_repository(tmp_path, monkeypatch):
    """An installed package finds its presets from any directory; a file of that name in the cwd wins."""
    monkeypatch.chdir(tmp_path)
    from_package = parsed("--config", str(CONFIG_DIR / "sft_minimind2-small.yaml"))
    assert from_package.learning_rate == 5e-7 and from_package.hidden_size == 512
    for name in ("sft_minimind2-small", "sft_minimind2-small.yaml", "configs/sft_minimind2-small.yaml"):
        assert parsed("--config", name) == from_package, name
    pathlib.Path("sft_minimind2-small.yaml").write_text("train:\n  learning_rate: 1.0e-4\n")
    assert parsed("--config", "sft_minimind2-small.yaml").learning_rate == 1e-4


def test_config_that_is_neither_a_file_nor_a_preset_lists_the_presets(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sft", "--config", "elsewhere/sft_minimind2-small"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: elsewhere/sft_minimind2-small: no such run config file or preset; presets: ")
    listed = err.strip().rpartition("presets: ")[2].split(", ")
    assert {"sft_minimind2-small", "pretrain_minimind2-small", "minimind2-small"} <= set(listed)
    assert "demo" not in listed and len(err.splitlines()) == 1
