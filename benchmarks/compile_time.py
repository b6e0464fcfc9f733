"""Where the compile time of the train step goes: trace + lower, and XLA's compile, of the step `main.py sft`
builds, for one preset and batch shape, with each fast-path switch changed alone.

    python benchmarks/compile_time.py --preset minimind2 --batch_size 16 --max_seq_len 512 \
        [--variants default literal unrolled scanned xla causal_blocks full_logits] [--dtype bfloat16]

The step is built from abstract inputs (nothing is computed), on the process's backend, with the persistent
compilation cache off so every figure is a cold compile. One line of JSON per variant.
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
from flax import nnx  # noqa: E402

from minimind_jax.model.config import LITERAL_STEP, default_dtype, fast_path_settings, load_preset  # noqa: E402
from minimind_jax.model.params import abstract_model  # noqa: E402
from minimind_jax.training.objectives import NextTokenLoss  # noqa: E402
from minimind_jax.training.optimizer import make_optimizer  # noqa: E402
from minimind_jax.training.sharding import make_mesh  # noqa: E402
from minimind_jax.training.step import make_train_step  # noqa: E402

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


def compile_times(preset: str, batch: int, seq_len: int, dtype: str, settings: dict) -> dict:
    config = load_preset(
        preset, dtype=dtype, attention_impl=settings["attention_impl"], scan_layers=settings["scan_layers"]
    )
    graphdef, state = nnx.split(abstract_model(config), nnx.Param)
    params = nnx.to_pure_dict(state)
    optimizer = make_optimizer(1e-4)
    opt_state = jax.eval_shape(optimizer.init, params)
    step = make_train_step(graphdef, optimizer, make_mesh(), objective=NextTokenLoss(settings["loss_chunk_size"]))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    start = time.perf_counter()
    lowered = step.lower(params, opt_state, [abstract_batch(batch, seq_len)], key, {})
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {"trace_lower_s": round(lowered_at - start, 2), "compile_s": round(done - lowered_at, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="minimind2")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_seq_len", type=int, default=512, help="2510 rows are one shorter")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU/TPU")
    parser.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS))
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    platform = jax.devices()[0].platform
    dtype = args.dtype or default_dtype(platform)
    seq_len = args.max_seq_len - (load_preset(args.preset).arch == "minimind2")
    for name in args.variants:
        settings = {**fast_path_settings(platform, dtype, seq_len), **VARIANTS[name]}
        times = compile_times(args.preset, args.batch_size, seq_len, dtype, settings)
        row = {"preset": args.preset, "variant": name, "batch": [args.batch_size, seq_len], "dtype": dtype}
        device = {"device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", "")}
        print(json.dumps({**row, **settings, **times, **device}), flush=True)


if __name__ == "__main__":
    main()
