"""Rollouts: prompts in, the step's rows out, with rewards and advantages.

A rollout comes from one of two sources with one method, `completions(params, records, prompt_ids, prompt_mask,
num_generations, seed)`, which gives each prompt's completions (ids through the first eos):
- `SamplerRollout`: our jitted KV-cache sampler (inference/generation.py), run on the training mesh with
  the weights of the current update and each era's sampling: 2510 is HF `generate` (temperature 0.8, top-k
  50, top-p 1.0), v3 MiniMind's own (temperature 0.8, top-k 50, top-p 0.85);
- `ReplayRollout`: the completions a replay file recorded (an external generator's, or a test's).

Rows are laid out as MiniMind lays them out (`layout_rows`): prompt i's G completions are rows i·G..i·G+G−1;
each row is the prompt, left-padded to the batch's longest and cut to its last max_seq_len ids, then the
completion, right-filled to the batch's longest. Positions are absolute from the first column, left padding
included, as MiniMind's are. v3's forwards mask the padding out (attention_mask = ids ≠ pad), as 2510's PPO
does; 2510's GRPO and SPO attend to it. To share compiled programs between updates, the prompt and completion widths are rounded up
to buckets: the extra prompt columns sit left of the padding, masked out and at negative positions, so every
real token keeps MiniMind's position and sees what it sees there; extra completion columns come after every
token that counts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from minimind_jax.data.pipeline import global_batch, process_rows
from minimind_jax.data.tokenizer import Tokenizer
from minimind_jax.inference.generation import bucket_length, generate
from minimind_jax.rl.algorithms import SPOTracker, completion_log_probs, group_advantages
from minimind_jax.rl.data import PromptRecord, render_prompt
from minimind_jax.rl.rewards import RewardModel, call_reward_fn, era_rewards

# Each era's rollout sampling: (temperature, top_k, top_p, fill of finished rows: "pad" or "eos").
ERA_SAMPLING = {"minimind2": (0.8, 50, 1.0, "pad"), "minimind3": (0.8, 50, 0.85, "eos")}


class Layout(NamedTuple):
    """How a trainer of an era lays out its rows (prompt_matrix's `keep`, layout_rows' flags)."""

    mask_padding: bool
    skip_first_token: bool = False
    keep_prompt: str = "last"


def trainer_layout(mode: str, arch: str) -> Layout:
    """PPO (both eras) masks the padding and keeps each prompt's first ids, 2510's also leaves the first
    generated token out of its sums; GRPO and SPO mask the padding in v3 only."""
    if mode == "ppo":
        return Layout(mask_padding=True, skip_first_token=arch == "minimind2", keep_prompt="first")
    return Layout(mask_padding=arch == "minimind3")


@dataclasses.dataclass
class PromptBatches:
    """The run's prompts, `batch_size` per batch over `epochs` epochs, shuffled per epoch from `seed` (or in
    file order). The last batch of an epoch is short, as MiniMind's DataLoader keeps it. len() is the
    batches per epoch; get_state()/set_state() resume at a batch boundary."""

    records: Sequence[PromptRecord]
    batch_size: int
    seed: int
    epochs: int
    shuffle: bool
    step: int = 0  # the next batch, counted over all epochs

    def __len__(self) -> int:
        return -(-len(self.records) // self.batch_size)

    @property
    def epoch(self) -> int:
        return self.step // len(self)

    def get_state(self) -> dict:
        return {"next_step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["next_step"])

    def next_batch(self) -> tuple[int, list[int]]:
        """(epoch, indices of the records of the next batch)."""
        if self.step >= len(self) * self.epochs:
            raise StopIteration
        epoch, index = divmod(self.step, len(self))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.records)) if self.shuffle else None
        chosen = np.arange(len(self.records)) if order is None else order
        self.step += 1
        return epoch, [int(i) for i in chosen[index * self.batch_size : (index + 1) * self.batch_size]]


def prompt_matrix(tokenizer: Tokenizer, prompts: Sequence[str], max_seq_len: int,
                  keep: str = "last") -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """MiniMind's prompt tokenization: left-padded to the longest, then cut to max_seq_len, [B, P] ids and mask.
    keep "last": the last max_seq_len columns (GRPO, SPO); "first": each prompt's first max_seq_len ids
    before padding (PPO's tokenizer(truncation=True), which cuts the generation prompt of a long prompt)."""
    encoded = tokenizer.encode_batch(list(prompts))
    if keep == "first":
        encoded = [ids[:max_seq_len] for ids in encoded]
    width = max(len(ids) for ids in encoded)
    ids = np.full((len(encoded), width), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(encoded), width), np.int32)
    for row, row_ids in enumerate(encoded):
        if row_ids:
            ids[row, -len(row_ids) :], mask[row, -len(row_ids) :] = row_ids, 1
    return ids[:, -max_seq_len:], mask[:, -max_seq_len:]


