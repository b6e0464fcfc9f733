"""Causal self-attention with the Pallas TPU Splash kernel, for training (no KV cache).

Shapes: B batch, T positions, N query heads, K kv heads, G = N // K, Hd head dim; P is T padded to a multiple
of 128.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

LANES = 128  # the kernel's blocks must be multiples of the TPU lane width
# Blocks of 512 (MaxText's default) keep a step's [512,512] fp32 scores small in VMEM while amortising the per-step
# cost; at T of a few thousand there are still enough blocks that skipping those above the diagonal halves the work.
MAX_BLOCK = 512
# jax's TPU tests of the kernel cover head dims 64, 128, 192 and 256; others (MiniMind's 96) are zero-padded up to a multiple of 64.
HEAD_DIM_MULTIPLE = 64


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _block_size(padded_len: int) -> int:
    """The largest of 512, 256, 128 that divides the lane-padded length, so padding never exceeds 127."""
    return next(block for block in (MAX_BLOCK, MAX_BLOCK // 2, LANES) if padded_len % block == 0)


@functools.lru_cache(maxsize=32)
def _causal_kernel(padded_len: int, num_heads: int, interpret: bool) -> splash_kernel.SplashAttentionKernel:
    """The kernel for one batch element, [N,P,Hd] queries against [K,P,Hd] keys and values."""
    block = _block_size(padded_len)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((padded_len, padded_len))] * num_heads)
    block_sizes = splash_kernel.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    # The kernel holds its mask tables as arrays; made concrete, they can outlive the trace that built them.
    with jax.ensure_compile_time_eval():
        return splash_kernel.make_splash_mha(
            mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1, interpret=interpret
        )


def _pad_axis(x, axis: int, size: int, value=0):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def splash_attention(q_BTNHd, k_BTKHd, v_BTKHd, segment_ids_BT=None, *, interpret: bool = False):
    """Causal softmax(q·kᵀ/√Hd)·v -> [B,T,N,Hd] in the input dtype; with segment ids, a token attends only
    within its segment. Query head h reads kv head h // G (MiniMind's repeat_interleave grouping).

    Equal to `grouped_attention(q, k, v, attention_bias(B, T, T, 0, segment_ids_BT=segment_ids_BT))` up to
    rounding, values and gradients. `interpret=True` runs the kernel in Pallas interpret mode (CPU).
    """
    _, t, num_heads, head_dim = q_BTNHd.shape
    padded_len = _round_up(t, LANES)
    padded_dim = _round_up(head_dim, HEAD_DIM_MULTIPLE)
    kernel = _causal_kernel(padded_len, num_heads, interpret)

    # The kernel does not scale. Rounding q·(1/√Hd) once from fp32 is exact when √Hd is a power of two.
    q_BTNHd = (q_BTNHd.astype(jnp.float32) * (1.0 / math.sqrt(head_dim))).astype(q_BTNHd.dtype)
    # Zero dims add nothing to q·k, and the zero value dims are sliced off. Padded positions come last: causality
    # hides them from every real query, each sees at least itself (no empty softmax), and their outputs are
    # dropped, so their zero cotangents add nothing to the gradients.
    q_BNPHd, k_BKPHd, v_BKPHd = (
        _pad_axis(_pad_axis(x, 3, padded_dim), 1, padded_len).transpose(0, 2, 1, 3) for x in (q_BTNHd, k_BTKHd, v_BTKHd)
    )
    # The MHA kernel takes K < N kv heads itself, reading kv head h // G for query head h and summing the G
    # heads' key and value gradients in its backward pass: no repeated keys or values are materialised.
    if segment_ids_BT is None:
        out_BNPHd = _on_each_device(jax.vmap(kernel), q_BNPHd, k_BKPHd, v_BKPHd)
    else:
        # Padding gets a segment of its own (-1, outside packing's ids), apart from the last real segment.
        segment_ids_BP = _pad_axis(segment_ids_BT.astype(jnp.int32), 1, padded_len, value=-1)
        with_segments = lambda q, k, v, ids_BP: jax.vmap(kernel)(q, k, v, splash_kernel.SegmentIds(q=ids_BP, kv=ids_BP))
        out_BNPHd = _on_each_device(with_segments, q_BNPHd, k_BKPHd, v_BKPHd, segment_ids_BP)
    return out_BNPHd[:, :, :t, :head_dim].transpose(0, 2, 1, 3)


def _on_each_device(kernel_fn, *arrays_B):
    """kernel_fn on each device's rows when a mesh is in context (jax.sharding.use_abstract_mesh), the batch split
    over as many of its axes, in order, as divide it; else on all rows. XLA cannot partition a Pallas call, and
    the call cannot sit in a shard_map that checks varying axes, hence this one, with check_vma=False: every
    input and output is split over the same axes, so there is nothing replicated for the check to guard."""
    mesh = jax.sharding.get_abstract_mesh()
    batch, axes = arrays_B[0].shape[0], []
    for axis in () if mesh.empty else mesh.axis_names:
        if axis not in mesh.manual_axes and batch % (math.prod(mesh.shape[a] for a in axes) * mesh.shape[axis]) == 0:
            axes.append(axis)
    if not axes:
        return kernel_fn(*arrays_B)
    spec = P(tuple(axes))
    return jax.shard_map(kernel_fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(*arrays_B)
