"""Peak FLOP/s of the device, for MFU: spec sheets for accelerators, a measured matmul peak on CPU."""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak per chip (spec sheets); fp32 work on these is reported against the same number.
ACCELERATOR_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12,
    "RTX 3090": 71e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` jitted size×size matmuls on device 0 (used as the CPU's peak)."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def total_peak_flops(dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s of all devices together, where the number comes from).

    On CPU the simulated devices share the same cores, so the machine's measured peak is the total.
    """
    device = jax.devices()[0]
    if device.platform == "cpu":
        return measured_matmul_peak(dtype), "measured 2048² matmul on this CPU"
    kind = device.device_kind
    for name, peak in ACCELERATOR_PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak * jax.device_count(), f"{kind} spec sheet × {jax.device_count()}"
    return float("nan"), f"unknown device {kind}"
