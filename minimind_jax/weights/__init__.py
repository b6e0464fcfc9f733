"""Moving weights between a `MiniMind` model, MiniMind `.pth` files and our Orbax checkpoints.

`mapping` turns MiniMind's state dict into our parameter tree and back; `pth` reads and writes the file;
`hf` the Hugging Face format (safetensors in transformers' Llama / Qwen3 / Qwen3-MoE).
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from minimind_jax.model.params import abstract_model, model_from_params, params_of
from minimind_jax.model.transformer import MiniMind
from minimind_jax.weights.hf import is_hf_directory, load_hf
from minimind_jax.weights.mapping import infer_config, params_from_state_dict, state_dict_from_params
from minimind_jax.weights.orbax import restore_params
from minimind_jax.weights.pth import read_state_dict, write_state_dict

__all__ = ["load", "save_pth", "abstract_model", "model_from_params", "params_of"]


def load(path, **overrides) -> MiniMind:
    """A MiniMind `.pth` (plain or resume dict), one of our checkpoints or a Hugging Face directory (as
    `main.py convert --format hf` writes it), as a `MiniMind` model.

    For a `.pth`, the era, sizes and MoE layout are read off the keys and shapes; `overrides` set what
    shapes cannot tell (e.g. num_attention_heads for 2510, num_experts_per_tok, dtype, remat).
    """
    path = pathlib.Path(path)
    if path.is_dir():
        config, params = (load_hf if is_hf_directory(path) else restore_params)(path, **overrides)
        return model_from_params(config, params)
    state_dict = read_state_dict(path)
    config = infer_config(state_dict, source=str(path), **overrides)
    return model_from_params(config, params_from_state_dict(state_dict, config, source=str(path)))


def save_pth(model: MiniMind, path, dtype: str = "float16") -> pathlib.Path:
    """MiniMind's `.pth`: exact key names and order, both tied keys, fp16 by default as MiniMind saves."""
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params_of(model))
    return write_state_dict(state_dict_from_params(params, model.config), path, dtype)
