"""`python main.py bench`: our SFT train step against PyTorch MiniMind's, side by side, in one run.

Both sides train the same model (same preset and initial weights) on the same real chat batches
(chatterbot-corpus + chitchat-dataset through MiniMind's tokenizer) with the same masked loss:
- ours: `train.make_train_step` + `init_train_state` on a mesh of every present device, on MiniMind's padded
  rows or on packed rows (--packing), with the fast-path switches below;
- PyTorch: `torch_reference.sft_step`, MiniMind's train_full_sft step in eager mode (forward, masked CE,
  backward, clip_grad_norm, AdamW), always on MiniMind's padded rows, with bf16 autocast under
  --dtype bfloat16, on CUDA when there is a GPU.

The sides take turns step by step (and so do the variants of --ablation), so a machine that is busy with
other work slows all of them alike; every figure is the median over the timed steps, after warm-up.
Per side: tokens/s (all B·T positions), loss tokens/s (positions that carry loss), the ratio to PyTorch
(with `noise`, the spread of the per-turn ratios), the ratio of CPU time per token (on CPU, less sensitive
to other load), MFU (model FLOPs / the device's peak from `perf`), compile time (trace, lower and XLA compile,
ahead of the first step), compiles during the steps (must be 0), the step's memory (XLA's account for ours,
torch.cuda.max_memory_allocated for torch on GPU) and the fraction of the step spent waiting for the input
iterator.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import resource
import statistics
import sys
import time
from typing import Any

from minimind_jax import malloc
from minimind_jax.config import ATTENTION_IMPLS
from minimind_jax.errors import UserError

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_TOKENIZERS = {"minimind2": REPO_ROOT.parent / "shared" / "minimind" / "2510",
                     "minimind3": REPO_ROOT.parent / "shared" / "minimind" / "v3"}
DEFAULT_DATA_DIR = pathlib.Path.home() / ".cache" / "minimind_jax" / "bench"
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def add_arguments(parser: argparse.ArgumentParser, command: str = "bench") -> None:
    parser.description = __doc__.split("\n\n")[1].replace("\n", " ")
    parser.add_argument("--preset", default="minimind2-small", help="model preset name or YAML file")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_len", type=int, default=512, help="MiniMind's max_seq_len (2510 rows are one shorter)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side first (the first compiles)")
    parser.add_argument("--packing", action="store_true", help="our side trains on packed rows")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch side")
    parser.add_argument("--loss_chunk_size", type=int, default=None,
                        help="lm_head + CE only at loss positions, this many at a time (default: full logits)")
    parser.add_argument("--attention_impl", default="xla", choices=ATTENTION_IMPLS)
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    parser.add_argument("--unroll_layers", action="store_true",
                        help="run the layers unrolled instead of with lax.scan (ModelConfig.scan_layers=False)")
    parser.add_argument("--ablation", action="store_true",
                        help="also run each fast-path switch on its own and all together (one row each)")
    parser.add_argument("--decode", action="store_true", help="also run generate.benchmark_decode on the preset")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=2,tensor=2 (default: all devices on data)")
    parser.add_argument("--tokenizer_path", default=None,
                        help="default: ../shared/minimind/{2510|v3} when present, else a SentencePiece "
                             "tokenizer trained on the corpus")
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR),
                        help="corpus, tokenizer and tokenized cache are kept here between runs")
    parser.add_argument("--num_records", type=int, default=2000, help="SFT records of the corpus to use")
    parser.add_argument("--compilation_cache_dir", default=None,
                        help="persistent XLA compilation cache (default: off, so compile_s is a cold compile)")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)


# ---------------------------------------------------------------------------------------------------------
# What runs


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration of our train step."""

    name: str
    packing: bool = False
    loss_chunk_size: int | None = None
    attention_impl: str = "xla"
    remat: str = "none"
    unroll_layers: bool = False


