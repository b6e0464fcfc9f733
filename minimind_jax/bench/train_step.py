"""`python main.py bench`: our train step against PyTorch MiniMind's, side by side, in one run.

--objective picks what every side trains: MiniMind's train_full_sft (default), train_lora, train_dpo or
train_distillation, with the script's loss and defaults for the era. Every side trains the same model (same
preset and initial weights; LoRA: the same adapters; distillation: the same teacher) on the same real chat
batches (chatterbot-corpus + chitchat-dataset through MiniMind's tokenizer; DPO: pairs built from them):
- ours, in this process: the step `main.py {objective}` builds (training/run.py's builders, make_train_step,
  init_train_state) on a mesh of every present device, on MiniMind's padded rows or on packed rows
  (--packing): by default the backend's fast path (config.fast_path_settings), the flags' step if they ask
  for another, and MiniMind's literal computation (--fast_path 0);
- PyTorch, each in a process of its own (bench/torch_side.py, --torch_python, glibc's default malloc): the
  project's torch reference, and with --minimind_dir MiniMind's own MiniMindForCausalLM (and model_lora) with
  its script's loss; eager mode (forward, loss, backward, clip_grad_norm, AdamW), always on MiniMind's padded
  rows, with bf16 autocast under --dtype bfloat16, on CUDA when there is a GPU; with --torch_compile also
  MiniMind's model under torch.compile (v3's --use_compile 1), a row of its own (ratios stay to eager).

The sides take turns step by step (and so do the variants of --ablation), so a machine that is busy with
other work slows all of them alike; every figure is the median over the timed steps, after warm-up.
Per side: tokens/s (all B·T positions), loss tokens/s (positions that carry loss), the ratio to the
baseline (MiniMind's own model with --minimind_dir, else the torch reference; with `noise`, the spread of the
per-turn ratios), the ratio of CPU time per token (on CPU, less sensitive to other load), MFU (model FLOPs /
the device's peak from `perf`), compile time (trace, lower and XLA compile, ahead of the first step), compiles
during the steps (must be 0), the step's memory (XLA's account for ours, torch.cuda.max_memory_allocated for
torch on GPU) and the fraction of the step spent waiting for the input iterator.
--decode (--decode_only: alone) times generate on the preset, and with --minimind_dir MiniMind's own generate
(bench/minimind_decode.py, own process) on the same prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

from minimind_jax import runtime
from minimind_jax.errors import UserError
from minimind_jax.model.config import (
    ATTENTION_IMPLS,
    LITERAL_STEP,
    MOE_IMPLS,
    REMATS,
    fast_path_settings,
    train_step_settings,
)

if TYPE_CHECKING:
    from minimind_jax.training.compilation import CompileWatch

PACKAGE_PARENT = pathlib.Path(__file__).resolve().parents[2]  # the directory that holds minimind_jax/
DEFAULT_DATA_DIR = pathlib.Path.home() / ".cache" / "minimind_jax" / "bench"
OBJECTIVES = ("sft", "lora", "dpo", "distill", "grpo", "ppo")
STEP_LEARNING_RATE = 1e-4


def add_arguments(parser: argparse.ArgumentParser, command: str = "bench") -> None:
    parser.description = __doc__.split("\n\n")[1].replace("\n", " ")
    parser.add_argument("--preset", default="minimind2-small", help="model preset name or YAML file")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument(
        "--max_seq_len", type=int, default=512, help="MiniMind's max_seq_len (2510 rows are one shorter)"
    )
    parser.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="sft",
        help="what every side trains: MiniMind's train_full_sft, train_lora, train_dpo (pairs built from the "
        "corpus) or train_distillation, with its script's defaults for the era (β, α, T, LoRA rank); grpo: one "
        "whole RL update against train_grpo.py; ppo: against train_ppo.py (bench/rl_update.py)",
    )
    parser.add_argument("--num_generations", type=int, default=4, help="grpo: completions per prompt")
    parser.add_argument("--max_gen_len", type=int, default=128, help="grpo: the most tokens of a completion")
    parser.add_argument(
        "--teacher_preset",
        default=None,
        help="distill: the teacher's preset or YAML (default: MiniMind's teacher for the era, "
        "--teacher_hidden_size and --teacher_num_layers of train_distillation.py)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side first (the first compiles)")
    parser.add_argument("--packing", action="store_true", help="our side trains on packed rows")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)",
    )
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch sides")
    parser.add_argument(
        "--minimind_dir",
        default=None,
        help="a MiniMind checkout of the preset's era (2510 for minimind2, v3 for minimind3): also "
        "time its own model/model_minimind.py, the baseline of the ratios",
    )
    parser.add_argument(
        "--torch_reference",
        type=int,
        choices=(0, 1),
        default=1,
        help="1 = time the project's torch reference (0 with --minimind_dir: only MiniMind's own "
        "model, which saves a process's memory on the big MoE presets)",
    )
    parser.add_argument(
        "--torch_compile",
        type=int,
        choices=(0, 1),
        default=0,
        help="1 = also time MiniMind's own model under torch.compile (v3's train_full_sft --use_compile 1), in a "
        "process of its own; needs --minimind_dir. Its compile_s: the extra time of the steps that compiled",
    )
    parser.add_argument(
        "--torch_compile_backend",
        default="inductor",
        help="torch.compile's backend for --torch_compile (inductor: torch's default; eager: dynamo's capture "
        "alone, a quick check of the plumbing)",
    )
    parser.add_argument(
        "--torch_python",
        default=sys.executable,
        help="interpreter of the PyTorch processes; with --minimind_dir it needs transformers (default: this one)",
    )
    parser.add_argument(
        "--fast_path",
        type=int,
        choices=(0, 1),
        default=1,
        help="as main.py sft: 1 = the backend's fastest exact step, 0 = MiniMind's literal computation",
    )
    parser.add_argument(
        "--loss_chunk_size",
        type=int,
        default=None,
        help="lm_head + CE only at loss positions, this many at a time; 0 = full logits (default: per --fast_path)",
    )
    parser.add_argument("--attention_impl", default=None, choices=ATTENTION_IMPLS, help="default: per --fast_path")
    parser.add_argument(
        "--scan_layers",
        type=int,
        choices=(0, 1),
        default=None,
        help="1 = the layers in lax.scan, 0 = unrolled (default: per --fast_path)",
    )
    parser.add_argument("--remat", default="none", choices=REMATS)
    parser.add_argument("--moe_impl", default="tiles", choices=MOE_IMPLS, help="as main.py sft's, for MoE presets")
    parser.add_argument(
        "--literal_row",
        type=int,
        choices=(0, 1),
        default=1,
        help="1 = also time MiniMind's literal computation (--fast_path 0) as a row; 0 = only the asked step, "
        "so the process's peak memory is that step's",
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="also run each fast-path switch on its own and all together (one row each)",
    )
    parser.add_argument(
        "--decode",
        action="store_true",
        help="also run generate.benchmark_decode on the preset in the bench's dtype, and with --minimind_dir "
        "MiniMind's own generate (bench/minimind_decode.py, own process) on the same prompts",
    )
    parser.add_argument("--decode_only", action="store_true", help="only the --decode benchmark, no train step")
    parser.add_argument(
        "--decode_batch_sizes", default=None, help="comma-separated batch sizes of --decode (default: 1,--batch_size)"
    )
    parser.add_argument("--decode_new_tokens", type=int, default=64, help="tokens generated per row by --decode")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=2,tensor=2 (default: all devices on data)")
    parser.add_argument(
        "--tokenizer_path",
        default=None,
        help="default: MiniMind's own (model/ of --minimind_dir) when there, else a SentencePiece "
        "tokenizer trained on the corpus",
    )
    parser.add_argument(
        "--data_dir",
        default=str(DEFAULT_DATA_DIR),
        help="corpus, tokenizer and tokenized cache are kept here between runs",
    )
    parser.add_argument("--num_records", type=int, default=2000, help="SFT records of the corpus to use")
    parser.add_argument(
        "--compilation_cache_dir",
        default=None,
        help="persistent XLA compilation cache (default: off, so compile_s is a cold compile)",
    )
    parser.add_argument(
        "--learning_rate", type=float, help=f"default: {STEP_LEARNING_RATE}; grpo, ppo: the script's for the era"
    )
    parser.add_argument("--seed", type=int, default=0)


# ---------------------------------------------------------------------------------------------------------
# What runs


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration of our train step; `name` says what it is (empty: only its settings)."""

    name: str
    packing: bool = False
    loss_chunk_size: int | None = None
    attention_impl: str = "xla"
    remat: str = "none"
    scan_layers: bool = True


