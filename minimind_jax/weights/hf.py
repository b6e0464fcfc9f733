"""Hugging Face format, both ways: safetensors and config.json in transformers' own architectures.

era 2510 dense -> LlamaForCausalLM, 2510 MoE -> Qwen2MoeForCausalLM, v3 dense -> Qwen3ForCausalLM, v3 MoE ->
Qwen3MoeForCausalLM, so `AutoModelForCausalLM.from_pretrained(DIR)`, llama.cpp and vLLM take the directory
without remote code.
MiniMind's state-dict keys are already these architectures' keys (v3's q_norm/k_norm are Qwen3's, v3's
`mlp.gate` and `mlp.experts.{e}.*` are Qwen3-MoE's, per expert as on the Hub); the tied `lm_head.weight` is
left out, as save_pretrained leaves it out. The rest of the model is in config.json: RoPE theta, RMSNorm eps,
head_dim, top-k and whether the top-k weights are renormalised (both MiniMind and Qwen3-MoE take the softmax
over all experts first; MiniMind's + 1e-20 in the denominator changes nothing in fp32 at weights > 1e-13).

2510 MoE adds its shared experts ungated, where Qwen2-MoE multiplies its one shared expert by
sigmoid(gate · x). The export makes that exact: a zero gate (sigmoid(0) = 0.5) and the shared down_proj doubled
in the file's dtype (powers of two scale floats exactly), MiniMind's S shared experts side by side as one of S
times the width, and zero q/k/v biases (Qwen2-MoE has them; most readers expect them). Reading back undoes this
and refuses a nonzero gate or bias. 2510's top-1 routing keeps the raw softmax weight: norm_topk_prob false.

Not expressible, refused in one line: 2510 MoE without shared experts and 2510's YaRN (a per-dimension ramp that
is not transformers' "yarn"). v3's YaRN is transformers' "yarn" with attention_factor 1.0, exported as such.

Only what this model computes is read back: any other setting (biases, sliding windows, dense MLP layers
among the MoE ones, untied lm_head, ...) is refused, as is a missing, extra or misshapen tensor.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import numpy as np

from minimind_jax.errors import UserError, first_line
from minimind_jax.model.config import EVAL_SAMPLING, ModelConfig
from minimind_jax.weights.mapping import EMBED, LM_HEAD, PROJ, params_from_state_dict, state_dict_from_params

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DTYPES = ("float16", "float32", "bfloat16")

# (arch, use_moe) -> (transformers architecture, model_type)
ARCHITECTURES = {
    ("minimind2", False): ("LlamaForCausalLM", "llama"),
    ("minimind2", True): ("Qwen2MoeForCausalLM", "qwen2_moe"),
    ("minimind3", False): ("Qwen3ForCausalLM", "qwen3"),
    ("minimind3", True): ("Qwen3MoeForCausalLM", "qwen3_moe"),
}


# ---------------------------------------------------------------------------------------------------------
# config.json


def _yarn(config: ModelConfig) -> dict | None:
    """transformers' "yarn" parameters equal to the model's RoPE rescaling, None without one.

    MiniMind rescales only when max_position_embeddings exceeds the original length (transformers always does).
    """
    scaling = config.rope_scaling
    if scaling is None or config.max_position_embeddings <= scaling["original_max_position_embeddings"]:
        return None
    if not config.is_v3:
        raise UserError(
            "inference_rope_scaling: 2510's YaRN ramps each RoPE dimension by its own beta, which transformers' "
            "yarn cannot express; export without it (inference_rope_scaling=False)"
        )
    dim, theta, orig = config.head_dim, config.rope_theta, scaling["original_max_position_embeddings"]
    high = math.ceil(dim * math.log(orig / (scaling["beta_slow"] * 2 * math.pi)) / (2 * math.log(theta)))
    if high > dim // 2 - 1:  # MiniMind clamps the ramp's end at dim/2 - 1, transformers at dim - 1
        raise UserError(
            f"inference_rope_scaling: with head_dim {dim} and rope_theta {theta:g} MiniMind's YaRN ramp is cut "
            f"short where transformers' yarn is not; export without it (inference_rope_scaling=False)"
        )
    return {
        "rope_type": "yarn",
        "factor": float(scaling["factor"]),
        "original_max_position_embeddings": orig,
        "beta_fast": float(scaling["beta_fast"]),
        "beta_slow": float(scaling["beta_slow"]),
        "attention_factor": float(scaling["attention_factor"]),
        "truncate": True,
    }


def hf_config(config: ModelConfig, dtype: str = "float16") -> dict:
    """config.json of the transformers architecture that computes what `config` computes."""
    if config.use_moe and not config.is_v3 and config.num_shared_experts == 0:
        raise UserError(
            "2510 MoE without shared experts cannot be exported: Qwen2-MoE always has one, and Mixtral renormalises "
            "the top-k weights where MiniMind's top-1 does not"
        )
    architecture, model_type = ARCHITECTURES[config.arch, config.use_moe]
    yarn = _yarn(config)
    fields = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        # Both spellings: rope_parameters for transformers >= 5, rope_theta/rope_scaling for older readers.
        "rope_theta": config.rope_theta,
        "rope_scaling": yarn,
        "rope_parameters": {"rope_type": "default", **(yarn or {}), "rope_theta": config.rope_theta},
        "tie_word_embeddings": True,
        "attention_dropout": 0.0,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if model_type == "llama":
        fields.update(mlp_bias=False, pretraining_tp=1)
    else:
        fields.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_hidden_layers)
    if model_type != "qwen2_moe":  # Qwen2-MoE says qkv_bias instead (below)
        fields.update(attention_bias=False)
    if config.use_moe:
        fields.update(
            num_experts=config.num_routed_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            moe_intermediate_size=config.expert_intermediate_size,
            # MiniMind renormalises top-k weights in v3 always, in 2510 only for k > 1
            norm_topk_prob=config.norm_topk_prob and (config.is_v3 or config.num_experts_per_tok > 1),
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=config.router_aux_loss_coef if config.is_v3 else config.aux_loss_alpha,
            output_router_logits=False,
        )
    if model_type == "qwen2_moe":
        fields.update(
            qkv_bias=True, shared_expert_intermediate_size=config.num_shared_experts * config.intermediate_size
        )
    return fields


def config_from_hf(fields: dict, source: str, **overrides) -> ModelConfig:
    """The ModelConfig of a config.json written for one of ARCHITECTURES; anything else is refused."""
    by_type = {model_type: key for key, (_, model_type) in ARCHITECTURES.items()}
    model_type = fields.get("model_type")
    if model_type not in by_type:
        names = ", ".join(f"{name} ({t})" for name, t in ARCHITECTURES.values())
        raise UserError(f"{source}: model_type {model_type!r} is not one MiniMind can load; expected {names}")
    arch, use_moe = by_type[model_type]
    if "num_local_experts" in fields:  # transformers 5 writes num_experts under this name
        fields = {"num_experts": fields["num_local_experts"], **fields}

    def refuse_unless(ok: bool, what: str):
        if not ok:
            raise UserError(f"{source}: {what}; MiniMind's model has no such setting")

    def required(name: str):
        if not isinstance(fields.get(name), int):
            raise UserError(f"{source}: {name} is missing or not an integer ({fields.get(name)!r})")
        return fields[name]

    refuse_unless(fields.get("hidden_act", "silu") == "silu", f"hidden_act {fields.get('hidden_act')!r}")
    refuse_unless(fields.get("tie_word_embeddings") is True, "tie_word_embeddings is not true")
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
        refuse_unless(not fields.get(flag), f"{flag} is true")
    refuse_unless(fields.get("pretraining_tp", 1) == 1, f"pretraining_tp {fields.get('pretraining_tp')}")
    if use_moe:
        refuse_unless(not fields.get("mlp_only_layers"), "mlp_only_layers (dense layers among the MoE ones)")
        refuse_unless(fields.get("decoder_sparse_step", 1) == 1, "decoder_sparse_step other than 1")

    rope = dict(fields.get("rope_parameters") or {**(fields.get("rope_scaling") or {})})
    rope_theta = rope.pop("rope_theta", fields.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    config_fields = dict(
        arch=arch,
        use_moe=use_moe,
        vocab_size=required("vocab_size"),
        hidden_size=required("hidden_size"),
        intermediate_size=required("intermediate_size"),
        num_hidden_layers=required("num_hidden_layers"),
        num_attention_heads=required("num_attention_heads"),
        num_key_value_heads=fields.get("num_key_value_heads") or required("num_attention_heads"),
        head_dim=fields.get("head_dim") or required("hidden_size") // required("num_attention_heads"),
        max_position_embeddings=fields.get("max_position_embeddings", 32768),
        rms_norm_eps=fields.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
    )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(fields.get(name), int):
            config_fields[name] = fields[name]
    norm_topk_prob = bool(fields.get("norm_topk_prob", False))
    if use_moe and arch == "minimind3":
        config_fields.update(
            num_experts=required("num_experts"),
            num_experts_per_tok=required("num_experts_per_tok"),
            moe_intermediate_size=required("moe_intermediate_size"),
            norm_topk_prob=norm_topk_prob,
            router_aux_loss_coef=fields.get("router_aux_loss_coef", 5e-4),
        )
    elif use_moe:
        width, shared_width, top_k = (
            required("moe_intermediate_size"),
            fields.get("shared_expert_intermediate_size") or 0,
            required("num_experts_per_tok"),
        )
        refuse_unless(
            shared_width > 0 and shared_width % width == 0,
            f"a shared expert {shared_width} wide, not a multiple of the experts' {width}",
        )
        refuse_unless(
            top_k > 1 or not norm_topk_prob, "norm_topk_prob with one expert per token (2510 keeps the softmax weight)"
        )
        config_fields.update(
            n_routed_experts=required("num_experts"),
            n_shared_experts=shared_width // width,
            num_experts_per_tok=top_k,
            intermediate_size=width,
            norm_topk_prob=norm_topk_prob or top_k == 1,
            aux_loss_alpha=fields.get("router_aux_loss_coef", 0.1),
        )
    try:
        config = ModelConfig.from_dict({**config_fields, **overrides})
    except (TypeError, ValueError) as error:
        raise UserError(f"{source}: not a valid MiniMind config ({first_line(error)})") from None
    if rope_type != "default":
        # The one rescaling the model has: v3's YaRN, with MiniMind's parameters exactly.
        scaled = config.replace(inference_rope_scaling=True)
        expected = (_yarn(scaled) or {}) if rope_type == "yarn" and config.is_v3 else {}
        expected.pop("rope_type", None)
        refuse_unless(
            expected and {"truncate": True, **rope} == expected,
            f"RoPE scaling {rope_type} {json.dumps(rope)} (MiniMind has only v3's YaRN: {json.dumps(expected)})",
        )
        config = scaled
    return config


# ---------------------------------------------------------------------------------------------------------
# Files


def _safetensors():
    try:
        import safetensors.numpy
    except ImportError:
        raise UserError(
            "the Hugging Face format needs the safetensors package: pip install 'minimind-jax[hf]'"
        ) from None
    return safetensors.numpy


def _numpy_dtype(dtype: str):
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "bfloat16":
        import ml_dtypes  # a JAX dependency

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def is_hf_directory(path) -> bool:
    """A directory written in the Hugging Face format (its weights or a config.json with a model_type)."""
    path = pathlib.Path(path)
    if (path / WEIGHTS_FILE).is_file() or (path / INDEX_FILE).is_file():
        return True
    try:
        return "model_type" in json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return False


def save_hf(model, directory, dtype: str = "float16", tokenizer_path=None) -> pathlib.Path:
    """Writes `directory`: model.safetensors, config.json, generation_config.json and, given a MiniMind
    tokenizer directory, its tokenizer.json and tokenizer_config.json (they carry the chat template).

    The directory is written next to its final name and renamed when complete.
    """
    import jax

    from minimind_jax.data.tokenizer import HFTokenizer, check_fits, load_tokenizer
    from minimind_jax.model.params import params_of

    config = model.config
    fields = hf_config(config, dtype)  # refuses what cannot be exported before anything is written
    numpy_dtype = _numpy_dtype(dtype)
    safetensors_numpy = _safetensors()
    tokenizer = None if tokenizer_path is None else load_tokenizer(tokenizer_path)
    if tokenizer is not None:
        if not isinstance(tokenizer, HFTokenizer):
            raise UserError(
                f"{tokenizer.path}: the Hugging Face format takes a tokenizer directory (tokenizer.json and "
                f"tokenizer_config.json, as MiniMind's model/), not a SentencePiece model"
            )
        check_fits(tokenizer, config.arch, config.vocab_size)
    directory = pathlib.Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UserError(f"{directory}: exists and is not empty; choose a new output directory")

    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params_of(model))
    state_dict = {k: v.astype(numpy_dtype) for k, v in state_dict_from_params(params, config).items()}
    tensors = {k: np.ascontiguousarray(v) for k, v in hf_tensors(state_dict, config).items()}
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        # serialised here and written by Python, so the file gets the usual permissions
        (partial / WEIGHTS_FILE).write_bytes(safetensors_numpy.save(tensors, metadata={"format": "pt"}))
        _write_json(partial / CONFIG_FILE, fields)
        generation = {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
            "do_sample": True,
            **EVAL_SAMPLING[config.arch],
            "top_k": 50,  # as MiniMind's generate
        }
        _write_json(partial / GENERATION_CONFIG_FILE, generation)
        if tokenizer is not None:
            for name in TOKENIZER_FILES:
                shutil.copyfile(tokenizer.path / name, partial / name)
        if directory.exists():
            directory.rmdir()
        partial.rename(directory)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"{directory}: cannot write ({(error.strerror or str(error)).lower()})") from None
    return directory


def _shared_expert_keys(config: ModelConfig, layer: int):
    """For each projection in PROJ order: MiniMind's keys of the layer's shared experts, and Qwen2-MoE's one key."""
    prefix = f"model.layers.{layer}.mlp."
    return [
        (
            [f"{prefix}shared_experts.{s}.{p}.weight" for s in range(config.num_shared_experts)],
            f"{prefix}shared_expert.{p}.weight",
        )
        for p in PROJ
    ]


