"""Moving weights between a `MiniMind` model, MiniMind `.pth` files and our Orbax checkpoints."""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimind_jax.config import ModelConfig
from minimind_jax.errors import UserError
from minimind_jax.model import MiniMind

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


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


def load(path, **overrides) -> MiniMind:
    """A MiniMind `.pth` (plain or resume dict) or one of our checkpoints, as a `MiniMind` model.

    For a `.pth`, the era, sizes and MoE layout are read off the keys and shapes; `overrides` set what
    shapes cannot tell (e.g. num_attention_heads for 2510, num_experts_per_tok, dtype, remat).
    """
    path = pathlib.Path(path)
    if path.is_dir():
        from minimind_jax.checkpoint import restore_params

        config, params = restore_params(path, **overrides)
        return model_from_params(config, params)
    from convert.mapping import infer_config, params_from_state_dict
    from convert.pth import read_state_dict

    state_dict = read_state_dict(path)
    config = infer_config(state_dict, source=str(path), **overrides)
    return model_from_params(config, params_from_state_dict(state_dict, config, source=str(path)))


def save_pth(model: MiniMind, path, dtype: str = "float16") -> pathlib.Path:
    """MiniMind's `.pth`: exact key names and order, both tied keys, fp16 by default as MiniMind saves."""
    from convert.mapping import state_dict_from_params
    from convert.pth import write_state_dict

    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params_of(model))
    return write_state_dict(state_dict_from_params(params, model.config), path, dtype)


def write_config(config: ModelConfig, directory) -> None:
    pathlib.Path(directory, CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1))


def read_config(directory, **overrides) -> ModelConfig:
    path = pathlib.Path(directory, CONFIG_FILE)
    try:
        fields = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{directory}: not a minimind-jax checkpoint (no {CONFIG_FILE})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: corrupt config ({error})") from None
    return ModelConfig.from_dict({**fields, **overrides})
