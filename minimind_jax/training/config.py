"""The run's settings: every flag of MiniMind's train_full_sft.py / train_pretrain.py has a field of the
same name and meaning here, checked in one place."""
from __future__ import annotations

import dataclasses
import numbers
import pathlib
from typing import Any


from minimind_jax.model.config import ARCHS, ATTENTION_IMPLS, REMATS, TRAIN_DTYPES, ModelConfig, weight_stem
from minimind_jax.errors import UserError
from minimind_jax.training.step import LOSS_NORMS



CHOICES = {"mode": ("sft", "pretrain"), "arch": ARCHS, "dtype": TRAIN_DTYPES, "remat": REMATS,
           "attention_impl": ATTENTION_IMPLS, "loss_norm": LOSS_NORMS,
           **dict.fromkeys(("use_moe", "from_resume", "overwrite", "use_wandb", "packing", "fast_path", "scan_layers",
                            "strict", "shuffle", "progress"), (0, 1))}
AT_LEAST = {"epochs": 1, "batch_size": 1, "accumulation_steps": 1, "log_interval": 1, "save_interval": 1,
            "hidden_size": 1, "num_hidden_layers": 1, "max_seq_len": 1, "num_workers": 0, "seed": 0,
            "warmup_steps": 0, "keep_checkpoints": 1, "max_steps": 1, "loss_chunk_size": 0, "num_attention_heads": 1,
            "max_consecutive_skips": 1}


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass
class TrainConfig:
    mode: str = "sft"  # sft | pretrain
    # ---- MiniMind's flags (train_full_sft.py defaults; pretrain's differ, see defaults_for) ----
    save_dir: str = "out"
    save_weight: str = "full_sft"
    epochs: int = 2
    batch_size: int = 16
    learning_rate: float = 5e-7
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on GPU/TPU
    accumulation_steps: int = 1
    grad_clip: float = 1.0
    log_interval: int = 100
    save_interval: int = 100
    hidden_size: int = 512
    num_hidden_layers: int = 8
    max_seq_len: int = 512
    use_moe: int = 0
    data_path: str = "dataset/sft_mini_512.jsonl"
    from_weight: str = "pretrain"
    from_resume: int = 0
    use_wandb: bool = False  # log to Weights & Biases (MiniMind: SwanLab with the W&B API)
    wandb_project: str = "MiniMind-Full-SFT"
    num_workers: int | None = None  # tokenizing processes (MiniMind: data-loader workers)
    # ---- ours ----
    arch: str = "minimind2"
    tokenizer_path: str = "model"
    packing: bool = False
    mesh: str | None = None
    seed: int = 42
    loss_norm: str = "tokens"
    eval_data_path: str | None = None
    warmup_steps: int = 0
    checkpoint_dir: str | None = None  # None: {save_dir}/checkpoints
    overwrite: int = 0  # 1: a fresh run moves an earlier run's checkpoints and logs aside instead of refusing
    keep_checkpoints: int = 3
    max_steps: int | None = None  # stop at this optimizer update, counted from the run's start (a resumed one too)
    remat: str = "none"
    # The train step: fast_path=True takes the backend's fastest exact settings (config.fast_path_settings),
    # False MiniMind's literal computation (config.LITERAL_STEP); the three after it, when not None, win.
    fast_path: bool = True
    scan_layers: bool | None = None
    attention_impl: str | None = None  # ModelConfig.attention_impl: xla | causal_blocks | dot_product_attention | cudnn
    loss_chunk_size: int | None = None  # lm_head + CE this many loss positions at a time; 0: the full logits
    num_attention_heads: int | None = None
    cache_dir: str | None = None
    compilation_cache_dir: str | None = None  # None: $JAX_COMPILATION_CACHE_DIR if set, else {cache}/xla; "none": off
    strict: bool = False
    system_prompt_ratio: float | None = None
    drop_empty_think_ratio: float | None = None
    max_consecutive_skips: int = 10
    shuffle: bool = True
    progress: bool = True

    def __post_init__(self):
        """Every setting checked here, so flags, YAML run configs and the Python API share one set of rules.
        A field whose default is None may be None."""
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        given = {name: value for name, value in vars(self).items() if not (value is None and defaults[name] is None)}
        for name, allowed in CHOICES.items():
            if name in given and given[name] not in allowed:
                raise UserError(f"--{name} must be one of {', '.join(map(str, allowed))}, got {given[name]!r}")
        for name, minimum in AT_LEAST.items():
            if name in given and not (_is_integer(given[name]) and given[name] >= minimum):
                raise UserError(f"--{name} must be an integer >= {minimum}, got {given[name]!r}")
        for name in ("learning_rate", "grad_clip"):
            if not (_is_number(given[name]) and given[name] > 0):
                raise UserError(f"--{name} must be a number > 0, got {given[name]!r}")
        for name in ("system_prompt_ratio", "drop_empty_think_ratio"):
            if name in given and not (_is_number(given[name]) and 0 <= given[name] <= 1):
                raise UserError(f"--{name} must be a number in [0, 1], got {given[name]!r}")
        try:  # the model the flags describe (a loaded weight file must match it: build_model)
            ModelConfig(arch=self.arch, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                        use_moe=bool(self.use_moe), remat=self.remat,
                        **{name: given[name] for name in ("dtype", "num_attention_heads", "attention_impl")
                           if name in given})
        except ValueError as error:  # its message names the fields, which are the flags' names
            raise UserError(str(error)) from None
        if self.from_resume and self.overwrite:
            raise UserError("--from_resume 1 continues the earlier run and --overwrite 1 starts over; give one")

    @property
    def run_name(self) -> str:
        """MiniMind's weight file stem: {save_weight}_{hidden}{_moe}."""
        return weight_stem(self.save_weight, self.hidden_size, self.use_moe)

    @property
    def run_checkpoint_dir(self) -> pathlib.Path:
        """{checkpoint_dir}/{run_name}; by default under the run's --save_dir, so runs with different save
        dirs never share checkpoints."""
        return pathlib.Path(self.checkpoint_dir or pathlib.Path(self.save_dir) / "checkpoints") / self.run_name

    @property
    def log_dir(self) -> pathlib.Path:
        return pathlib.Path(self.save_dir) / "logs" / self.run_name


def defaults_for(mode: str, arch: str) -> dict[str, Any]:
    """MiniMind's defaults per script and era (TrainConfig's own defaults are 2510's train_full_sft.py)."""
    v3 = arch == "minimind3"
    if mode == "pretrain":
        fields = dict(save_weight="pretrain", epochs=1, batch_size=32, learning_rate=5e-4, accumulation_steps=8,
                      data_path="dataset/pretrain_hq.jsonl", from_weight="none", wandb_project="MiniMind-Pretrain")
        if v3:
            fields.update(epochs=2, hidden_size=768, max_seq_len=340, save_interval=1000,
                          data_path="dataset/pretrain_t2t_mini.jsonl")
        return fields
    if v3:
        return dict(learning_rate=1e-5, hidden_size=768, max_seq_len=768, save_interval=1000,
                    data_path="dataset/sft_t2t_mini.jsonl")
    return {}
