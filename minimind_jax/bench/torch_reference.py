"""MiniMind in plain PyTorch, both eras: the parity reference for the JAX model and the eager baseline.

Same math, state-dict keys and module order as MiniMind's `MiniMindForCausalLM` (2510 and v3), and the
same SFT step as its `train_full_sft.py`. Nothing here imports jax or transformers.

Shape suffixes: B batch, T query length, S key length (cache + T), D hidden, H query heads, K kv heads,
E routed experts, N = B*T tokens, V vocab.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from minimind_jax.model.config import ModelConfig


class ReferenceOutput(NamedTuple):
    logits: torch.Tensor  # [B,T,V] fp32 (float64 in a float64 model)
    hidden_states: torch.Tensor  # [B,T,D] after the final norm
    past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer (k, v) [B,S,K,hd]
    aux_loss: torch.Tensor  # scalar, MoE load balancing summed over layers; 0 in eval mode


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """MiniMind's `.float()` upcast of half-precision activations, which leaves a float64 model in float64
    (the parity tests run the reference in float64 as the exact answer)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, cast_before_weight: bool):
        super().__init__()
        self.eps = eps
        self.cast_before_weight = cast_before_weight  # 2510 casts, then scales; v3 scales in fp32, then casts
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x_wide = at_least_fp32(x)
        normed = x_wide * torch.rsqrt(x_wide.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.cast_before_weight:
            return self.weight * normed.type_as(x)
        return (self.weight * normed).type_as(x)


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Per-pair rotary frequencies [head_dim/2] (YaRN-scaled per era) and the cos/sin factor, in fp32 on the CPU."""
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device="cpu")[: dim // 2].float() / dim))
    scaling = config.rope_scaling
    # MiniMind applies YaRN only when the table outgrows the original context.
    if scaling is None or config.max_position_embeddings <= scaling["original_max_position_embeddings"]:
        return inv_freq, 1.0
    orig_max, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    beta_fast, beta_slow = scaling["beta_fast"], scaling["beta_slow"]
    index = torch.arange(dim // 2, device="cpu")
    if config.is_v3:

        def correction_dim(beta):
            return dim * math.log(orig_max / (beta * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim // 2 - 1)
        ramp = torch.clamp((index.float() - low) / max(high - low, 0.001), 0, 1)
        return inv_freq * (1 - ramp + ramp / factor), scaling["attention_factor"]
    # 2510: the first pair whose wavelength exceeds the original context and all after it get 1/factor.
    corr_dim = next((i for i in range(dim // 2) if 2 * math.pi / inv_freq[i] > orig_max), dim // 2)
    beta = beta_slow + (beta_fast - beta_slow) * (index.float() / max(dim // 2 - 1, 1))
    scale = torch.where(index < corr_dim, (beta * factor - beta + 1) / (beta * factor), 1.0 / factor)
    return inv_freq * scale, 1.0


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_position_embeddings, head_dim], built on the CPU as MiniMind builds them at init."""
    inv_freq, attention_factor = rope_inv_freq(config)
    angles = torch.outer(torch.arange(config.max_position_embeddings, device="cpu"), inv_freq).float()
    cos = torch.cat([torch.cos(angles), torch.cos(angles)], dim=-1) * attention_factor
    sin = torch.cat([torch.sin(angles), torch.sin(angles)], dim=-1) * attention_factor
    return cos, sin


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x_BTHd, cos_Td, sin_Td):
    cos, sin = cos_Td[:, None, :], sin_Td[:, None, :]
    return x_BTHd * cos + rotate_half(x_BTHd) * sin