def _qkv_bias_keys(layer: int) -> list[str]:
    return [f"model.layers.{layer}.self_attn.{p}_proj.bias" for p in ("q", "k", "v")]


def hf_tensors(state_dict: dict, config: ModelConfig) -> dict[str, np.ndarray]:
    """MiniMind's state dict (one dtype) as the architecture's tensors: the tied lm_head left out, and for 2510
    MoE the Qwen2-MoE shared expert (see the module's docstring)."""
    tensors = {k: v for k, v in state_dict.items() if k != LM_HEAD}
    if config.is_v3 or not config.use_moe:
        return tensors
    embed = state_dict[EMBED]
    for layer in range(config.num_hidden_layers):
        for (ours, theirs), proj in zip(_shared_expert_keys(config, layer), PROJ):
            parts = [tensors.pop(key) for key in ours]
            if proj == "down_proj":  # [D, F] each, side by side; doubled against the gate's 0.5
                tensors[theirs] = np.concatenate(parts, axis=1) * np.asarray(2, embed.dtype)
                if not np.isfinite(tensors[theirs]).all():
                    raise UserError(f"{ours[0]}: twice its values overflow {embed.dtype}; export in a wider --dtype")
            else:
                tensors[theirs] = np.concatenate(parts, axis=0)
        tensors[f"model.layers.{layer}.mlp.shared_expert_gate.weight"] = np.zeros((1, config.hidden_size), embed.dtype)
        for key, width in zip(
            _qkv_bias_keys(layer), (config.num_attention_heads, config.num_key_value_heads, config.num_key_value_heads)
        ):
            tensors[key] = np.zeros(width * config.head_dim, embed.dtype)
    return tensors


