"""Model configuration for both MiniMind eras, and the named presets (package data in minimind_jax/configs/).

`arch="minimind2"` is the 2510 era (MiniMind2 family), `arch="minimind3"` is v3. Every field of MiniMind's
own `MiniMindConfig` is here under its MiniMind name; fields left as None take the era's default, exactly as
MiniMind computes it. Fields after the divider are ours (dtype policy, scan, remat).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import pathlib
from typing import Any

import yaml

from minimind_jax.errors import UserError

ARCHS = ("minimind2", "minimind3")
# The presets ship inside the package; the repository's top-level configs/ is a link to this folder.
CONFIG_DIR = importlib.resources.files("minimind_jax") / "configs"
# How attention without a KV cache is computed (model.Attention): "xla" the explicit einsum/softmax path;
# "causal_blocks" the same math per block of queries against only the keys at or before the block (about
# half the work, no [T,T] scores beyond the diagonal); "dot_product_attention" jax.nn.dot_product_attention
# (XLA); "cudnn" its cuDNN flash-attention kernel (GPU, bfloat16/float16, rows padded to its multiple);
# "splash" Pallas' Splash attention kernel (TPU; elsewhere Pallas' interpreter runs it, for tests). The fused
# kernels serve training and evaluation; decoding with a KV cache and dropout take the exact path.
ATTENTION_IMPLS = ("xla", "causal_blocks", "dot_product_attention", "cudnn", "splash")
# Attention kernels that run on each device's rows by a shard_map of their own (Pallas kernels fail the varying-axes
# checks of the train step's shard_map): a step with one leaves the batch's partitioning to XLA instead.
SELF_MAPPED_ATTENTION = ("splash",)
# How a MoE layer runs its routed experts: "tiles" (model.routed_swiglu: each expert on its own tokens, in tiles)
# or "ragged_dot" (model.ragged_swiglu: jax.lax.ragged_dot's grouped matmuls, fast where the backend has them).
MOE_IMPLS = ("tiles", "ragged_dot")
REMATS = ("none", "full", "dots")  # activation recomputation in the backward pass (model._REMAT_POLICIES)
DTYPES = ("float32", "bfloat16", "float16")  # compute dtypes; the parameters stay float32
TRAIN_DTYPES = ("float32", "bfloat16")  # float16 would need loss scaling, which the trainer does not do
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the projections that can take an adapter
PRESETS = ("minimind2-small", "minimind2", "minimind2-moe", "minimind3", "minimind3-moe")
# MiniMind's eval script's sampling defaults per era (2510's eval_model.py, v3's eval_llm.py): chat and the
# Hugging Face export's generation_config.json.
EVAL_SAMPLING = {
    "minimind2": {"temperature": 0.85, "top_p": 0.85},
    "minimind3": {"temperature": 0.85, "top_p": 0.95},
}


@dataclasses.dataclass
class ModelConfig:
    arch: str = "minimind2"
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # 2 (2510) or 4 (v3)
    head_dim: int | None = None  # hidden_size // num_attention_heads
    vocab_size: int = 6400
    intermediate_size: int | None = None  # era formula from hidden_size
    rms_norm_eps: float | None = None  # 1e-5 (2510) or 1e-6 (v3)
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    inference_rope_scaling: bool = False
    dropout: float = 0.0
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    tie_word_embeddings: bool = True
    flash_attn: bool = True
    # MoE. 2510 names: n_routed_experts, n_shared_experts, aux_loss_alpha, seq_aux, scoring_func.
    # v3 names: num_experts, moe_intermediate_size, router_aux_loss_coef.
    use_moe: bool = False
    num_experts_per_tok: int | None = None  # 2 (2510) or 1 (v3)
    n_routed_experts: int = 4
    n_shared_experts: int = 1
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.1
    seq_aux: bool = True
    norm_topk_prob: bool = True
    num_experts: int = 4
    moe_intermediate_size: int | None = None
    router_aux_loss_coef: float = 5e-4
    # ---- ours ----
    dtype: str = "float32"  # compute dtype; params stay fp32 and logits are returned in fp32
    scan_layers: bool = True  # False unrolls the layer loop (faster on CPU, compile time grows with depth)
    remat: str = "none"  # none | full | dots (jax.checkpoint policy for each scanned block)
    attention_impl: str = "xla"  # see ATTENTION_IMPLS; "xla" is the exact path the parity tests check
    attention_block_size: int = 128  # queries per block of attention_impl="causal_blocks"
    moe_impl: str = "tiles"  # see MOE_IMPLS
    expert_tile_size: int = 256  # MoE tiles: rows per routed-expert matmul, an expert's last ones in quarter tiles
    # LoRA (MiniMind's model_lora.py): W x + B(A x) on each projection named in lora_targets, rank lora_rank.
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        # MiniMind's config carries these fields but its model knows one value of each; the model here too.
        for name, only in (("hidden_act", "silu"), ("tie_word_embeddings", True), ("scoring_func", "softmax")):
            if getattr(self, name) != only:
                raise ValueError(f"{name} must be {only!r} (MiniMind's only value), got {getattr(self, name)!r}")
        v3 = self.arch == "minimind3"
        if self.num_key_value_heads is None:
            self.num_key_value_heads = 4 if v3 else 2
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            if v3:
                self.intermediate_size = math.ceil(self.hidden_size * math.pi / 64) * 64
            else:
                self.intermediate_size = 64 * ((int(self.hidden_size * 8 / 3) + 63) // 64)
        if self.rms_norm_eps is None:
            self.rms_norm_eps = 1e-6 if v3 else 1e-5
        if self.num_experts_per_tok is None:
            self.num_experts_per_tok = 1 if v3 else 2
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(
                f"head_dim={self.head_dim} (hidden_size={self.hidden_size} / num_attention_heads="
                f"{self.num_attention_heads}) must be even: RoPE rotates pairs of dimensions"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.remat not in REMATS:
            raise ValueError(f"remat must be one of {REMATS}, got {self.remat!r}")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.attention_impl == "cudnn" and self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"attention_impl=cudnn needs dtype bfloat16 or float16, got {self.dtype!r}")
        for name in ("attention_block_size", "expert_tile_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.lora_targets = tuple(self.lora_targets)
        unknown = [name for name in self.lora_targets if name not in LORA_TARGETS]
        if unknown or self.lora_rank < 0 or bool(self.lora_rank) != bool(self.lora_targets):
            raise ValueError(
                f"lora_targets {list(self.lora_targets)} with lora_rank {self.lora_rank}: adapters go on the "
                f"attention projections {', '.join(LORA_TARGETS)}, with a rank >= 1 (no targets and rank 0: none)"
            )

    # ---- derived, era-independent views used by the model ----
    @property
    def is_v3(self) -> bool:
        return self.arch == "minimind3"

    @property
    def num_routed_experts(self) -> int:
        return self.num_experts if self.is_v3 else self.n_routed_experts

    @property
    def num_shared_experts(self) -> int:
        return 0 if self.is_v3 else self.n_shared_experts

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size if self.is_v3 else self.intermediate_size

    @property
    def rope_scaling(self) -> dict | None:
        """MiniMind's YaRN settings, present only with inference_rope_scaling."""
        if not self.inference_rope_scaling:
            return None
        if self.is_v3:
            return {
                "beta_fast": 32,
                "beta_slow": 1,
                "factor": 16,
                "original_max_position_embeddings": 2048,
                "attention_factor": 1.0,
                "type": "yarn",
            }
        return {"beta_fast": 4, "beta_slow": 1, "factor": 4, "original_max_position_embeddings": 2048, "type": "yarn"}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**fields)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def square_projections(config: ModelConfig) -> tuple[str, ...]:
    """MiniMind's LoRA targets (apply_lora): the projections whose weight is square."""
    q, kv, d = (
        config.num_attention_heads * config.head_dim,
        config.num_key_value_heads * config.head_dim,
        config.hidden_size,
    )
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d)}
    return tuple(name for name, (d_in, d_out) in shapes.items() if d_in == d_out)


