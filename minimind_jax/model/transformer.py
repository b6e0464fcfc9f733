"""MiniMind in Flax NNX, both eras, numerically matching the PyTorch original.

Shapes: B batch, T new tokens, S key positions, D hidden, H query heads, K kv heads, G = H // K query heads
per kv head, Hd head dim, F MLP width, E routed experts, V vocab, L layers.

The L blocks are one `Block` whose parameters carry a leading layer axis; `MiniMind.forward` runs them with
`jax.lax.scan`, so compile time does not grow with depth. Parameters stay fp32; activations use
`config.dtype`; logits are returned in fp32.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimind_jax.errors import UserError
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.splash import splash_attention

MASKED_PAD = -1e9  # MiniMind adds (1 - mask) * -1e9 to padded keys (not -inf: fully padded rows stay finite)


def check_token_ids(ids: np.ndarray, vocab_size: int) -> None:
    """A one-line UserError for ids outside the vocabulary, which the embedding lookup would clamp silently."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise UserError(f"input_ids must lie in [0, {vocab_size}), found {ids.min()}..{ids.max()}")


class KVCache(NamedTuple):
    """Fixed-size cache, one array per layer: a decode step reads and writes each in place, where slicing one
    stacked [L, ...] array would copy every layer's part at every step. Keys are stored after RoPE and before
    the GQA repeat."""

    layer_k_BSKHd: tuple[jax.Array, ...]
    layer_v_BSKHd: tuple[jax.Array, ...]
    length: jax.Array  # int32: positions [0, length) are filled; a scalar, or [B] when each row has its own

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
        return cls(zeros(), zeros(), jnp.zeros((), jnp.int32))

    def map(self, function: Callable[[jax.Array], jax.Array]) -> KVCache:
        """The cache with `function` applied to every layer's keys and values (e.g. a slice or a pad)."""
        return self._replace(layer_k_BSKHd=tuple(map(function, self.layer_k_BSKHd)),
                             layer_v_BSKHd=tuple(map(function, self.layer_v_BSKHd)))  # fmt: skip

    def with_new(self, new_kv, write: Callable[[jax.Array, jax.Array], jax.Array]) -> KVCache:
        """The cache with each layer's new keys and values (as `ModelOutput.new_kv`) put in by
        `write(the layer's cache, its new positions)`."""
        return self._replace(layer_k_BSKHd=tuple(map(write, self.layer_k_BSKHd, new_kv[0])),
                             layer_v_BSKHd=tuple(map(write, self.layer_v_BSKHd, new_kv[1])))  # fmt: skip


class ModelOutput(NamedTuple):
    logits: jax.Array | None  # [B,T,V] fp32, None when not requested
    hidden_states: jax.Array  # [B,T,D] after the final norm
    aux_loss: jax.Array  # fp32 scalar: summed MoE aux loss of all layers (0 in eval mode or without MoE)
    cache: KVCache | None  # the cache with the new positions written
    # with a cache: only the new positions' (layer_k_BTKHd, layer_v_BTKHd), one [B,T,KV,Hd] per layer
    new_kv: tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]] | None = None


def _uniform_init(key, shape, fan_in):
    """torch.nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which MiniMind trains from."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _linear(rngs: nnx.Rngs, *shape: int) -> nnx.Param:
    """A kernel laid out [..., in, out] (torch stores [out, in])."""
    return nnx.Param(_uniform_init(rngs.params(), shape, shape[-2]))


class LoRA(nnx.Module):
    """MiniMind's adapter (model_lora.py): x -> B(A x), A ~ N(0, 0.02), B = 0, no scaling, added to its
    projection's output. Laid out like the kernels: A [in, rank], B [rank, out]."""

    def __init__(self, d_in: int, d_out: int, rank: int, rngs: nnx.Rngs):
        self.A = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d_in, rank), jnp.float32))
        self.B = nnx.Param(jnp.zeros((rank, d_out), jnp.float32))

    def __call__(self, x_ND):
        return (x_ND @ self.A[...].astype(x_ND.dtype)) @ self.B[...].astype(x_ND.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, multiply_in_fp32: bool):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps
        # 2510 casts back to the input dtype before the weight multiply; v3 multiplies in fp32, then casts.
        self.multiply_in_fp32 = multiply_in_fp32

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.multiply_in_fp32:
            return (self.weight[...] * normed).astype(x.dtype)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies [Hd/2] in fp32, with the era's YaRN rescaling when it is switched on."""
    dim, theta = config.head_dim, config.rope_theta
    half = dim // 2
    inv_freq = (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32)[:half] / np.float32(dim)))).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None or config.max_position_embeddings / scaling["original_max_position_embeddings"] <= 1.0:
        return inv_freq
    orig, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    fast, slow = scaling["beta_fast"], scaling["beta_slow"]
    index = np.arange(half, dtype=np.float32)
    if config.is_v3:
        inv_dim = lambda b: dim * math.log(orig / (b * 2 * math.pi)) / (2 * math.log(theta))
        low, high = max(math.floor(inv_dim(fast)), 0), min(math.ceil(inv_dim(slow)), half - 1)
        ramp = np.clip((index - low) / max(high - low, 0.001), 0, 1).astype(np.float32)
        return (inv_freq * (1 - ramp + ramp / factor)).astype(np.float32)
    corr_dim = next((i for i in range(half) if 2 * math.pi / inv_freq[i] > orig), half)
    beta = (slow + (fast - slow) * index / max(half - 1, 1)).astype(np.float32)
    scale = np.where(index < corr_dim, (beta * factor - beta + 1) / (beta * factor), 1.0 / factor)
    return (inv_freq * scale).astype(np.float32)


