"""Peak FLOP/s of the device, for MFU: spec sheets for accelerators, a measured matmul peak on CPU."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak per chip (spec sheets); fp32 work on these is reported against the same number.
ACCELERATOR_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


@functools.cache
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


def model_flops_per_token(config) -> float:
    """Training FLOPs per token (forward + backward = 3× forward), matmuls only, attention at full T counted
    by the caller via `attention_flops_per_token`."""
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    attn_proj = 2 * (h * q + 2 * h * kv + q * h)
    if config.use_moe:
        active = config.num_experts_per_tok + config.num_shared_experts
        mlp = 2 * 3 * h * config.expert_intermediate_size * active + 2 * h * config.num_routed_experts
    else:
        mlp = 2 * 3 * h * config.intermediate_size
    lm_head = 2 * h * config.vocab_size
    return 3 * (config.num_hidden_layers * (attn_proj + mlp) + lm_head)


def attention_flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token of the QK^T and PV products (causal: half of the T×T scores)."""
    per_layer = 2 * 2 * config.num_attention_heads * config.head_dim * seq_len / 2
    return 3 * config.num_hidden_layers * per_layer


def objective_flops_per_token(config, seq_len: int, mode: str = "sft", teacher_config=None) -> float:
    """FLOPs per token of a run's step: the model's forward and backward; LoRA's backward reaches the
    activations but gives the frozen weights no gradient (2 of the 3 forwards' worth); DPO's frozen reference
    (the policy's size) and the distillation teacher add a forward each."""
    trained = model_flops_per_token(config) + attention_flops_per_token(config, seq_len)
    if mode == "lora":
        return trained * 2 / 3
    if mode == "dpo":
        return trained * 4 / 3
    if mode == "distill":
        return (
            trained + (model_flops_per_token(teacher_config) + attention_flops_per_token(teacher_config, seq_len)) / 3
        )
    return trained
