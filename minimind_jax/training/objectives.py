"""What a trainer optimizes. Every trainer runs the one sharded step (training/step.py) with an objective.

An objective declares
- `batch_fields`: the arrays each micro-batch holds, each [B, ...] and split over the mesh's batch axes;
- `trainable(path)`: which parameters train (every one, or adapters only); the others keep their values and
  have no optimizer state;
- `frozen_models`: the names of frozen models it reads (a DPO reference, a distillation teacher); the step
  takes their parameters separately and never differentiates them;

and computes, on one device's rows of a micro-batch, `weight_sum` (Σ weight: loss tokens, pairs) from the
batch alone and `loss_sums` (Σ weighted loss, the model's aux loss, Σ of each metric) from the models. The
step psums the sums over the devices and divides once, by the weight of every device and micro-batch of
the update, so the loss stays token-weighted across devices and accumulation. The weight comes from the
batch because the step needs every micro-batch's before it differentiates the first.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from minimind_jax.data.preference import BATCH_KEYS as PAIR_BATCH_KEYS
from minimind_jax.training.loss import chunked_masked_ce_sums, masked_ce_sums, token_cross_entropy

ParamPath = tuple[str, ...]


class LossSums(NamedTuple):
    """One device's sums over its rows of a micro-batch."""

    loss: jax.Array  # Σ weighted loss, divided by the global Σ weight for the objective
    aux_loss: jax.Array  # a scalar the model already averaged globally (MoE load balance), added as it is
    metrics: Mapping[str, jax.Array]  # Σ of each extra metric, reported divided by the global Σ weight