def variants_for(args, platform: str, dtype: str, seq_len: int) -> list[Variant]:
    """The step the flags ask for (by default the one `main.py {--objective}` runs), MiniMind's literal computation, then
    (--ablation) each fast-path switch alone on the literal step, and the fast path with and without packing."""
    fast = fast_path_settings(platform, dtype, seq_len)
    default = Variant(f"default (main.py {args.objective})", **fast)
    literal = Variant("--fast_path 0 (MiniMind's literal)", **LITERAL_STEP)
    ablation = [
        Variant("literal + loss chunks", loss_chunk_size=fast["loss_chunk_size"]),
        Variant(f"literal + {fast['attention_impl']}", attention_impl=fast["attention_impl"]),
        Variant("literal + remat dots", remat="dots"),
        Variant("literal + unrolled", scan_layers=False),
        Variant("literal + packing", packing=True),
        default,
        Variant("default + packing", packing=True, **fast),
    ]
    given = {
        "attention_impl": args.attention_impl,
        "loss_chunk_size": args.loss_chunk_size,
        "scan_layers": None if args.scan_layers is None else bool(args.scan_layers),
    }
    asked = Variant(
        "",
        args.packing,
        remat=args.remat,
        **train_step_settings(bool(args.fast_path), platform, dtype, seq_len, **given),
    )
    asked = next((v for v in [literal, *ablation] if settings_of(v) == settings_of(asked)), asked)
    rows = [asked, *([literal] * args.literal_row), *(ablation if args.ablation else [])]
    return [v for i, v in enumerate(rows) if settings_of(v) not in map(settings_of, rows[:i])]


def settings_of(variant: Variant) -> tuple:
    return dataclasses.astuple(variant)[1:]


def describe(variant: Variant) -> str:
    """A row label: the variant's name, if it has one, and its settings."""
    parts = ["packed" if variant.packing else "padded"]
    parts.append(f"loss chunks {variant.loss_chunk_size}" if variant.loss_chunk_size else "full logits")
    parts.append(variant.attention_impl)
    if variant.remat != "none":
        parts.append(f"remat {variant.remat}")
    parts.append("scanned" if variant.scan_layers else "unrolled")
    return f"ours, {variant.name} ({', '.join(parts)})" if variant.name else f"ours ({', '.join(parts)})"


@dataclasses.dataclass
class StepRecord:
    seconds: float  # from asking for the batch until the step's outputs are ready
    data_wait: float  # of which blocked on the input iterator
    cpu_seconds: float  # CPU time of the process (all its threads) meanwhile
    tokens: int  # B·T positions
    loss_tokens: float  # positions carrying loss
    loss: float


# ---------------------------------------------------------------------------------------------------------
# Data