def repeat_kv_heads(x_BSKd, n_rep: int):
    """Each kv head repeated n_rep times in place (kv head k serves query heads k*n_rep ... k*n_rep+n_rep-1)."""
    if n_rep == 1:
        return x_BSKd
    B, S, K, d = x_BSKd.shape
    return x_BSKd[:, :, :, None, :].expand(B, S, K, n_rep, d).reshape(B, S, K * n_rep, d)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.is_v3 = config.is_v3
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        D, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(D, q_dim, bias=False)
        self.k_proj = nn.Linear(D, kv_dim, bias=False)
        self.v_proj = nn.Linear(D, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, D, bias=False)
        if self.is_v3:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, cast_before_weight=False)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, cast_before_weight=False)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.flash = config.flash_attn

    def forward(self, x_BTD, cos_Td, sin_Td, past_kv=None, use_cache=False, attention_mask_BS=None):
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim)
        if self.is_v3:
            q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos_Td, sin_Td).to(q.dtype), apply_rope(k, cos_Td, sin_Td).to(k.dtype)
        else:
            q, k = apply_rope(q, cos_Td, sin_Td), apply_rope(k, cos_Td, sin_Td)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=1), torch.cat([past_kv[1], v], dim=1)
        present = (k, v) if use_cache else None

        n_rep = self.num_heads // self.num_kv_heads
        q_BHTd = q.transpose(1, 2)
        k_BHSd = repeat_kv_heads(k, n_rep).transpose(1, 2)
        v_BHSd = repeat_kv_heads(v, n_rep).transpose(1, 2)
        no_padding = attention_mask_BS is None or bool(torch.all(attention_mask_BS == 1))
        if self.flash and T > 1 and past_kv is None and no_padding:
            out_BHTd = F.scaled_dot_product_attention(
                q_BHTd, k_BHSd, v_BHSd, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        else:
            scores_BHTS = (q_BHTd @ k_BHSd.transpose(-2, -1)) / math.sqrt(self.head_dim)
            # Causal over the new queries; cached keys (the first S-T) are all visible.
            causal_TT = torch.full((T, T), float("-inf"), device=scores_BHTS.device).triu(1)
            scores_BHTS[:, :, :, -T:] += causal_TT
            if attention_mask_BS is not None:
                scores_BHTS = scores_BHTS + (1.0 - attention_mask_BS[:, None, None, :]) * -1e9
            probs_BHTS = self.attn_dropout(F.softmax(at_least_fp32(scores_BHTS), dim=-1).type_as(q_BHTd))
            out_BHTd = probs_BHTS @ v_BHSd
        out_BTD = out_BHTd.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.o_proj(out_BTD)), present


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); 2510 adds a dropout on the output, v3 has none."""

    def __init__(self, config: ModelConfig, intermediate_size: int):
        super().__init__()
        D = config.hidden_size
        self.gate_proj = nn.Linear(D, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, D, bias=False)
        self.up_proj = nn.Linear(D, intermediate_size, bias=False)
        self.dropout = nn.Identity() if config.is_v3 else nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class MoEFeedForward(nn.Module):
    """Softmax router over E experts, top-k, plus (2510) shared experts. Sets `self.aux_loss` each call."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        D, E, width = config.hidden_size, config.num_routed_experts, config.expert_intermediate_size
        # Registration order fixes the state-dict order: v3 has the gate first, 2510 after the experts.
        if config.is_v3:
            self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList([FeedForward(config, width) for _ in range(E)])
        if not config.is_v3:
            self.gate = nn.Linear(D, E, bias=False)
            if config.num_shared_experts > 0:
                self.shared_experts = nn.ModuleList(
                    [FeedForward(config, width) for _ in range(config.num_shared_experts)]
                )
        self.aux_loss = None  # set by every forward

    def forward(self, x_BTD):
        cfg = self.config
        B, T, D = x_BTD.shape
        E, k = cfg.num_routed_experts, cfg.num_experts_per_tok
        x_ND = x_BTD.reshape(-1, D)
        scores_NE = F.softmax(self.gate(x_ND), dim=-1)
        weight_Nk, expert_Nk = torch.topk(scores_NE, k=k, dim=-1, sorted=False)
        if cfg.norm_topk_prob and (cfg.is_v3 or k > 1):
            weight_Nk = weight_Nk / (weight_Nk.sum(dim=-1, keepdim=True) + 1e-20)

        # Route the N*k (token, slot) pairs expert by expert. Every expert runs, on zero rows if unchosen,
        # so in training each expert gets a gradient (zeros when idle), as in MiniMind.
        expert_slots = expert_Nk.reshape(-1)
        by_expert = torch.argsort(expert_slots, stable=True)
        counts = torch.bincount(expert_slots, minlength=E).tolist()
        tokens_by_expert = (by_expert // k).split(counts)
        outputs = torch.cat([expert(x_ND[tokens]) for expert, tokens in zip(self.experts, tokens_by_expert)])
        slot_out_NkD = outputs[torch.argsort(by_expert)].view(-1, k, D)
        fp16_buffer = self.training and not cfg.is_v3  # 2510's training path rounds expert outputs to fp16
        if fp16_buffer:
            slot_out_NkD = slot_out_NkD.to(torch.float16)
        y_ND = (slot_out_NkD * weight_Nk.unsqueeze(-1)).sum(dim=1)
        if not fp16_buffer:
            y_ND = y_ND.to(x_ND.dtype)
        y_BTD = y_ND.view(B, T, D)
        for expert in getattr(self, "shared_experts", ()):
            y_BTD = y_BTD + expert(x_BTD)
        self.aux_loss = (
            self._load_balancing_loss(scores_NE, expert_Nk, B, T) if self.training else scores_NE.new_zeros(())
        )
        return y_BTD

    def _load_balancing_loss(self, scores_NE, expert_Nk, B, T):
        cfg = self.config
        E, k = cfg.num_routed_experts, cfg.num_experts_per_tok
        if cfg.is_v3:
            if cfg.router_aux_loss_coef <= 0:
                return scores_NE.new_zeros(())
            load_kE = F.one_hot(expert_Nk, E).float().mean(0)
            return (load_kE * scores_NE.mean(0)).sum() * E * cfg.router_aux_loss_coef
        if cfg.aux_loss_alpha <= 0:
            return scores_NE.new_zeros(())
        if cfg.seq_aux:
            # Per sequence: (times expert e was chosen) / (its fair share T*k/E), times its mean score.
            chosen_BE = F.one_hot(expert_Nk.view(B, T * k), E).sum(1).float() / (T * k / E)
            mean_score_BE = scores_NE.view(B, T, E).mean(dim=1)
            return (chosen_BE * mean_score_BE).sum(dim=1).mean() * cfg.aux_loss_alpha
        load_E = F.one_hot(expert_Nk.view(-1), E).float().mean(0)
        return (scores_NE.mean(0) * (load_E * E)).sum() * cfg.aux_loss_alpha


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        v3 = config.is_v3
        self.self_attn = Attention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, cast_before_weight=not v3)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, cast_before_weight=not v3)
        self.mlp = MoEFeedForward(config) if config.use_moe else FeedForward(config, config.intermediate_size)

    def forward(self, h_BTD, cos_Td, sin_Td, past_kv, use_cache, attention_mask_BS):
        attn_out, present = self.self_attn(
            self.input_layernorm(h_BTD), cos_Td, sin_Td, past_kv, use_cache, attention_mask_BS
        )
        h_BTD = h_BTD + attn_out
        return h_BTD + self.mlp(self.post_attention_layernorm(h_BTD)), present