class Objective(abc.ABC):
    batch_fields: tuple[str, ...]
    frozen_models: tuple[str, ...] = ()
    # An objective that halts reads batch["halted"] [B] (1: contribute nothing) and reports a metric "halt"
    # (> 0: this micro-batch halted); the step sets "halted" on every later micro-batch of the update.
    halts: bool = False

    def trainable(self, path: ParamPath) -> bool:
        """Whether the parameter at `path` (e.g. ("layers", "0", "self_attn", "q_proj")) trains."""
        return True

    @abc.abstractmethod
    def weight_sum(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Σ weight of these rows, from the batch alone."""

    @abc.abstractmethod
    def loss_sums(
        self,
        model: nnx.Module,
        batch: Mapping[str, jax.Array],
        frozen: Mapping[str, nnx.Module],
        *,
        rng: jax.Array,
        batch_axes: tuple[str, ...],
    ) -> LossSums:
        """The sums on these rows. model: in training mode; frozen: the models named by frozen_models;
        rng: this device's key for the micro-batch (dropout); batch_axes: as in the model's forward."""


@dataclasses.dataclass(frozen=True)
class NextTokenLoss(Objective):
    """Pretraining, SFT and LoRA: Σ cross-entropy · loss_mask over the targets, weighted by Σ loss_mask.

    loss_chunk_size: compute the tied lm_head and CE that many loss positions at a time, never holding the
    [B, T, V] logits; None computes them in one piece, as MiniMind does.
    adapters_only: train the LoRA adapters alone (the model's `*_lora` modules), as train_lora.py does.
    """

    loss_chunk_size: int | None = None
    adapters_only: bool = False
    batch_fields = ("inputs", "targets", "loss_mask", "segment_ids", "positions")

    def trainable(self, path):
        return not self.adapters_only or any(name.endswith("_lora") for name in path)

    def weight_sum(self, batch):
        return batch["loss_mask"].astype(jnp.float32).sum()

    def loss_sums(self, model, batch, frozen, *, rng, batch_axes):
        dropout = nnx.Rngs(dropout=rng) if model.config.dropout > 0 else None
        out = model.forward(
            batch["inputs"],
            segment_ids_BT=batch["segment_ids"],
            positions_BT=batch["positions"],
            train=True,
            dropout_rngs=dropout,
            return_logits=self.loss_chunk_size is None,
            batch_axes=batch_axes,
        )
        if self.loss_chunk_size is None:
            ce_sum, _ = masked_ce_sums(out.logits, batch["targets"], batch["loss_mask"])
        else:
            ce_sum, _ = chunked_masked_ce_sums(
                out.hidden_states, model.embed_tokens[...], batch["targets"], batch["loss_mask"], self.loss_chunk_size
            )
        return LossSums(ce_sum, out.aux_loss, {})


def split_trainable(objective: Objective, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainable, fixed): the nested parameter dict's leaves as the objective trains them, in two dicts of the
    same nesting. When every parameter trains, `params` itself and {}."""
    trainable, fixed = {}, {}
    for path, leaf in _leaves(params):
        into = trainable if objective.trainable(tuple(map(str, path))) else fixed
        for key in path[:-1]:
            into = into.setdefault(key, {})
        into[path[-1]] = leaf
    return (params, {}) if not fixed else (trainable, fixed)


def merge_params(trainable: dict[str, Any], fixed: dict[str, Any]) -> dict[str, Any]:
    """The inverse of split_trainable."""
    if not fixed:
        return trainable
    merged = dict(trainable)
    for key, value in fixed.items():
        merged[key] = merge_params(merged[key], value) if key in merged else value
    return merged


def _leaves(tree: dict, prefix: tuple = ()):
    """(path of keys, leaf) for each leaf; keys as they are (nnx gives layer indices as ints)."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


@dataclasses.dataclass(frozen=True)
class DPOLoss(Objective):
    """MiniMind's DPO (train_dpo.py): −log σ(β·((πc − πr) − (ρc − ρr))), averaged over pairs, where π and ρ are
    the policy's and the frozen reference's log-probability of a side's targets over its mask: summed (v3) or
    averaged over the mask (2510). Rows come in pairs, chosen then rejected (data/preference.py).

    Metrics: reward_margin, the mean of β·((πc − ρc) − (πr − ρr)), and reward_accuracy, how often the chosen
    side's reward β·(π − ρ) beats the rejected side's. add_aux_loss: v3 adds the policy's MoE aux loss.
    """

    beta: float
    mean_over_mask: bool
    add_aux_loss: bool
    batch_fields = PAIR_BATCH_KEYS
    frozen_models = ("reference",)

    def weight_sum(self, batch):
        return batch["pair_weight"].sum() / 2  # each pair weighs on its two rows

    def loss_sums(self, model, batch, frozen, *, rng, batch_axes):
        dropout = nnx.Rngs(dropout=rng) if model.config.dropout > 0 else None
        policy = model.forward(batch["inputs"], segment_ids_BT=batch["segment_ids"], positions_BT=batch["positions"],
                               train=True, dropout_rngs=dropout, batch_axes=batch_axes)  # fmt: skip
        reference = frozen["reference"].forward(
            batch["inputs"], segment_ids_BT=batch["segment_ids"], positions_BT=batch["positions"]
        )
        policy_R2, reference_R2 = (self._side_log_probs(out.logits, batch) for out in (policy, reference))
        weight_R = batch["pair_weight"].reshape(-1, 2)[:, 0]
        rewards_R2 = self.beta * (policy_R2 - reference_R2)
        margin_R = rewards_R2[:, 0] - rewards_R2[:, 1]  # = β·((πc − πr) − (ρc − ρr))
        loss_R = -jax.nn.log_sigmoid(margin_R)
        metrics = {"reward_margin": (margin_R * weight_R).sum(),
                   "reward_accuracy": ((margin_R > 0) * weight_R).sum()}  # fmt: skip
        aux = policy.aux_loss if self.add_aux_loss else jnp.zeros((), jnp.float32)
        return LossSums((loss_R * weight_R).sum(), aux, metrics)

    def _side_log_probs(self, logits_BTV, batch):
        """[pairs, 2]: each row's log-probability of its targets over its mask (summed, or its mean)."""
        log_probs_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
        target_BT = jnp.take_along_axis(log_probs_BTV, batch["targets"][..., None], axis=-1)[..., 0]
        mask_BT = batch["loss_mask"].astype(jnp.float32)
        per_row_B = (target_BT * mask_BT).sum(-1)
        if self.mean_over_mask:
            per_row_B = per_row_B / jnp.maximum(mask_BT.sum(-1), 1e-8)
        return per_row_B.reshape(-1, 2)


@dataclasses.dataclass(frozen=True)
class DistillLoss(Objective):
    """MiniMind's white-box distillation (train_distillation.py): α·CE + (1 − α)·T²·KL(teacher ‖ student) over the
    loss positions, each a mean over those positions, the teacher's logits cut to the student's vocabulary and
    both softened by the temperature T. The student's MoE aux loss joins the CE (so it is scaled by α).

    ignore_pad_targets: 2510's CE ignores targets of id 0 (its ignore_index) while still counting them in the
    mean. Metrics: ce and distill, the two parts.
    """

    alpha: float
    temperature: float
    ignore_pad_targets: bool
    batch_fields = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
    frozen_models = ("teacher",)

    def weight_sum(self, batch):
        return batch["loss_mask"].astype(jnp.float32).sum()

    def loss_sums(self, model, batch, frozen, *, rng, batch_axes):
        dropout = nnx.Rngs(dropout=rng) if model.config.dropout > 0 else None
        inputs = dict(segment_ids_BT=batch["segment_ids"], positions_BT=batch["positions"])
        student = model.forward(batch["inputs"], **inputs, train=True, dropout_rngs=dropout, batch_axes=batch_axes)
        teacher_BTV = frozen["teacher"].forward(batch["inputs"], **inputs).logits[..., : student.logits.shape[-1]]
        mask_BT = batch["loss_mask"].astype(jnp.float32)
        ce_BT = token_cross_entropy(student.logits, batch["targets"])
        if self.ignore_pad_targets:
            ce_BT = jnp.where(batch["targets"] == 0, 0.0, ce_BT)
        t = self.temperature
        teacher_probs_BTV = jax.nn.softmax(teacher_BTV.astype(jnp.float32) / t, axis=-1)
        student_log_probs_BTV = jax.nn.log_softmax(student.logits.astype(jnp.float32) / t, axis=-1)
        kl_BT = (jax.scipy.special.xlogy(teacher_probs_BTV, teacher_probs_BTV)
                 - teacher_probs_BTV * student_log_probs_BTV).sum(-1)  # fmt: skip
        ce_sum, distill_sum = (ce_BT * mask_BT).sum(), t * t * (kl_BT * mask_BT).sum()
        loss = self.alpha * ce_sum + (1 - self.alpha) * distill_sum
        return LossSums(loss, self.alpha * student.aux_loss, {"ce": ce_sum, "distill": distill_sum})


@dataclasses.dataclass(frozen=True)
class TagWeightedLoss(Objective):
    """2510's reasoning distillation (train_distill_reason.py): SFT's CE where every target that is one of the
    tag ids (the ids of `<think>`, `</think>`, `<answer>`, `</answer>`) weighs `tag_weight` instead of its mask
    value (inside the loss positions or not), divided by the sum of the mask alone; plus the MoE aux loss."""

    tag_ids: tuple[int, ...]
    tag_weight: float = 10.0
    batch_fields = ("inputs", "targets", "loss_mask", "segment_ids", "positions")

    def weight_sum(self, batch):
        return batch["loss_mask"].astype(jnp.float32).sum()

    def loss_sums(self, model, batch, frozen, *, rng, batch_axes):
        dropout = nnx.Rngs(dropout=rng) if model.config.dropout > 0 else None
        out = model.forward(batch["inputs"], segment_ids_BT=batch["segment_ids"], positions_BT=batch["positions"],
                            train=True, dropout_rngs=dropout, batch_axes=batch_axes)  # fmt: skip
        is_tag_BT = jnp.isin(batch["targets"], jnp.asarray(self.tag_ids, jnp.int32))
        weight_BT = jnp.where(is_tag_BT, self.tag_weight, batch["loss_mask"].astype(jnp.float32))
        return LossSums((token_cross_entropy(out.logits, batch["targets"]) * weight_BT).sum(), out.aux_loss, {})