def bench_data(args) -> tuple[pathlib.Path, pathlib.Path, str]:
    """(jsonl of the first --num_records SFT records of the real chat corpus, or DPO pairs built from them;
    tokenizer path; its label)."""
    from minimind_jax.data.corpus import build_corpus, write_preference_pairs
    from minimind_jax.data.tokenizer import train_sentencepiece

    if args.num_records < 1:
        raise UserError(f"--num_records must be at least 1, got {args.num_records}")
    data_dir = pathlib.Path(args.data_dir)
    corpus_dir = data_dir / "corpus"
    if not (corpus_dir / "stats.json").exists():
        build_corpus(corpus_dir)
    subset = data_dir / f"sft_first_{args.num_records}.jsonl"
    if not subset.exists():
        with open(corpus_dir / "sft.jsonl", encoding="utf-8") as source:
            lines = [line for _, line in zip(range(args.num_records), source)]
        partial = subset.with_name(subset.name + ".tmp")
        partial.write_text("".join(lines), "utf-8")
        os.replace(partial, subset)
    data_path = subset
    if args.objective == "dpo":
        data_path = data_dir / f"dpo_first_{args.num_records}.jsonl"
        if not data_path.exists():
            write_preference_pairs(subset, data_path)

    tokenizer_path = args.tokenizer_path
    checkout_tokenizer = pathlib.Path(args.minimind_dir or "", "model")  # where a MiniMind checkout keeps it
    if tokenizer_path is None and args.minimind_dir and (checkout_tokenizer / "tokenizer.json").exists():
        tokenizer_path = checkout_tokenizer
    if tokenizer_path is None:
        model_file = data_dir / f"tokenizer_{args.num_records}.model"
        if not model_file.exists():
            train_sentencepiece([subset], model_file.with_suffix(""))
        return data_path, model_file, f"SentencePiece trained on {subset.name}"
    return data_path, pathlib.Path(tokenizer_path), str(tokenizer_path)


def bench_run_config(args, config, dtype: str, data_path, tokenizer_path, workdir: pathlib.Path):
    """The TrainConfig `main.py {--objective}` gets for this bench, with MiniMind's defaults for its script and
    era (β, α, T, LoRA rank, the teacher's sizes), and the initial weights it starts from, written to `workdir`
    as our checkpoints, which keep every field of the preset: init (the model of --preset, seeded), teacher
    (distill); and lora_init.pth, LoRA's adapters as MiniMind's file. Returns (TrainConfig, {name: (ModelConfig,
    params)} of those models)."""
    from flax import nnx

    from minimind_jax.model.config import ModelConfig, load_preset
    from minimind_jax.model.transformer import MiniMind
    from minimind_jax.training.config import TrainConfig, defaults_for
    from minimind_jax.training.run import attach_adapters
    from minimind_jax.weights import params_of
    from minimind_jax.weights.lora import save_lora
    from minimind_jax.weights.orbax import save_model_checkpoint

    fields = {
        **defaults_for(args.objective, config.arch),
        "mode": args.objective,
        "arch": config.arch,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "use_moe": int(config.use_moe),
        "num_attention_heads": config.num_attention_heads,
        "from_weight": str(workdir / "init"),
        "tokenizer_path": str(tokenizer_path),
        "data_path": str(data_path),
        "cache_dir": str(pathlib.Path(args.data_dir) / "cache"),
        "save_dir": str(workdir),
        "batch_size": args.batch_size,
        "max_seq_len": args.max_seq_len,
        "learning_rate": args.learning_rate or STEP_LEARNING_RATE,
        "seed": args.seed,
        "dtype": dtype,
        "moe_impl": args.moe_impl,
        "progress": False,
    }
    model = MiniMind(config, rngs=nnx.Rngs(args.seed))
    save_model_checkpoint(model, workdir / "init")
    models = {"init": (config, params_of(model))}
    if args.objective == "distill":
        cfg = TrainConfig(**fields)
        teacher_config = (
            load_preset(args.teacher_preset, dtype=dtype)
            if args.teacher_preset
            else ModelConfig(arch=config.arch, hidden_size=cfg.teacher_hidden_size,
                             num_hidden_layers=cfg.teacher_num_layers, use_moe=cfg.teacher_moe, dtype=dtype)
        )  # fmt: skip
        teacher = MiniMind(teacher_config, rngs=nnx.Rngs(args.seed + 1))
        save_model_checkpoint(teacher, workdir / "teacher")
        models["teacher"] = (teacher_config, params_of(teacher))
        fields.update(from_teacher_weight=str(workdir / "teacher"), teacher_hidden_size=teacher_config.hidden_size,
                      teacher_num_layers=teacher_config.num_hidden_layers, teacher_use_moe=int(teacher_config.use_moe))  # fmt: skip
    if args.objective == "lora":
        save_lora(attach_adapters(TrainConfig(**fields), model), workdir / "lora_init.pth")
        fields["from_lora"] = str(workdir / "lora_init.pth")
    return TrainConfig(**fields), models


def enough_epochs(dataset, args, packing: bool) -> int:
    """Epochs for the iterator to yield warmup + steps batches (DPO: of pairs; a short last batch is filled)."""
    from minimind_jax.data.pipeline import plan_rows

    if args.objective == "dpo":
        rows = len(dataset)
    else:
        plan = plan_rows(dataset, seed=args.seed, packing=packing)
        rows = len(dataset) if plan is None else len(plan)
    steps_per_epoch = math.ceil(rows / args.batch_size)
    return math.ceil((args.warmup + args.steps) / steps_per_epoch)


def bench_batches(run_cfg, dataset, args, packing: bool, sharding=None):
    """The batches `main.py {objective}` feeds its step, over enough epochs for the bench's turns."""
    from minimind_jax.training.run import run_batches

    cfg = dataclasses.replace(run_cfg, packing=packing, epochs=enough_epochs(dataset, args, packing))
    return run_batches(cfg, dataset, sharding)


# ---------------------------------------------------------------------------------------------------------
# The two sides


