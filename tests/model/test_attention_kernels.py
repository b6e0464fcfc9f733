"""The Splash attention kernel, run in Pallas interpret mode on CPU, against the exact grouped attention: values
and gradients for whole and padded lengths, several blocks, packed rows, grouped kv heads and head dims."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from minimind_jax.model.splash import splash_attention
from minimind_jax.model.transformer import attention_bias, grouped_attention


def packed_segment_ids(t: int) -> np.ndarray:
    """Three segments per row, cut at different places in the two rows."""
    segment_ids_BT = np.zeros((2, t), np.int32)
    for row, cuts in enumerate([(t // 3, 2 * t // 3), (t // 4, t // 2 + 5)]):
        for cut in cuts:
            segment_ids_BT[row, cut:] += 1
    return segment_ids_BT


def values_and_grads(attention, q_BTNHd, k_BTKHd, v_BTKHd, cotangent_BTNHd):
    """The output and the gradients w.r.t. q, k, v of sum(output · cotangent)."""

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v).astype(jnp.float32) * cotangent_BTNHd)

    out = jax.jit(attention)(q_BTNHd, k_BTKHd, v_BTKHd)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q_BTNHd, k_BTKHd, v_BTKHd)
    return out, *grads


def splash_and_exact(t, num_heads, num_kv_heads, head_dim, packed, dtype, splash=splash_attention):
    """`splash` on inputs in `dtype`, and the exact attention in fp32 on the same input values."""
    rng = np.random.default_rng(t + num_heads + head_dim)
    q_BTNHd = jnp.asarray(rng.standard_normal((2, t, num_heads, head_dim)), dtype)
    k_BTKHd, v_BTKHd = (jnp.asarray(rng.standard_normal((2, t, num_kv_heads, head_dim)), dtype) for _ in range(2))
    cotangent_BTNHd = jnp.asarray(rng.standard_normal((2, t, num_heads, head_dim)), jnp.float32)
    segment_ids_BT = jnp.asarray(packed_segment_ids(t)) if packed else None
    bias_B1TT = attention_bias(2, t, t, 0, segment_ids_BT=segment_ids_BT)
    got = values_and_grads(
        lambda q, k, v: splash(q, k, v, segment_ids_BT, interpret=True),
        q_BTNHd,
        k_BTKHd,
        v_BTKHd,
        cotangent_BTNHd,
    )
    exact = values_and_grads(
        lambda q, k, v: grouped_attention(q, k, v, bias_B1TT),
        *(x.astype(jnp.float32) for x in (q_BTNHd, k_BTKHd, v_BTKHd)),
        cotangent_BTNHd,
    )
    return got, exact


@pytest.mark.parametrize(
    "t, num_heads, num_kv_heads, head_dim, packed",
    [
        (256, 2, 2, 64, False),  # one whole 256 block
        (255, 4, 2, 64, False),  # a block less one position, like MiniMind's 511
        (383, 4, 2, 64, False),  # three 128 blocks: whole blocks above the diagonal are skipped
        (300, 4, 2, 64, True),  # segments crossing 128-block edges, and a padded tail
        (256, 4, 2, 128, True),
        (127, 4, 1, 96, True),  # head dim padded to 128
    ],
)
def test_splash_matches_exact_attention_in_float32(t, num_heads, num_kv_heads, head_dim, packed):
    splash, exact = splash_and_exact(t, num_heads, num_kv_heads, head_dim, packed, jnp.float32)
    for name, got, want in zip(("out", "dq", "dk", "dv"), splash, exact):
        assert got.dtype == jnp.float32
        # fp32 sums in another order: measured at most 0.45 of this bound, on values up to 10
        np.testing.assert_allclose(got, want, rtol=5e-6, atol=5e-6, err_msg=name)


def test_splash_in_bfloat16_is_as_close_to_exact_as_bfloat16_allows():
    splash, exact = splash_and_exact(200, 4, 2, 64, True, jnp.bfloat16)
    for name, got, want in zip(("out", "dq", "dk", "dv"), splash, exact):
        assert got.dtype == jnp.bfloat16
        # a few bfloat16 steps (2^-8) of the largest value, as for the bfloat16 exact path: measured 0.44 of this
        np.testing.assert_allclose(
            np.asarray(got, np.float32), want, rtol=0, atol=1e-2 * np.abs(want).max(), err_msg=name
        )


def test_splash_runs_per_device_inside_shard_map():
    """Pallas calls do not declare how their outputs vary over the mesh, so shard_map needs check_vma=False."""
    mesh = jax.sharding.Mesh(jax.devices()[:2], ("data",))

    def sharded(q, k, v, segment_ids_BT, interpret):
        attend = lambda q, k, v, segment_ids_BT: splash_attention(q, k, v, segment_ids_BT, interpret=interpret)
        spec = P("data")
        return jax.shard_map(attend, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec, check_vma=False)(
            q, k, v, segment_ids_BT
        )

    splash, exact = splash_and_exact(130, 4, 2, 64, True, jnp.float32, splash=sharded)
    for name, got, want in zip(("out", "dq", "dk", "dv"), splash, exact):
        np.testing.assert_allclose(got, want, rtol=5e-6, atol=5e-6, err_msg=name)