def minimind_state_dict(tensors: dict, config: ModelConfig, source: str) -> dict[str, np.ndarray]:
    """The inverse of `hf_tensors`, with the tied lm_head; a missing or nonzero gate or bias is refused."""
    state_dict = dict(tensors)
    if EMBED in state_dict:
        state_dict.setdefault(LM_HEAD, state_dict[EMBED])  # tied, left out as save_pretrained leaves it out
    if config.is_v3 or not config.use_moe:
        return state_dict

    def take(key):
        if key not in state_dict:
            raise UserError(f"{source}: missing key {key} (a Qwen2-MoE model as 2510 MoE)")
        return state_dict.pop(key)

    for layer in range(config.num_hidden_layers):
        gate = f"model.layers.{layer}.mlp.shared_expert_gate.weight"
        # the biases are absent when config.json says qkv_bias false
        checked = {gate: take(gate), **{k: state_dict.pop(k) for k in _qkv_bias_keys(layer) if k in state_dict}}
        nonzero = [key for key, value in checked.items() if np.any(value)]
        if nonzero:
            raise UserError(
                f"{source}: {nonzero[0]} is not zero; MiniMind 2510 has no gate on its shared experts, no q/k/v biases"
            )
        for (ours, theirs), proj in zip(_shared_expert_keys(config, layer), PROJ):
            merged = take(theirs)
            width = config.num_shared_experts * config.intermediate_size
            expected = (config.hidden_size, width) if proj == "down_proj" else (width, config.hidden_size)
            if merged.shape != expected:
                raise UserError(f"{source}: {theirs} has shape {list(merged.shape)}, expected {list(expected)}")
            if proj == "down_proj":
                merged = merged / np.asarray(2, merged.dtype)
            for key, part in zip(ours, np.split(merged, len(ours), axis=1 if proj == "down_proj" else 0)):
                state_dict[key] = part
    return state_dict


