"""Masked next-token cross-entropy, returned as a (numerator, denominator) pair.

The loss is Σ(ce·mask) / Σmask. Returning both sums lets the train step add them over devices and
micro-batches before dividing once (token-weighted), which is what makes every mesh give the same number.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits_BTV, targets_BT):
    """Per-token CE in fp32: logsumexp(logits) - logits[target]."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits_BTV, axis=-1) - target_logit


def masked_ce_sums(logits_BTV, targets_BT, loss_mask_BT):
    """(Σ ce·mask, Σ mask), both fp32 scalars."""
    mask = loss_mask_BT.astype(jnp.float32)
    return (token_cross_entropy(logits_BTV, targets_BT) * mask).sum(), mask.sum()


def safe_divide(numerator, denominator):
    """numerator / denominator, and exactly 0 (with zero gradient) when nothing carries loss, never NaN."""
    has_tokens = denominator > 0
    return jnp.where(has_tokens, numerator / jnp.where(has_tokens, denominator, 1.0), 0.0)


def chunked_masked_ce_sums(hidden_BTD, embed_VD, targets_BT, loss_mask_BT, chunk_size: int):
    """masked_ce_sums of the tied lm_head's logits, computed only at loss-bearing positions.

    The positions whose mask is non-zero are gathered, in order, to the front of a [B·T, D] buffer, which
    is then projected `chunk_size` rows at a time; chunks past the last loss position are skipped
    (lax.cond), so the lm_head and CE cost follows the number of loss positions, not B·T. Each chunk's
    logits are recomputed in the backward pass (jax.checkpoint): the [B,T,V] logits are never materialised,
    peak memory holds one [chunk, V] block. Exact: the skipped positions carry no loss.
    """
    d = hidden_BTD.shape[-1]
    hidden_ND, targets_N = hidden_BTD.reshape(-1, d), targets_BT.reshape(-1)
    mask_N = loss_mask_BT.reshape(-1).astype(jnp.float32)
    num_chunks = -(-mask_N.shape[0] // chunk_size)
    # Indices of the loss positions first; the slots after them point one past the end, which the gathers
    # below fill with zeros (mask 0: no loss, no gradient).
    (index_N,) = jnp.nonzero(mask_N != 0, size=num_chunks * chunk_size, fill_value=mask_N.shape[0])
    num_loss_positions = jnp.count_nonzero(mask_N)

    def gather(x):  # [N, ...] -> [num_chunks, chunk_size, ...]
        picked = jnp.take(x, index_N, axis=0, mode="fill", fill_value=0)
        return picked.reshape(num_chunks, chunk_size, *x.shape[1:])

    @jax.checkpoint
    def chunk_sums(hidden_CD, targets_C, mask_C):
        logits_CV = jnp.einsum("cd,vd->cv", hidden_CD, embed_VD.astype(hidden_CD.dtype),
                               preferred_element_type=jnp.float32)
        return masked_ce_sums(logits_CV, targets_C, mask_C)

    zero = jnp.zeros_like(mask_N, shape=())  # like the data: varying over the mesh inside shard_map

    def body(totals, chunk):
        first, *arrays = chunk
        ce, count = jax.lax.cond(first < num_loss_positions, chunk_sums, lambda *_: (zero, zero), *arrays)
        return (totals[0] + ce, totals[1] + count), None

    starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size
    (ce_sum, mask_sum), _ = jax.lax.scan(body, (zero, zero),
                                         (starts, gather(hidden_ND), gather(targets_N), gather(mask_N)))
    return ce_sum, mask_sum
