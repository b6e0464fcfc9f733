"""MiniMind's RL losses, as objectives of the one sharded step (training/objectives.py), and their
advantages, computed on the host from the rewards.

A rollout's rows are laid out as MiniMind lays them out (rl/rollout.py): B prompts, each G times in a row
(prompt-major), every row its left-padded prompt of P ids then its completion in R columns. Each row weighs
`row_weight` (0 on the fill of a short last batch), so the step's Σ loss / Σ weight is MiniMind's mean over
rows of each row's mean over its completion tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimind_jax.training.objectives import LossSums, Objective

ROLLOUT_FIELDS = (
    "sequences",
    "attention_mask",
    "positions",
    "completion_mask",
    "old_log_probs",
    "advantages",
    "row_weight",
)
# 2510's GRPO is REINFORCE with a k3 KL; v3's GRPO has grpo and cispo; spo is 2510's SPO.
POLICY_LOSSES = ("reinforce", "grpo", "cispo", "spo")
SCORE_SCALE = 3.0  # rewards live in [-3, 3] (the reward model's clip); SPO's baseline maps [0, 1] onto it


def group_advantages(rewards_N: np.ndarray, num_generations: int, arch: str) -> np.ndarray:
    """GRPO's advantages [N] from the rewards [N = B·G], in float32 as MiniMind computes them.

    v3: (r − group mean) / (group std, biased, + 1e-4). 2510: the same with the unbiased std, clipped to
    ±10, then normalised again over the whole batch (unbiased std + 1e-8).
    """
    rewards = np.asarray(rewards_N, np.float32)
    grouped_BG = rewards.reshape(-1, num_generations)
    mean_N = np.repeat(grouped_BG.mean(1, dtype=np.float32), num_generations)
    std_N = np.repeat(grouped_BG.std(1, ddof=0 if arch == "minimind3" else 1, dtype=np.float32), num_generations)
    advantages = (rewards - mean_N) / (std_N + np.float32(1e-4))
    if arch == "minimind3":
        return advantages.astype(np.float32)
    advantages = np.clip(advantages, -10, 10)
    spread = advantages.std(ddof=1, dtype=np.float32) + np.float32(1e-8)
    return ((advantages - advantages.mean(dtype=np.float32)) / spread).astype(np.float32)


class SPOTracker:
    """2510's SPO value tracker (AutoAdaptiveValueTracker, rho_mode "kl"): a Beta(α, β) estimate of the
    normalised reward, whose mean is every prompt's baseline. After each micro-batch it decays by ρ and
    takes the batch's mean normalised reward; ρ is 0.9 at first, then 2^(−|Δ|/0.06) clipped to [0.5, 0.96],
    where Δ is how far the policy's mean log-prob of its completions moved since the last batch. MiniMind
    keeps it in memory only; here it is part of the checkpointed data state."""

    def __init__(self):
        self.alpha = self.beta = 0.5 / (1 - 0.5)  # N_init = 1 / (1 - clip_lower), split evenly
        self.old_mean_log_prob = None

    def advantages(self, rewards_N: np.ndarray) -> tuple[np.ndarray, float]:
        """(clip(r − baseline on the reward scale, ±5) [N], the baseline in [0, 1]) in float32."""
        baseline = np.float32(self.alpha / (self.alpha + self.beta))
        unnormalised = baseline * np.float32(2 * SCORE_SCALE) - np.float32(SCORE_SCALE)
        return np.clip(np.asarray(rewards_N, np.float32) - unnormalised, -5.0, 5.0).astype(np.float32), float(baseline)

    def update(self, rewards_N: np.ndarray, log_probs_NR: np.ndarray, mask_NR: np.ndarray) -> float:
        """Takes one micro-batch's rewards and the policy's log-probs of its completions; returns ρ."""
        mask = mask_NR.astype(np.float32)
        mean_log_prob = float((log_probs_NR * mask).sum(dtype=np.float32) / mask.sum(dtype=np.float32))
        rho = 0.9
        if self.old_mean_log_prob is not None:
            rho = max(min(2 ** (-abs(self.old_mean_log_prob - mean_log_prob) / 0.06), 0.96), 0.5)
        self.old_mean_log_prob = mean_log_prob
        normalised = float(
            ((np.asarray(rewards_N, np.float32) + np.float32(SCORE_SCALE)) / np.float32(2 * SCORE_SCALE)).mean(
                dtype=np.float32
            )
        )
        self.alpha = rho * self.alpha + normalised
        self.beta = rho * self.beta + (1 - normalised)
        return rho

    def get_state(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "old_mean_log_prob": self.old_mean_log_prob}

    def set_state(self, state: dict) -> None:
        self.alpha, self.beta, self.old_mean_log_prob = state["alpha"], state["beta"], state["old_mean_log_prob"]


def completion_log_probs(model, batch, *, train: bool = False, dropout_rngs=None, batch_axes=()):
    """(log-probabilities [N, R] of each row's completion tokens under `model`, its MoE aux loss), on the
    rows' own attention mask and positions (rl/rollout.py lays them out). The logits at position P − 1 + t
    predict completion token t."""
    sequences_NT = batch["sequences"]
    num_completion = batch["completion_mask"].shape[1]
    out = model.forward(sequences_NT, batch["attention_mask"], positions_BT=batch["positions"], train=train,
                        dropout_rngs=dropout_rngs, batch_axes=batch_axes)  # fmt: skip
    prompt_len = sequences_NT.shape[1] - num_completion
    log_probs_NRV = jax.nn.log_softmax(out.logits[:, prompt_len - 1 : -1].astype(jnp.float32), axis=-1)
    targets_NR = sequences_NT[:, prompt_len:]
    return jnp.take_along_axis(log_probs_NRV, targets_NR[..., None], axis=-1)[..., 0], out.aux_loss


@dataclasses.dataclass(frozen=True)
class PolicyLoss(Objective):
    """MiniMind's GRPO and SPO losses per token t of a row with advantage A, policy log-prob π, rollout log-prob
    π_old and reference log-prob ρ, with k3 = e^(ρ−π) − (ρ−π) − 1:

      reinforce (2510 GRPO): −(e^(π − sg π)·A − β·k3)              (the ratio is 1: REINFORCE with a KL term)
      grpo (v3 GRPO):        −(min(r·A, clip(r, 1−ε, 1+ε)·A) − β·k3),  r = e^(π − π_old)
      cispo (v3 GRPO):       −(sg(min(r, ε_high))·A·π − β·k3)
      spo (2510 SPO):        −(π·A − β·k3)

    averaged over the row's completion tokens, then over rows. v3 adds the policy's MoE aux loss; 2510 does
    not. Metrics, each summed over rows: kl_ref_sum, k3_sum and completion_tokens (Σ (ρ − π), Σ k3 and Σ mask:
    MiniMind's kl_ref and SPO's kl are ratios of them).
    """

    variant: str
    beta: float
    epsilon: float = 0.2
    epsilon_high: float = 5.0
    batch_fields = ROLLOUT_FIELDS
    frozen_models = ("reference",)

    def __post_init__(self):
        if self.variant not in POLICY_LOSSES:
            raise ValueError(f"variant must be one of {POLICY_LOSSES}, got {self.variant!r}")

    @property
    def is_v3(self) -> bool:
        return self.variant in ("grpo", "cispo")

    @property
    def reads_old_log_probs(self) -> bool:
        """Whether the loss (or SPO's tracker) reads the rollout's log-probs; 2510's GRPO never does."""
        return self.variant != "reinforce"

    def weight_sum(self, batch):
        return batch["row_weight"].sum()

    def loss_sums(self, model, batch, frozen, *, rng, batch_axes):
        dropout = nnx_dropout(model, rng)
        policy_NR, aux = completion_log_probs(model, batch, train=True, dropout_rngs=dropout, batch_axes=batch_axes)
        reference_NR, _ = completion_log_probs(frozen["reference"], batch)
        mask_NR = batch["completion_mask"].astype(jnp.float32)
        advantage_N1 = batch["advantages"][:, None]
        log_ratio_ref_NR = reference_NR - policy_NR
        k3_NR = jnp.exp(log_ratio_ref_NR) - log_ratio_ref_NR - 1
        if self.variant == "reinforce":
            gain_NR = jnp.exp(policy_NR - jax.lax.stop_gradient(policy_NR)) * advantage_N1
        elif self.variant == "spo":
            gain_NR = policy_NR * advantage_N1
        else:
            ratio_NR = jnp.exp(policy_NR - batch["old_log_probs"])
            if self.variant == "cispo":
                gain_NR = jax.lax.stop_gradient(jnp.minimum(ratio_NR, self.epsilon_high)) * advantage_N1 * policy_NR
            else:
                clipped_NR = jnp.clip(ratio_NR, 1 - self.epsilon, 1 + self.epsilon)
                gain_NR = jnp.minimum(ratio_NR * advantage_N1, clipped_NR * advantage_N1)
        per_token_NR = -(gain_NR - self.beta * k3_NR)
        # A real row has at least one completion token; v3 clamps the count at 1, which also keeps fill rows finite.
        row_loss_N = (per_token_NR * mask_NR).sum(1) / jnp.maximum(mask_NR.sum(1), 1.0)
        weight_N = batch["row_weight"]
        counted_NR = mask_NR * weight_N[:, None]
        metrics = {"kl_ref_sum": (log_ratio_ref_NR * counted_NR).sum(), "k3_sum": (k3_NR * counted_NR).sum(),
                   "completion_tokens": counted_NR.sum()}  # fmt: skip
        return LossSums((row_loss_N * weight_N).sum(), aux if self.is_v3 else jnp.zeros((), jnp.float32), metrics)


def nnx_dropout(model, rng):
    """The dropout streams for the model's training forward, when its config has dropout."""
    return nnx.Rngs(dropout=rng) if model.config.dropout > 0 else None


@dataclasses.dataclass(frozen=True)
class SequencePPOLoss(Objective):
    """2510's PPO (train_ppo.py), one advantage per sequence. The model is an ActorCritic (rl/actor_critic.py).

    With S = Σ log-probs of a row's completion tokens under the mask (2510 leaves out the first generated
    token), for the actor, the old actor (its S arrives in old_log_probs) and the reference, V the critic's
    value at the row's last attended position and r the reward:
      A = r − sg(V),  ratio = e^(S_actor − S_old),
      loss = −min(ratio·A, clip(ratio, 1 ± clip_epsilon)·A) + vf_coef·(V − r)² + kl_coef·(S_actor − S_ref)
    averaged over rows. The old actor does not train. 2510 does not divide this loss by the accumulation
    steps, so `scale` (the accumulation steps) undoes the step's division. Metrics, summed over rows:
    actor_loss, critic_loss, kl (S_actor − S_old) and kl_ref (S_actor − S_ref).
    """

    clip_epsilon: float = 0.1
    vf_coef: float = 0.5
    kl_coef: float = 0.02
    scale: float = 1.0
    batch_fields = (*ROLLOUT_FIELDS, "rewards", "value_index")
    frozen_models = ("reference",)
    variant = "sequence"
    reads_old_log_probs = True  # the old actor's

    def trainable(self, path):
        return path[0] != "old_actor"

    def weight_sum(self, batch):
        return batch["row_weight"].sum()

    def loss_sums(self, model, batch, frozen, *, rng, batch_axes):
        actor_NR, _ = completion_log_probs(model.actor, batch, train=True, dropout_rngs=nnx_dropout(model.actor, rng),
                                           batch_axes=batch_axes)  # fmt: skip
        reference_NR, _ = completion_log_probs(frozen["reference"], batch)
        values_NT, _ = model.critic.values(batch, train=True, batch_axes=batch_axes)
        mask_NR = batch["completion_mask"].astype(jnp.float32)
        actor_N, old_N, reference_N = ((x * mask_NR).sum(1) for x in (actor_NR, batch["old_log_probs"], reference_NR))
        value_N = jnp.take_along_axis(values_NT, batch["value_index"][:, None], axis=1)[:, 0]
        reward_N = batch["rewards"]
        advantage_N = reward_N - jax.lax.stop_gradient(value_N)
        ratio_N = jnp.exp(actor_N - old_N)
        clipped_N = jnp.clip(ratio_N, 1 - self.clip_epsilon, 1 + self.clip_epsilon)
        policy_N = -jnp.minimum(ratio_N * advantage_N, clipped_N * advantage_N)
        critic_N = (value_N - reward_N) ** 2
        kl_ref_N = actor_N - reference_N
        weight_N = batch["row_weight"]
        row_loss_N = policy_N + self.vf_coef * critic_N + self.kl_coef * kl_ref_N
        metrics = {"actor_loss": (policy_N * weight_N).sum(), "critic_loss": (critic_N * weight_N).sum(),
                   "kl": ((actor_N - old_N) * weight_N).sum(), "kl_ref": (kl_ref_N * weight_N).sum()}  # fmt: skip
        return LossSums(self.scale * (row_loss_N * weight_N).sum(), jnp.zeros((), jnp.float32), metrics)


def gae_advantages(rewards_N: np.ndarray, values_NR: np.ndarray, mask_NR: np.ndarray, gamma: float,
                   lam: float) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """v3 PPO's (whitened advantages [N, R], returns [N, R]) in float32, in MiniMind's order of operations.

    The reward is the last completion token's; values_NR are the critic's before each token, 0 outside the
    mask. GAE runs over every column (0 past a row's end), returns = advantages + values, and the advantages
    are whitened by their masked mean and biased variance over the whole rollout, then masked.
    """
    mask = mask_NR.astype(np.float32)
    values = np.asarray(values_NR, np.float32) * mask
    num_rows, num_completion = mask.shape
    token_rewards = np.zeros_like(mask)
    last = np.maximum(mask.sum(1).astype(np.int64), 1) - 1
    token_rewards[np.arange(num_rows), last] += np.asarray(rewards_N, np.float32)
    advantages = np.zeros_like(mask)
    running = np.zeros(num_rows, np.float32)
    for t in reversed(range(num_completion)):
        next_value = values[:, t + 1] if t < num_completion - 1 else 0.0
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    returns = advantages + values
    count = max(mask.sum(dtype=np.float32), np.float32(1))
    mean = (advantages * mask).sum(dtype=np.float32) / count
    variance = ((advantages - mean) ** 2 * mask).sum(dtype=np.float32) / count
    whitened = (advantages - mean) * (np.float32(1) / np.sqrt(variance + np.float32(1e-8))) * mask
    return whitened.astype(np.float32), returns.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TokenPPOLoss(Objective):
    """v3's PPO (train_ppo.py), per token, on one minibatch of a rollout. The model is an ActorCritic.

    With r = e^(π − π_old) per completion token, A the whitened GAE advantage, V the critic's value before the
    token, V_old and R the rollout's values and returns, and k3 of the reference as in PolicyLoss:
      policy = max(−A·r, −A·clip(r, 1 ± clip_epsilon)) + kl_coef·k3
      value  = ½·max((V − R)², (clip(V, V_old ± cliprange_value) − R)²)
      loss   = policy + vf_coef·value (+ the actor's MoE aux loss)
    averaged over the minibatch's completion tokens. PPO's early stop: once a minibatch's approx KL (the mean
    of ½·log r²) exceeds early_stop_kl it halts: its loss and every later one of the rollout count zero,
    though their optimizer steps still run, as MiniMind runs them. Metrics, summed over tokens: policy_loss,
    critic_loss, kl_ref (Σ k3), approx_kl, clipfrac and halt.
    """

    clip_epsilon: float = 0.2
    vf_coef: float = 0.5
    kl_coef: float = 0.02
    cliprange_value: float = 0.2
    early_stop_kl: float = 0.25
    batch_fields = ("sequences", "attention_mask", "positions", "completion_mask", "old_log_probs",
                    "reference_log_probs", "old_values", "returns", "token_advantages", "halted")  # fmt: skip
    halts = True
    variant = "token"
    reads_old_log_probs = True

    def weight_sum(self, batch):
        return batch["completion_mask"].astype(jnp.float32).sum()

    def loss_sums(self, model, batch, frozen, *, rng, batch_axes):
        actor_NR, aux = completion_log_probs(model.actor, batch, train=True,
                                             dropout_rngs=nnx_dropout(model.actor, rng), batch_axes=batch_axes)  # fmt: skip
        mask_NR = batch["completion_mask"].astype(jnp.float32)
        values_NR = model.critic.values(batch, train=True, batch_axes=batch_axes)[0][:, -mask_NR.shape[1] - 1 : -1]
        log_ratio_NR = actor_NR - batch["old_log_probs"]
        kl_terms_NR = 0.5 * log_ratio_NR**2 * mask_NR
        tokens = jax.lax.psum(mask_NR.sum(), batch_axes)
        approx_kl = jax.lax.stop_gradient(jax.lax.psum(kl_terms_NR.sum(), batch_axes) / jnp.maximum(tokens, 1.0))
        halted_N = jnp.maximum(batch["halted"], (approx_kl > self.early_stop_kl).astype(batch["halted"].dtype))
        live = 1.0 - jax.lax.pmax(halted_N.max(), batch_axes).astype(jnp.float32)  # the same on every device
        ratio_NR = jnp.exp(log_ratio_NR)
        advantage_NR = batch["token_advantages"]
        clipped_NR = jnp.clip(ratio_NR, 1 - self.clip_epsilon, 1 + self.clip_epsilon)
        reference_gap_NR = batch["reference_log_probs"] - actor_NR
        k3_NR = jnp.exp(reference_gap_NR) - reference_gap_NR - 1
        policy_NR = jnp.maximum(-advantage_NR * ratio_NR, -advantage_NR * clipped_NR) + self.kl_coef * k3_NR
        old_values_NR, returns_NR = batch["old_values"], batch["returns"]
        clipped_values_NR = jnp.clip(values_NR, old_values_NR - self.cliprange_value,
                                     old_values_NR + self.cliprange_value)  # fmt: skip
        value_NR = 0.5 * jnp.maximum((values_NR - returns_NR) ** 2, (clipped_values_NR - returns_NR) ** 2)
        per_token_NR = (policy_NR + self.vf_coef * value_NR) * mask_NR
        metrics = {"policy_loss": (policy_NR * mask_NR).sum(), "critic_loss": (value_NR * mask_NR).sum(),
                   "kl_ref": (k3_NR * mask_NR).sum(), "approx_kl": kl_terms_NR.sum(),
                   "clipfrac": ((jnp.abs(ratio_NR - 1) > self.clip_epsilon) * mask_NR).sum(),
                   "halt": halted_N.sum().astype(jnp.float32)}  # fmt: skip
        return LossSums(live * per_token_NR.sum(), live * aux, metrics)
