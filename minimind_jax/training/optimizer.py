"""MiniMind's optimizer and learning-rate schedule, computed as torch computes them: AdamW with torch's
bias correction, global-norm clipping and MiniMind's cosine schedule."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from minimind_jax.training.accumulation import UpdatePlan


def minimind_lr(arch: str, step, total_steps: int, lr: float, warmup_steps: int = 0, xp=jnp):
    """MiniMind's cosine schedule at micro-step `step` (1-based, across epochs) of `total_steps`.

    2510: lr/10 + lr/2·(1+cos(π·s/S)); v3: lr·(0.1 + 0.45·(1+cos(π·s/S))). Optional linear warmup
    (MiniMind has none) multiplies the first `warmup_steps` micro-steps by s/warmup. xp=np computes it in
    float64 on the host, as MiniMind's Python does (the logged LR); jnp traces it for the optimizer.
    """
    cosine = 1 + xp.cos(xp.pi * step / total_steps)
    value = lr * (0.1 + 0.45 * cosine) if arch == "minimind3" else lr / 10 + 0.5 * lr * cosine
    if warmup_steps:
        value = value * xp.minimum(1.0, step / warmup_steps)
    return value


def clip_by_global_norm_like_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)). max_norm <= 0 does not clip
    (MiniMind's RL trainers skip the call then)."""

    def update(grads, state, params=None):
        del params
        if max_norm <= 0:
            return grads, state
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(grads) + 1e-6))
        return jax.tree.map(lambda g: g * scale, grads), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def adamw_like_torch(learning_rate, weight_decay: float, b1: float, b2: float, eps: float):
    """torch.optim.AdamW's step in its own order of operations (single-tensor, as on CPU):
    p ← p·(1 − lr·wd), then p ← p + (−lr/bc1)·m / (√v / √bc2 + ε).

    The bias corrections bc = 1 − βᵗ are −expm1(t·log β): in fp32 that is within 1e-7 of torch's float64
    value, where optax's 1 − βᵗ is 1.3e-5 off at t = 1. The update handed on is new − p; adding it back gives
    new exactly, since new and p are close (Sterbenz). The state has optax.adamw's structure (Adam moments,
    the decay's empty state, the schedule's count), so checkpoints restore as before.
    """
    schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)
    adam = optax.scale_by_adam(b1, b2, eps)

    def init(params):
        return adam.init(params), optax.EmptyState(), optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(grads, state, params):
        adam_state, decay_state, schedule_state = state
        mu = optax.tree.update_moment(grads, adam_state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(grads, adam_state.nu, b2, 2)
        count = optax.safe_increment(adam_state.count)
        lr = schedule(schedule_state.count)
        correction1, correction2 = (-jnp.expm1(count * math.log(beta)) for beta in (b1, b2))
        step_size, correction2_sqrt, decay = lr / correction1, jnp.sqrt(correction2), 1 - lr * weight_decay

        def new_minus_old(p, m, v):
            return (p * decay + (-step_size * m) / (jnp.sqrt(v) / correction2_sqrt + eps)) - p

        updates = jax.tree.map(new_minus_old, params, mu, nu)
        new_state = (
            optax.ScaleByAdamState(count=count, mu=mu, nu=nu),
            decay_state,
            optax.ScaleByScheduleState(count=optax.safe_increment(schedule_state.count)),
        )
        return updates, new_state

    return optax.GradientTransformation(init, update)


def make_optimizer(learning_rate, grad_clip: float = 1.0, weight_decay: float = 0.01) -> optax.GradientTransformation:
    """torch.optim.AdamW's defaults (β 0.9/0.999, ε 1e-8, weight decay on every parameter) after clipping.

    learning_rate: a float or an optax schedule of the update count.
    """
    return optax.chain(
        clip_by_global_norm_like_torch(grad_clip),
        adamw_like_torch(learning_rate, weight_decay, b1=0.9, b2=0.999, eps=1e-8),
    )


def update_lr_schedule(arch: str, lr: float, plan: UpdatePlan, warmup_steps: int = 0):
    """The LR of optimizer update u (0-based): MiniMind sets it every micro-step, so update u uses
    minimind_lr of the micro-step it happens at (plan.micro_steps[u], over plan.total_micro_steps)."""
    micro_steps = np.asarray(plan.micro_steps, np.int32)
    return lambda update: minimind_lr(
        arch, jnp.asarray(micro_steps)[jnp.minimum(update, len(micro_steps) - 1)], plan.total_micro_steps, lr,
        warmup_steps,
    )  # fmt: skip


def annealing_lr(lr: float, total_updates: int, update, xp=jnp):
    """torch's CosineAnnealingLR(T_max=total_updates, eta_min=lr/10) after `update` optimizer steps, in its
    closed form: MiniMind's RL trainers step it once per update. xp=np: float64, as torch logs it."""
    eta_min = lr / 10
    return eta_min + (lr - eta_min) * (1 + xp.cos(xp.pi * update / total_updates)) / 2


def annealing_lr_schedule(lr: float, total_updates: int):
    """The LR of optimizer update u (0-based) under MiniMind's RL schedule: the annealed LR after u steps."""
    return lambda update: annealing_lr(lr, total_updates, update)