def variants_for(args, platform: str) -> list[Variant]:
    """The variant the flags ask for, then (--ablation) each fast-path switch alone and all of them together."""
    asked = Variant("", args.packing, args.loss_chunk_size, args.attention_impl, args.remat, args.unroll_layers)
    if not args.ablation:
        return [asked]
    chunk = args.loss_chunk_size or 512
    attention = "cudnn" if platform == "gpu" and (args.dtype or "bfloat16") != "float32" else "causal_blocks"
    rows = [
        Variant("baseline: padded, full logits, xla attention"),
        Variant(f"loss positions only (chunk {chunk})", loss_chunk_size=chunk),
        Variant(f"attention {attention}", attention_impl=attention),
        Variant("remat dots", remat="dots"),
        Variant("layers unrolled", unroll_layers=True),
        Variant("packing", packing=True),
    ]
    # Unrolling helps XLA:CPU (no stacked activation buffers); on accelerators scan keeps compiles short.
    unroll = platform == "cpu"
    switches = f"loss positions + {attention}{' + unrolled' if unroll else ''}"
    rows.append(Variant(f"padded (MiniMind's rows): {switches}", False, chunk, attention, unroll_layers=unroll))
    rows.append(Variant(f"all: packing + {switches}", True, chunk, attention, unroll_layers=unroll))
    settings = lambda v: dataclasses.astuple(v)[1:]
    return [asked] + [v for v in rows if settings(v) != settings(asked)]


def describe(variant: Variant) -> str:
    """A row label: the variant's own name, or its settings."""
    if variant.name:
        return variant.name
    parts = ["packed" if variant.packing else "padded"]
    parts.append(f"loss positions (chunk {variant.loss_chunk_size})" if variant.loss_chunk_size else "full logits")
    parts.append(f"{variant.attention_impl} attention")
    if variant.remat != "none":
        parts.append(f"remat {variant.remat}")
    if variant.unroll_layers:
        parts.append("unrolled")
    return "ours: " + ", ".join(parts)


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


def bench_dataset(args, arch: str):
    """(TokenizedDataset of the first --num_records SFT records of the real chat corpus, tokenizer label)."""
    from minimind_jax.corpus import build_corpus
    from minimind_jax.data import ExampleConfig, load_dataset
    from minimind_jax.tokenizer import load_tokenizer, train_sentencepiece

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

    tokenizer_path = args.tokenizer_path
    if tokenizer_path is None and SHARED_TOKENIZERS[arch].exists():
        tokenizer_path = SHARED_TOKENIZERS[arch]
    if tokenizer_path is None:
        model_file = data_dir / f"tokenizer_{args.num_records}.model"
        if not model_file.exists():
            train_sentencepiece([subset], model_file.with_suffix(""))
        tokenizer_path, label = model_file, f"SentencePiece trained on {subset.name}"
    else:
        label = str(tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.arch is not None and tokenizer.arch != arch:
        raise UserError(f"--tokenizer_path {tokenizer_path} is the {tokenizer.arch} tokenizer but --preset "
                        f"{args.preset} is {arch}")
    examples = ExampleConfig(kind="sft", arch=arch, max_seq_len=args.max_seq_len)
    dataset = load_dataset(subset, tokenizer, examples, cache_dir=data_dir / "cache", progress=False)
    return dataset, label


def enough_epochs(dataset, args, packing: bool) -> int:
    """Epochs for the iterator to yield warmup + steps batches."""
    from minimind_jax.pipeline import plan_rows

    rows = plan_rows(dataset, seed=args.seed, packing=packing)
    steps_per_epoch = (len(dataset) if rows is None else len(rows)) // args.batch_size
    if steps_per_epoch < 1:
        raise UserError(f"--num_records {args.num_records} gives fewer rows than --batch_size {args.batch_size}")
    return math.ceil((args.warmup + args.steps) / steps_per_epoch)


# ---------------------------------------------------------------------------------------------------------
# The two sides


class CompileWatch:
    """Counts XLA compiles and persistent-cache hits since the last reset (JAX's monitoring events)."""

    def __init__(self):
        import jax

        self.reset()
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def reset(self) -> None:
        self.compiles, self.cache_hits = 0, 0

    def _on_duration(self, event: str, duration: float, **_) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.compiles += 1

    def _on_event(self, event: str, **_) -> None:
        if event == CACHE_HIT_EVENT:
            self.cache_hits += 1

    def close(self) -> None:
        import jax

        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)


