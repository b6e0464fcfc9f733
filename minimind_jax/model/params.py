"""A `MiniMind` model's parameters as a plain nested dict (nnx pure dict), and a model back from one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minimind_jax.errors import UserError
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.transformer import MiniMind


def abstract_model(config: ModelConfig) -> MiniMind:
    """The model's structure with shape-only parameters: no memory is allocated."""
    return nnx.eval_shape(lambda: MiniMind(config, rngs=nnx.Rngs(0)))


def params_of(model: MiniMind) -> dict:
    """Parameters as a nested dict of arrays (nnx pure dict)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def model_from_params(config: ModelConfig, params: dict) -> MiniMind:
    """A model whose parameters are exactly `params` (cast to fp32), after checking every shape."""
    graphdef, state = nnx.split(abstract_model(config))
    expected = nnx.to_pure_dict(state)
    flat_expected = dict(_flatten(expected))
    flat_given = dict(_flatten(params))
    if flat_expected.keys() != flat_given.keys():
        missing = sorted(set(flat_expected) - set(flat_given))
        extra = sorted(set(flat_given) - set(flat_expected))
        raise UserError(f"parameter tree mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, spec in flat_expected.items():
        if tuple(flat_given[name].shape) != tuple(spec.shape):
            raise UserError(f"parameter {name} has shape {list(flat_given[name].shape)}, expected {list(spec.shape)}")
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params))
    return nnx.merge(graphdef, state)


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        else:
            yield name, value