def _write_json(path: pathlib.Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (a Hugging Face model directory has one)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({first_line(error)})") from None


def read_hf_state_dict(directory) -> tuple[dict[str, np.ndarray], str]:
    """Every tensor of the directory's safetensors file(s) and a name of where they came from, for errors."""
    directory = pathlib.Path(directory)
    if (directory / WEIGHTS_FILE).is_file():
        files, source = [directory / WEIGHTS_FILE], str(directory / WEIGHTS_FILE)
    elif (directory / INDEX_FILE).is_file():
        weight_map = _read_json(directory / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{directory / INDEX_FILE}: no weight_map")
        files, source = [directory / name for name in sorted(set(weight_map.values()))], str(directory / INDEX_FILE)
    else:
        raise UserError(f"{directory}: no {WEIGHTS_FILE} (nor {INDEX_FILE}); not a Hugging Face model directory")
    safetensors_numpy = _safetensors()
    state_dict: dict[str, np.ndarray] = {}
    for path in files:
        try:
            tensors = safetensors_numpy.load_file(str(path))
        except FileNotFoundError:
            raise UserError(f"{path}: no such file (named in {INDEX_FILE})") from None
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise UserError(f"{path}: not a readable safetensors file ({first_line(error)})") from None
        repeated = sorted(state_dict.keys() & tensors.keys())
        if repeated:
            raise UserError(f"{path}: {repeated[0]} is also in another file of {directory}")
        state_dict.update(tensors)
    return state_dict, source


def load_hf(directory, **overrides):
    """(config, params) of a Hugging Face directory: every tensor present with its exact shape, or a UserError."""
    directory = pathlib.Path(directory)
    config = config_from_hf(_read_json(directory / CONFIG_FILE), str(directory / CONFIG_FILE), **overrides)
    tensors, source = read_hf_state_dict(directory)
    return config, params_from_state_dict(minimind_state_dict(tensors, config, source), config, source=source)
