"""Held-out scores: the masked eval loss, Σ(ce·mask) / Σmask over a whole dataset with the same masks as
training, and a DPO objective's reward margin and accuracy on held-out pairs.

Used by `main.py eval`, by the trainer's `--eval_data_path` and by the demo. The masked loss runs the model in
eval mode (no dropout, MoE without aux loss). Sums are accumulated on the host in float64.
"""

from __future__ import annotations

import math
import sys

import jax
import tqdm
from flax import nnx

from minimind_jax.errors import UserError
from minimind_jax.training.loss import masked_ce_sums


def make_loss_sums(graphdef: nnx.GraphDef):
    """jit: (params, batch) -> (Σ ce·mask, Σ mask). One compiled program per batch shape, for any weights
    of this structure."""

    @jax.jit
    def loss_sums(params, batch):
        out = nnx.merge(graphdef, params).forward(
            batch["inputs"], segment_ids_BT=batch["segment_ids"], positions_BT=batch["positions"]
        )
        return masked_ce_sums(out.logits, batch["targets"], batch["loss_mask"])

    return loss_sums


def evaluate(loss_sums, params, batches, num_batches: int | None = None, progress: bool = False) -> dict:
    """Token-weighted masked loss over `batches` (the first `num_batches` of them when given)."""
    total = len(batches) if num_batches is None else num_batches
    ce_total, tokens = 0.0, 0.0
    bar = tqdm.tqdm(total=total, desc="eval", unit="batch", disable=not progress, file=sys.stderr)
    for index, batch in enumerate(batches):
        if index == total:
            break
        ce_sum, count = jax.device_get(loss_sums(params, batch))
        ce_total, tokens = ce_total + float(ce_sum), tokens + float(count)
        bar.update()
        if tokens:
            bar.set_postfix(loss=f"{ce_total / tokens:.4f}")
    bar.close()
    if not tokens:
        raise UserError("no token carries loss in the evaluated examples")
    loss = ce_total / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "loss_tokens": int(tokens)}


def evaluate_preferences(objective, graphdef: nnx.GraphDef, params, reference_params, batches) -> dict:
    """A DPO objective's loss and metrics (reward margin and accuracy) on held-out pairs (data.preference's
    PairBatches), the policy `params` against the frozen reference; averaged over the pairs."""

    @jax.jit
    def sums(params, reference_params, batch):
        model, frozen = nnx.merge(graphdef, params), {"reference": nnx.merge(graphdef, reference_params)}
        out = objective.loss_sums(model, batch, frozen, rng=jax.random.key(0), batch_axes=())
        return out.loss, out.metrics, objective.weight_sum(batch)

    totals, pairs = {}, 0.0
    for batch in batches:
        loss, metrics, weight = jax.device_get(sums(params, reference_params, batch))
        for name, value in {"loss": loss, **metrics}.items():
            totals[name] = totals.get(name, 0.0) + float(value)
        pairs += float(weight)
    if not pairs:
        raise UserError("no preference pair in the evaluated data")
    return {name: total / pairs for name, total in totals.items()} | {"pairs": int(pairs)}
