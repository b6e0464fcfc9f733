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
    """masked_ce_sums of the tied lm_head's logits, computed `chunk_size` positions at a time.

    The [B,T,V] logits are never all materialised: each chunk's logits are recomputed in the backward pass
    (jax.checkpoint), so peak memory holds one [B,chunk,V] block instead of the whole tensor.
    """
    b, t, d = hidden_BTD.shape
    num_chunks = -(-t // chunk_size)
    pad = num_chunks * chunk_size - t
    if pad:
        hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
        loss_mask_BT = jnp.pad(loss_mask_BT, ((0, 0), (0, pad)))

    def to_chunks(x):  # [B, C*chunk, ...] -> [C, B, chunk, ...]
        return jnp.swapaxes(x.reshape(b, num_chunks, chunk_size, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def chunk_sums(hidden_BcD, targets_Bc, mask_Bc):
        logits = jnp.einsum("bcd,vd->bcv", hidden_BcD, embed_VD.astype(hidden_BcD.dtype),
                            preferred_element_type=jnp.float32)
        return masked_ce_sums(logits, targets_Bc, mask_Bc)

    def body(totals, chunk):
        ce, count = chunk_sums(*chunk)
        return (totals[0] + ce, totals[1] + count), None

    zero = jnp.zeros((), jnp.float32)
    (ce_sum, mask_sum), _ = jax.lax.scan(body, (zero, zero),
                                         (to_chunks(hidden_BTD), to_chunks(targets_BT), to_chunks(loss_mask_BT)))
    return ce_sum, mask_sum
