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
    """masked_ce_sums of the tied lm_head's logits, computed only at the loss-bearing positions.

    Those positions are gathered, in order, to the front of a [B·T, D] buffer that is projected `chunk_size`
    rows at a time; chunks past the last of them are skipped (lax.cond), so the lm_head and CE cost follows
    the number of loss positions, not B·T. The [B,T,V] logits never exist: the backward pass recomputes each
    chunk's logits (see `_gathered_ce_sum`), so memory holds one [chunk, V] block at a time.
    """
    d = hidden_BTD.shape[-1]
    mask_N = loss_mask_BT.reshape(-1).astype(jnp.float32)
    n = mask_N.shape[0]
    num_chunks = -(-n // chunk_size)
    # Loss positions first, in order; the slots after them point past the end and gather zeros (mask 0).
    (index_M,) = jnp.nonzero(mask_N != 0, size=num_chunks * chunk_size, fill_value=n)

    def gather(x_N):  # [N, ...] -> [num_chunks, chunk_size, ...]
        picked = jnp.take(x_N, index_M, axis=0, mode="fill", fill_value=0)
        return picked.reshape(num_chunks, chunk_size, *x_N.shape[1:])

    # Inside shard_map the rows vary over devices but the embedding does not; adding a zero taken from the
    # rows types it like them (JAX then sums its gradient over the devices), so the chunk loops type-check.
    embed_VD = embed_VD + jnp.zeros_like(mask_N, shape=()).astype(embed_VD.dtype)
    ce_sum = _gathered_ce_sum(
        gather(hidden_BTD.reshape(n, d)),
        embed_VD,
        gather(targets_BT.reshape(n)),
        gather(mask_N),
        jnp.count_nonzero(mask_N),
    )
    return ce_sum, mask_N.sum()


def _chunk_logits(hidden_cD, embed_VD):
    return jnp.einsum("cd,vd->cv", hidden_cD, embed_VD.astype(hidden_cD.dtype), preferred_element_type=jnp.float32)


@jax.custom_vjp
def _gathered_ce_sum(hidden_CcD, embed_VD, targets_Cc, mask_Cc, num_rows):
    """Σ ce·mask over chunks [C, c] of gathered rows; chunks starting at or after `num_rows` are skipped."""
    return _gathered_ce_sum_fwd(hidden_CcD, embed_VD, targets_Cc, mask_Cc, num_rows)[0]


def _gathered_ce_sum_fwd(hidden_CcD, embed_VD, targets_Cc, mask_Cc, num_rows):
    def compute(hidden_cD, targets_c, mask_c):
        logits_cV = _chunk_logits(hidden_cD, embed_VD)
        lse_c = jax.nn.logsumexp(logits_cV, axis=-1)
        target_logit_c = jnp.take_along_axis(logits_cV, targets_c[:, None], axis=-1)[:, 0]
        return ((lse_c - target_logit_c) * mask_c).sum(), lse_c

    def skip(hidden_cD, targets_c, mask_c):
        return jnp.zeros_like(mask_c, shape=()), jnp.zeros_like(mask_c)

    def body(total, chunk):
        start, *arrays = chunk
        ce, lse_c = jax.lax.cond(start < num_rows, compute, skip, *arrays)
        return total + ce, lse_c

    starts = jnp.arange(hidden_CcD.shape[0], dtype=jnp.int32) * hidden_CcD.shape[1]
    total, lse_Cc = jax.lax.scan(body, jnp.zeros_like(mask_Cc, shape=()), (starts, hidden_CcD, targets_Cc, mask_Cc))
    return total, (hidden_CcD, embed_VD, targets_Cc, mask_Cc, num_rows, lse_Cc)


def _gathered_ce_sum_bwd(residuals, total_grad):
    """d ce / d logits = softmax - onehot(target), from each chunk's recomputed logits and saved logsumexp;
    the embedding gradient is accumulated chunk by chunk."""
    hidden_CcD, embed_VD, targets_Cc, mask_Cc, num_rows, lse_Cc = residuals
    dtype, vocab = hidden_CcD.dtype, embed_VD.shape[0]

    def compute(embed_grad_VD, hidden_cD, targets_c, mask_c, lse_c):
        probs_cV = jnp.exp(_chunk_logits(hidden_cD, embed_VD) - lse_c[:, None])
        target_cV = jax.nn.one_hot(targets_c, vocab, dtype=jnp.float32)
        dlogits_cV = ((probs_cV - target_cV) * (mask_c * total_grad)[:, None]).astype(dtype)
        hidden_grad_cD = jnp.dot(dlogits_cV, embed_VD.astype(dtype), preferred_element_type=jnp.float32)
        embed_grad_VD = embed_grad_VD + jnp.einsum(
            "cv,cd->vd", dlogits_cV, hidden_cD, preferred_element_type=jnp.float32
        )
        return embed_grad_VD, hidden_grad_cD.astype(dtype)

    def skip(embed_grad_VD, hidden_cD, targets_c, mask_c, lse_c):
        return embed_grad_VD, jnp.zeros_like(hidden_cD)

    def body(embed_grad_VD, chunk):
        start, *arrays = chunk
        return jax.lax.cond(start < num_rows, compute, skip, embed_grad_VD, *arrays)

    starts = jnp.arange(hidden_CcD.shape[0], dtype=jnp.int32) * hidden_CcD.shape[1]
    embed_grad_VD, hidden_grad_CcD = jax.lax.scan(
        body, jnp.zeros_like(embed_VD, dtype=jnp.float32), (starts, hidden_CcD, targets_Cc, mask_Cc, lse_Cc)
    )
    return hidden_grad_CcD, embed_grad_VD.astype(embed_VD.dtype), None, None, None


_gathered_ce_sum.defvjp(_gathered_ce_sum_fwd, _gathered_ce_sum_bwd)
