"""The sharded train step and MiniMind's training recipe.

One optimizer update consumes `accumulation_steps` micro-batches, each a dict of global [B,T] arrays
(`inputs`, `targets`, `loss_mask`, `segment_ids`, `positions`) split over the mesh's batch axes (data×fsdp).
The loss and its gradient are computed in a `shard_map` over those of them with more than one device (see
make_train_step): each device sums ce·mask and the mask on its own rows, both sums are psum'd, and the
division happens once, in the open:

  loss_norm="tokens"   (default)  Σ ce·mask over all micro-batches and devices / Σ mask over the same
                                  + the mean of the micro-batches' MoE aux losses (token-weighted).
  loss_norm="minimind"            Σ_micro (ce_mean(micro) + aux(micro)) / accumulation_steps, exactly
                                  what MiniMind's train_full_sft.py optimizes.

Parameters enter the shard_map replicated over the batch axes (XLA gathers fsdp shards for the forward
and backward) and stay automatically sharded over `tensor`; the optimizer update runs on the sharded
parameters outside it. The result is the same on any mesh."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from minimind_jax.training.loss import chunked_masked_ce_sums, masked_ce_sums, safe_divide
from minimind_jax.training.sharding import replicated, split_batch_axes, tree_shardings



LOSS_NORMS = ("tokens", "minimind")


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                    accumulation_steps: int = 1, loss_norm: str = "tokens", loss_chunk_size: int | None = None,
                    param_shardings=None, opt_shardings=None):
    """A jitted `step(params, opt_state, micro_batches, rng) -> (params, opt_state, metrics)`.

    micro_batches: a list of `accumulation_steps` batch dicts. params/opt_state are donated.
    loss_chunk_size: compute the tied lm_head and CE that many positions at a time (never materialising the
    whole [B,T,V] logits); None computes them in one piece.
    A step whose loss or gradient is not finite leaves params and opt_state unchanged (metrics["skipped"]=1).
    """
    if loss_norm not in LOSS_NORMS:
        raise ValueError(f"loss_norm must be one of {LOSS_NORMS}, got {loss_norm!r}")
    num_micro = accumulation_steps
    batch_axes = split_batch_axes(mesh)

    def micro_objective(params, batch, rng, token_total, micro_token_total):
        model = nnx.merge(graphdef, params)
        dropout = nnx.Rngs(dropout=rng) if model.config.dropout > 0 else None
        out = model.forward(batch["inputs"], segment_ids_BT=batch["segment_ids"], positions_BT=batch["positions"],
                            train=True, dropout_rngs=dropout, return_logits=loss_chunk_size is None,
                            batch_axes=batch_axes)
        if loss_chunk_size is None:
            ce_sum, _ = masked_ce_sums(out.logits, batch["targets"], batch["loss_mask"])
        else:
            ce_sum, _ = chunked_masked_ce_sums(out.hidden_states, params["embed_tokens"][...], batch["targets"],
                                               batch["loss_mask"], loss_chunk_size)
        ce_total = jax.lax.psum(ce_sum, batch_axes)
        logits_loss = safe_divide(ce_total, micro_token_total)
        if loss_norm == "tokens":
            objective = safe_divide(ce_total, token_total) + out.aux_loss / num_micro
        else:
            objective = (logits_loss + out.aux_loss) / num_micro
        return objective, (logits_loss, out.aux_loss)

    def local_loss_and_grads(params, micro_batches, rng):
        """Runs on each device's rows of every micro-batch; returns globally reduced values."""
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *micro_batches)  # [A, b, T]
        micro_token_totals = jax.lax.psum(stacked["loss_mask"].astype(jnp.float32).sum((1, 2)), batch_axes)
        token_total = micro_token_totals.sum()
        device_rng = jax.random.fold_in(rng, jax.lax.axis_index(batch_axes))
        grad_fn = jax.value_and_grad(micro_objective, has_aux=True)

        def accumulate(grads_sum, micro):
            batch, micro_total, index = micro
            (objective, (logits_loss, aux)), grads = grad_fn(params, batch, jax.random.fold_in(device_rng, index),
                                                              token_total, micro_total)
            return jax.tree.map(jnp.add, grads_sum, grads), (objective, logits_loss, aux)

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, (objectives, logits_losses, aux_losses) = jax.lax.scan(
            accumulate, zeros, (stacked, micro_token_totals, jnp.arange(num_micro)))
        metrics = {
            "loss": objectives.sum(),
            "logits_loss": safe_divide((logits_losses * micro_token_totals).sum(), token_total)
            if loss_norm == "tokens" else logits_losses.mean(),
            "aux_loss": aux_losses.mean(),
            "micro_losses": logits_losses + aux_losses,  # what MiniMind logs for each micro-step
            "loss_tokens": token_total,
        }
        return grads, metrics

    # Only the axes that split the batch are manual. A manual axis of size 1 is not merely idle: when every
    # manual axis has size 1 and `tensor` does not, XLA's partitioner rejects the psums ("Cross-partition
    # allreduce must be in (partial) manual partitioning mode"). With no split batch axis the local function
    # runs as it is, its psums over no axes being the identity.
    sharded_loss_and_grads = local_loss_and_grads if not batch_axes else jax.shard_map(
        local_loss_and_grads, mesh=mesh, in_specs=(P(), P(batch_axes), P()), out_specs=(P(), P()),
        axis_names=set(batch_axes))

    def step(params, opt_state, micro_batches, rng):
        grads, metrics = sharded_loss_and_grads(params, micro_batches, rng)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        metrics.update(grad_norm=grad_norm, skipped=(~finite).astype(jnp.int32))
        return keep(new_params, params), keep(new_opt_state, opt_state), metrics

    out_shardings = (param_shardings, opt_shardings, replicated(mesh)) if param_shardings is not None else None
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, mesh: Mesh):
    """(graphdef, params, opt_state, param_shardings, opt_shardings), placed on the mesh by the sharding rules.

    params is a plain nested dict of arrays (`nnx.merge(graphdef, params)` rebuilds the model), so the train
    state checkpoints and restores as an ordinary pytree.
    """
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    param_shardings = tree_shardings(params, mesh, model.config)
    params = jax.device_put(params, param_shardings)
    opt_shardings = tree_shardings(jax.eval_shape(optimizer.init, params), mesh, model.config)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    return graphdef, params, opt_state, param_shardings, opt_shardings
