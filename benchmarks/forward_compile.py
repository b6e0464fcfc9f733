"""Compile time of the jitted forward pass vs depth: the scanned layers keep it flat.

python benchmarks/forward_compile.py [--preset minimind2] [--layers 4 16] [--seq_len 512]
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from minimind_jax.model.config import load_preset
from minimind_jax.weights import abstract_model


def compile_seconds(config, batch: int, seq_len: int) -> float:
    graphdef, state = nnx.split(abstract_model(config))
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    start = time.perf_counter()
    forward.lower(state, ids).compile()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="minimind2")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for layers in args.layers:
        config = load_preset(args.preset, num_hidden_layers=layers)
        times = [compile_seconds(config, args.batch, args.seq_len) for _ in range(args.repeats)]
        print(
            json.dumps(
                {
                    "preset": args.preset,
                    "layers": layers,
                    "compile_s_min": round(min(times), 3),
                    "compile_s_all": [round(t, 3) for t in times],
                    "device": jax.devices()[0].device_kind,
                }
            )
        )


if __name__ == "__main__":
    main()
