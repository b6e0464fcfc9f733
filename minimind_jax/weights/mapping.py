"""MiniMind state dict <-> our parameter tree. Pure numpy: torch is only needed to read or write the file.

Our tree (nnx.to_pure_dict of `MiniMind`): `embed_tokens` [V,D], `norm.weight` [D], and under `layers` every
per-layer tensor stacked on a leading L axis, linear kernels transposed to [in, out]. MoE experts are stacked
on an E axis after L; the router is `mlp.router` [L,D,E]; 2510's shared experts are `mlp.shared_*` [L,S,...].
"""

from __future__ import annotations

import re
from collections import OrderedDict

import numpy as np

from minimind_jax.errors import UserError
from minimind_jax.model.config import ModelConfig

EMBED, LM_HEAD, FINAL_NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"
PROJ = ("gate_proj", "down_proj", "up_proj")  # MiniMind's registration order inside FeedForward


def _layer_entries(config: ModelConfig):
    """(MiniMind key suffix within layer i, our path under `layers`, extra index, transpose) in MiniMind's order."""
    attn = [(f"self_attn.{p}.weight", ("self_attn", p), (), True) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if config.is_v3:
        attn += [(f"self_attn.{n}.weight", ("self_attn", n, "weight"), (), False) for n in ("q_norm", "k_norm")]
    norms = [(f"{n}.weight", (n, "weight"), (), False) for n in ("input_layernorm", "post_attention_layernorm")]
    if not config.use_moe:
        mlp = [(f"mlp.{p}.weight", ("mlp", p), (), True) for p in PROJ]
    else:
        experts = [
            (f"mlp.experts.{e}.{p}.weight", ("mlp", p), (e,), True)
            for e in range(config.num_routed_experts)
            for p in PROJ
        ]
        router = [("mlp.gate.weight", ("mlp", "router"), (), True)]
        shared = [
            (f"mlp.shared_experts.{s}.{p}.weight", ("mlp", f"shared_{p}"), (s,), True)
            for s in range(config.num_shared_experts)
            for p in PROJ
        ]
        # v3 registers the gate before the experts; 2510 after them.
        mlp = router + experts if config.is_v3 else experts + router + shared
    return attn + norms + mlp


def state_dict_keys(config: ModelConfig) -> list[str]:
    """MiniMind's state-dict keys, in the order its model registers them."""
    keys = [EMBED]
    for i in range(config.num_hidden_layers):
        keys += [f"model.layers.{i}.{suffix}" for suffix, *_ in _layer_entries(config)]
    return keys + [FINAL_NORM, LM_HEAD]


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, hd = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    f = config.expert_intermediate_size if config.use_moe else config.intermediate_size
    per_layer = {
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "gate_proj.weight": (f, d),
        "up_proj.weight": (f, d),
        "down_proj.weight": (d, f),
        "mlp.gate.weight": (config.num_routed_experts, d),
    }
    shapes = {EMBED: (config.vocab_size, d), FINAL_NORM: (d,), LM_HEAD: (config.vocab_size, d)}
    for key in state_dict_keys(config)[1:-2]:
        suffix = key.split(".", 3)[3]
        shapes[key] = per_layer.get(suffix) or per_layer[".".join(suffix.split(".")[-2:])]
    return shapes


def infer_config(state_dict, source: str = "state dict", **overrides) -> ModelConfig:
    """Era, sizes and MoE layout from keys and shapes. `overrides` name what shapes cannot tell."""
    keys = set(state_dict)
    if EMBED not in keys or not any(k.startswith("model.layers.0.") for k in keys):
        sample = ", ".join(sorted(keys)[:3]) or "no keys"
        raise UserError(f"{source}: not a MiniMind state dict: no {EMBED} / model.layers.* (found {sample}, ...)")

    def shape(key):
        return tuple(state_dict[key].shape)

    vocab, hidden = shape(EMBED)
    layer_ids = {int(m.group(1)) for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    fields = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=max(layer_ids) + 1)
    v3 = "model.layers.0.self_attn.q_norm.weight" in keys
    fields["arch"] = "minimind3" if v3 else "minimind2"
    fields["use_moe"] = "model.layers.0.mlp.gate.weight" in keys
    fields.update({k: v for k, v in overrides.items() if k in ("arch", "num_attention_heads", "head_dim")})
    v3 = fields["arch"] == "minimind3"

    q_out, k_out = (
        shape("model.layers.0.self_attn.q_proj.weight")[0],
        shape("model.layers.0.self_attn.k_proj.weight")[0],
    )
    if v3 and "model.layers.0.self_attn.q_norm.weight" in keys and "head_dim" not in fields:
        fields["head_dim"] = shape("model.layers.0.self_attn.q_norm.weight")[0]
    if "head_dim" in fields and "num_attention_heads" not in fields:
        fields["num_attention_heads"] = q_out // fields["head_dim"]
    heads = fields.setdefault("num_attention_heads", 8)  # 2510 shapes cannot tell; MiniMind's default is 8
    head_dim = fields.setdefault("head_dim", hidden // heads)
    if q_out != heads * head_dim or k_out % head_dim:
        raise UserError(
            f"{source}: attention shapes (q_proj out {q_out}, k_proj out {k_out}) do not fit {heads} heads of dim {head_dim}; "
            f"MiniMind's default is 8 heads: pass num_attention_heads=N (and head_dim=N for v3) to say otherwise"
        )
    fields["num_key_value_heads"] = k_out // head_dim

    if fields["use_moe"]:
        experts = {int(m.group(1)) for k in keys if (m := re.match(r"model\.layers\.0\.mlp\.experts\.(\d+)\.", k))}
        shared = {
            int(m.group(1)) for k in keys if (m := re.match(r"model\.layers\.0\.mlp\.shared_experts\.(\d+)\.", k))
        }
        width = shape("model.layers.0.mlp.experts.0.gate_proj.weight")[0] if experts else None
        if v3:
            fields.update(num_experts=len(experts), moe_intermediate_size=width)
        else:
            fields.update(n_routed_experts=len(experts), n_shared_experts=len(shared), intermediate_size=width)
    elif "model.layers.0.mlp.gate_proj.weight" in keys:
        fields["intermediate_size"] = shape("model.layers.0.mlp.gate_proj.weight")[0]
    fields.update(overrides)
    return ModelConfig.from_dict(fields)


def validate(state_dict, config: ModelConfig, source: str) -> None:
    """Every key present with its exact shape, nothing extra, tied matrices equal: never a partial load."""
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    if missing or extra:
        parts = ([f"missing {len(missing)} key(s): {', '.join(missing[:3])}"] if missing else []) + (
            [f"unexpected {len(extra)} key(s): {', '.join(extra[:3])}"] if extra else []
        )
        raise UserError(
            f"{source}: {'; '.join(parts)} (for a {config.arch} model of {config.num_hidden_layers} layers)"
        )
    for key, want in expected.items():
        got = tuple(state_dict[key].shape)
        if got != want:
            raise UserError(f"{source}: {key} has shape {list(got)}, expected {list(want)}")
    if not np.array_equal(np.asarray(state_dict[EMBED]), np.asarray(state_dict[LM_HEAD]), equal_nan=True):
        raise UserError(f"{source}: {LM_HEAD} differs from {EMBED}; MiniMind ties them")


def _set(tree: dict, path: tuple, value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for name in path:
        tree = tree[name]
    return tree


def params_from_state_dict(state_dict, config: ModelConfig, source: str = "state dict") -> dict:
    """numpy arrays {name: [V,D] | [L,...]} in our layout, keeping the file's dtype. Validates first."""
    state_dict = {k: np.asarray(v) for k, v in state_dict.items()}
    validate(state_dict, config, source)
    params = {"embed_tokens": state_dict[EMBED], "norm": {"weight": state_dict[FINAL_NORM]}}
    layers: dict = {}
    experts: dict[tuple, dict[int, np.ndarray]] = {}  # path -> expert index -> [L,...]
    for suffix, path, index, transpose in _layer_entries(config):
        stacked = np.stack([state_dict[f"model.layers.{i}.{suffix}"] for i in range(config.num_hidden_layers)])
        if transpose:
            stacked = np.swapaxes(stacked, -1, -2)
        if index:
            experts.setdefault(path, {})[index[0]] = stacked
        else:
            _set(layers, path, stacked)
    for path, by_index in experts.items():
        _set(layers, path, np.stack([by_index[i] for i in sorted(by_index)], axis=1))
    params["layers"] = layers
    return params


def state_dict_from_params(params: dict, config: ModelConfig) -> OrderedDict[str, np.ndarray]:
    """MiniMind's exact keys and order, both tied keys present, arrays in the params' dtype."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    embed = np.asarray(params["embed_tokens"])
    out[EMBED] = embed
    layers = params["layers"]
    for i in range(config.num_hidden_layers):
        for suffix, path, index, transpose in _layer_entries(config):
            value = np.asarray(_get(layers, path))[i]
            if index:
                value = value[index[0]]
            out[f"model.layers.{i}.{suffix}"] = np.swapaxes(value, -1, -2) if transpose else value
    out[FINAL_NORM] = np.asarray(params["norm"]["weight"])
    out[LM_HEAD] = embed
    return out
