"""The routed MoE (each expert runs only on the tokens routed to it) against the dense formulation (every expert
on every token, each token's chosen outputs picked): outputs, aux loss and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minimind_jax.model import transformer as model_lib
from minimind_jax.model.config import ModelConfig


def every_expert_swiglu(x_ND, expert_index_NK, gate_EDF, up_EDF, down_EFD, batch_axes=(), *, tile_size):
    """The dense formulation of routed_swiglu: all E experts' outputs [N, E, D], then the chosen ones (no tiles)."""
    run_expert = lambda gate_DF, up_DF, down_FD: model_lib.swiglu(x_ND[None], gate_DF, up_DF, down_FD, batch_axes)[0]
    out_NED = jax.vmap(run_expert, out_axes=1)(gate_EDF, up_EDF, down_EFD)
    return jnp.take_along_axis(out_NED, expert_index_NK[:, :, None], axis=1)


def _moe_and_inputs(arch, top_k, batch, seq_len, unused_expert, expert_tile_size=128, moe_impl="tiles"):
    config = ModelConfig(
        arch=arch,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        moe_intermediate_size=48,
        use_moe=True,
        num_experts=4,
        n_routed_experts=4,
        num_experts_per_tok=top_k,
        expert_tile_size=expert_tile_size,
        moe_impl=moe_impl,
    )
    moe = model_lib.MoE(config, nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(1), 2)
    # Feature 0 is 1 for every token and adds -10 to one expert's router logit only: it gets no token.
    x_BTD = jax.random.normal(keys[0], (batch, seq_len, 32)).at[:, :, 0].set(1.0)
    moe.router[...] = moe.router[...].at[0].set(0.0).at[0, unused_expert].set(-10.0)
    cotangent_BTD = jax.random.normal(keys[1], x_BTD.shape)
    return moe, x_BTD, cotangent_BTD


def _outputs_and_grads(moe, x_BTD, cotangent_BTD, train):
    graphdef, params = nnx.split(moe)

    def objective(params, x_BTD):
        y_BTD, aux = nnx.merge(graphdef, params)(x_BTD, train)
        return (y_BTD * cotangent_BTD).sum() + aux, (y_BTD, aux)

    (_, (y_BTD, aux)), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(params, x_BTD)
    return y_BTD, aux, grads


@pytest.mark.parametrize(
    "arch,top_k,train",
    [("minimind2", 2, True), ("minimind2", 1, False), ("minimind3", 1, True), ("minimind3", 2, False)],
)
def test_routed_moe_matches_every_expert_on_every_token(arch, top_k, train, monkeypatch):
    # Tiles of 16 rows: several tiles per expert, and padded ones.
    moe, x_BTD, cotangent_BTD = _moe_and_inputs(arch, top_k, batch=2, seq_len=24, unused_expert=3, expert_tile_size=16)
    chosen = jax.lax.top_k(x_BTD @ moe.router[...], top_k)[1]
    assert 3 not in np.asarray(chosen) and len(np.unique(chosen)) == 3, "expert 3 must receive no token"
    assert (moe.config.num_shared_experts == 1) == (arch == "minimind2")

    y, aux, grads = _outputs_and_grads(moe, x_BTD, cotangent_BTD, train)
    monkeypatch.setattr(model_lib, "routed_swiglu", every_expert_swiglu)
    y_dense, aux_dense, grads_dense = _outputs_and_grads(moe, x_BTD, cotangent_BTD, train)

    np.testing.assert_allclose(y, y_dense, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(aux, aux_dense, rtol=1e-6)
    assert (float(aux) > 0) == train
    for (path, got), want in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(grads_dense)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert not np.asarray(grads[0]["gate_proj"][...][3]).any(), "the expert without tokens gets no gradient"


@pytest.mark.parametrize("arch", ["minimind2", "minimind3"])
def test_routed_moe_on_one_token(arch, monkeypatch):
    """Decoding: one token, fewer assignments than a tile."""
    moe, x_BTD, _ = _moe_and_inputs(arch, 2, batch=1, seq_len=1, unused_expert=0)
    y, _ = moe(x_BTD, train=False)
    monkeypatch.setattr(model_lib, "routed_swiglu", every_expert_swiglu)
    np.testing.assert_allclose(y, moe(x_BTD, train=False)[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("arch,top_k,train", [("minimind2", 2, True), ("minimind3", 1, True), ("minimind3", 2, False)])
def test_ragged_dot_moe_matches_every_expert_on_every_token(arch, top_k, train, monkeypatch):
    """moe_impl="ragged_dot" (jax.lax.ragged_dot's grouped matmuls): the dense formulation's outputs, aux loss
    and gradients, an expert without tokens included."""
    moe, x_BTD, cotangent_BTD = _moe_and_inputs(arch, top_k, 2, 24, unused_expert=3, moe_impl="ragged_dot")
    y, aux, grads = _outputs_and_grads(moe, x_BTD, cotangent_BTD, train)
    dense, *_ = _moe_and_inputs(arch, top_k, 2, 24, unused_expert=3)
    monkeypatch.setattr(model_lib, "routed_swiglu", every_expert_swiglu)
    y_dense, aux_dense, grads_dense = _outputs_and_grads(dense, x_BTD, cotangent_BTD, train)
    np.testing.assert_allclose(y, y_dense, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(aux, aux_dense, rtol=1e-6)
    for (path, got), want in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(grads_dense)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