def load_preset(name_or_path: str, **overrides) -> ModelConfig:
    """A named preset (configs/NAME.yaml) or a YAML file with a `model:` section or ModelConfig fields."""
    path = pathlib.Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(f"{name_or_path}: no such preset or file (looked for {path}); presets: {', '.join(PRESETS)}")
    fields = yaml.safe_load(path.read_text()) or {}
    fields = fields.get("model", fields)
    return ModelConfig.from_dict({**fields, **overrides})


def weight_stem(weight: str, hidden_size: int, use_moe) -> str:
    """MiniMind's weight file stem, `{weight}_{hidden}{_moe}`: its `.pth` names and our run names."""
    return f"{weight}_{hidden_size}{'_moe' if use_moe else ''}"


def num_params(config: ModelConfig) -> int:
    """Parameter count as MiniMind counts it (the tied embedding once)."""
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    attn = h * q + 2 * h * kv + q * h + (2 * d if config.is_v3 else 0)
    if config.use_moe:
        experts = config.num_routed_experts + config.num_shared_experts
        mlp = experts * 3 * h * config.expert_intermediate_size + config.num_routed_experts * h
    else:
        mlp = 3 * h * config.intermediate_size
    per_layer = attn + mlp + 2 * h
    return config.vocab_size * h + config.num_hidden_layers * per_layer + h


