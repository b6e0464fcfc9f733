"""The one sharded train step, for every objective (training/objectives.py).

One optimizer update consumes a list of micro-batches (accumulation_steps of them, or as many as MiniMind's
accumulation boundaries give the update: training/accumulation.py), each a dict of the objective's batch fields,
global [B, ...] arrays split over the mesh's batch axes (data×fsdp). The loss and its gradient are computed
in a `shard_map` over those of them with more than one device (see make_train_step): each device sums the
objective's weighted loss and weight on its own rows, both sums are psum'd, and the division happens once,
in the open:

  loss_norm="tokens"   (default)  Σ loss over all micro-batches and devices / Σ weight over the same
                                  + the mean of the micro-batches' MoE aux losses (token-weighted).
  loss_norm="minimind"            Σ_micro (loss(micro) / weight(micro) + aux(micro)) / accumulation_steps,
                                  exactly what MiniMind's trainers optimize (an update of fewer or more
                                  micro-batches than accumulation_steps divides by it all the same).

Parameters enter the shard_map replicated over the batch axes (XLA gathers fsdp shards for the forward
and backward) and stay automatically sharded over `tensor`; the optimizer update runs on the sharded
parameters outside it. The result is the same on any mesh.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from minimind_jax.model.config import SELF_MAPPED_ATTENTION
from minimind_jax.training.config import LOSS_NORMS
from minimind_jax.training.loss import safe_divide
from minimind_jax.training.objectives import NextTokenLoss, Objective, merge_params, split_trainable
from minimind_jax.training.sharding import replicated, split_batch_axes, tree_shardings


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    objective: Objective | None = None,
    frozen_graphdefs: dict[str, nnx.GraphDef] | None = None,
    accumulation_steps: int = 1,
    loss_norm: str = "tokens",
    param_shardings=None,
    opt_shardings=None,
):
    """A jitted `step(params, opt_state, micro_batches, rng, frozen_params={}) -> (params, opt_state, metrics)`.

    objective: default NextTokenLoss(), pretraining's and SFT's. params: the whole parameter dict; only the objective's
    trainable ones move, and opt_state is theirs (init_train_state). micro_batches: a list of batch dicts, one
    program compiled per length. frozen_params: the parameters of the objective's frozen models, whose
    structures frozen_graphdefs gives. params/opt_state are donated.
    A step whose loss or gradient is not finite leaves params and opt_state unchanged (metrics["skipped"]=1).
    """
    if loss_norm not in LOSS_NORMS:
        raise ValueError(f"loss_norm must be one of {LOSS_NORMS}, got {loss_norm!r}")
    objective = objective or NextTokenLoss()
    frozen_graphdefs = frozen_graphdefs or {}
    if set(frozen_graphdefs) != set(objective.frozen_models):
        raise ValueError(
            f"the objective reads frozen models {objective.frozen_models}, given {tuple(frozen_graphdefs)}"
        )

    def micro_objective(batch_axes, num_micro, trainable, fixed, frozen, batch, rng, weight_total, micro_weight_total):
        model = nnx.merge(graphdef, merge_params(trainable, fixed))
        sums = objective.loss_sums(model, batch, frozen, rng=rng, batch_axes=batch_axes)
        loss_total = jax.lax.psum(sums.loss, batch_axes)
        micro_loss = safe_divide(loss_total, micro_weight_total)
        if loss_norm == "tokens":
            value = safe_divide(loss_total, weight_total) + sums.aux_loss / num_micro
        else:
            value = (micro_loss + sums.aux_loss) / accumulation_steps
        metric_totals = {name: jax.lax.psum(total, batch_axes) for name, total in sums.metrics.items()}
        return value, (micro_loss, sums.aux_loss, metric_totals)

    def local_loss_and_grads(batch_axes, trainable, fixed, frozen_params, micro_batches, rng):
        """Runs on each device's rows of every micro-batch (all rows with no batch_axes); returns globally
        reduced values."""
        missing = [name for name in objective.batch_fields if name not in micro_batches[0]]
        if missing:
            raise ValueError(f"{type(objective).__name__} needs batch fields {missing}")
        frozen = {
            name: nnx.merge(frozen_graphdefs[name], jax.lax.stop_gradient(params))
            for name, params in frozen_params.items()
        }
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *micro_batches)  # [A, b, ...]
        micro_weight_totals = jax.lax.psum(jax.vmap(objective.weight_sum)(stacked), batch_axes)
        weight_total = micro_weight_totals.sum()
        device_rng = jax.random.fold_in(rng, jax.lax.axis_index(batch_axes))
        num_micro = len(micro_batches)
        grad_fn = jax.value_and_grad(functools.partial(micro_objective, batch_axes, num_micro), has_aux=True)

        def accumulate(carry, micro):
            grads_sum, halted = carry
            batch, micro_total, index = micro
            if objective.halts:  # a micro-batch after one that halted contributes nothing
                batch = {**batch, "halted": jnp.maximum(batch["halted"], halted)}
            (value, (micro_loss, aux, metric_totals)), grads = grad_fn(
                trainable, fixed, frozen, batch, jax.random.fold_in(device_rng, index), weight_total, micro_total
            )
            if objective.halts:
                halted = jnp.maximum(halted, (metric_totals["halt"] > 0).astype(halted.dtype))
            return (jax.tree.map(jnp.add, grads_sum, grads), halted), (value, micro_loss, aux, metric_totals)

        zeros = jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((), jnp.int32)
        (grads, _), (values, micro_losses, aux_losses, metric_totals) = jax.lax.scan(
            accumulate, zeros, (stacked, micro_weight_totals, jnp.arange(num_micro))
        )
        metrics = {
            "loss": values.sum(),
            "logits_loss": safe_divide((micro_losses * micro_weight_totals).sum(), weight_total)
            if loss_norm == "tokens"
            else micro_losses.mean(),
            "aux_loss": aux_losses.mean(),
            "micro_losses": micro_losses + aux_losses,  # what MiniMind logs for each micro-step
            "loss_tokens": weight_total,
            **{name: safe_divide(totals.sum(), weight_total) for name, totals in metric_totals.items()},
            "per_micro": {name: safe_divide(totals, micro_weight_totals) for name, totals in metric_totals.items()},
        }
        return grads, metrics

    # Only the axes that split the batch are manual. A manual axis of size 1 is not merely idle: when every
    # manual axis has size 1 and `tensor` does not, XLA's partitioner rejects the psums ("Cross-partition
    # allreduce must be in (partial) manual partitioning mode"). With no split batch axis the local function
    # runs as it is, its psums over no axes being the identity.
    batch_axes = split_batch_axes(mesh)
    sharded_loss_and_grads = (
        functools.partial(local_loss_and_grads, ())
        if not batch_axes
        else jax.shard_map(
            functools.partial(local_loss_and_grads, batch_axes),
            mesh=mesh,
            in_specs=(P(), P(), P(), P(batch_axes), P()),
            out_specs=(P(), P()),
            axis_names=set(batch_axes),
        )
    )

    def partitioned_loss_and_grads(*args):
        """The same on the global batch, partitioned by XLA, for a model whose attention kernel maps itself over
        the devices (it finds the mesh in the context)."""
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return local_loss_and_grads((), *args)

    def step(params, opt_state, micro_batches, rng, frozen_params=None):
        trainable, fixed = split_trainable(objective, params)
        self_mapped = nnx.merge(graphdef, params).config.attention_impl in SELF_MAPPED_ATTENTION
        loss_and_grads = partitioned_loss_and_grads if self_mapped else sharded_loss_and_grads
        grads, metrics = loss_and_grads(trainable, fixed, frozen_params or {}, micro_batches, rng)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
        new_params = merge_params(optax.apply_updates(trainable, updates), fixed)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        metrics.update(grad_norm=grad_norm, skipped=(~finite).astype(jnp.int32))
        return keep(new_params, params), keep(new_opt_state, opt_state), metrics

    out_shardings = (param_shardings, opt_shardings, replicated(mesh)) if param_shardings is not None else None
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)


def init_train_state(
    model: nnx.Module, optimizer: optax.GradientTransformation, mesh: Mesh, objective: Objective | None = None
):
    """(graphdef, params, opt_state, param_shardings, opt_shardings), placed on the mesh by the sharding rules.

    params is a plain nested dict of arrays (`nnx.merge(graphdef, params)` rebuilds the model), so the train
    state checkpoints and restores as an ordinary pytree. opt_state covers the objective's trainable
    parameters (all of them by default).
    """
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    param_shardings = tree_shardings(params, mesh, model.config)
    params = jax.device_put(params, param_shardings)
    init = lambda params: optimizer.init(split_trainable(objective or NextTokenLoss(), params)[0])
    opt_shardings = tree_shardings(jax.eval_shape(init, params), mesh, model.config)
    opt_state = jax.jit(init, out_shardings=opt_shardings)(params)
    return graphdef, params, opt_state, param_shardings, opt_shardings