class JaxSide:
    """Our train step for one Variant, built as `main.py {objective}` builds it, with its own batch iterator."""

    def __init__(self, variant: Variant, run_cfg, dataset, mesh, args, watch: CompileWatch):
        import jax

        from minimind_jax.training import sharding
        from minimind_jax.training.compilation import planned_memory_bytes
        from minimind_jax.training.optimizer import make_optimizer
        from minimind_jax.training.run import attach_adapters, build_model, frozen_models, objective_for
        from minimind_jax.training.step import init_train_state, make_train_step

        step = {name: getattr(variant, name) for name in ("attention_impl", "loss_chunk_size", "scan_layers")}
        cfg = dataclasses.replace(run_cfg, remat=variant.remat)
        model = build_model(cfg, cfg.dtype, step)
        if cfg.mode == "lora":
            model = attach_adapters(cfg, model)
        objective = objective_for(cfg, model.config, step)
        # DPO and distillation read every position's logits: loss chunks are the next-token losses' alone.
        variant = dataclasses.replace(variant, loss_chunk_size=getattr(objective, "loss_chunk_size", None))
        self.name, self.variant, self.watch = describe(variant), variant, watch
        optimizer = make_optimizer(args.learning_rate or STEP_LEARNING_RATE)
        graphdef, self.params, self.opt_state, param_shardings, opt_shardings = init_train_state(
            model, optimizer, mesh, objective
        )
        frozen_graphdefs, self.frozen_params = frozen_models(cfg, graphdef, self.params, mesh, cfg.dtype, step)
        self.step_fn = make_train_step(
            graphdef,
            optimizer,
            mesh,
            objective=objective,
            frozen_graphdefs=frozen_graphdefs,
            param_shardings=param_shardings,
            opt_shardings=opt_shardings,
        )
        batch_sharding = sharding.batch_sharding(mesh)
        self.batches = bench_batches(cfg, dataset, args, variant.packing, batch_sharding)
        self.packing_stats = self.batches.stats
        self.key = jax.random.key_data(jax.random.key(args.seed))
        # Compiled ahead of the first step (which then reuses the executable): the compile time, and XLA's
        # own account of the step's memory (arguments + outputs + temporaries, donated buffers once).
        rows = 2 * args.batch_size if cfg.mode == "dpo" else args.batch_size
        batch = {
            key: jax.ShapeDtypeStruct(
                (rows,) if key == "pair_weight" else (rows, dataset.seq_len),
                "float32" if key in ("loss_mask", "pair_weight") else "int32",
                sharding=batch_sharding,
            )
            for key in objective.batch_fields
        }
        watch.reset()
        start = time.perf_counter()
        compiled = self.step_fn.lower(self.params, self.opt_state, [batch], self.key, self.frozen_params).compile()
        self.compile_s, self.compile_cache_hits = time.perf_counter() - start, watch.cache_hits
        self.memory_bytes = planned_memory_bytes(compiled)
        self.recompilations = 0

    def step(self) -> StepRecord:
        import jax
        import numpy as np

        self.watch.reset()
        start, cpu_start = time.perf_counter(), process_cpu_seconds()
        batch = next(self.batches)
        got_batch = time.perf_counter()
        self.params, self.opt_state, metrics = self.step_fn(
            self.params, self.opt_state, [batch], self.key, self.frozen_params
        )
        metrics = jax.device_get(jax.block_until_ready((self.params, metrics))[1])
        done = time.perf_counter()
        self.recompilations += self.watch.compiles
        return StepRecord(
            done - start,
            got_batch - start,
            process_cpu_seconds() - cpu_start,
            batch["inputs"].size,
            float(np.asarray(batch["loss_mask"]).sum()),  # DPO's metrics count pairs; both its sides carry loss
            float(metrics["loss"]),
        )

    def close(self) -> None:
        self.batches.close()


TORCH_SIDES = {  # model of TorchProcess: its row's name
    "reference": "PyTorch: project torch reference, own process",
    "minimind": "PyTorch: MiniMind's model_minimind.py, own process",
    "minimind_compiled": "PyTorch: MiniMind's model_minimind.py + torch.compile, own process",
}


def torch_process_env() -> dict[str, str]:
    """The environment of a PyTorch process: this package importable, and glibc's default malloc, as MiniMind's
    scripts run with."""
    env = {name: value for name, value in os.environ.items() if name not in runtime.KEEP_FREED_MEMORY_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")]))
    return env


class TorchProcess:
    """A PyTorch side in its own process (bench/torch_side.py): it builds the model, then takes one
    step each time it is asked, so the turns still alternate with ours; its step times are its own.
    Under torch.compile its first step compiles (and a later one may compile again, for new shapes):
    compile_s is the time of the steps that compiled less a steady step's each (the median of the others),
    and recompilations count the graphs compiled after the first step."""

    def __init__(self, model: str, run_cfg, models: dict, torch_batches: dict, args, workdir: pathlib.Path):
        """models: {"init": (ModelConfig, params)}, and "teacher" for distill (bench_run_config). The process
        starts here; wait_ready waits until it has built its model."""
        import numpy as np

        from minimind_jax.weights.mapping import state_dict_from_params

        self.name, self.compiled = TORCH_SIDES[model], model == "minimind_compiled"
        self.compile_s, self.recompilations, self.memory_bytes, self.compile_cache_hits = 0.0, 0, None, 0
        self.history: list[tuple[float, int]] = []  # (seconds, graphs compiled) of every step, warm-up included
        directory = workdir / model
        directory.mkdir()
        for name, (config, params) in models.items():
            state = state_dict_from_params(params, config)
            np.savez(directory / f"{name}.npz", **{key: np.asarray(value, np.float32) for key, value in state.items()})
        np.savez(directory / "batches.npz", **torch_batches)
        config = models["init"][0]
        spec = {
            "model": "reference" if model == "reference" else "minimind",
            "torch_compile": args.torch_compile_backend if self.compiled else None,
            "objective": run_cfg.mode,
            "arch": config.arch,
            "dtype": run_cfg.dtype,
            "learning_rate": args.learning_rate or STEP_LEARNING_RATE,
            "model_config": config.to_dict(),
            "minimind_config": minimind_config_fields(config),
            "minimind_dir": args.minimind_dir,
            "beta": run_cfg.beta,
            "alpha": run_cfg.alpha,
            "temperature": run_cfg.temperature,
            "lora_file": run_cfg.from_lora,
        }
        if "teacher" in models:
            spec["teacher_model_config"] = models["teacher"][0].to_dict()
            spec["teacher_minimind_config"] = minimind_config_fields(models["teacher"][0])
        (directory / "spec.json").write_text(json.dumps(spec))
        self.log_path = directory / "stderr.log"
        command = [args.torch_python, "-m", "minimind_jax.bench.torch_side", str(directory / "spec.json")]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=torch_process_env(), text=True
            )

    def wait_ready(self) -> None:
        self.info = {**self._receive()["ready"], "python": self.process.args[0]}

    def _receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise UserError(
                f"{self.name} ({self.process.args[0]}) exited with status {self.process.returncode}: {tail[0]}"
            )
        return json.loads(line)

    def step(self) -> StepRecord:
        try:
            self.process.stdin.write("step\n")
            self.process.stdin.flush()
        except BrokenPipeError:  # it has exited: _receive says why
            pass
        timing = self._receive()
        self.memory_bytes = timing.pop("memory_bytes")
        self.history.append((timing["seconds"], timing.pop("compiles")))
        if self.compiled:
            steady = [seconds for seconds, graphs in self.history if not graphs]
            steady_s = statistics.median(steady) if steady else min(seconds for seconds, _ in self.history)
            self.compile_s = sum(seconds - steady_s for seconds, graphs in self.history if graphs)
            self.recompilations = sum(graphs for _, graphs in self.history[1:])
        return StepRecord(**timing)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # end of input: the process exits
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def minimind_config_fields(config) -> dict[str, Any]:
    """The ModelConfig fields that are MiniMind's own (those before `dtype`), for its MiniMindConfig."""
    names = [field.name for field in dataclasses.fields(config)]
    return {name: getattr(config, name) for name in names[: names.index("dtype")]}