def rope_cos_sin(inv_freq: np.ndarray, positions_BT, attention_factor: float = 1.0):
    """cos, sin [B,T,Hd] laid out cat([f, f]) as MiniMind builds them."""
    angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x_BTNHd, cos_BTHd, sin_BTHd):
    """Half-split rotation (HF-Llama rotate_half), computed in the promoted dtype like MiniMind."""
    half = x_BTNHd.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNHd[..., half:], x_BTNHd[..., :half]], axis=-1)
    cos, sin = cos_BTHd[:, :, None, :], sin_BTHd[:, :, None, :]
    return (x_BTNHd * cos + rotated * sin).astype(x_BTNHd.dtype)


def attention_bias(
    batch: int,
    num_queries: int,
    num_keys: int,
    query_offset,
    *,
    segment_ids_BT=None,
    key_segment_ids_BS=None,
    attention_mask_BS=None,
):
    """Additive fp32 bias [B,1,T,S]: -inf above the causal diagonal or across segments, -1e9 on padded keys.

    Query t sits at absolute position query_offset + t (query_offset: a scalar, or [B], one per row); key s at
    position s.
    """
    query_pos = jnp.reshape(query_offset, (-1, 1, 1)) + jnp.arange(num_queries)[None, :, None]
    allowed = jnp.arange(num_keys)[None, None, :] <= query_pos  # [1 or B,T,S]
    if segment_ids_BT is not None:
        keys = segment_ids_BT if key_segment_ids_BS is None else key_segment_ids_BS
        allowed = allowed & (segment_ids_BT[:, :, None] == keys[:, None, :])
    bias = jnp.where(allowed, 0.0, -jnp.inf).astype(jnp.float32)
    bias = jnp.broadcast_to(bias, (batch, num_queries, num_keys))
    if attention_mask_BS is not None:
        bias = bias + (1.0 - attention_mask_BS.astype(jnp.float32))[:, None, :] * MASKED_PAD
    return bias[:, None]


class AttentionMask(NamedTuple):
    """Which keys each query sees, in the form each attention path takes: the additive bias of the exact paths
    (attention_bias), and the segment ids of packed rows for the TPU kernel, which applies the causal mask
    itself. The fused kernels run only when `fusable`: no KV cache and no padded keys (no attention_mask)."""

    bias_B1TS: jax.Array
    segment_ids_BT: jax.Array | None
    fusable: bool


def grouped_attention(q_BTNHd, k_BSKHd, v_BSKHd, bias_B1TS, dropout=None):
    """softmax(q·kᵀ/√Hd + bias)·v in fp32 scores -> [B,T,N,Hd]. Query head h reads kv head h // G, as MiniMind's
    repeat_interleave does, without materialising the repeat. `dropout` is applied to the probabilities."""
    b, t, num_heads, head_dim = q_BTNHd.shape
    num_kv_heads = k_BSKHd.shape[2]
    q = q_BTNHd.reshape(b, t, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k_BSKHd, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(head_dim) + bias_B1TS[:, :, None]
    probs = jax.nn.softmax(scores, axis=-1).astype(q_BTNHd.dtype)
    if dropout is not None:
        probs = dropout(probs)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKHd).reshape(q_BTNHd.shape)