class Backbone(nn.Module):
    """MiniMind's `MiniMindModel`: embedding, blocks, final norm (the `model.` prefix of the state dict)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, cast_before_weight=not config.is_v3)
        cos, sin = rope_tables(config)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)


class MiniMindTorch(nn.Module):
    """MiniMind's causal LM for `config.arch` (minimind2 = 2510, minimind3 = v3), lm_head tied to the embedding."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.model.embed_tokens.weight = self.lm_head.weight

    def forward(self, input_ids_BT, attention_mask_BT=None, past_key_values=None, use_cache=False):
        backbone = self.model
        T = input_ids_BT.shape[1]
        past_key_values = past_key_values or [None] * len(backbone.layers)
        start = past_key_values[0][0].shape[1] if past_key_values[0] is not None else 0
        cos_Td = backbone.freqs_cos[start : start + T]
        sin_Td = backbone.freqs_sin[start : start + T]
        h_BTD = backbone.dropout(backbone.embed_tokens(input_ids_BT))
        presents = []
        for layer, past_kv in zip(backbone.layers, past_key_values):
            h_BTD, present = layer(h_BTD, cos_Td, sin_Td, past_kv, use_cache, attention_mask_BT)
            presents.append(present)
        h_BTD = backbone.norm(h_BTD)
        aux_loss = h_BTD.new_zeros((), dtype=at_least_fp32(h_BTD).dtype)
        for layer in backbone.layers:
            if isinstance(layer.mlp, MoEFeedForward):
                aux_loss = aux_loss + layer.mlp.aux_loss
        return ReferenceOutput(
            logits=at_least_fp32(self.lm_head(h_BTD)),
            hidden_states=h_BTD,
            past_key_values=presents if use_cache else None,
            aux_loss=aux_loss,
        )


class LoRA(nn.Module):
    """MiniMind's adapter on a square projection: B(A x), added to the projection's output."""

    def __init__(self, features: int, rank: int):
        super().__init__()
        self.A = nn.Linear(features, rank, bias=False)
        self.B = nn.Linear(rank, features, bias=False)

    def forward(self, x):
        return self.B(self.A(x))


def add_lora(model: MiniMindTorch, rank: int, targets: tuple[str, ...]) -> None:
    """Adapters (state keys `...{target}.lora.A.weight`, as MiniMind's) on the attention projections named in
    `targets`; load their weights with load_state_dict."""
    for layer in model.model.layers:
        for target in targets:
            projection = getattr(layer.self_attn, target)
            projection.lora = LoRA(projection.in_features, rank)
            projection.forward = lambda x, base=projection.forward, lora=projection.lora: base(x) + lora(x)


@torch.no_grad()
def greedy_decode(model: MiniMindTorch, prompt_ids_1T, max_new_tokens: int):
    """MiniMind's generate with do_sample=False: prefill, then one token per forward through the KV cache.

    Puts the model in eval mode and stops after emitting eos. Returns (new token ids [n], the last-position
    logits of every forward [n, V]).
    """
    model.eval()
    past, step_input = None, prompt_ids_1T
    tokens, step_logits = [], []
    for _ in range(max_new_tokens):
        out = model(step_input, past_key_values=past, use_cache=True)
        last_logits_V = out.logits[0, -1]
        step_logits.append(last_logits_V)
        next_token = int(torch.argmax(last_logits_V))
        tokens.append(next_token)
        if next_token == model.config.eos_token_id:
            break
        past, step_input = out.past_key_values, prompt_ids_1T.new_tensor([[next_token]])
    return torch.tensor(tokens, dtype=torch.long), torch.stack(step_logits)