class JaxSide:
    """Our train step for one Variant, with its own batch iterator."""

    def __init__(self, variant: Variant, config, dataset, init_params, mesh, args, watch: CompileWatch):
        import jax

        from minimind_jax import sharding
        from minimind_jax.pipeline import BATCH_KEYS, make_batches
        from minimind_jax.train import init_train_state, make_optimizer, make_train_step
        from minimind_jax.weights import model_from_params

        self.name, self.variant, self.watch = describe(variant), variant, watch
        self.config = config.replace(remat=variant.remat, attention_impl=variant.attention_impl,
                                     scan_layers=not variant.unroll_layers)
        optimizer = make_optimizer(args.learning_rate)
        graphdef, self.params, self.opt_state, param_shardings, opt_shardings = init_train_state(
            model_from_params(self.config, init_params), optimizer, mesh)
        self.step_fn = make_train_step(graphdef, optimizer, mesh, loss_chunk_size=variant.loss_chunk_size,
                                       param_shardings=param_shardings, opt_shardings=opt_shardings)
        batch_sharding = sharding.batch_sharding(mesh)
        self.batches = make_batches(dataset, batch_size=args.batch_size, seed=args.seed,
                                    epochs=enough_epochs(dataset, args, variant.packing), packing=variant.packing,
                                    sharding=batch_sharding)
        self.packing_stats = self.batches.stats
        self.key = jax.random.key_data(jax.random.key(args.seed))
        # Compiled ahead of the first step (which then reuses the executable): the compile time, and XLA's
        # own account of the step's memory (arguments + outputs + temporaries, donated buffers once).
        shape = (args.batch_size, dataset.seq_len)
        batch = {key: jax.ShapeDtypeStruct(shape, "float32" if key == "loss_mask" else "int32", sharding=batch_sharding)
                 for key in BATCH_KEYS}
        watch.reset()
        start = time.perf_counter()
        stats = self.step_fn.lower(self.params, self.opt_state, [batch], self.key).compile().memory_analysis()
        self.compile_s, self.compile_cache_hits = time.perf_counter() - start, watch.cache_hits
        self.memory_bytes = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
                             - stats.alias_size_in_bytes)
        self.recompilations = 0

    def step(self) -> StepRecord:
        import jax

        self.watch.reset()
        start, cpu_start = time.perf_counter(), process_cpu_seconds()
        batch = next(self.batches)
        got_batch = time.perf_counter()
        self.params, self.opt_state, metrics = self.step_fn(self.params, self.opt_state, [batch], self.key)
        metrics = jax.device_get(jax.block_until_ready((self.params, metrics))[1])
        done = time.perf_counter()
        self.recompilations += self.watch.compiles
        return StepRecord(done - start, got_batch - start, process_cpu_seconds() - cpu_start, batch["inputs"].size,
                          float(metrics["loss_tokens"]), float(metrics["loss"]))

    def close(self) -> None:
        self.batches.close()


