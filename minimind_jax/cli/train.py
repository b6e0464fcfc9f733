"""`python main.py sft` and `python main.py pretrain`: MiniMind's trainer flags, plus ours.

Precedence: MiniMind's defaults for the script and era < `--config FILE.yaml` (run settings named as the
flags, at the top level or under `train:`) < flags given on the command line.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import pathlib

import yaml

from minimind_jax.model.config import ARCHS, ATTENTION_IMPLS, REMATS, TRAIN_DTYPES
from minimind_jax.errors import UserError, first_line

MINIMIND_FLAGS = {  # name: (type, help); defaults come from trainer.TrainConfig / defaults_for
    "save_dir": (str, "where {save_weight}_{hidden}{_moe}.pth and logs go"),
    "save_weight": (str, "weight file prefix (full_sft / pretrain)"),
    "epochs": (int, "training epochs"),
    "batch_size": (int, "global batch size (all devices)"),
    "learning_rate": (float, "peak learning rate of MiniMind's cosine schedule"),
    "dtype": (str, "compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)"),
    "accumulation_steps": (int, "micro-batches per optimizer update"),
    "grad_clip": (float, "clip the global gradient norm to this"),
    "log_interval": (int, "log every N micro-steps"),
    "save_interval": (int, "checkpoint and write the .pth every N micro-steps"),
    "hidden_size": (int, "hidden size"),
    "num_hidden_layers": (int, "number of layers"),
    "max_seq_len": (int, "truncation length"),
    "use_moe": (int, "1 = MoE model"),
    "data_path": (str, "training jsonl"),
    "from_weight": (str, "'none', a MiniMind weight name ({save_dir}/{name}_{hidden}{_moe}.pth), a .pth or our checkpoint"),
    "from_resume": (int, "1 = continue from the newest complete checkpoint"),
    "wandb_project": (str, "W&B project for --use_wandb (default: MiniMind-Full-SFT / MiniMind-Pretrain)"),
    "num_workers": (int, "tokenizing processes (default: one per CPU; 0: in this process)"),
}
OUR_FLAGS = {
    "arch": (str, "minimind2: the 2510 era; minimind3: v3"),
    "tokenizer_path": (str, "MiniMind tokenizer directory or SentencePiece .model"),
    "mesh": (str, "device mesh, e.g. data=8 or data=2,fsdp=2,tensor=2 (default: all devices on data)"),
    "seed": (int, "seed for init, shuffling and dropout"),
    "loss_norm": (str, "tokens (global token-weighted) | minimind (per micro-batch mean / accumulation_steps)"),
    "eval_data_path": (str, "held-out jsonl: masked eval loss at the end"),
    "warmup_steps": (int, "linear warmup micro-steps (MiniMind: 0)"),
    "checkpoint_dir": (str, "Orbax checkpoints go to {checkpoint_dir}/{save_weight}_{hidden}{_moe} "
                            "(default: {save_dir}/checkpoints)"),
    "overwrite": (int, "1 = start over where an earlier run left checkpoints: move them and its logs to a dated "
                       "folder (without it, such a run stops: continue with --from_resume 1)"),
    "keep_checkpoints": (int, "how many checkpoints to keep"),
    "max_steps": (int, "stop at optimizer update N, counted from the run's start (a resumed run too)"),
    "remat": (str, "recompute activations in the backward pass: all (full) or all but matmul outputs (dots)"),
    "fast_path": (int, "1 (default) = the backend's fastest exact step (CPU: causal_blocks attention, loss chunks "
                       "of 512, unrolled layers; GPU: cuDNN attention in bf16); 0 = MiniMind's literal computation "
                       "(full logits, xla attention, scanned layers). The three flags below override it"),
    "scan_layers": (int, "1 = the layers in lax.scan; 0 = unrolled: faster on CPU, slower to compile"),
    "attention_impl": (str, "xla is MiniMind's explicit softmax; causal_blocks skips keys above the diagonal; "
                            "cudnn: GPU, bf16"),
    "loss_chunk_size": (int, "lm_head + CE only at loss positions, this many at a time; 0 = the full logits"),
    "num_attention_heads": (int, "heads (2510 weights cannot tell; default 8)"),
    "cache_dir": (str, "tokenized-data cache directory"),
    "compilation_cache_dir": (str, "persistent XLA compilation cache (default ~/.cache/minimind_jax/xla; 'none': off)"),
    "system_prompt_ratio": (float, "v3: chance of adding a random system prompt (MiniMind: 0.2)"),
    "drop_empty_think_ratio": (float, "v3: chance of dropping an empty think block (MiniMind: 0.8)"),
    "max_consecutive_skips": (int, "stop after N consecutive non-finite updates"),
}
# Shown in --help; TrainConfig checks every value, so a bad one is a one-line error (exit 1) wherever it comes from.
CHOICES_SHOWN = {"arch": ARCHS, "dtype": TRAIN_DTYPES, "remat": REMATS, "attention_impl": ATTENTION_IMPLS,
                 **dict.fromkeys(("use_moe", "from_resume", "overwrite", "fast_path", "scan_layers", "packing"),
                                 (0, 1))}
IGNORED_FLAGS = {"device": str, "use_compile": int}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.description = f"MiniMind-compatible {'full SFT' if command == 'sft' else 'pretraining'}. " + " ".join(
        __doc__.split("\n\n")[1].split())
    parser.add_argument("--config", help="YAML run preset (see configs/)")
    for name, (kind, help_text) in {**MINIMIND_FLAGS, **OUR_FLAGS}.items():
        parser.add_argument(f"--{name}", type=kind, default=None, help=help_text, metavar=_choices_metavar(name))
    parser.add_argument("--packing", type=int, default=None, help="1 = pack several examples per row",
                        metavar=_choices_metavar("packing"))
    parser.add_argument("--strict", action="store_true", default=None, help="a bad jsonl line is an error, not a skip")
    parser.add_argument("--use_wandb", action="store_true", default=None,
                        help="log the metrics to Weights & Biases (pip install 'minimind-jax[wandb]')")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    for name, kind in IGNORED_FLAGS.items():  # accepted so MiniMind command lines run unchanged
        parser.add_argument(f"--{name}", type=kind, help=argparse.SUPPRESS)


def _choices_metavar(name: str) -> str | None:
    return "{" + ",".join(map(str, CHOICES_SHOWN[name])) + "}" if name in CHOICES_SHOWN else None


def config_from_args(args, command: str):
    from minimind_jax.training.config import TrainConfig, defaults_for

    from_file = {}
    if args.config:
        path = pathlib.Path(args.config)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise UserError(f"{path}: cannot read run config ({first_line(error)})") from None
        from_file = loaded.get("train", loaded) if isinstance(loaded, dict) else loaded
        if not isinstance(from_file, dict):
            raise UserError(f"{path}: a run config is a mapping of settings, got {type(from_file).__name__}")
        for name, value in from_file.items():
            if isinstance(value, str) and {**MINIMIND_FLAGS, **OUR_FLAGS}.get(name, (str,))[0] is float:
                with contextlib.suppress(ValueError):  # YAML reads 1e-5 (no dot) as a string; else TrainConfig says
                    from_file[name] = float(value)
    given = {name: getattr(args, name)
             for name in {**MINIMIND_FLAGS, **OUR_FLAGS, "packing": 0, "strict": 0, "use_wandb": 0}
             if getattr(args, name) is not None}
    arch = given.get("arch", from_file.get("arch", "minimind2"))
    fields = {**defaults_for(command, arch), **from_file, **given, "mode": command}
    if args.no_progress:
        fields["progress"] = False
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UserError(f"{args.config}: unknown run setting(s): {', '.join(unknown)}")
    return TrainConfig(**fields)


def run(args) -> int:
    from minimind_jax.training.loop import train

    summary = train(config_from_args(args, args.command))
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, default=str))
    return 0