def causal_block_attention(q_BTNHd, k_BTKHd, v_BTKHd, bias_B1TT, block_size: int, recompute: bool = False):
    """grouped_attention without a cache, one block of queries at a time against only the keys up to the
    block's end. The keys left out are all above the causal diagonal (bias -inf, probability exactly 0), so
    the result is the same for about half the work. With `recompute`, each block's scores are recomputed in
    the backward pass rather than kept, so no [T,T] probabilities are stored per layer. Queries, keys and
    values are laid out head-major once ([B,K,G,T,Hd], [B,K,T,Hd]), so XLA:CPU does not transpose the blocks'
    probabilities."""
    b, t, num_heads, head_dim = q_BTNHd.shape
    num_kv_heads = k_BTKHd.shape[2]
    q_BKGTHd = q_BTNHd.reshape(b, t, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    k_BKTHd, v_BKTHd = k_BTKHd.transpose(0, 2, 1, 3), v_BTKHd.transpose(0, 2, 1, 3)

    def attend(q_BKGtHd, k_BKsHd, v_BKsHd, bias_B1ts):
        scores = jnp.einsum("bkgth,bksh->bkgts", q_BKGtHd, k_BKsHd, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores / math.sqrt(head_dim) + bias_B1ts[:, :, None], axis=-1)
        return jnp.einsum("bkgts,bksh->bkgth", probs.astype(v_BKsHd.dtype), v_BKsHd)

    if recompute:
        attend = jax.checkpoint(attend)
    blocks = []
    for start in range(0, t, block_size):
        stop = min(start + block_size, t)
        blocks.append(
            attend(
                q_BKGTHd[:, :, :, start:stop],
                k_BKTHd[:, :, :stop],
                v_BKTHd[:, :, :stop],
                bias_B1TT[:, :, start:stop, :stop],
            )
        )
    return jnp.concatenate(blocks, axis=3).transpose(0, 3, 1, 2, 4).reshape(q_BTNHd.shape)


# cuDNN's fused attention with a bias needs an even row length; rows padded to whole 64-row tiles also keep its
# blocks full. MiniMind 2510's rows of max_seq_len - 1 positions are padded by one.
CUDNN_ROW_MULTIPLE = 64


def padded_causal_attention(q_BTNHd, k_BTKHd, v_BTKHd, bias_B1TT, multiple: int, implementation: str):
    """jax.nn.dot_product_attention, causal, with the rows padded at their end to a multiple of `multiple`.

    The padded keys come after every real query, so the causal mask hides them from all real positions; a
    padded query sees at least itself (bias 0), so nothing turns NaN; the padded outputs are dropped, and with
    them any gradient through them. The bias's -inf become the dtype's most negative half: the same
    probabilities (exactly 0), and a fused kernel's running maximum never meets -inf - (-inf).
    """
    t, head_dim = q_BTNHd.shape[1], q_BTNHd.shape[-1]
    pad = -t % multiple
    pad_rows = lambda x_BT: jnp.pad(x_BT, ((0, 0), (0, pad)) + ((0, 0),) * (x_BT.ndim - 2))
    dtype = q_BTNHd.dtype
    bias_B1TT = jnp.maximum(bias_B1TT, jnp.finfo(dtype).min / 2).astype(dtype)
    out_BTNHd = jax.nn.dot_product_attention(
        pad_rows(q_BTNHd),
        pad_rows(k_BTKHd),
        pad_rows(v_BTKHd),
        jnp.pad(bias_B1TT, ((0, 0), (0, 0), (0, pad), (0, pad))),
        scale=1 / math.sqrt(head_dim),
        is_causal=True,  # lets cuDNN skip the blocks above the diagonal
        implementation=implementation,
    )
    return out_BTNHd[:, :t]


def write_cache(cache_XBSKHd, new_XBTKHd, index):
    """The cache with the new keys (or values) written from position `index` on its S axis (leading axes, such
    as layers, are carried along): a scalar, or [B], one per row of `new` (the cache's first B rows), where a
    row whose positions lie past the cache writes nothing (a slot with nothing to write)."""
    s_axis = cache_XBSKHd.ndim - 3
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache_XBSKHd, new_XBTKHd, (0,) * s_axis + (index, 0, 0))
    b, t = new_XBTKHd.shape[s_axis - 1 : s_axis + 1]
    positions_BT = index[:, None] + jnp.arange(t)[None, :]
    rows_positions = (slice(None),) * (s_axis - 1) + (jnp.arange(b)[:, None], positions_BT)
    return cache_XBSKHd.at[rows_positions].set(new_XBTKHd, mode="drop")


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = _linear(rngs, d, self.num_heads * hd)
        self.k_proj = _linear(rngs, d, self.num_kv_heads * hd)
        self.v_proj = _linear(rngs, d, self.num_kv_heads * hd)
        self.o_proj = _linear(rngs, self.num_heads * hd, d)
        for name in config.lora_targets:  # e.g. self.q_proj_lora
            d_in, d_out = getattr(self, name).shape
            setattr(self, f"{name}_lora", LoRA(d_in, d_out, config.lora_rank, rngs))
        self.qk_norm = config.is_v3
        if self.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps, multiply_in_fp32=True)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps, multiply_in_fp32=True)
        self.dropout = nnx.Dropout(config.dropout)
        self.impl, self.block_size = config.attention_impl, config.attention_block_size
        self.recompute_scores = config.remat != "none"  # causal_blocks keeps its probabilities only without remat

    def __call__(self, x_BTD, cos, sin, mask: AttentionMask, kv_cache=None, cache_index=None, dropout_rngs=None):
        """Returns (out_BTD, (k_BTKHd, v_BTKHd)): the new keys and values (after RoPE; in the cache's dtype with
        a cache, which the caller writes them into)."""
        dtype = x_BTD.dtype
        b, t, d = x_BTD.shape
        # Projections on [B·T, D]: contracting over one token axis, the weight gradients need no transposed
        # copy of the activations (XLA:CPU transposes them when B and T are separate axes).
        x_ND = x_BTD.reshape(b * t, d)
        q = self._project("q_proj", x_ND).reshape(b, t, self.num_heads, self.head_dim)
        k = self._project("k_proj", x_ND).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self._project("v_proj", x_ND).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = (k, v)
        if kv_cache is not None:  # attend over the cache with the new positions in it: its first b rows, and
            # as many positions as the mask has keys
            new_kv = tuple(new.astype(cache.dtype) for cache, new in zip(kv_cache, new_kv))
            num_keys = mask.bias_B1TS.shape[-1]
            k, v = (write_cache(cache, new, cache_index)[:b, :num_keys].astype(dtype)
                    for cache, new in zip(kv_cache, new_kv))  # fmt: skip
        fused = mask.fusable and dropout_rngs is None
        if fused and self.impl == "cudnn":
            out = padded_causal_attention(q, k, v, mask.bias_B1TS, CUDNN_ROW_MULTIPLE, implementation="cudnn")
        elif fused and self.impl == "splash":  # off TPU, Pallas' interpreter runs the kernel (for tests)
            out = splash_attention(q, k, v, mask.segment_ids_BT, interpret=jax.default_backend() != "tpu")
        elif kv_cache is not None or dropout_rngs is not None or self.impl in ("xla", "cudnn", "splash"):
            dropout = functools.partial(self.dropout, rngs=dropout_rngs, deterministic=dropout_rngs is None)
            out = grouped_attention(q, k, v, mask.bias_B1TS, dropout)
        elif self.impl == "causal_blocks":
            out = causal_block_attention(q, k, v, mask.bias_B1TS, self.block_size, recompute=self.recompute_scores)
        else:
            out = jax.nn.dot_product_attention(
                q, k, v, mask.bias_B1TS, scale=1 / math.sqrt(self.head_dim), implementation="xla"
            )
        out = self._project("o_proj", out.reshape(b * t, self.num_heads * self.head_dim)).reshape(b, t, d)
        return self.dropout(out, rngs=dropout_rngs, deterministic=dropout_rngs is None), new_kv

    def _project(self, name: str, x_ND):
        """x through the projection `name`, plus its LoRA adapter when it has one."""
        out = x_ND @ getattr(self, name)[...].astype(x_ND.dtype)
        lora = getattr(self, f"{name}_lora", None)
        return out if lora is None else out + lora(x_ND)