class TorchSide:
    """MiniMind's train_full_sft step in eager PyTorch on padded rows (same weights, batches and loss)."""

    name = "pytorch (MiniMind eager)"

    def __init__(self, config, dataset, init_params, args, dtype: str):
        import numpy as np
        import torch

        from minimind_jax.weights.mapping import state_dict_from_params
        from minimind_jax.pipeline import make_batches
        from minimind_jax.torch_reference import MiniMindTorch, make_optimizer

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = MiniMindTorch(config).to(self.device)
        state = state_dict_from_params(init_params, config)
        self.model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()})
        self.optimizer = make_optimizer(self.model, args.learning_rate)
        self.learning_rate = args.learning_rate
        self.autocast = torch.bfloat16 if dtype == "bfloat16" else None
        self.batches = make_batches(dataset, batch_size=args.batch_size, seed=args.seed,
                                    epochs=enough_epochs(dataset, args, False), packing=False)
        self.compile_s, self.recompilations, self.memory_bytes, self.compile_cache_hits = 0.0, 0, None, 0

    def step(self) -> StepRecord:
        from minimind_jax.torch_reference import sft_step

        torch = self.torch
        start, cpu_start = time.perf_counter(), process_cpu_seconds()
        batch = next(self.batches)
        inputs, targets, mask = (torch.from_numpy(batch[k]).to(self.device) for k in ("inputs", "targets", "loss_mask"))
        got_batch = time.perf_counter()
        out = sft_step(self.model, self.optimizer, inputs.long(), targets.long(), mask, self.learning_rate,
                       autocast_dtype=self.autocast)
        loss = float(out["loss"])  # waits for the device
        done = time.perf_counter()
        if self.device.type == "cuda":
            self.memory_bytes = torch.cuda.max_memory_allocated(self.device)
        return StepRecord(done - start, got_batch - start, process_cpu_seconds() - cpu_start, inputs.numel(),
                          float(mask.sum()), loss)

    def close(self) -> None:
        self.batches.close()


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
        from minimind_jax.perf import measured_matmul_peak, total_peak_flops

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
    """Speed ratios to PyTorch from steps taken in the same turn (paired, so shared-machine load cancels)."""
    tokens = [(o.tokens / o.seconds) / (t.tokens / t.seconds) for o, t in zip(ours, theirs)]
    loss_tokens = [(o.loss_tokens / o.seconds) / (t.loss_tokens / t.seconds) for o, t in zip(ours, theirs)]
    cpu = [(t.cpu_seconds / t.tokens) / (o.cpu_seconds / o.tokens) for o, t in zip(ours, theirs)]
    return {"speedup": statistics.median(tokens), "loss_tokens_speedup": statistics.median(loss_tokens),
            "cpu_speedup": statistics.median(cpu),
            "noise": {"speedup_min": min(tokens), "speedup_max": max(tokens),
                      "loss_tokens_speedup_min": min(loss_tokens), "loss_tokens_speedup_max": max(loss_tokens)}}


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_memory_bytes(platform: str) -> int:
    """Host RSS high-water mark of this process on CPU; the devices' peak bytes in use on accelerators."""
    import jax

    if platform == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return sum((device.memory_stats() or {}).get("peak_bytes_in_use", 0) for device in jax.local_devices())


def _ratio(row: dict, key: str, low: str, high: str) -> str:
    if key not in row:
        return "-"
    return f"{row[key]:.2f} ({row['noise'][low]:.2f}-{row['noise'][high]:.2f})"


TABLE_COLUMNS = (  # header, width, cell
    ("side", -52, lambda r: r["name"][:52]),
    ("step s", 7, lambda r: f"{r['step_s']:.2f}"),
    ("tokens/s", 9, lambda r: f"{r['tokens_per_s']:,.0f}"),
    ("loss tok/s", 10, lambda r: f"{r['loss_tokens_per_s']:,.0f}"),
    ("× torch (min-max)", 17, lambda r: _ratio(r, "speedup", "speedup_min", "speedup_max")),
    ("loss tok × torch", 17, lambda r: _ratio(r, "loss_tokens_speedup", "loss_tokens_speedup_min",
                                               "loss_tokens_speedup_max")),
    ("CPU-time ×", 10, lambda r: f"{r['cpu_speedup']:.2f}" if "cpu_speedup" in r else "-"),
    ("MFU", 6, lambda r: f"{r['mfu']:.1%}"),
    ("compile s", 9, lambda r: f"{r['compile_s']:.1f}"),
    ("recomp", 6, lambda r: str(r["recompilations"])),
    ("data wait", 9, lambda r: f"{r['data_wait_fraction']:.1%}"),
    ("step MB", 7, lambda r: f"{r['memory_bytes'] / 2**20:,.0f}" if r.get("memory_bytes") else "-"),
)