def layout_rows(prompt_ids_BP: np.ndarray, completions: Sequence[Sequence[int]], *, arch: str, num_rows: int,
                max_seq_len: int, max_gen_len: int, pad_id: int, eos_id: int, mask_padding: bool,
                skip_first_token: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    """The rows of the step (see the module's docstring) for B prompts and their B·G completions, filled with
    empty rows up to num_rows: sequences, attention_mask and positions [num_rows, P' + R'], completion_mask
    [num_rows, R'] and value_index [num_rows] (the last attended column, where PPO's critic reads a row).

    mask_padding: the forwards mask out pad ids (attention_mask = ids ≠ pad: v3, and 2510's PPO); otherwise the
    padding is attended (2510's GRPO and SPO). The completion mask covers each completion's ids through its eos;
    skip_first_token: 2510 PPO's, which leaves out the first generated token and every pad id."""
    num_prompts, prompt_len = prompt_ids_BP.shape
    generations = len(completions) // num_prompts
    longest = max(len(ids) for ids in completions)
    prompt_cols = min(bucket_length(prompt_len), max(max_seq_len, prompt_len))
    completion_cols = min(bucket_length(longest), max(max_gen_len, longest))
    extra = prompt_cols - prompt_len
    fill = pad_id if ERA_SAMPLING[arch][3] == "pad" else eos_id
    sequences = np.full((num_rows, prompt_cols + completion_cols), pad_id, np.int32)
    completion_mask = np.zeros((num_rows, completion_cols), np.int32)
    sequences[: len(completions), extra:prompt_cols] = np.repeat(prompt_ids_BP, generations, axis=0)
    sequences[: len(completions), prompt_cols:] = fill
    for row, ids in enumerate(completions):
        sequences[row, prompt_cols : prompt_cols + len(ids)] = ids
        completion_mask[row, : len(ids)] = 1
    if skip_first_token:
        completion_mask[: len(completions)] = sequences[: len(completions), prompt_cols:] != pad_id
        completion_mask[:, 0] = 0
    attention_mask = np.ones_like(sequences)
    attention_mask[:, :extra] = 0
    if mask_padding:
        attention_mask &= (sequences != pad_id).astype(np.int32)
    attention_mask[len(completions) :] = 0
    positions = np.broadcast_to(np.arange(sequences.shape[1], dtype=np.int32) - extra, sequences.shape).copy()
    last_attended = sequences.shape[1] - 1 - np.argmax(attention_mask[:, ::-1], axis=1)
    return {"sequences": sequences, "attention_mask": attention_mask, "positions": positions,
            "completion_mask": completion_mask, "value_index": last_attended.astype(np.int32)}  # fmt: skip


class SamplerRollout:
    """Completions drawn by our sampler from the current weights, with the era's sampling."""

    def __init__(self, graphdef: nnx.GraphDef, arch: str, max_gen_len: int, eos_id: int):
        self.graphdef, self.arch, self.max_gen_len, self.eos_id = graphdef, arch, max_gen_len, eos_id

    def completions(self, params, records, prompt_ids_BP, prompt_mask_BP, num_generations: int, seed: int):
        temperature, top_k, top_p, _ = ERA_SAMPLING[self.arch]
        out = generate(
            nnx.merge(self.graphdef, params),
            np.repeat(prompt_ids_BP, num_generations, axis=0),
            self.max_gen_len,
            do_sample=True,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            attention_mask=np.repeat(prompt_mask_BP, num_generations, axis=0),
            eos_token_id=self.eos_id,
            seed=seed,
        )
        new = out[:, prompt_ids_BP.shape[1] :]
        completions = []
        for row in new:  # up to and including the first eos
            ends = np.flatnonzero(row == self.eos_id)
            completions.append([int(i) for i in row[: ends[0] + 1 if len(ends) else len(row)]])
        return completions


class ReplayRollout:
    """The completions recorded in a replay file."""

    def completions(self, params, records, prompt_ids_BP, prompt_mask_BP, num_generations: int, seed: int):
        return [list(ids) for record in records for ids in record.completions]


@dataclasses.dataclass
class RewardSettings:
    """Where rewards come from: a replay's recorded ones when it has them, else --reward_fn when given, else
    MiniMind's era rewards (rules, plus the reward model when one is loaded)."""

    arch: str
    reasoning: bool = False
    reward_model: RewardModel | None = None
    reward_fn: Callable | None = None


class RolloutBatches:
    """The RL run's data: each `next_batch(params, seed)` takes the next prompts, rolls them out with `params`
    and returns the step's micro-batch on the mesh, with the rollout's statistics (MiniMind's names) and
    timings. get_state()/set_state() are the prompts' position (and SPO's tracker), for checkpoints.

    old_log_probs(params, batch): the policy's log-probs of the completions before the update, or None where
    the loss never reads them (2510's GRPO, whose ratio is 1 by construction): zeros then."""

    def __init__(self, prompts: PromptBatches, source, *, tokenizer: Tokenizer, arch: str, num_generations: int,
                 max_seq_len: int, max_gen_len: int, thinking_ratio: float, rewards: RewardSettings,
                 old_log_probs: Callable | None, layout: Layout, tracker: SPOTracker | None = None,
                 sharding=None):  # fmt: skip
        """tracker: SPO's value tracker gives the advantages; without it they are GRPO's, per group (PPO's
        critic makes its own in the step)."""
        self.prompts, self.source, self.tokenizer, self.arch = prompts, source, tokenizer, arch
        self.tracker, self.layout = tracker, layout
        self.num_generations, self.max_seq_len, self.max_gen_len = num_generations, max_seq_len, max_gen_len
        self.thinking_ratio, self.rewards, self.old_log_probs = thinking_ratio, rewards, old_log_probs
        self.sharding = sharding
        self.num_rows = prompts.batch_size * num_generations

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def step(self) -> int:
        return self.prompts.step

    @property
    def epoch(self) -> int:
        return self.prompts.epoch

    def get_state(self) -> dict:
        return {**self.prompts.get_state(), **({"tracker": self.tracker.get_state()} if self.tracker else {})}

    def set_state(self, state: dict) -> None:
        self.prompts.set_state(state)
        if self.tracker is not None:
            self.tracker.set_state(state["tracker"])

    def next_batch(self, params, seed: int, old_params=None) -> tuple[dict, dict]:
        """(the micro-batch, its statistics on the host). params: the policy's, which rolls out; old_params:
        the policy whose log-probs are the old ones (2510 PPO's old actor), by default `params`."""
        epoch, indices = self.prompts.next_batch()
        records = [self.prompts.records[i] for i in indices]
        rng = lambda i: np.random.default_rng([self.prompts.seed, epoch, indices[i]])
        texts = [
            render_prompt(r, self.tokenizer, self.arch, rng(i), self.thinking_ratio) for i, r in enumerate(records)
        ]
        prompt_ids, prompt_mask = prompt_matrix(self.tokenizer, texts, self.max_seq_len, self.layout.keep_prompt)
        started = time.perf_counter()
        completions = self.source.completions(params, records, prompt_ids, prompt_mask, self.num_generations, seed)
        rollout_s = time.perf_counter() - started
        rewards = self.rewards_for(records, texts, completions)
        rows = layout_rows(prompt_ids, completions, arch=self.arch, num_rows=self.num_rows,
                           max_seq_len=self.max_seq_len, max_gen_len=self.max_gen_len, pad_id=self.tokenizer.pad_id,
                           eos_id=self.tokenizer.eos_id, mask_padding=self.layout.mask_padding,
                           skip_first_token=self.layout.skip_first_token)  # fmt: skip
        num_real = len(completions)
        advantages, stats = np.zeros(self.num_rows, np.float32), {}
        rows["rewards"] = np.zeros(self.num_rows, np.float32)
        rows["rewards"][:num_real] = rewards
        if self.tracker is not None:
            advantages[:num_real], stats["baseline"] = self.tracker.advantages(rewards)
        elif self.num_generations > 1:  # GRPO; PPO's one generation per prompt gets its critic's, in the step
            advantages[:num_real] = group_advantages(rewards, self.num_generations, self.arch)
        rows.update(advantages=advantages, row_weight=(np.arange(self.num_rows) < num_real).astype(np.float32))
        batch = on_mesh(rows, self.sharding)
        started = time.perf_counter()
        if self.old_log_probs is None:
            batch["old_log_probs"] = jax.numpy.zeros_like(batch["completion_mask"], jax.numpy.float32)
        else:
            batch["old_log_probs"] = jax.block_until_ready(self.old_log_probs(
                params if old_params is None else old_params, batch))  # fmt: skip
        log_probs_s = time.perf_counter() - started
        if self.tracker is not None:  # after the baselines: MiniMind updates it after the batch's backward pass
            log_probs = np.asarray(multihost_utils.process_allgather(batch["old_log_probs"], tiled=True))
            stats["rho"] = self.tracker.update(rewards, log_probs[:num_real], rows["completion_mask"][:num_real])
        lengths = np.asarray([len(ids) for ids in completions], np.float32)
        stats |= {
            "reward": float(rewards.mean(dtype=np.float32)),
            "advantages_mean": float(advantages[:num_real].mean(dtype=np.float32)),
            "advantages_std": float(advantages[:num_real].std(ddof=1, dtype=np.float32)) if num_real > 1 else 0.0,
            "avg_response_len": float(lengths.mean()),
            "rollout_tokens": int(rows["attention_mask"].sum()),
            "completions": num_real,
            "rollout_s": rollout_s,  # sampling the completions
            "log_probs_s": log_probs_s,  # the policy's log-probs of them before the update
        }
        return batch, stats

    def rewards_for(self, records: list[PromptRecord], prompts: list[str], completions: list[list[int]]) -> np.ndarray:
        generations = self.num_generations
        if all(r.rewards is not None for r in records):
            return np.asarray([x for r in records for x in r.rewards], np.float32)
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
        settings = self.rewards
        if settings.reward_fn is not None:
            fields = {key: [r.fields.get(key) for r in records for _ in range(generations)]
                      for key in sorted({k for r in records for k in r.fields})}  # fmt: skip
            per_completion_prompts = [p for p in prompts for _ in range(generations)]
            return call_reward_fn(settings.reward_fn, per_completion_prompts, texts, records[0].line, **fields)
        return era_rewards(self.arch, prompts, texts, generations, reasoning=settings.reasoning,
                           reward_model=settings.reward_model)  # fmt: skip


def on_mesh(rows: dict[str, np.ndarray], sharding=None) -> dict:
    """Every process's copy of the same host rows as global arrays split over the mesh's batch axes (on the
    default device without a sharding)."""
    if sharding is None:
        return {key: jax.numpy.asarray(value) for key, value in rows.items()}
    num_rows = len(next(iter(rows.values())))
    local = process_rows(sharding, num_rows)
    return global_batch(sharding, {key: value[local] for key, value in rows.items()}, num_rows)


def make_old_log_probs(graphdef: nnx.GraphDef) -> Callable:
    """A jitted (params, batch) -> the policy's log-probs of the completions [N, R], as MiniMind's rollout
    engine computes them before the update."""
    return jax.jit(lambda params, batch: completion_log_probs(nnx.merge(graphdef, params), batch)[0])