def minimind_checkout_arch(minimind_dir: str) -> str:
    """The arch of a MiniMind checkout's model code: 2510's config has n_routed_experts, v3's num_experts."""
    path = pathlib.Path(minimind_dir, "model", "model_minimind.py")
    if not path.is_file():
        raise UserError(f"--minimind_dir {minimind_dir}: no model/model_minimind.py there (a MiniMind checkout?)")
    return "minimind2" if "n_routed_experts" in path.read_text(encoding="utf-8") else "minimind3"


def padded_batches(run_cfg, dataset, args) -> dict:
    """warmup + steps of MiniMind's padded batches, stacked [steps, rows, T]: the same ones our padded side
    sees (DPO: each pair's chosen row, then its rejected row)."""
    import numpy as np

    batches = bench_batches(run_cfg, dataset, args, packing=False)
    try:
        taken = [next(batches) for _ in range(args.warmup + args.steps)]
    finally:
        batches.close()
    return {key: np.stack([np.asarray(batch[key]) for batch in taken]) for key in ("inputs", "targets", "loss_mask")}


def take_turns(sides: list, warmup: int, steps: int, progress, after_turn=lambda: None) -> dict[str, list[StepRecord]]:
    """Each side steps once per turn, in order; the first `warmup` turns are not kept."""
    records = {side.name: [] for side in sides}
    for turn in range(warmup + steps):
        for side in sides:
            record = side.step()
            progress(f"turn {turn + 1}/{warmup + steps} {side.name}: {record.seconds:.2f}s loss {record.loss:.4f}")
            if turn >= warmup:
                records[side.name].append(record)
        after_turn()
    return records


class PeakFlops:
    """The device's peak for MFU. On CPU the matmul peak is measured again after every turn and the best is
    kept: measured once on a machine busy with other work it can come out low enough to put MFU above 100%."""

    def __init__(self, dtype: str, platform: str):
        from minimind_jax.training.perf import measured_matmul_peak, total_peak_flops

        self.dtype, self.remeasure = dtype, platform == "cpu"
        self.measure = measured_matmul_peak.__wrapped__  # uncached: a fresh measurement each call
        self.flops, self.source = total_peak_flops(dtype)
        if self.remeasure:
            self.source = "best 2048² matmul on this CPU, measured between turns"

    def update(self) -> None:
        if self.remeasure:
            self.flops = max(self.flops, self.measure(self.dtype))


# ---------------------------------------------------------------------------------------------------------
# Figures


def side_figures(records: list[StepRecord], flops_per_token: float, peak_flops: float) -> dict[str, Any]:
    step_s = statistics.median(r.seconds for r in records)
    tokens_per_s = statistics.median(r.tokens / r.seconds for r in records)
    return {
        "step_s": step_s,
        "cpu_s": statistics.median(r.cpu_seconds for r in records),
        "tokens_per_s": tokens_per_s,
        "loss_tokens_per_s": statistics.median(r.loss_tokens / r.seconds for r in records),
        "mfu": tokens_per_s * flops_per_token / peak_flops,
        "data_wait_fraction": sum(r.data_wait for r in records) / sum(r.seconds for r in records),
        "loss_fraction": sum(r.loss_tokens for r in records) / sum(r.tokens for r in records),
        "step_s_spread": (max(r.seconds for r in records) - min(r.seconds for r in records)) / step_s,
        "losses": [r.loss for r in records],
    }


def ratio_figures(ours: list[StepRecord], theirs: list[StepRecord]) -> dict[str, float]:
    """Speed ratios to the baseline from steps taken in the same turn (paired, so shared-machine load cancels)."""
    tokens = [(o.tokens / o.seconds) / (t.tokens / t.seconds) for o, t in zip(ours, theirs)]
    loss_tokens = [(o.loss_tokens / o.seconds) / (t.loss_tokens / t.seconds) for o, t in zip(ours, theirs)]
    cpu = [(t.cpu_seconds / t.tokens) / (o.cpu_seconds / o.tokens) for o, t in zip(ours, theirs)]
    return {
        "speedup": statistics.median(tokens),
        "loss_tokens_speedup": statistics.median(loss_tokens),
        "cpu_speedup": statistics.median(cpu),
        "noise": {
            "speedup_min": min(tokens),
            "speedup_max": max(tokens),
            "loss_tokens_speedup_min": min(loss_tokens),
            "loss_tokens_speedup_max": max(loss_tokens),
        },
    }


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_memory_bytes(platform: str) -> int:
    """Host RSS high-water mark of this process on CPU; the devices' peak bytes in use on accelerators."""
    import jax

    if platform == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return sum((device.memory_stats() or {}).get("peak_bytes_in_use", 0) for device in jax.local_devices())