def table_rows(rows: list[dict]) -> list[str]:
    def line(cells):
        return " ".join(f"{cell:<{-width}}" if width < 0 else f"{cell:>{width}}"
                        for cell, (_, width, _) in zip(cells, TABLE_COLUMNS))

    header = line([name for name, _, _ in TABLE_COLUMNS])
    return [header, "-" * len(header)] + [line([cell(row) for _, _, cell in TABLE_COLUMNS]) for row in rows]


def format_table(result: dict[str, Any]) -> str:
    setup = result["setup"]
    lines = [
        f"{setup['preset']} ({setup['arch']}, {setup['params'] / 1e6:.1f}M params), batch {setup['batch_size']} × "
        f"{setup['seq_len']} positions, {setup['dtype']}, {setup['devices']} × {setup['device_kind']} "
        f"(mesh {setup['mesh']}), peak {setup['peak_flops'] / 1e9:,.0f} GFLOP/s ({setup['peak_flops_source']})",
        f"data: {setup['records']} SFT records of the chat corpus, tokenizer {setup['tokenizer']}; loss-bearing "
        f"positions {setup['padded_loss_fraction']:.1%} of padded rows, {setup['packed_loss_fraction']:.1%} of packed",
        f"{setup['steps']} timed steps per side after {setup['warmup']} warm-up, sides taking turns; medians, and "
        f"the range of the per-turn ratios to torch; CPU-time ×: torch's process CPU seconds per token over ours",
        f"malloc settings of this process (both sides): {setup['malloc_env'] or 'glibc defaults'}",
        "",
    ]
    lines += table_rows(result["rows"])
    lines += [f"{row['name']}: could not run here ({row['error']})" for row in result.get("failed_variants", [])]
    lines.append(f"process peak memory {result['peak_memory_bytes'] / 2**20:,.0f} MB ({result['peak_memory_source']})")
    for row in result.get("decode", []):
        lines.append(f"decode batch {row['batch']}: {row['tokens_per_s']:,.1f} tokens/s "
                     f"(decode loop {row['decode_tokens_per_s']:,.1f}), prefill {row['prefill_s']:.3f}s, "
                     f"compile {row['compile_s']:.1f}s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Entry point


def run(args) -> int:
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        raise UserError("--batch_size and --steps must be at least 1 and --warmup at least 0")
    if args.loss_chunk_size is not None and args.loss_chunk_size < 1:
        raise UserError(f"--loss_chunk_size must be at least 1, got {args.loss_chunk_size}")
    import jax

    if args.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    import numpy as np
    from flax import nnx

    from minimind_jax import sharding
    from minimind_jax.config import load_preset, num_params
    from minimind_jax.model import MiniMind
    from minimind_jax.train import attention_flops_per_token, model_flops_per_token
    from minimind_jax.weights import params_of

    progress = (lambda message: print(message, file=sys.stderr, flush=True))
    platform = jax.devices()[0].platform
    dtype = args.dtype or ("float32" if platform == "cpu" else "bfloat16")
    try:
        config = load_preset(args.preset, dtype=dtype)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(f"--preset {args.preset}: {error}") from None
    mesh = sharding.make_mesh(args.mesh)
    if args.batch_size % sharding.batch_size_per_step(mesh):
        raise UserError(f"--batch_size {args.batch_size} is not divisible by the data-parallel size "
                        f"{sharding.batch_size_per_step(mesh)} of mesh {dict(mesh.shape)}")
    dataset, tokenizer_label = bench_dataset(args, config.arch)
    init_params = jax.tree.map(np.asarray, params_of(MiniMind(config, rngs=nnx.Rngs(args.seed))))
    peak = PeakFlops(dtype, platform)
    flops_per_token = model_flops_per_token(config) + attention_flops_per_token(config, dataset.seq_len)

    watch = CompileWatch()
    sides, failed = [], []
    try:
        for index, variant in enumerate(variants_for(args, platform)):
            progress(f"building our step: {describe(variant)}")
            try:
                sides.append(JaxSide(variant, config, dataset, init_params, mesh, args, watch))
            except Exception as error:  # an ablation variant this device cannot run is reported, not fatal
                if index == 0:
                    raise
                message = " ".join(f"{type(error).__name__}: {error}".split())[:300]
                failed.append({"name": describe(variant), "settings": dataclasses.asdict(variant), "error": message})
                progress(f"  failed: {message}")
        torch_side = None
        if not args.no_torch:
            progress("building the PyTorch step")
            torch_side = TorchSide(config, dataset, init_params, args, dtype)
            sides.append(torch_side)
        records = take_turns(sides, args.warmup, args.steps, progress, after_turn=peak.update)
    finally:
        watch.close()
        for side in sides:
            side.close()

    rows = []
    for side in sides:
        row = {"name": side.name, **side_figures(records[side.name], flops_per_token, peak.flops),
               "compile_s": side.compile_s, "compile_cache_hits": side.compile_cache_hits,
               "recompilations": side.recompilations, "memory_bytes": side.memory_bytes}
        if isinstance(side, JaxSide):
            row["settings"] = dataclasses.asdict(side.variant)
            if torch_side is not None:
                row.update(ratio_figures(records[side.name], records[torch_side.name]))
        rows.append(row)
    padded = next((s.packing_stats for s in sides if isinstance(s, JaxSide) and not s.variant.packing), None)
    packed = next((s.packing_stats for s in sides if isinstance(s, JaxSide) and s.variant.packing), None)
    from minimind_jax.pipeline import packing_stats, plan_rows

    padded = padded or packing_stats(dataset, None)
    packed = packed or packing_stats(dataset, plan_rows(dataset, seed=args.seed, packing=True))
    main_row, torch_row = rows[0], (rows[-1] if torch_side is not None else None)
    platform_memory = "host RSS (getrusage)" if platform == "cpu" else "peak_bytes_in_use of the devices"
    result = {
        "tokens_per_s": main_row["tokens_per_s"],
        "loss_tokens_per_s": main_row["loss_tokens_per_s"],
        "torch_tokens_per_s": torch_row["tokens_per_s"] if torch_row else None,
        "torch_loss_tokens_per_s": torch_row["loss_tokens_per_s"] if torch_row else None,
        "speedup": main_row.get("speedup"),
        "loss_tokens_speedup": main_row.get("loss_tokens_speedup"),
        "compile_s": main_row["compile_s"],
        "recompilations": main_row["recompilations"],
        "peak_memory_bytes": peak_memory_bytes(platform),
        "peak_memory_source": platform_memory,
        "mfu": main_row["mfu"],
        "torch_mfu": torch_row["mfu"] if torch_row else None,
        "data_wait_fraction": main_row["data_wait_fraction"],
        "setup": {
            "preset": args.preset, "arch": config.arch, "params": num_params(config), "dtype": dtype,
            "batch_size": args.batch_size, "seq_len": dataset.seq_len, "steps": args.steps, "warmup": args.warmup,
            "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind, "platform": platform,
            "mesh": dict(mesh.shape), "peak_flops": peak.flops, "peak_flops_source": peak.source,
            "flops_per_token": flops_per_token, "records": len(dataset), "tokenizer": tokenizer_label,
            "padded_loss_fraction": padded["loss_fraction"], "packed_loss_fraction": packed["loss_fraction"],
            "packed_token_fraction": packed["token_fraction"],
            "torch_threads": torch_side.torch.get_num_threads() if torch_side is not None else None,
            "torch_device": str(torch_side.device) if torch_side is not None else None,
            "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            # Both sides share this process's allocator settings (main.py sets them; see minimind_jax.malloc).
            "malloc_env": malloc.current_settings(),
            "compilation_cache_dir": args.compilation_cache_dir,
        },
        "rows": rows,
        "failed_variants": failed,
    }
    if args.decode:
        from minimind_jax.generate import benchmark_decode

        progress("decode benchmark")
        result["decode"] = benchmark_decode(args.preset, batch_sizes=(1, args.batch_size), new_tokens=64)
    print(json.dumps(result) if args.json else format_table(result))
    return 0
