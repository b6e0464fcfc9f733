"""LoRA adapters as MiniMind keeps them (model_lora.py): adapter-only `.pth` files, and merging.

A MiniMind LoRA file holds, for each adapted projection, `model.layers.{i}.self_attn.{proj}.lora.A.weight`
[rank, in] and `....lora.B.weight` [out, rank], in the order of the model's modules. 2510's save_lora writes
them in float32, v3's in float16.
"""

from __future__ import annotations

import functools
import pathlib
import re
from collections import OrderedDict

import jax
import numpy as np
from flax import nnx

from minimind_jax.errors import UserError
from minimind_jax.model.config import LORA_TARGETS
from minimind_jax.model.params import model_from_params, params_of
from minimind_jax.model.transformer import LoRA, MiniMind
from minimind_jax.weights.pth import read_state_dict, write_state_dict

KEY = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(\w+)\.lora\.([AB])\.weight$")


def with_adapters(model: MiniMind, rank: int, targets: tuple[str, ...], seed: int) -> MiniMind:
    """The model with new adapters (LoRA's init: A ~ N(0, 0.02), B = 0) on `targets`; its own weights unchanged.
    Only the adapters are initialised, not a whole model (seconds at MiniMind's sizes)."""
    config = model.config.replace(lora_rank=rank, lora_targets=tuple(targets))
    params = params_of(model)
    attention = params["layers"]["self_attn"]  # every leaf stacked over the layers
    layer_keys = jax.random.split(jax.random.key(seed), (len(targets), config.num_hidden_layers))
    for target, keys in zip(targets, layer_keys):
        new_adapter = functools.partial(LoRA, *attention[target].shape[1:], rank)  # (d_in, d_out, rank)
        attention[f"{target}_lora"] = jax.vmap(lambda key, new=new_adapter: params_of(new(nnx.Rngs(key))))(keys)
    return model_from_params(config, params)


def without_adapters(model: MiniMind) -> MiniMind:
    """The model's own weights, adapters left out."""
    config = model.config.replace(lora_rank=0, lora_targets=())
    return model_from_params(config, _base_only(params_of(model)))


def merge_adapters(model: MiniMind) -> MiniMind:
    """One model whose projections include their adapters: W + A·B (MiniMind's merge_lora)."""
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params_of(model))
    attention = params["layers"]["self_attn"]
    for target in model.config.lora_targets:
        adapter = attention[f"{target}_lora"]
        attention[target] = attention[target] + adapter["A"] @ adapter["B"]
    return without_adapters(model_from_params(model.config, params))


def lora_state_dict(model: MiniMind) -> OrderedDict[str, np.ndarray]:
    """MiniMind's keys and layouts, in its module order (layer by layer, projections in model order)."""
    attention = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params_of(model)["layers"]["self_attn"])
    out = OrderedDict()
    for layer in range(model.config.num_hidden_layers):
        for target in (t for t in LORA_TARGETS if t in model.config.lora_targets):
            adapter = attention[f"{target}_lora"]
            out[f"model.layers.{layer}.self_attn.{target}.lora.A.weight"] = adapter["A"][layer].T
            out[f"model.layers.{layer}.self_attn.{target}.lora.B.weight"] = adapter["B"][layer].T
    return out


def save_lora(model: MiniMind, path) -> pathlib.Path:
    """The adapters alone, as the era's save_lora writes them (2510 float32, v3 float16)."""
    return write_state_dict(lora_state_dict(model), path, "float16" if model.config.is_v3 else "float32")


def load_lora(model: MiniMind, path) -> MiniMind:
    """The model with the adapters of a MiniMind LoRA file, whose targets and rank the file tells. Every
    adapter of the file must fit the model, and every adapted layer must be in it: nothing loads partly."""
    path = pathlib.Path(path)
    state_dict = read_state_dict(path)
    found: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    for key, value in state_dict.items():
        match = KEY.match(key)
        if match is None or match[2] not in LORA_TARGETS:
            raise UserError(f"{path}: {key!r} is not a LoRA adapter key (model.layers.N.self_attn.PROJ.lora.A.weight)")
        found.setdefault(match[2], {}).setdefault(match[3], {})[int(match[1])] = np.asarray(value, np.float32)
    if not found:
        raise UserError(f"{path}: no LoRA adapters in the file")
    layers = range(model.config.num_hidden_layers)
    ranks = {a.shape[0] for matrices in found.values() for a in matrices.get("A", {}).values()}
    if len(ranks) != 1:
        raise UserError(f"{path}: adapters of ranks {sorted(ranks)}; one rank is expected")
    targets = tuple(t for t in LORA_TARGETS if t in found)
    adapted = without_adapters(model) if model.config.lora_rank else model
    adapted = with_adapters(adapted, ranks.pop(), targets, seed=0)
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params_of(adapted))
    attention = params["layers"]["self_attn"]
    for target in targets:
        for matrix in ("A", "B"):
            by_layer = found[target].get(matrix, {})
            if sorted(by_layer) != list(layers):
                raise UserError(
                    f"{path}: {target}.lora.{matrix} for layers {sorted(by_layer)}; the model has layers 0-{layers[-1]}"
                )
            expected = attention[f"{target}_lora"][matrix].shape[1:]
            stacked = np.stack([by_layer[i].T for i in layers])
            if stacked.shape[1:] != expected:
                raise UserError(
                    f"{path}: {target}.lora.{matrix} is {list(by_layer[0].shape)}, the model needs "
                    f"{list(expected[::-1])}"
                )
            attention[f"{target}_lora"][matrix] = stacked
    return model_from_params(adapted.config, params)


def _base_only(params: dict) -> dict:
    return {
        key: _base_only(value) if isinstance(value, dict) else value
        for key, value in params.items()
        if not str(key).endswith("_lora")
    }
