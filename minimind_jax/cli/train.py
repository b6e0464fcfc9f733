"""`python main.py sft` and `python main.py pretrain`: MiniMind's trainer flags, plus ours.

Precedence: MiniMind's defaults for the script and era < `--config FILE.yaml` (run settings named as the
flags, at the top level or under `train:`) < flags given on the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.resources.abc
import json
import pathlib
import typing

import yaml

from minimind_jax.errors import UserError, first_line
from minimind_jax.model.config import CONFIG_DIR
from minimind_jax.training.config import CHOICES, RL_MODES, STUDENT_FLAGS, V3_ONLY_MODES, TrainConfig, defaults_for

IGNORED_FLAGS = {"device": str, "use_compile": int}  # MiniMind's, accepted so its command lines run unchanged
# MiniMind's RL debugging prints and its SGLang engine's settings (--rollout_engine takes torch only)
IGNORED_RL_FLAGS = {"debug_interval": int, "sglang_base_url": str, "sglang_model_path": str, "sglang_shared_path": str}
IGNORED_RL_SWITCHES = ("debug_mode", "debug_log_ratio")


def train_flags(command: str) -> list[tuple[dataclasses.Field, type]]:
    """The flags of `command`: TrainConfig's fields declared with config.flag (but for other commands' own),
    MiniMind's first, each with the type its value is read as: the field's type (X for `X | None`), and int for
    a bool, which is given as 0/1."""
    types = typing.get_type_hints(TrainConfig)
    flags = []
    for field in dataclasses.fields(TrainConfig):
        only = field.metadata.get("only", ())
        if "help" in field.metadata and (only is None or command in only):
            (kind,) = set(typing.get_args(types[field.name]) or {types[field.name]}) - {type(None)}
            flags.append((field, int if kind is bool else kind))
    return sorted(flags, key=lambda flag: not flag[0].metadata["minimind"])


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    what = {"sft": "full SFT", "pretrain": "pretraining", "lora": "LoRA adapters on a frozen model",
            "dpo": "DPO against a frozen reference", "distill": "distillation from a frozen teacher",
            "distill_reason": "reasoning distillation (2510)",
            "grpo": "GRPO (2510) / GRPO and CISPO (v3) reinforcement learning",
            "spo": "2510's SPO reinforcement learning (one completion per prompt, a tracked baseline)",
            "agent": "v3's agentic RL: multi-turn tool use, CISPO/GRPO on whole trajectories",
            "ppo": "PPO with a critic (2510: one advantage per sequence; v3: per token, GAE, minibatch epochs)"}[command]  # fmt: skip
    parser.description = f"MiniMind-compatible {what}. " + " ".join(__doc__.split("\n\n")[1].split())
    parser.add_argument(
        "--config", help="a YAML run config, or a shipped preset's name (configs/, e.g. sft_minimind2-small)"
    )
    # Every default is None, so a flag not given leaves the value to --config and MiniMind's defaults.
    for field, kind in train_flags(command):
        if field.metadata["switch"]:
            parser.add_argument(f"--{field.name}", action="store_true", default=None, help=field.metadata["help"])
        else:
            parser.add_argument(
                f"--{field.name}",
                type=kind,
                default=None,
                help=field.metadata["help"],
                metavar=_choices_metavar(field.name),
            )
    if command == "distill":
        for alias, name in STUDENT_FLAGS.items():
            parser.add_argument(f"--{alias}", dest=name, default=None, type=_flag_types(command)[name],
                                help=f"MiniMind's name for --{name}")  # fmt: skip
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    for name, kind in IGNORED_FLAGS.items():
        parser.add_argument(f"--{name}", type=kind, help=argparse.SUPPRESS)
    if command in RL_MODES:
        for name, kind in IGNORED_RL_FLAGS.items():
            parser.add_argument(f"--{name}", type=kind, help=argparse.SUPPRESS)
        for name in IGNORED_RL_SWITCHES:
            parser.add_argument(f"--{name}", action="store_true", help=argparse.SUPPRESS)
        parser.add_argument(
            "--rollout_engine",
            metavar="{torch}",
            help="torch: our jitted sampler (MiniMind's default engine); for SGLang or vLLM, record their rollouts "
            "and give --rollouts",
        )


def _flag_types(command: str) -> dict[str, type]:
    return {field.name: kind for field, kind in train_flags(command)}


def _choices_metavar(name: str) -> str | None:
    """The allowed values in --help; TrainConfig checks every value, so a bad one is a one-line error (exit 1)
    wherever it comes from."""
    return "{" + ",".join(map(str, CHOICES[name])) + "}" if name in CHOICES else None


def run_presets() -> list[str]:
    """The names of the run presets shipped in the package (configs/*.yaml but the demo's own settings)."""
    names = (entry.name.removesuffix(".yaml") for entry in CONFIG_DIR.iterdir() if entry.name.endswith(".yaml"))
    return sorted(name for name in names if name != "demo")


def run_config_path(given: str) -> pathlib.Path | importlib.resources.abc.Traversable:
    """--config's file: the path as given when it exists, else the shipped preset of that name (`NAME`,
    `NAME.yaml` or `configs/NAME.yaml`), so an installed package finds its presets from any directory."""
    path = pathlib.Path(given)
    if path.exists():
        return path
    preset = CONFIG_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent in (pathlib.Path("."), pathlib.Path("configs")) and preset.is_file():
        return preset
    raise UserError(f"{given}: no such run config file or preset; presets: {', '.join(run_presets())}")


def config_from_args(args, command: str) -> TrainConfig:
    if getattr(args, "rollout_engine", None) not in (None, "torch"):
        raise UserError(f"--rollout_engine {args.rollout_engine}: only torch (our sampler) runs here; record the "
                        "external engine's rollouts and give them with --rollouts FILE.jsonl")  # fmt: skip
    flags = train_flags(command)
    from_file = {}
    if args.config:
        path = run_config_path(args.config)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise UserError(f"{path}: cannot read run config ({first_line(error)})") from None
        from_file = loaded.get("train", loaded) if isinstance(loaded, dict) else loaded
        if not isinstance(from_file, dict):
            raise UserError(f"{path}: a run config is a mapping of settings, got {type(from_file).__name__}")
        float_names = {field.name for field, kind in flags if kind is float}
        for name, value in from_file.items():
            if isinstance(value, str) and name in float_names:
                with contextlib.suppress(ValueError):  # YAML reads 1e-5 (no dot) as a string; else TrainConfig says
                    from_file[name] = float(value)
    given = {field.name: getattr(args, field.name) for field, _ in flags if getattr(args, field.name) is not None}
    arch = given.get("arch", from_file.get("arch", "minimind3" if command in V3_ONLY_MODES else "minimind2"))
    fields = {**defaults_for(command, arch), **from_file, **given, "mode": command, "arch": arch}
    if command in RL_MODES and arch == "minimind2" and "from_weight" not in {**from_file, **given}:
        fields["from_weight"] = "reason" if fields.get("reasoning", 1) else "full_sft"  # as 2510's script picks it
    if args.no_progress:
        fields["progress"] = False
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UserError(f"{args.config}: unknown run setting(s): {', '.join(unknown)}")
    return TrainConfig(**fields)


def run(args) -> int:
    import jax

    cfg = config_from_args(args, args.command)
    if cfg.mode in RL_MODES:
        from minimind_jax.rl.run import train
    else:
        from minimind_jax.training.run import train
    summary = train(cfg)
    if jax.process_index() == 0:  # one summary for a run of several processes, as for its logs
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, default=str))
    return 0
