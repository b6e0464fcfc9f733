"""Attention implementations (causal blocks, dot_product_attention) and unrolled layers against the exact path,
logits and gradients, on packed and padded rows; which implementations a config accepts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minimind_jax.model.config import ModelConfig
from minimind_jax.model.transformer import (
    CUDNN_ROW_MULTIPLE,
    MiniMind,
    attention_bias,
    grouped_attention,
    padded_causal_attention,
)


def attention_loss_and_grads(arch: str, attention_impl: str, **config_fields):
    """Logits and parameter gradients of a 2-layer model on packed rows (segments, a padded tail) that also
    carry a padding mask, so every part of the attention bias is exercised."""
    config = ModelConfig(
        arch=arch, hidden_size=64, num_hidden_layers=2, vocab_size=300, attention_impl=attention_impl, **config_fields
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 300, (2, 29))
    segments = np.ones((2, 29), np.int32)
    segments[1, 10:], segments[1, 25:] = 2, 0
    positions = np.stack([np.arange(29), np.r_[np.arange(10), np.arange(15), np.arange(4)]]).astype(np.int32)
    padding = np.ones((2, 29), np.int32)
    padding[0, :3] = 0
    graphdef, params = nnx.split(MiniMind(config, rngs=nnx.Rngs(0)), nnx.Param)

    def loss(params):
        logits = (
            nnx.merge(graphdef, params).forward(ids, padding, segment_ids_BT=segments, positions_BT=positions).logits
        )
        return (logits**2).mean(), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


@pytest.fixture(scope="module")
def exact_attention():
    return {arch: attention_loss_and_grads(arch, "xla") for arch in ("minimind2", "minimind3")}


@pytest.mark.parametrize(
    "impl, fields",
    [
        ("causal_blocks", {}),
        ("causal_blocks", {"remat": "dots"}),
        ("dot_product_attention", {}),
        ("xla", {"scan_layers": False}),
    ],
)
@pytest.mark.parametrize("arch", ["minimind2", "minimind3"])
def test_attention_impls_and_unrolled_layers_match_the_exact_path(impl, fields, arch, exact_attention):
    expected_logits, expected_grads = exact_attention[arch]
    # 8 queries per block: several blocks on 29 positions, the last one short
    logits, grads = attention_loss_and_grads(arch, impl, attention_block_size=8, **fields)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_cudnn_attention_needs_half_precision():
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        ModelConfig(attention_impl="cudnn")
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        ModelConfig(attention_impl="flash")
    assert ModelConfig(attention_impl="cudnn", dtype="bfloat16").attention_impl == "cudnn"


@pytest.mark.parametrize("t", [29, 32, 63])
def test_rows_padded_for_a_fused_kernel_give_the_unpadded_attention_and_gradients(t):
    """cuDNN's path pads rows at their end to its multiple (2510's rows of 511 positions to 512). With XLA in
    the kernel's place: the same outputs and q, k, v gradients as the exact path on the unpadded rows, on packed
    rows (segments) with grouped kv heads, and nothing NaN."""
    rng = np.random.default_rng(t)
    q, k, v = (jnp.asarray(rng.normal(size=(2, t, heads, 16)), jnp.float32) for heads in (4, 2, 2))
    segments = np.ones((2, t), np.int32)
    segments[1, t // 3 :], segments[1, t - 4 :] = 2, 3
    bias = attention_bias(2, t, t, 0, segment_ids_BT=jnp.asarray(segments))
    cotangent = jnp.asarray(rng.normal(size=(2, t, 4, 16)), jnp.float32)
    padded = lambda q, k, v: padded_causal_attention(q, k, v, bias, CUDNN_ROW_MULTIPLE, implementation="xla")
    exact = lambda q, k, v: grouped_attention(q, k, v, bias)
    outputs = {}
    for name, attend in (("padded", padded), ("exact", exact)):
        out, vjp = jax.vjp(attend, q, k, v)
        outputs[name] = (out, *vjp(cotangent))
    for got, expected in zip(outputs["padded"], outputs["exact"]):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, expected, atol=2e-6, rtol=1e-5)