def swiglu(x_BTD, gate_DF, up_DF, down_FD, batch_axes: tuple[str, ...] = ()):
    """silu(x·gate) * (x·up) · down, computed on [B·T, D] rows with a hand-written backward pass.

    batch_axes: inside shard_map, the mesh axes the batch is split over. The backward pass gives each device's
    own weight gradients, so the weights enter as device-varying values; autodiff sums them over those axes.
    """
    b, t, d = x_BTD.shape
    weights = _local_weights(x_BTD.dtype, batch_axes, gate_DF, up_DF, down_FD)
    return _swiglu_rows(x_BTD.reshape(b * t, d), *weights).reshape(b, t, -1)


def _local_weights(dtype, batch_axes: tuple[str, ...], *weights):
    """The weights in the activation dtype; inside shard_map, as device-varying values (see swiglu)."""
    weights = [w.astype(dtype) for w in weights]
    if batch_axes:
        weights = [jax.lax.pcast(w, batch_axes, to="varying") for w in weights]
    return weights


def _swiglu_rows_fwd(x_ND, gate_DF, up_DF, down_FD):
    gate_NF, up_NF = x_ND @ gate_DF, x_ND @ up_DF
    return (jax.nn.silu(gate_NF) * up_NF) @ down_FD, (x_ND, gate_NF, up_NF, gate_DF, up_DF, down_FD)


@jax.custom_vjp
def _swiglu_rows(x_ND, gate_DF, up_DF, down_FD):
    return _swiglu_rows_fwd(x_ND, gate_DF, up_DF, down_FD)[0]


def _swiglu_rows_bwd(residuals, dy_ND):
    """The same gradients autodiff gives, from the saved pre-activations; the train step on XLA:CPU ran
    1.27× faster with it (minimind2-small, 8 × 512, fp32), as autodiff's version made XLA transpose each
    layer's [N, F] gradient to get the gate and up weight gradients."""
    x_ND, gate_NF, up_NF, gate_DF, up_DF, down_FD = residuals
    sigmoid_NF = jax.nn.sigmoid(gate_NF)
    silu_NF = gate_NF * sigmoid_NF
    d_hidden_NF = dy_ND @ down_FD.T
    d_up_NF = d_hidden_NF * silu_NF
    d_gate_NF = d_hidden_NF * up_NF * sigmoid_NF * (1 + gate_NF * (1 - sigmoid_NF))
    dx_ND = d_gate_NF @ gate_DF.T + d_up_NF @ up_DF.T
    return dx_ND, x_ND.T @ d_gate_NF, x_ND.T @ d_up_NF, (silu_NF * up_NF).T @ dy_ND


_swiglu_rows.defvjp(_swiglu_rows_fwd, _swiglu_rows_bwd)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj, self.down_proj = _linear(rngs, d, f), _linear(rngs, d, f), _linear(rngs, f, d)
        self.dropout = nnx.Dropout(config.dropout)

    def __call__(self, x_BTD, train: bool, dropout_rngs=None, batch_axes=()):
        out = swiglu(x_BTD, self.gate_proj[...], self.up_proj[...], self.down_proj[...], batch_axes)
        return self.dropout(out, rngs=dropout_rngs, deterministic=dropout_rngs is None), jnp.zeros((), jnp.float32)