def memory_limit_bytes(platform: str) -> int | None:
    """What the devices' allocators may take in all (JAX's bytes_limit); None on CPU."""
    import jax

    if platform == "cpu":
        return None
    return sum((device.memory_stats() or {}).get("bytes_limit", 0) for device in jax.local_devices())


def _ratio(row: dict, key: str, low: str, high: str) -> str:
    if key not in row:
        return "-"
    return f"{row[key]:.2f} ({row['noise'][low]:.2f}-{row['noise'][high]:.2f})"


TABLE_COLUMNS = (  # header, width, cell
    ("side", -78, lambda r: r["name"][:78]),
    ("step s", 7, lambda r: f"{r['step_s']:.2f}"),
    ("tokens/s", 9, lambda r: f"{r['tokens_per_s']:,.0f}"),
    ("loss tok/s", 10, lambda r: f"{r['loss_tokens_per_s']:,.0f}"),
    ("× baseline (min-max)", 20, lambda r: _ratio(r, "speedup", "speedup_min", "speedup_max")),
    (
        "loss tok × baseline",
        20,
        lambda r: _ratio(r, "loss_tokens_speedup", "loss_tokens_speedup_min", "loss_tokens_speedup_max"),
    ),
    ("CPU-time ×", 10, lambda r: f"{r['cpu_speedup']:.2f}" if "cpu_speedup" in r else "-"),
    ("MFU", 6, lambda r: f"{r['mfu']:.1%}"),
    ("compile s", 9, lambda r: f"{r['compile_s']:.1f}"),
    ("recomp", 6, lambda r: str(r["recompilations"])),
    ("data wait", 9, lambda r: f"{r['data_wait_fraction']:.1%}"),
    ("step MB", 7, lambda r: f"{r['memory_bytes'] / 2**20:,.0f}" if r.get("memory_bytes") else "-"),
)


def table_rows(rows: list[dict]) -> list[str]:
    def line(cells):
        return " ".join(
            f"{cell:<{-width}}" if width < 0 else f"{cell:>{width}}"
            for cell, (_, width, _) in zip(cells, TABLE_COLUMNS)
        )

    header = line([name for name, _, _ in TABLE_COLUMNS])
    return [header, "-" * len(header)] + [line([cell(row) for _, _, cell in TABLE_COLUMNS]) for row in rows]


def objective_label(setup: dict[str, Any]) -> str:
    """What the step trains, as MiniMind's script names it."""
    script = {"sft": "train_full_sft", "lora": "train_lora", "dpo": "train_dpo", "distill": "train_distillation"}
    label = f"{script[setup['objective']]} step"
    return label + (f" (teacher {setup['teacher']})" if setup.get("teacher") else "")


def format_table(result: dict[str, Any]) -> str:
    setup = result["setup"]
    lines = [
        f"{objective_label(setup)}: {setup['preset']} ({setup['arch']}, {setup['params'] / 1e6:.1f}M params), "
        f"batch {setup['batch_size']}{' pairs' if setup['objective'] == 'dpo' else ''} × "
        f"{setup['seq_len']} positions, {setup['dtype']}, {setup['devices']} × {setup['device_kind']} "
        f"(mesh {setup['mesh']}), peak {setup['peak_flops'] / 1e9:,.0f} GFLOP/s ({setup['peak_flops_source']})",
        f"data: {setup['records']} {'DPO pairs built from SFT' if setup['objective'] == 'dpo' else 'SFT'} records "
        f"of the chat corpus, tokenizer {setup['tokenizer']}; loss-bearing "
        f"positions {setup['padded_loss_fraction']:.1%} of padded rows"
        + (f", {setup['packed_loss_fraction']:.1%} of packed" if setup["packed_loss_fraction"] is not None else ""),
        f"{setup['steps']} timed steps per side after {setup['warmup']} warm-up, sides taking turns; medians, and "
        f"the range of the per-turn ratios to the baseline ({result['baseline'] or 'none: --no_torch'}); "
        f"CPU-time ×: the baseline's process CPU seconds per token over the row's",
        f"ours: this process (pid {setup['pid']}), malloc {setup['malloc_env'] or 'glibc defaults'}",
        *(
            f"{side['name']}: pid {side['pid']}, {side['model_class']}, torch {side['torch']} on {side['device']} with "
            f"{side['threads']} threads, {side['python']}, glibc default malloc"
            for side in setup["torch_processes"]
        ),
        "",
    ]
    lines += table_rows(result["rows"])
    lines += [f"{row['name']}: could not run here ({row['error']})" for row in result.get("failed_variants", [])]
    lines.append(f"process peak memory {result['peak_memory_bytes'] / 2**20:,.0f} MB ({result['peak_memory_source']})")
    return "\n".join(lines + decode_lines(result))


def decode_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for row in result.get("decode", []):
        line = (
            f"decode batch {row['batch']}: {row['tokens_per_s']:,.1f} tokens/s "
            f"(decode loop {row['decode_tokens_per_s']:,.1f}), prefill {row['prefill_s']:.3f}s, "
            f"compile {row['compile_s']:.1f}s"
        )
        if "minimind_tokens_per_s" in row:
            line += f"; MiniMind's generate {row['minimind_tokens_per_s']:,.1f} tokens/s, ours × {row['speedup']:.2f}"
        lines.append(line)
    if result.get("minimind_decode_error"):
        lines.append(f"MiniMind's generate could not run: {result['minimind_decode_error']}")
    return lines


# ---------------------------------------------------------------------------------------------------------
# Decode

DECODE_PROMPT_LEN = 64


