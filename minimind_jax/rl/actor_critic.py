"""PPO's models: MiniMind's CriticModel and the actor-critic that the one sharded step trains as one model.

MiniMind's critic is a MiniMindForCausalLM whose lm_head is unused and which adds `value_head`, a
Linear(hidden, 1) with torch's default init; its value of a position is value_head(model.norm(h)) where h is
MiniMindModel's output, which the final RMSNorm has already normalised: the norm is applied twice, and so it
is here. A critic `.pth` is MiniMind's: the model's keys and value_head.weight [1, D], value_head.bias [1].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimind_jax.errors import UserError
from minimind_jax.model.params import model_from_params
from minimind_jax.model.transformer import MiniMind
from minimind_jax.weights.mapping import infer_config, params_from_state_dict
from minimind_jax.weights.pth import read_state_dict

VALUE_HEAD_KEYS = ("value_head.weight", "value_head.bias")


class ValueHead(nnx.Module):
    def __init__(self, hidden_size: int, rngs: nnx.Rngs):
        bound = 1 / math.sqrt(hidden_size)  # torch's Linear init: U(±1/√fan_in) for weight and bias
        self.weight = nnx.Param(jax.random.uniform(rngs.params(), (1, hidden_size), jnp.float32, -bound, bound))
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (1,), jnp.float32, -bound, bound))

    def __call__(self, h_NTD):
        return jnp.einsum("ntd,d->nt", h_NTD.astype(jnp.float32), self.weight[...][0]) + self.bias[...][0]


class Critic(nnx.Module):
    def __init__(self, lm: MiniMind, rngs: nnx.Rngs):
        self.lm = lm
        self.value_head = ValueHead(lm.config.hidden_size, rngs)

    def values(self, batch, *, train: bool = False, batch_axes=()):
        """(values [N, T] of every position of the rows, the model's MoE aux loss)."""
        out = self.lm.forward(batch["sequences"], batch["attention_mask"], positions_BT=batch["positions"],
                              train=train, return_logits=False, batch_axes=batch_axes)  # fmt: skip
        return self.value_head(self.lm.norm(out.hidden_states)), out.aux_loss


class ActorCritic(nnx.Module):
    """The policy (actor), its critic, and for 2510 the old actor, a copy of the actor refreshed every few
    steps, which trains not but lives here so that checkpoints keep it."""

    def __init__(self, actor: MiniMind, critic: Critic, old_actor: MiniMind | None = None):
        self.actor, self.critic, self.old_actor = actor, critic, old_actor

    @property
    def config(self):
        return self.actor.config


def load_critic(path: str, actor: MiniMind) -> Critic:
    """A MiniMind critic state dict (its model's keys and the value head), for the actor's architecture."""
    state = read_state_dict(path)
    missing = [key for key in VALUE_HEAD_KEYS if key not in state]
    if missing:
        raise UserError(f"--critic_weight {path}: no {', '.join(missing)} (not a MiniMind critic state dict)")
    head = {key: state.pop(key) for key in VALUE_HEAD_KEYS}
    config = infer_config(state, source=str(path))
    for field in ("arch", "hidden_size", "num_hidden_layers", "use_moe"):
        if getattr(config, field) != getattr(actor.config, field):
            raise UserError(f"--critic_weight {path} has {field} {getattr(config, field)}, the actor "
                            f"{getattr(actor.config, field)}")  # fmt: skip
    lm = model_from_params(actor.config, params_from_state_dict(state, actor.config, source=str(path)))
    critic = Critic(lm, nnx.Rngs(0))
    critic.value_head.weight[...] = jnp.asarray(np.asarray(head["value_head.weight"], np.float32).reshape(1, -1))
    critic.value_head.bias[...] = jnp.asarray(np.asarray(head["value_head.bias"], np.float32).reshape(1))
    return critic
