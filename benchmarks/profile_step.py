"""Where the time of one train step goes: a jax.profiler trace of our step, summed per XLA op.

    python benchmarks/profile_step.py --preset minimind2-small --batch_size 2 [--fast_path 0]
        [--loss_chunk_size 512] [--attention_impl causal_blocks] [--scan_layers 0] [--remat dots] [--top 30]
        [--hlo step.hlo]

Runs the real `train.make_train_step` (by default the step `main.py sft` runs: the backend's fast path) on
random tokens (real batches change nothing per op), traces
`--steps` steps after one warm-up, and prints each op's time per step (summed over the threads that ran
it, so ops running side by side can add up to more than the step), with the JAX operation it came from
(the HLO metadata) and the ops fused into it. `--hlo FILE` writes the optimized HLO for a closer look.
`--torch` profiles PyTorch MiniMind's step (torch.profiler) on the same shapes instead.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


def random_batch(batch: int, seq_len: int, vocab: int, loss_fraction: float, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    return {
        "inputs": rng.integers(3, vocab, (batch, seq_len)).astype(np.int32),
        "targets": rng.integers(3, vocab, (batch, seq_len)).astype(np.int32),
        "loss_mask": (rng.random((batch, seq_len)) < loss_fraction).astype(np.float32),
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
    }


def hlo_index(hlo: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(instruction name -> its definition, computation name -> the op kinds in it) of an HLO text dump."""
    definitions, computations, current = {}, {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = computations.setdefault(header.group(1), [])
            continue
        instruction = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", line)
        if instruction:
            definitions[instruction.group(1)] = line.strip()
            if current is not None and instruction.group(2) not in ("parameter", "constant", "bitcast"):
                current.append(instruction.group(2))
    return definitions, computations


def describe_op(name: str, definitions: dict, computations: dict) -> str:
    line = definitions.get(name, "")
    shape = re.search(r"= (\S+) ", line)
    source = re.search(r'op_name="([^"]+)"', line)
    called = re.search(r"calls=%?([\w.\-]+)", line)
    fused = computations.get(called.group(1), []) if called else []
    kinds = " ".join(dict.fromkeys(fused))
    origin = source.group(1).replace("jit(step)/", "")[-70:] if source else ""
    return f"{shape.group(1) if shape else '?':28s} {origin:70s} [{kinds[:60]}]"


def profile_jax(args) -> None:
    import jax
    from flax import nnx

    from minimind_jax.model.config import load_preset, train_step_settings
    from minimind_jax.model.transformer import MiniMind
    from minimind_jax.training import sharding
    from minimind_jax.training.objectives import NextTokenLoss
    from minimind_jax.training.optimizer import make_optimizer
    from minimind_jax.training.step import init_train_state, make_train_step

    settings = train_step_settings(
        bool(args.fast_path),
        jax.devices()[0].platform,
        "float32",
        args.seq_len,
        attention_impl=args.attention_impl,
        loss_chunk_size=args.loss_chunk_size,
        scan_layers=args.scan_layers,
    )
    config = load_preset(
        args.preset, remat=args.remat, attention_impl=settings["attention_impl"], scan_layers=settings["scan_layers"]
    )
    mesh = sharding.make_mesh(None)
    optimizer = make_optimizer(1e-4)
    graphdef, params, opt_state, param_shardings, opt_shardings = init_train_state(
        MiniMind(config, rngs=nnx.Rngs(0)), optimizer, mesh
    )
    step = make_train_step(
        graphdef,
        optimizer,
        mesh,
        objective=NextTokenLoss(settings["loss_chunk_size"]),
        param_shardings=param_shardings,
        opt_shardings=opt_shardings,
    )
    batch = jax.device_put(
        random_batch(args.batch_size, args.seq_len, config.vocab_size, args.loss_fraction),
        sharding.batch_sharding(mesh),
    )
    key = jax.random.key_data(jax.random.key(0))
    hlo = step.lower(params, opt_state, [batch], key).compile().as_text()
    if args.hlo:
        pathlib.Path(args.hlo).write_text(hlo)
    params, opt_state, metrics = jax.block_until_ready(step(params, opt_state, [batch], key))
    trace_dir = tempfile.mkdtemp(prefix="profile_step_")
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
            params, opt_state, metrics = jax.block_until_ready(step(params, opt_state, [batch], key))
    wall = (time.perf_counter() - start) / args.steps

    from jax._src.lib import _profile_data

    trace_file = sorted(pathlib.Path(trace_dir).rglob("*.xplane.pb"))[-1]
    plane = _profile_data.ProfileData.from_file(str(trace_file)).find_plane_with_name("/host:CPU")
    per_op, calls = collections.Counter(), collections.Counter()
    for line in plane.lines:
        if line.name == "python":
            continue
        for event in line.events:
            if event.name.startswith(("ThunkExecutor", "end:")):
                continue
            per_op[event.name] += event.duration_ns / 1e9 / args.steps
            calls[event.name] += 1
    definitions, computations = hlo_index(hlo)
    total = sum(per_op.values())
    print(f"wall {wall:.3f} s/step; op time {total:.3f} s/step (summed over threads)")
    for name, seconds in per_op.most_common(args.top):
        print(
            f"{seconds * 1e3:9.1f} ms {seconds / total:6.1%} ×{calls[name] // args.steps:<3d} {name[:30]:30s} "
            f"{describe_op(name, definitions, computations)}"
        )


def profile_torch(args) -> None:
    import torch

    from minimind_jax.bench.torch_reference import MiniMindTorch, make_optimizer, sft_step
    from minimind_jax.model.config import load_preset

    config = load_preset(args.preset)
    model = MiniMindTorch(config)
    optimizer = make_optimizer(model, 1e-4)
    batch = {
        k: torch.from_numpy(v)
        for k, v in random_batch(args.batch_size, args.seq_len, config.vocab_size, args.loss_fraction).items()
    }
    run = lambda: sft_step(model, optimizer, batch["inputs"].long(), batch["targets"].long(), batch["loss_mask"], 1e-4)
    run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(args.steps):
            run()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=511)
    parser.add_argument("--loss_fraction", type=float, default=0.19, help="share of positions with loss")
    parser.add_argument("--fast_path", type=int, choices=(0, 1), default=1, help="as main.py sft's")
    parser.add_argument("--loss_chunk_size", type=int, default=None, help="default: per --fast_path; 0: full logits")
    parser.add_argument("--attention_impl", default=None, help="default: per --fast_path")
    parser.add_argument("--scan_layers", type=int, choices=(0, 1), default=None, help="default: per --fast_path")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--hlo", default=None, help="write the optimized HLO here")
    parser.add_argument("--torch", action="store_true", help="profile the PyTorch step instead")
    args = parser.parse_args(argv)
    (profile_torch if args.torch else profile_jax)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