# ---- training: MiniMind's train_full_sft step ----


def minimind_lr(arch: str, step: int, total_steps: int, lr: float) -> float:
    """MiniMind's per-micro-step cosine LR; `step` is 1-based, counted across epochs, out of `total_steps`."""
    cosine = 1 + math.cos(math.pi * step / total_steps)
    if arch == "minimind3":
        return lr * (0.1 + 0.45 * cosine)
    return lr / 10 + 0.5 * lr * cosine


def make_optimizer(model: MiniMindTorch, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def batch_from_2510(X, Y, loss_mask):
    """2510's SFTDataset already yields the shifted form: (inputs, targets, loss_mask) = (X, Y, loss_mask)."""
    return X, Y, loss_mask


def batch_from_v3(input_ids, labels):
    """v3 forwards every id and scores logits[:, :-1] against labels[:, 1:] (-100 ignored).

    In the era-neutral form the target at t is labels[t+1]; the last position has target 0 and mask 0.
    """
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
    loss_mask = (shifted != -100).long()
    return input_ids, shifted.masked_fill(shifted == -100, 0), loss_mask


def _loss_backward(model, inputs_BT, targets_BT, loss_mask_BT, loss_scale, autocast_dtype):
    """MiniMind's SFT loss (masked mean CE + aux), backpropagated after dividing by `loss_scale`."""
    model.train()
    with torch.autocast(inputs_BT.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(inputs_BT)
        ce_BT = F.cross_entropy(out.logits.flatten(0, 1), targets_BT.flatten(), reduction="none")
        mask_BT = loss_mask_BT.to(ce_BT.dtype)
        logits_loss = (ce_BT.view_as(mask_BT) * mask_BT).sum() / mask_BT.sum()
        loss = logits_loss + out.aux_loss
    (loss / loss_scale).backward()
    return loss.detach(), logits_loss.detach(), out.aux_loss.detach()


def _optimizer_step(model, optimizer, grad_clip):
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # norm before clipping
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def sft_step(model, optimizer, inputs_BT, targets_BT, loss_mask_BT, lr, grad_clip=1.0, autocast_dtype=None):
    """One train_full_sft step without accumulation, in train mode; `autocast_dtype` (e.g. torch.bfloat16)
    wraps the forward and loss as MiniMind does on CUDA. Returns detached scalar tensors (no host sync)."""
    _set_lr(optimizer, lr)
    loss, logits_loss, aux_loss = _loss_backward(model, inputs_BT, targets_BT, loss_mask_BT, 1, autocast_dtype)
    grad_norm = _optimizer_step(model, optimizer, grad_clip)
    return dict(loss=loss, logits_loss=logits_loss, aux_loss=aux_loss, grad_norm=grad_norm)


def reference_train_loop(
    model, batches, *, arch, lr, total_steps, accumulation_steps, grad_clip, optimizer=None, epoch=0
):
    """One epoch of train_full_sft with MiniMind's gradient accumulation, per era.

    `batches` are (inputs, targets, loss_mask) micro-batches; micro-step s is 1-based and the LR uses
    epoch*len(batches)+s out of `total_steps`. 2510 steps when (s+1) % acc == 0 and never flushes (leftover
    gradients carry into the next call); v3 steps when s % acc == 0 and flushes the remainder at the end.
    Returns per-micro-step `loss` (undivided), `lr` and `stepped` (whether the optimizer stepped after it).
    """
    optimizer = optimizer or make_optimizer(model, lr)
    iters = len(batches)
    losses, lrs, stepped = [], [], []
    for s, (inputs, targets, loss_mask) in enumerate(batches, start=1):
        step_lr = minimind_lr(arch, epoch * iters + s, total_steps, lr)
        _set_lr(optimizer, step_lr)
        loss, _, _ = _loss_backward(model, inputs, targets, loss_mask, accumulation_steps, None)
        due = (s % accumulation_steps == 0) if arch == "minimind3" else ((s + 1) % accumulation_steps == 0)
        if arch == "minimind3" and s == iters and s % accumulation_steps != 0:
            due = True  # v3 flushes the partial accumulation at the end of the epoch
        if due:
            _optimizer_step(model, optimizer, grad_clip)
        losses.append(float(loss))
        lrs.append(step_lr)
        stepped.append(due)
    return dict(loss=losses, lr=lrs, stepped=stepped)