def routed_swiglu(
    x_ND, expert_index_NK, gate_EDF, up_EDF, down_EFD, batch_axes: tuple[str, ...] = (), *, tile_size: int
):
    """Each token's chosen experts' SwiGLU outputs [N, K, D] (K choices per token), each expert run only on the
    tokens routed to it.

    The A = N·K (token, choice) assignments are grouped by expert, in token order within a group (a stable sort
    by expert id), into R rows where each group is padded with zero rows to whole units of tile_size // 4 rows.
    Each group runs as full tiles of tile_size rows, then its last few units one at a time: padding to whole
    tiles cost 12% more rows on minimind2-moe. jax.lax.ragged_dot groups rows the same way, but XLA:CPU lowers
    it to a masked product with all E experts, as slow as running every expert on every token.
    batch_axes: as in swiglu.
    """
    n, top_k = expert_index_NK.shape
    num_experts = gate_EDF.shape[0]
    num_assignments = n * top_k
    tiling = _Tiling(min(tile_size, num_assignments))
    unit = tiling.unit
    num_rows = (num_assignments + num_experts * (unit - 1)) // unit * unit  # the most that any routing fills
    expert_A = expert_index_NK.reshape(num_assignments)
    chosen_AE = jax.nn.one_hot(expert_A, num_experts, dtype=jnp.int32)
    rank_A = (jnp.cumsum(chosen_AE, axis=0) * chosen_AE).sum(1) - 1  # place among its expert's assignments
    units_E = -(-chosen_AE.sum(0) // unit)
    row_A = ((jnp.cumsum(units_E) - units_E) * unit)[expert_A] + rank_A
    token_A = jnp.arange(num_assignments, dtype=jnp.int32) // top_k
    token_R = jnp.full((num_rows,), n, jnp.int32).at[row_A].set(token_A)
    x_RD = jnp.take(x_ND, token_R, axis=0, mode="fill", fill_value=0)  # padding rows (token n) are zeros
    weights = _local_weights(x_ND.dtype, batch_axes, gate_EDF, up_EDF, down_EFD)
    out_RD = _grouped_swiglu_rows(x_RD, units_E, *weights, tiling)
    return out_RD[row_A].reshape(n, top_k, -1)


def ragged_swiglu(x_ND, expert_index_NK, gate_EDF, up_EDF, down_EFD, batch_axes: tuple[str, ...] = ()):
    """routed_swiglu with jax.lax.ragged_dot: the assignments sorted by expert (stably, so token order within a
    group), one grouped matmul per projection, and autodiff's grouped matmuls for the backward pass. As fast as
    the backend's ragged_dot: XLA:CPU and XLA:GPU (jaxlib 0.10/0.11) expand it to every expert on every row.
    """
    n, top_k = expert_index_NK.shape
    num_experts = gate_EDF.shape[0]
    expert_A = expert_index_NK.reshape(n * top_k)
    order_A = jnp.argsort(expert_A, stable=True)  # assignment (token · K + choice) at each sorted row
    group_sizes_E = jnp.bincount(expert_A, length=num_experts).astype(jnp.int32)
    x_AD = jnp.take(x_ND, order_A // top_k, axis=0)
    gate, up, down = _local_weights(x_ND.dtype, batch_axes, gate_EDF, up_EDF, down_EFD)
    hidden_AF = jax.nn.silu(jax.lax.ragged_dot(x_AD, gate, group_sizes_E)) * jax.lax.ragged_dot(x_AD, up, group_sizes_E)
    out_AD = jax.lax.ragged_dot(hidden_AF, down, group_sizes_E)
    row_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(n * top_k, dtype=order_A.dtype))
    return jnp.take(out_AD, row_A, axis=0).reshape(n, top_k, -1)


class _Tiling(NamedTuple):
    """Rows per matmul in routed_swiglu: full tiles of `size` rows, and units of size // 4 rows for the rest."""

    size: int

    @property
    def unit(self) -> int:
        return max(1, self.size // 4)

    def expert_loops(self, units_E, weights):
        """(that expert's slices of weights, its tile loops) for each expert in turn. The expert is a Python int,
        so its weights are static slices. Its loops are (rows per tile, first row, number of tiles): its full
        tiles, then its remaining units."""
        units_per_tile = self.size // self.unit
        first_unit = jnp.zeros((), jnp.int32)
        for expert in range(units_E.shape[0]):
            full_tiles, rest = units_E[expert] // units_per_tile, units_E[expert] % units_per_tile
            loops = (
                (self.size, first_unit * self.unit, full_tiles),
                (self.unit, (first_unit + full_tiles * units_per_tile) * self.unit, rest),
            )
            yield tuple(w[expert] for w in weights), loops
            first_unit = first_unit + units_E[expert]


def _over_tiles(run_tile, loops, carry):
    """carry after run_tile(rows, start_row, carry) on each tile of loops (see _Tiling.expert_loops)."""
    for rows, first_row, num_tiles in loops:
        carry = jax.lax.fori_loop(
            0, num_tiles, lambda i, c, rows=rows, first_row=first_row: run_tile(rows, first_row + i * rows, c), carry
        )
    return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _grouped_swiglu_rows(x_RD, units_E, gate_EDF, up_EDF, down_EFD, tiling: _Tiling):
    """_swiglu_rows on expert-grouped rows: the experts' units follow one another, units_E[e] of them for expert
    e; rows after the last unit stay 0. Its backward pass loops over the same tiles with _swiglu_rows_bwd."""
    return _grouped_swiglu_rows_fwd(x_RD, units_E, gate_EDF, up_EDF, down_EFD, tiling)[0]


def _grouped_swiglu_rows_fwd(x_RD, units_E, gate_EDF, up_EDF, down_EFD, tiling):
    def run_tile(expert_weights, rows, start, buffers):
        x_tD = jax.lax.dynamic_slice_in_dim(x_RD, start, rows)
        out_tD, (_, gate_tF, up_tF, *_) = _swiglu_rows_fwd(x_tD, *expert_weights)
        return tuple(
            jax.lax.dynamic_update_slice_in_dim(buffer, tile_rows, start, 0)
            for buffer, tile_rows in zip(buffers, (out_tD, gate_tF, up_tF))
        )

    # zeros_like keeps x's shard_map type (device-varying), which a loop carry must keep.
    hidden_RF = jnp.zeros_like(x_RD, shape=(x_RD.shape[0], gate_EDF.shape[-1]))
    buffers = (jnp.zeros_like(x_RD), hidden_RF, hidden_RF)
    for expert_weights, loops in tiling.expert_loops(units_E, (gate_EDF, up_EDF, down_EFD)):
        buffers = _over_tiles(functools.partial(run_tile, expert_weights), loops, buffers)
    out_RD, gate_RF, up_RF = buffers
    return out_RD, (x_RD, units_E, gate_RF, up_RF, gate_EDF, up_EDF, down_EFD)


def _grouped_swiglu_rows_bwd(tiling, residuals, dy_RD):
    x_RD, units_E, gate_RF, up_RF, gate_EDF, up_EDF, down_EFD = residuals

    def run_tile(expert_weights, rows, start, grads):
        dx_RD, *weight_grads = grads
        tile_rows = lambda a: jax.lax.dynamic_slice_in_dim(a, start, rows)
        tile_residuals = (tile_rows(x_RD), tile_rows(gate_RF), tile_rows(up_RF), *expert_weights)
        dx_tD, *tile_weight_grads = _swiglu_rows_bwd(tile_residuals, tile_rows(dy_RD))
        dx_RD = jax.lax.dynamic_update_slice_in_dim(dx_RD, dx_tD, start, 0)
        return dx_RD, *(total + part for total, part in zip(weight_grads, tile_weight_grads))

    # Each expert's weight gradients add up in a loop carry of their own: cheaper than .at[expert].add on
    # the [E, ...] gradients every tile.
    dx_RD, expert_grads = jnp.zeros_like(x_RD), []
    for expert_weights, loops in tiling.expert_loops(units_E, (gate_EDF, up_EDF, down_EFD)):
        dx_RD, *grads = _over_tiles(
            functools.partial(run_tile, expert_weights), loops, (dx_RD, *map(jnp.zeros_like, expert_weights))
        )
        expert_grads.append(grads)
    return dx_RD, None, *(jnp.stack(grads) for grads in zip(*expert_grads))


_grouped_swiglu_rows.defvjp(_grouped_swiglu_rows_fwd, _grouped_swiglu_rows_bwd)


class MoE(nnx.Module):
    """Routed experts (+ 2510's shared experts, which run on every token). Each routed expert runs only on the
    tokens routed to it (routed_swiglu), as MiniMind's training loop does; each device routes its own tokens."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, f, e = config.hidden_size, config.expert_intermediate_size, config.num_routed_experts
        self.config = config
        self.router = nnx.Param(_uniform_init(rngs.params(), (d, e), d))
        self.gate_proj, self.up_proj, self.down_proj = (
            _linear(rngs, e, d, f),
            _linear(rngs, e, d, f),
            _linear(rngs, e, f, d),
        )
        if config.num_shared_experts:
            s = config.num_shared_experts
            self.shared_gate_proj, self.shared_up_proj = _linear(rngs, s, d, f), _linear(rngs, s, d, f)
            self.shared_down_proj = _linear(rngs, s, f, d)

    def __call__(self, x_BTD, train: bool, dropout_rngs=None, batch_axes=()):
        """batch_axes: mesh axes the batch is split over inside shard_map; the aux loss's means are taken over
        the global batch, so it is the same on any mesh."""
        cfg = self.config
        b, t, d = x_BTD.shape
        num_experts, top_k = cfg.num_routed_experts, cfg.num_experts_per_tok
        router_logits = x_BTD.astype(jnp.float32) @ self.router[...]
        scores_BTE = jax.nn.softmax(router_logits, axis=-1)
        top_weight_BTK, top_index_BTK = jax.lax.top_k(scores_BTE, top_k)
        normalise = cfg.norm_topk_prob and (cfg.is_v3 or top_k > 1)
        if normalise:
            top_weight_BTK = top_weight_BTK / (top_weight_BTK.sum(-1, keepdims=True) + 1e-20)
        chosen_BTKE = jax.nn.one_hot(top_index_BTK, num_experts, dtype=jnp.float32)

        experts = (self.gate_proj[...], self.up_proj[...], self.down_proj[...])
        x_ND, index_NK = x_BTD.reshape(b * t, d), top_index_BTK.reshape(b * t, top_k)
        if cfg.moe_impl == "ragged_dot":
            expert_out_NKD = ragged_swiglu(x_ND, index_NK, *experts, batch_axes)
        else:
            expert_out_NKD = routed_swiglu(x_ND, index_NK, *experts, batch_axes, tile_size=cfg.expert_tile_size)
        expert_out_NKD = expert_out_NKD.astype(jnp.float32)
        if train and not cfg.is_v3:
            # 2510's training path collects expert outputs in an fp16 buffer before weighting them.
            expert_out_NKD = expert_out_NKD.astype(jnp.float16).astype(jnp.float32)
        y = jnp.einsum("nk,nkd->nd", top_weight_BTK.reshape(b * t, top_k), expert_out_NKD).reshape(b, t, d)
        if cfg.num_shared_experts:
            for i in range(cfg.num_shared_experts):
                shared = swiglu(
                    x_BTD, self.shared_gate_proj[i], self.shared_up_proj[i], self.shared_down_proj[i], batch_axes
                )
                y = y + shared.astype(jnp.float32)

        def global_mean(x, axis):
            total, count = x.sum(axis), jnp.float32(np.prod([x.shape[a] for a in np.atleast_1d(axis)]))
            if batch_axes:
                total, count = jax.lax.psum(total, batch_axes), count * jax.lax.psum(1, batch_axes)
            return total / count

        aux = jnp.zeros((), jnp.float32)
        if train and cfg.is_v3 and cfg.router_aux_loss_coef > 0:
            load_KE = global_mean(chosen_BTKE, (0, 1))
            aux = (load_KE * global_mean(scores_BTE, (0, 1))).sum() * num_experts * cfg.router_aux_loss_coef
        elif train and not cfg.is_v3 and cfg.aux_loss_alpha > 0:
            if cfg.seq_aux:  # per sequence: load of each expert in the row times its mean score in the row
                counts_BE = chosen_BTKE.sum((1, 2)) / (t * top_k / num_experts)
                aux = global_mean((counts_BE * scores_BTE.mean(1)).sum(1), 0) * cfg.aux_loss_alpha
            else:
                load_E = global_mean(chosen_BTKE.sum(2), (0, 1)) / top_k
                aux = (global_mean(scores_BTE, (0, 1)) * load_E * num_experts).sum() * cfg.aux_loss_alpha
        return y.astype(x_BTD.dtype), aux


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        fp32_norm = config.is_v3
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fp32_norm)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fp32_norm)
        self.mlp = MoE(config, rngs) if config.use_moe else MLP(config, rngs)

    def __call__(self, h_BTD, cos, sin, mask, kv_cache, cache_index, train, dropout_rngs, batch_axes):
        attn_out, new_kv = self.self_attn(
            self.input_layernorm(h_BTD), cos, sin, mask, kv_cache, cache_index, dropout_rngs
        )
        h_BTD = h_BTD + attn_out
        mlp_out, aux = self.mlp(self.post_attention_layernorm(h_BTD), train, dropout_rngs, batch_axes)
        return h_BTD + mlp_out, aux, new_kv


_REMAT_POLICIES = {
    "full": None,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def unstack_layers(stacked: nnx.State) -> tuple[nnx.State, ...]:
    """The stacked layers' state ([L, ...] leaves) as one state per layer."""
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    return tuple(jax.tree.map(operator.itemgetter(i), stacked) for i in range(num_layers))


def split_for_decoding(model: MiniMind) -> tuple[nnx.GraphDef, nnx.State, tuple[nnx.State, ...]]:
    """(graphdef, params, layer_weights) for many decode steps: each layer's weights as arrays of their own
    (a copy), which every step reads in place (indexing the stacked [L, ...] weights inside a step copies them
    at every step), and the model's other params with the stacked layer weights left out (zero-size), so a
    step's arguments hold each weight once. A step runs
    `nnx.merge(graphdef, params).forward(ids, cache=..., layer_weights=layer_weights)`."""
    graphdef, params = nnx.split(model)
    layers = params["layers"]
    layer_weights = unstack_layers(layers)
    params["layers"] = jax.tree.map(lambda x: jnp.zeros((0,), x.dtype), layers)
    return graphdef, params, layer_weights


class MiniMind(nnx.Module):
    """MiniMindForCausalLM. `model(ids, attention_mask)` gives fp32 logits; `model.forward` gives everything."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.hidden_size
        # The embedding doubles as the (tied) lm_head, whose torch init MiniMind keeps.
        self.embed_tokens = nnx.Param(_uniform_init(rngs.params(), (config.vocab_size, d), d))

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_blocks(rngs):
            return Block(config, rngs)

        self.layers = stacked_blocks(rngs)
        self.norm = RMSNorm(d, config.rms_norm_eps, config.is_v3)
        self.embed_dropout = nnx.Dropout(config.dropout)

    def __call__(self, input_ids, attention_mask=None, **kwargs):
        """fp32 logits [B,T,V]; `input_ids` and `attention_mask` by position or by name, as in MiniMind and HF."""
        return self.forward(input_ids, attention_mask, **kwargs).logits

    def forward(
        self,
        input_ids,
        attention_mask=None,
        *,
        segment_ids_BT=None,
        positions_BT=None,
        cache: KVCache | None = None,
        layer_weights: tuple[nnx.State, ...] | None = None,
        attention_window: int | None = None,
        train: bool = False,
        dropout_rngs: nnx.Rngs | None = None,
        return_logits: bool = True,
        batch_axes: tuple[str, ...] = (),
    ) -> ModelOutput:
        """Runs the model.

        input_ids: [B,T] token ids.
        attention_mask: [B,T] (or [B,S] over the cache's S positions when decoding); 1 = real token, 0 = padding.
        segment_ids_BT: packed rows; a token attends only within its segment. positions_BT restart per segment.
        cache: decode with a fixed-size KV cache; the T new tokens are written at cache.length (each row at
          its own when cache.length is [B]). The layers then run one after another.
        layer_weights: with a cache, each layer's weights as arrays of their own (`split_for_decoding`), which
          the layers read in place; without them each call slices (copies) them out of the stacked weights.
        attention_window: with a cache, attend over its first attention_window positions only (a cache with
          more rows than the batch: its first B rows; the others are left as they are).
        train: MoE aux loss and 2510's fp16 expert buffer, as MiniMind's training mode.
        batch_axes: inside shard_map, the mesh axes the batch is split over (for the MoE aux loss).
        dropout_rngs: enables dropout (config.dropout) when given.
        """
        cfg = self.config
        if not isinstance(input_ids, jax.core.Tracer):  # concrete ids (an eager call) can be checked here
            check_token_ids(np.asarray(input_ids), cfg.vocab_size)
        dtype = jnp.dtype(cfg.dtype)
        b, t = input_ids.shape
        offset = jnp.zeros((), jnp.int32) if cache is None else cache.length
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.reshape(offset, (-1, 1)) + jnp.arange(t, dtype=jnp.int32), (b, t))
        attention_factor = (cfg.rope_scaling or {}).get("attention_factor", 1.0)
        cos, sin = rope_cos_sin(rope_inv_freq(cfg), positions_BT, attention_factor)
        num_keys = t if cache is None else attention_window or cache.layer_k_BSKHd[0].shape[1]
        bias = attention_bias(b, t, num_keys, offset, segment_ids_BT=segment_ids_BT, attention_mask_BS=attention_mask)
        mask = AttentionMask(bias, segment_ids_BT, fusable=cache is None and attention_mask is None)

        h = self.embed_tokens[...][input_ids].astype(dtype)
        h = self.embed_dropout(h, rngs=dropout_rngs, deterministic=dropout_rngs is None)

        graphdef, layer_state = nnx.split(self.layers)
        num_layers = cfg.num_hidden_layers
        layer_keys = (
            jax.random.split(dropout_rngs.dropout(), num_layers)
            if dropout_rngs is not None
            else jnp.zeros((num_layers,), jnp.uint32)
        )

        def run_block(h_BTD, per_layer):
            state, kv, key = per_layer
            block = nnx.merge(graphdef, state)
            rngs = nnx.Rngs(dropout=key) if dropout_rngs is not None else None
            h_BTD, aux, new_kv = block(h_BTD, cos, sin, mask, kv, offset, train, rngs, batch_axes)
            return h_BTD, (aux, new_kv if cache is not None else None)

        if cfg.remat != "none":
            run_block = jax.checkpoint(run_block, policy=_REMAT_POLICIES[cfg.remat])
        new_cache = new_kv = None
        if cache is None:
            # Unrolled (scan_layers=False), compile time grows with depth, but XLA lays out each layer's saved
            # activations freely instead of stacking them into [L, ...] buffers: faster on CPU.
            h, (aux_L, _) = jax.lax.scan(
                run_block, h, (layer_state, None, layer_keys), unroll=1 if cfg.scan_layers else num_layers
            )
            aux = aux_L.sum()
        else:  # one layer after another, each reading its own weights and cache in place
            weights = layer_weights if layer_weights is not None else unstack_layers(layer_state)
            aux_L, layer_k_BTKHd, layer_v_BTKHd = [], [], []
            for i in range(num_layers):
                layer_kv = (cache.layer_k_BSKHd[i], cache.layer_v_BSKHd[i])
                h, (layer_aux, (k_BTKHd, v_BTKHd)) = run_block(h, (weights[i], layer_kv, layer_keys[i]))
                aux_L.append(layer_aux)
                layer_k_BTKHd.append(k_BTKHd)
                layer_v_BTKHd.append(v_BTKHd)
            aux = sum(aux_L)
            new_kv = (tuple(layer_k_BTKHd), tuple(layer_v_BTKHd))
            # The layers return only the new positions: one write of T positions per layer here
            written = cache.with_new(new_kv, lambda old, new: write_cache(old, new, cache.length))
            new_cache = written._replace(length=cache.length + t)

        hidden = self.norm(h)
        logits = self.logits(hidden) if return_logits else None
        return ModelOutput(logits, hidden, aux, new_cache, new_kv)

    def logits(self, hidden_NTD):
        """The tied lm_head: [..., D] -> fp32 [..., V]."""
        embed = self.embed_tokens[...].astype(hidden_NTD.dtype)
        return jnp.einsum("...d,vd->...v", hidden_NTD, embed, preferred_element_type=jnp.float32)