def decode_batch_sizes(args) -> tuple[int, ...]:
    if args.decode_batch_sizes is None:
        return (1, args.batch_size)
    try:
        sizes = tuple(int(size) for size in args.decode_batch_sizes.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise UserError(f"--decode_batch_sizes {args.decode_batch_sizes}: comma-separated positive integers")
    return sizes


def decode_figures(args, config, progress) -> dict[str, Any]:
    """{"decode": benchmark_decode's rows for the preset in the bench's dtype (config.dtype)}; with --minimind_dir
    each row also has MiniMind's own generate's tokens/s on the same prompts and our speedup over it, and the
    result "minimind_decode" (that process's info) or "minimind_decode_error" (why it could not run)."""
    import yaml

    from minimind_jax.inference.generation import benchmark_decode

    sizes, result = decode_batch_sizes(args), {}
    with tempfile.TemporaryDirectory(prefix="minimind_jax_decode_") as workdir:
        fields = {name: list(value) if isinstance(value, tuple) else value for name, value in config.to_dict().items()}
        preset = pathlib.Path(workdir, "preset.yaml")  # the preset's fields with the bench's dtype
        preset.write_text(yaml.safe_dump(fields))
        progress(f"decode benchmark: ours, batch sizes {sizes}")
        rows = benchmark_decode(str(preset), sizes, DECODE_PROMPT_LEN, args.decode_new_tokens, args.seed)
        for row in rows:
            row["preset"] = args.preset
        result["decode"] = rows
        if args.minimind_dir:
            progress("decode benchmark: MiniMind's generate, own process")
            spec = {
                "minimind_dir": args.minimind_dir,
                "minimind_config": minimind_config_fields(config),
                "dtype": config.dtype,
                "batch_sizes": list(sizes),
                "prompt_len": DECODE_PROMPT_LEN,
                "new_tokens": args.decode_new_tokens,
                "seed": args.seed,
            }
            result.update(minimind_decode(args.torch_python, spec, pathlib.Path(workdir)))
    for row, theirs in zip(rows, result.get("minimind_decode", {}).get("rows", [])):
        row["minimind_tokens_per_s"] = theirs["tokens_per_s"]
        row["minimind_decode_tokens_per_s"] = theirs["decode_tokens_per_s"]
        row["speedup"] = row["tokens_per_s"] / theirs["tokens_per_s"]
    return result


def minimind_decode(python: str, spec: dict, workdir: pathlib.Path) -> dict[str, Any]:
    """{"minimind_decode": MiniMind's generate timed by bench/minimind_decode.py in a process of its own}, or
    {"minimind_decode_error": its last line of stderr}: the rest of the bench's figures stand without it."""
    (workdir / "minimind_decode.json").write_text(json.dumps(spec))
    command = [python, "-m", "minimind_jax.bench.minimind_decode", str(workdir / "minimind_decode.json")]
    done = subprocess.run(command, capture_output=True, text=True, env=torch_process_env())
    if done.returncode:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"minimind_decode_error": f"exit status {done.returncode}: {tail[0]}"}
    return {"minimind_decode": json.loads(done.stdout)}


# ---------------------------------------------------------------------------------------------------------
# Entry point


