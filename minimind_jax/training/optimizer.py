"""MiniMind's optimizer and learning-rate schedule, computed as torch computes them: AdamW with torch's
bias correction, global-norm clipping and MiniMind's cosine schedule."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def minimind_lr(arch: str, step, total_steps: int, lr: float, warmup_steps: int = 0):
    """MiniMind's cosine schedule at micro-step `step` (1-based, across epochs) of `total_steps`.

    2510: lr/10 + lr/2·(1+cos(π·s/S)); v3: lr·(0.1 + 0.45·(1+cos(π·s/S))). Optional linear warmup
    (MiniMind has none) multiplies the first `warmup_steps` micro-steps by s/warmup.
    """
    cosine = 1 + jnp.cos(jnp.pi * step / total_steps)
    value = lr * (0.1 + 0.45 * cosine) if arch == "minimind3" else lr / 10 + 0.5 * lr * cosine
    if warmup_steps:
        value = value * jnp.minimum(1.0, step / warmup_steps)
    return value


def clip_by_global_norm_like_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6))."""

    def update(grads, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(grads) + 1e-6))
        return jax.tree.map(lambda g: g * scale, grads), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_by_adam_like_torch(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """optax.scale_by_adam (same state) with torch's bias corrections. optax computes 1 - βᵗ in fp32, where
    1 - 0.999 is 1.3e-5 off, so its first updates are 6.6e-6 (relative) smaller than torch.optim.AdamW's; torch
    computes them in float64. -expm1(t·log β) in fp32 is within 1e-7 of that."""
    adam = optax.scale_by_adam(b1, b2, eps)

    def update(grads, state, params=None):
        del params
        mu = optax.tree.update_moment(grads, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(grads, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        correction1, correction2 = (-jnp.expm1(count * math.log(beta)) for beta in (b1, b2))
        updates = jax.tree.map(lambda m, v: (m / correction1) / (jnp.sqrt(v / correction2) + eps), mu, nu)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(adam.init, update)


def make_optimizer(learning_rate, grad_clip: float = 1.0, weight_decay: float = 0.01) -> optax.GradientTransformation:
    """torch.optim.AdamW's defaults (β 0.9/0.999, ε 1e-8, weight decay on every parameter) after clipping;
    the state has optax.adamw's structure.

    learning_rate: a float or an optax schedule of the update count.
    """
    return optax.chain(
        clip_by_global_norm_like_torch(grad_clip),
        optax.chain(
            scale_by_adam_like_torch(b1=0.9, b2=0.999, eps=1e-8),
            optax.add_decayed_weights(weight_decay),
            optax.scale_by_learning_rate(learning_rate),
        ),
    )


def update_lr_schedule(arch: str, lr: float, accumulation_steps: int, total_micro_steps: int, warmup_steps: int = 0):
    """The LR of optimizer update u (0-based): MiniMind sets it every micro-step, so the update made after
    micro-step s = (u+1)·accumulation_steps uses minimind_lr(s)."""
    return lambda update: minimind_lr(arch, (update + 1) * accumulation_steps, total_micro_steps, lr, warmup_steps)
