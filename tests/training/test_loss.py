"""Loss-position cross-entropy in chunks (the fast path) against the full logits: sums, weights and gradients,
inside shard_map too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from minimind_jax.training.loss import chunked_masked_ce_sums, masked_ce_sums


def ce_problem(batch=3, seq=37, dim=16, vocab=50, loss_fraction=0.3, seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.standard_normal((batch, seq, dim)), jnp.float32),
        jnp.asarray(rng.standard_normal((vocab, dim)), jnp.float32),
        jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32),
        jnp.asarray(rng.random((batch, seq)) < loss_fraction, jnp.float32),
    )


def full_ce_sums(hidden, embed, targets, mask):
    return masked_ce_sums(jnp.einsum("btd,vd->btv", hidden, embed), targets, mask)


@pytest.mark.parametrize("loss_fraction", [0.0, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("chunk_size", [8, 16, 111, 500])
def test_chunked_ce_matches_full_logits(loss_fraction, chunk_size):
    hidden, embed, targets, mask = ce_problem(loss_fraction=loss_fraction)
    chunked = jax.jit(lambda h, e: chunked_masked_ce_sums(h, e, targets, mask, chunk_size))
    expected, got = full_ce_sums(hidden, embed, targets, mask), chunked(hidden, embed)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
    assert float(got[1]) == float(expected[1]) == float(mask.sum())
    expected_grads = jax.grad(lambda h, e: full_ce_sums(h, e, targets, mask)[0], argnums=(0, 1))(hidden, embed)
    got_grads = jax.jit(jax.grad(lambda h, e: chunked(h, e)[0], argnums=(0, 1)))(hidden, embed)
    for g, e in zip(got_grads, expected_grads):
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_chunked_ce_uses_mask_weights_and_bf16_hidden():
    hidden, embed, targets, mask = ce_problem()
    weights = mask * jnp.linspace(0.5, 2.0, mask.size).reshape(mask.shape)
    expected = full_ce_sums(
        hidden.astype(jnp.bfloat16).astype(jnp.float32),
        embed.astype(jnp.bfloat16).astype(jnp.float32),
        targets,
        weights,
    )
    got = chunked_masked_ce_sums(hidden.astype(jnp.bfloat16), embed, targets, weights, 16)
    np.testing.assert_allclose(got[0], expected[0], rtol=2e-3)
    np.testing.assert_allclose(got[1], weights.sum(), rtol=1e-6)


def test_chunked_ce_inside_shard_map_matches_full_logits():
    """As the train step uses it: rows split over devices, the embedding replicated, sums psum'd."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    hidden, embed, targets, mask = ce_problem(batch=jax.device_count())

    def loss_and_grads(ce_sums):
        def local(h, e, t, m):
            return jax.value_and_grad(lambda h, e: jax.lax.psum(ce_sums(h, e, t, m), "data"), argnums=(0, 1))(h, e)

        return jax.jit(
            jax.shard_map(
                local, mesh=mesh, in_specs=(P("data"), P(), P("data"), P("data")), out_specs=(P(), (P("data"), P()))
            )
        )

    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    args = (put(hidden, P("data")), put(embed, P()), put(targets, P("data")), put(mask, P("data")))
    expected = loss_and_grads(lambda h, e, t, m: full_ce_sums(h, e, t, m)[0])(*args)
    got = loss_and_grads(lambda h, e, t, m: chunked_masked_ce_sums(h, e, t, m, 8)[0])(*args)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
    for g, e in zip(got[1], expected[1]):
        np.testing.assert_allclose(g, e, atol=1e-5)