def run(args) -> int:
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        raise UserError("--batch_size and --steps must be at least 1 and --warmup at least 0")
    if args.loss_chunk_size is not None and args.loss_chunk_size < 0:
        raise UserError(f"--loss_chunk_size must be at least 0 (0: full logits), got {args.loss_chunk_size}")
    if args.minimind_dir and args.no_torch:
        raise UserError("--minimind_dir times a PyTorch side, which --no_torch leaves out")
    if args.torch_compile and not args.minimind_dir:
        raise UserError("--torch_compile compiles MiniMind's own model: it needs --minimind_dir")
    if args.decode or args.decode_only:
        decode_batch_sizes(args)  # a bad list is refused before anything runs
        if args.decode_new_tokens < 1:
            raise UserError(f"--decode_new_tokens must be at least 1, got {args.decode_new_tokens}")
    if not args.no_torch and shutil.which(args.torch_python) is None:
        raise UserError(f"--torch_python {args.torch_python}: not an executable")
    import jax

    if args.compilation_cache_dir:  # off by default, so compile_s is a cold compile
        from minimind_jax.runtime import use_compilation_cache

        use_compilation_cache(args.compilation_cache_dir, cache_every_compile=True)
    from minimind_jax.model.config import default_dtype, load_preset, num_params
    from minimind_jax.training import sharding
    from minimind_jax.training.compilation import CompileWatch
    from minimind_jax.training.perf import objective_flops_per_token
    from minimind_jax.training.run import load_run_data

    progress = lambda message: print(message, file=sys.stderr, flush=True)
    platform = jax.devices()[0].platform
    dtype = args.dtype or default_dtype(platform)
    try:
        config = load_preset(args.preset, dtype=dtype)
    except (UserError, ValueError) as error:
        raise UserError(f"--preset {args.preset}: {error}") from None
    checkout_arch = minimind_checkout_arch(args.minimind_dir) if args.minimind_dir else config.arch
    if checkout_arch != config.arch:
        raise UserError(
            f"--minimind_dir {args.minimind_dir} holds MiniMind's {checkout_arch} model code but --preset "
            f"{args.preset} is {config.arch}; use a checkout of that era (minimind2: 2510, commit "
            f"6b86ea3; minimind3: v3)"
        )
    if args.decode_only:
        result = {"setup": {"preset": args.preset, "dtype": dtype, "device_kind": jax.devices()[0].device_kind}}
        result.update(decode_figures(args, config, progress))
        print(json.dumps(result) if args.json else "\n".join(decode_lines(result)))
        return 0
    mesh = sharding.make_mesh(args.mesh)
    if args.batch_size % sharding.batch_size_per_step(mesh):
        raise UserError(
            f"--batch_size {args.batch_size} is not divisible by the data-parallel size "
            f"{sharding.batch_size_per_step(mesh)} of mesh {dict(mesh.shape)}"
        )
    data_path, tokenizer_path, tokenizer_label = bench_data(args)
    peak = PeakFlops(dtype, platform)
    torch_models = (
        []
        if args.no_torch
        else ["reference"] * args.torch_reference
        + ["minimind"] * bool(args.minimind_dir)
        + ["minimind_compiled"] * args.torch_compile
    )

    watch = CompileWatch()
    jax_sides, torch_sides, failed = [], [], []
    with tempfile.TemporaryDirectory(prefix="minimind_jax_bench_") as workdir:
        try:
            run_cfg, models = bench_run_config(args, config, dtype, data_path, tokenizer_path, pathlib.Path(workdir))
            dataset = load_run_data(run_cfg, run_cfg.data_path, config)
            teacher_config = models["teacher"][0] if "teacher" in models else None
            flops_per_token = objective_flops_per_token(config, dataset.seq_len, args.objective, teacher_config)
            torch_batches = padded_batches(run_cfg, dataset, args) if torch_models else None
            for model in torch_models:  # first, so that a PyTorch environment that cannot run fails fast
                progress(f"starting a PyTorch process: {model}")
                torch_sides.append(TorchProcess(model, run_cfg, models, torch_batches, args, pathlib.Path(workdir)))
            for side in torch_sides:  # they start side by side
                side.wait_ready()
            for index, variant in enumerate(variants_for(args, platform, dtype, dataset.seq_len)):
                progress(f"building our step: {describe(variant)}")
                try:
                    try:  # a setting this dtype cannot run is refused in the config's own words
                        config.replace(attention_impl=variant.attention_impl, remat=variant.remat)
                    except ValueError as error:
                        raise UserError(str(error)) from None
                    jax_sides.append(JaxSide(variant, run_cfg, dataset, mesh, args, watch))
                except Exception as error:  # an ablation variant this device cannot run is reported, not fatal
                    if index == 0:
                        raise
                    message = " ".join(f"{type(error).__name__}: {error}".split())[:300]
                    failed.append(
                        {"name": describe(variant), "settings": dataclasses.asdict(variant), "error": message}
                    )
                    progress(f"  failed: {message}")
            sides = jax_sides + torch_sides
            records = take_turns(sides, args.warmup, args.steps, progress, after_turn=peak.update)
        finally:
            watch.close()
            for side in jax_sides + torch_sides:
                side.close()

    # MiniMind's own model in eager mode when it runs, else the reference.
    baseline = next((side for side in reversed(torch_sides) if not side.compiled), None)
    rows = []
    for side in sides:
        row = {
            "name": side.name,
            **side_figures(records[side.name], flops_per_token, peak.flops),
            "compile_s": side.compile_s,
            "compile_cache_hits": side.compile_cache_hits,
            "recompilations": side.recompilations,
            "memory_bytes": side.memory_bytes,
        }
        if isinstance(side, JaxSide):
            row["settings"] = dataclasses.asdict(side.variant)
        if baseline is not None and side is not baseline:
            row.update(ratio_figures(records[side.name], records[baseline.name]))
        rows.append(row)
    from minimind_jax.data.pipeline import packing_stats, plan_rows

    if args.objective == "dpo":  # pairs are never packed
        padded = {"loss_fraction": float(dataset.loss_mask.mean())}
        packed = {"loss_fraction": None, "token_fraction": None}
    else:
        padded = next((s.packing_stats for s in jax_sides if not s.variant.packing), None)
        packed = next((s.packing_stats for s in jax_sides if s.variant.packing), None)
        padded = padded or packing_stats(dataset, None)
        packed = packed or packing_stats(dataset, plan_rows(dataset, seed=args.seed, packing=True))
    main_row = rows[0]
    torch_row = next(row for row in rows if row["name"] == baseline.name) if baseline else None
    platform_memory = "host RSS (getrusage)" if platform == "cpu" else "peak_bytes_in_use of the devices"
    result = {
        "tokens_per_s": main_row["tokens_per_s"],
        "loss_tokens_per_s": main_row["loss_tokens_per_s"],
        "baseline": baseline.name if baseline else None,
        "torch_tokens_per_s": torch_row["tokens_per_s"] if torch_row else None,
        "torch_loss_tokens_per_s": torch_row["loss_tokens_per_s"] if torch_row else None,
        "speedup": main_row.get("speedup"),
        "loss_tokens_speedup": main_row.get("loss_tokens_speedup"),
        "compile_s": main_row["compile_s"],
        "recompilations": main_row["recompilations"],
        "peak_memory_bytes": peak_memory_bytes(platform),
        "peak_memory_source": platform_memory,
        "memory_limit_bytes": memory_limit_bytes(platform),
        "mfu": main_row["mfu"],
        "torch_mfu": torch_row["mfu"] if torch_row else None,
        "data_wait_fraction": main_row["data_wait_fraction"],
        "setup": {
            "objective": args.objective,
            "teacher": (
                f"{teacher_config.hidden_size} × {teacher_config.num_hidden_layers}"
                f"{' MoE' if teacher_config.use_moe else ''}, {num_params(teacher_config) / 1e6:.1f}M params"
                if teacher_config
                else None
            ),
            "preset": args.preset,
            "arch": config.arch,
            "moe_impl": args.moe_impl if config.use_moe else None,
            "params": num_params(config),
            "dtype": dtype,
            "batch_size": args.batch_size,
            "seq_len": dataset.seq_len,
            "steps": args.steps,
            "warmup": args.warmup,
            "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind,
            "platform": platform,
            "mesh": dict(mesh.shape),
            "peak_flops": peak.flops,
            "peak_flops_source": peak.source,
            "flops_per_token": flops_per_token,
            "records": len(dataset),
            "tokenizer": tokenizer_label,
            "padded_loss_fraction": padded["loss_fraction"],
            "packed_loss_fraction": packed["loss_fraction"],
            "packed_token_fraction": packed["token_fraction"],
            "torch_processes": [{"name": side.name, **side.info} for side in torch_sides],
            "minimind_dir": args.minimind_dir,
            "cpu_count": os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "pid": os.getpid(),
            # Our side's allocator settings (main.py sets them; see minimind_jax.malloc).
            "malloc_env": runtime.current_settings(),
            "compilation_cache_dir": args.compilation_cache_dir,
        },
        "rows": rows,
        "failed_variants": failed,
    }
    if args.decode:
        result.update(decode_figures(args, config, progress))
    print(json.dumps(result) if args.json else format_table(result))
    return 0
