"""Where the compile time of the train step goes: trace + lower, and XLA's compile, of the step `main.py sft`
builds, for one preset and batch shape, with each fast-path switch changed alone.

    python benchmarks/compile_time.py --preset minimind2 --batch_size 16 --max_seq_len 512 \
        [--variants default literal unrolled scanned xla causal_blocks full_logits] [--dtype bfloat16] [--steps N]

The step is built from abstract inputs (nothing is computed), on the process's first device, with the
persistent compilation cache off so every figure is a cold compile. One line of JSON per variant. --steps N
builds each from random weights and random tokens instead and also times N steps of each (after one
untimed), the variants taking turns: what a switch costs in compile time against what it gives per step.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from profile_step import random_batch  # noqa: E402  (this folder's)

from minimind_jax.model.config import LITERAL_STEP, default_dtype, fast_path_settings, load_preset  # noqa: E402
from minimind_jax.model.params import abstract_model  # noqa: E402
from minimind_jax.model.transformer import MiniMind  # noqa: E402
from minimind_jax.training.objectives import NextTokenLoss  # noqa: E402
from minimind_jax.training.optimizer import make_optimizer  # noqa: E402
from minimind_jax.training.sharding import make_mesh  # noqa: E402
from minimind_jax.training.step import init_train_state, make_train_step  # noqa: E402

# Each variant: the default step (fast_path_settings) with these settings changed.
VARIANTS = {
    "default": {},
    "literal": dict(LITERAL_STEP),
    "scanned": {"scan_layers": True},
    "unrolled": {"scan_layers": False},
    "xla": {"attention_impl": "xla"},
    "causal_blocks": {"attention_impl": "causal_blocks"},
    "full_logits": {"loss_chunk_size": None},
}


def abstract_batch(batch: int, seq_len: int) -> dict:
    ints = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    return {
        "inputs": ints,
        "targets": ints,
        "loss_mask": jax.ShapeDtypeStruct((batch, seq_len), jnp.float32),
        "segment_ids": ints,
        "positions": ints,
    }


def compile_step(preset: str, batch: int, seq_len: int, dtype: str, settings: dict, with_state: bool):
    """(timings, the compiled step and its arguments, or None without with_state: abstract inputs only)."""
    config = load_preset(
        preset, dtype=dtype, attention_impl=settings["attention_impl"], scan_layers=settings["scan_layers"]
    )
    optimizer, mesh = make_optimizer(1e-4), make_mesh(None, jax.devices()[:1])
    objective = NextTokenLoss(settings["loss_chunk_size"])
    if with_state:
        graphdef, params, opt_state, *_ = init_train_state(MiniMind(config, rngs=nnx.Rngs(0)), optimizer, mesh)
        args = [
            params,
            opt_state,
            [random_batch(batch, seq_len, vocab=6400, loss_fraction=0.3)],
            jax.random.key_data(jax.random.key(0)),
            {},
        ]
    else:
        graphdef, state = nnx.split(abstract_model(config), nnx.Param)
        params = nnx.to_pure_dict(state)
        key = jax.ShapeDtypeStruct((2,), jnp.uint32)
        args = [params, jax.eval_shape(optimizer.init, params), [abstract_batch(batch, seq_len)], key, {}]
    step = make_train_step(graphdef, optimizer, mesh, objective=objective)
    start = time.perf_counter()
    lowered = step.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    times = {"trace_lower_s": round(lowered_at - start, 2), "compile_s": round(done - lowered_at, 2)}
    return times, ((compiled, args) if with_state else None)


def median_step_seconds(sides: list, steps: int) -> list[float]:
    """Each side's median step time over `steps` timed steps after one untimed, the sides taking turns."""
    times = [[] for _ in sides]
    for _ in range(steps + 1):
        for side, record in zip(sides, times):
            compiled, args = side
            start = time.perf_counter()
            args[0], args[1], metrics = compiled(*args)
            jax.block_until_ready(metrics)
            record.append(time.perf_counter() - start)
    return [round(float(np.median(record[1:])), 3) for record in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="minimind2")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_seq_len", type=int, default=512, help="2510 rows are one shorter")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU/TPU")
    parser.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=0, help="also time this many steps of each, taking turns")
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    platform = jax.devices()[0].platform
    dtype = args.dtype or default_dtype(platform)
    seq_len = args.max_seq_len - (load_preset(args.preset).arch == "minimind2")
    rows, sides = [], []
    for name in args.variants:
        settings = {**fast_path_settings(platform, dtype, seq_len), **VARIANTS[name]}
        times, side = compile_step(args.preset, args.batch_size, seq_len, dtype, settings, with_state=args.steps > 0)
        row = {"preset": args.preset, "variant": name, "batch": [args.batch_size, seq_len], "dtype": dtype}
        device = {"device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", "")}
        rows.append({**row, **settings, **times, **device})
        sides.append(side)
        if not args.steps:  # one line per compile as it ends, so a time limit keeps the finished ones
            print(json.dumps(rows[-1]), flush=True)
    if args.steps:
        for row, seconds in zip(rows, median_step_seconds(sides, args.steps)):
            print(json.dumps({**row, "median_step_s": seconds}), flush=True)


if __name__ == "__main__":
    main()