def default_dtype(platform: str) -> str:
    """The compute dtype when none is given: float32 on CPU, bfloat16 on a JAX platform with an accelerator."""
    return "float32" if platform == "cpu" else "bfloat16"


# MiniMind's literal train-step computation (`--fast_path 0`): full [B,T,V] logits, explicit softmax
# attention, the layers in lax.scan.
LITERAL_STEP = {"attention_impl": "xla", "loss_chunk_size": None, "scan_layers": True}


def fast_path_settings(platform: str, dtype: str, seq_len: int) -> dict[str, Any]:
    """The fastest exact train-step settings for a JAX platform ("cpu", "gpu", "tpu"): the same loss and
    gradients as LITERAL_STEP up to rounding, as keys of LITERAL_STEP.

    Everywhere, the tied lm_head and CE run only at loss positions, 512 at a time. CPU: causal_blocks attention
    and unrolled layers (minimind2-small, 8 × 511, fp32: 1.13× MiniMind's own step, the literal step 0.93×; README).
    GPU: cuDNN's fused attention in bfloat16/float16 (Ampere or newer) for any row length (seq_len), the rows
    padded inside attention to its multiple; float32 takes causal_blocks. TPU: Pallas' Splash attention, any
    dtype. Accelerators keep lax.scan: one layer to compile, not L.
    """
    fused = {"gpu": "cudnn" if dtype in ("bfloat16", "float16") else None, "tpu": "splash"}.get(platform)
    return {
        "attention_impl": fused or "causal_blocks",
        "loss_chunk_size": 512,
        "scan_layers": platform != "cpu",
    }


def train_step_settings(fast_path: bool, platform: str, dtype: str, seq_len: int, **given) -> dict[str, Any]:
    """attention_impl, loss_chunk_size and scan_layers of a train step: those given (not None) win; the rest
    are fast_path_settings, or LITERAL_STEP without the fast path. A loss_chunk_size of 0 asks for the full logits."""
    chosen = fast_path_settings(platform, dtype, seq_len) if fast_path else LITERAL_STEP
    settings = {name: value if given.get(name) is None else given[name] for name, value in chosen.items()}
    settings["loss_chunk_size"] = settings["loss_chunk_size"] or None
    settings["scan_layers"] = bool(settings["scan_layers"])  # flags give 0 / 1
    return settings
