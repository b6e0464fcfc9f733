"""v3's PPO schedule (train_ppo.py): each rollout of `batch_size` prompts is trained on for `ppo_update_iters`
epochs, each a fresh permutation of its rows cut into minibatches of `mini_batch_size`. Every minibatch is a
micro-step of the one sharded step (TokenPPOLoss); an optimizer step comes after every `accumulation_steps`
of them, counted over the data epoch, and once more at the end of each rollout with what is left. Before the
epochs, the rollout's old values (the critic), reference log-probs and GAE advantages are computed once.

Early stop: once a minibatch halts (its approx KL above early_stop_kl), the rest of that epoch still runs
with a zero loss and the rollout's later epochs do not run. Only the step knows when a minibatch halts, so
after each step the schedule reads the step's per-micro-batch metrics before it gives the next one; a step
that held minibatches of a later epoch (accumulation across epochs) gave them zero weight, and they leave
MiniMind's count of minibatches as if they never ran.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from minimind_jax.rl.algorithms import gae_advantages
from minimind_jax.rl.rollout import RolloutBatches, make_old_log_probs, on_mesh

# MiniMind's per-minibatch metrics, averaged over the minibatches that ran
LOGGED = ("policy_loss", "critic_loss", "approx_kl", "kl_ref", "clipfrac")


class PPOEpochs:
    """The data of a v3 PPO run: `steps(state)` rolls out the next prompts with the actor and gives the
    optimizer steps of their epochs (Trainer's `steps`). get_state()/set_state() add MiniMind's count of
    minibatches in the data epoch (its accumulation boundaries) and the optimizer steps so far (the LR)."""

    def __init__(self, rollouts: RolloutBatches, *, policy_graphdef: nnx.GraphDef, critic_graphdef: nnx.GraphDef,
                 reference_params, ppo_update_iters: int, mini_batch_size: int, accumulation_steps: int,
                 gamma: float, lam: float, seed: int, shuffle: bool = True, sharding=None):  # fmt: skip
        """shuffle: each epoch permutes the rollout's rows (MiniMind's randperm), else keeps their order."""
        self.rollouts, self.reference_params, self.sharding = rollouts, reference_params, sharding
        self.ppo_update_iters, self.mini_batch_size = ppo_update_iters, mini_batch_size
        self.accumulation_steps, self.gamma, self.lam, self.seed = accumulation_steps, gamma, lam, seed
        self.shuffle = shuffle
        self.reference_log_probs = make_old_log_probs(policy_graphdef)
        self.critic_values = jax.jit(lambda params, batch: nnx.merge(critic_graphdef, params).values(batch)[0])
        self.minibatches_in_epoch = 0  # MiniMind's grad_accum_step
        self.optimizer_steps = 0

    def __len__(self) -> int:
        return len(self.rollouts)

    @property
    def step(self) -> int:
        return self.rollouts.step

    @property
    def epoch(self) -> int:
        return self.rollouts.epoch

    def get_state(self) -> dict:
        return {**self.rollouts.get_state(), "minibatches_in_epoch": self.minibatches_in_epoch,
                "optimizer_steps": self.optimizer_steps}  # fmt: skip

    def set_state(self, state: dict) -> None:
        self.rollouts.set_state(state)
        self.minibatches_in_epoch, self.optimizer_steps = state["minibatches_in_epoch"], state["optimizer_steps"]

    def steps(self, state, size: int):
        """Rolls out one batch of prompts with state.params["actor"] and yields its optimizer steps' micro-batch
        lists, reading state.metrics after each; leaves the rollout's statistics and MiniMind's averages of
        LOGGED in state.host_metrics."""
        if self.rollouts.step % len(self.rollouts) == 0:  # MiniMind counts minibatches per data epoch
            self.minibatches_in_epoch = 0
        seed = int(np.random.SeedSequence([self.seed, self.rollouts.step]).generate_state(1)[0])
        rollout_step = self.rollouts.step
        batch, stats = self.rollouts.next_batch(state.params["actor"], seed)
        started = time.perf_counter()
        rows = self._prepared(state.params["critic"], batch)
        stats["values_s"] = time.perf_counter() - started
        totals, pending, halted = dict.fromkeys((*LOGGED, "minibatches"), 0.0), [], False
        for ppo_epoch in range(self.ppo_update_iters):
            if halted:
                break
            order = np.arange(stats["completions"])
            if self.shuffle:
                order = np.random.default_rng([self.seed, rollout_step, ppo_epoch]).permutation(order)
            for start in range(0, len(order), self.mini_batch_size):
                pending.append((ppo_epoch, self._minibatch(rows, order[start : start + self.mini_batch_size], halted)))
                self.minibatches_in_epoch += 1
                if self.minibatches_in_epoch % self.accumulation_steps == 0:
                    yield [micro for _, micro in pending]
                    halt_epoch = self._account(state.metrics, pending, totals)
                    pending, halted = [], halted or halt_epoch is not None
                    if halt_epoch is not None and halt_epoch < ppo_epoch:
                        break  # this epoch's minibatches so far did not count; the rest never run
        if pending:  # what is left at the rollout's end makes one more step
            yield [micro for _, micro in pending]
            self._account(state.metrics, pending, totals)
        count = max(totals.pop("minibatches"), 1)
        state.host_metrics = {**stats, **{name: total / count for name, total in totals.items()},
                              "optimizer_steps": self.optimizer_steps}  # fmt: skip

    def _account(self, metrics: dict, pending: list, totals: dict) -> int | None:
        """Adds a step's minibatches to MiniMind's averages and counts; returns the PPO epoch of the first
        minibatch that halted, if one did. Minibatches of a later epoch than that one leave the count."""
        per_micro = jax.device_get(metrics["per_micro"])
        halts = np.flatnonzero(per_micro["halt"] > 0)
        halt_epoch = pending[halts[0]][0] if len(halts) else None
        for index, (ppo_epoch, _) in enumerate(pending):
            if halt_epoch is not None and ppo_epoch > halt_epoch:
                self.minibatches_in_epoch -= 1
                continue
            totals["minibatches"] += 1
            for name in LOGGED:
                totals[name] += float(per_micro[name][index])
        self.optimizer_steps += 1
        return halt_epoch

    def _prepared(self, critic_params, batch: dict) -> dict[str, np.ndarray]:
        """The rollout's rows on the host, with the critic's old values, the reference's log-probs and the
        whitened GAE advantages and returns."""
        num_completion = batch["completion_mask"].shape[1]
        values = self.critic_values(critic_params, batch)[:, -num_completion - 1 : -1]
        batch = {**batch, "old_values": values,
                 "reference_log_probs": self.reference_log_probs(self.reference_params, batch)}  # fmt: skip
        rows = {key: np.asarray(multihost_utils.process_allgather(value, tiled=True)) for key, value in batch.items()}
        rows["old_values"] = (rows["old_values"] * rows["completion_mask"]).astype(np.float32)
        rows["token_advantages"], rows["returns"] = gae_advantages(rows["rewards"], rows["old_values"],
                                                                   rows["completion_mask"], self.gamma, self.lam)  # fmt: skip
        return rows

    def _minibatch(self, rows: dict[str, np.ndarray], indices: np.ndarray, halted: bool) -> dict:
        """Rows `indices` of the rollout, filled with empty rows to mini_batch_size, on the mesh."""
        size = self.mini_batch_size
        fields = ("sequences", "attention_mask", "positions", "completion_mask", "old_log_probs",
                  "reference_log_probs", "old_values", "returns", "token_advantages")  # fmt: skip
        minibatch = {}
        for key in fields:
            filled = np.zeros((size, *rows[key].shape[1:]), rows[key].dtype)
            filled[: len(indices)] = rows[key][indices]
            minibatch[key] = filled
        minibatch["positions"][len(indices) :] = rows["positions"][0]
        minibatch["halted"] = np.full(size, int(halted), np.int32)
        return on_mesh(minibatch, self.sharding)
