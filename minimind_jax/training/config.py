"""The run's settings: every flag of MiniMind's train_full_sft.py / train_pretrain.py has a field of the
same name and meaning here, checked in one place. A field declared with `flag` is a command-line flag too, its
help text next to it (cli/train.py builds the parser from the fields)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import pathlib
from typing import Any

from minimind_jax.errors import UserError
from minimind_jax.model.config import (
    ARCHS,
    ATTENTION_IMPLS,
    LORA_TARGETS,
    MOE_IMPLS,
    REMATS,
    TRAIN_DTYPES,
    ModelConfig,
    weight_stem,
)

LOSS_NORMS = ("tokens", "minimind")  # see training/step.py
CHOICES = {
    "mode": ("sft", "pretrain", "lora", "dpo", "distill", "distill_reason", "grpo", "spo", "ppo", "agent"),
    "arch": ARCHS,
    "dtype": TRAIN_DTYPES,
    "remat": REMATS,
    "attention_impl": ATTENTION_IMPLS,
    "moe_impl": MOE_IMPLS,
    "loss_norm": LOSS_NORMS,
    **dict.fromkeys(
        (
            "use_moe",
            "teacher_use_moe",
            "from_resume",
            "overwrite",
            "use_wandb",
            "packing",
            "fast_path",
            "scan_layers",
            "strict",
            "shuffle",
            "progress",
            "reasoning",
            "trust_remote_code",
        ),
        (0, 1),
    ),
    "loss_type": ("cispo", "grpo"),
}
AT_LEAST = {
    "epochs": 1,
    "batch_size": 1,
    "accumulation_steps": 1,
    "log_interval": 1,
    "save_interval": 1,
    "hidden_size": 1,
    "num_hidden_layers": 1,
    "max_seq_len": 1,
    "num_workers": 0,
    "seed": 0,
    "warmup_steps": 0,
    "keep_checkpoints": 1,
    "max_steps": 1,
    "loss_chunk_size": 0,
    "num_attention_heads": 1,
    "max_consecutive_skips": 1,
    "lora_rank": 1,
    "teacher_hidden_size": 1,
    "teacher_num_layers": 1,
    "num_processes": 1,
    "process_id": 0,
    "num_generations": 1,
    "max_gen_len": 1,
    "max_total_len": 2,
    "update_old_actor_freq": 1,
    "ppo_update_iters": 1,
    "mini_batch_size": 1,
}
RL_MODES = ("grpo", "spo", "ppo", "agent")
GROUP_MODES = ("grpo", "agent")  # GRPO's G completions per prompt and its losses
V3_ONLY_MODES = ("agent",)  # the CLI's --arch default for them is minimind3
V3_PPO_FLAGS = ("gamma", "lam", "cliprange_value", "ppo_update_iters", "early_stop_kl", "mini_batch_size")
# MiniMind's distillation names the student's sizes and weights; here they are the run's own fields.
STUDENT_FLAGS = {
    "student_hidden_size": "hidden_size",
    "student_num_layers": "num_hidden_layers",
    "student_use_moe": "use_moe",
    "from_student_weight": "from_weight",
}


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def flag(default, help_text: str, *, minimind: bool = False, switch: bool = False,
         only: str | tuple[str, ...] | None = None):  # fmt: skip
    """A TrainConfig field that is also the flag --{name} (cli/train.py builds the parser from these fields).

    help_text: its --help line. minimind: one of MiniMind's own trainer flags (listed first in --help).
    switch: given without a value (store_true); otherwise a bool field is given as 0/1, as MiniMind's are.
    only: the command (mode) or commands that have the flag; None: every training command.
    """
    only = (only,) if isinstance(only, str) else only
    metadata = {"help": help_text, "minimind": minimind, "switch": switch, "only": only}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    mode: str = "sft"  # sft | pretrain | lora | dpo | distill | distill_reason: the subcommand, not a flag
    # ---- MiniMind's flags (train_full_sft.py defaults; pretrain's differ, see defaults_for) ----
    save_dir: str = flag("out", "where {save_weight}_{hidden}{_moe}.pth and logs go", minimind=True)
    save_weight: str = flag("full_sft", "weight file prefix (full_sft / pretrain)", minimind=True)
    epochs: int = flag(2, "training epochs", minimind=True)
    batch_size: int = flag(16, "global batch size (all devices)", minimind=True)
    learning_rate: float = flag(5e-7, "peak learning rate of MiniMind's cosine schedule", minimind=True)
    dtype: str | None = flag(None, "compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)", minimind=True)
    accumulation_steps: int = flag(1, "micro-batches per optimizer update", minimind=True)
    grad_clip: float = flag(1.0, "clip the global gradient norm to this", minimind=True)
    log_interval: int = flag(100, "log every N micro-steps", minimind=True)
    save_interval: int = flag(100, "checkpoint and write the .pth every N micro-steps", minimind=True)
    hidden_size: int = flag(512, "hidden size", minimind=True)
    num_hidden_layers: int = flag(8, "number of layers", minimind=True)
    max_seq_len: int = flag(512, "truncation length", minimind=True)
    use_moe: int = flag(0, "1 = MoE model", minimind=True)
    data_path: str = flag("dataset/sft_mini_512.jsonl", "training jsonl", minimind=True)
    from_weight: str = flag(
        "pretrain",
        "'none', a MiniMind weight name ({save_dir}/{name}_{hidden}{_moe}.pth), a .pth or our checkpoint",
        minimind=True,
    )
    from_resume: int = flag(0, "1 = continue from the newest complete checkpoint", minimind=True)
    # MiniMind: SwanLab with the W&B API
    use_wandb: bool = flag(
        False, "log the metrics to Weights & Biases (pip install 'minimind-jax[wandb]')", minimind=True, switch=True
    )
    wandb_project: str = flag(
        "MiniMind-Full-SFT",
        "W&B project for --use_wandb (default: MiniMind-Full-SFT / MiniMind-Pretrain)",
        minimind=True,
    )
    num_workers: int | None = flag(
        None, "tokenizing processes (default: one per CPU; 0: in this process)", minimind=True
    )  # MiniMind: data-loader workers
    lora_name: str = flag(
        "lora_identity",
        "LoRA weight name: {save_dir}/{lora_name}_{hidden}.pth (v3: {_moe} too)",
        minimind=True,
        only="lora",
    )
    beta: float = flag(0.1, "how far the policy may move from the reference: DPO's β (MiniMind: 0.1 in 2510, 0.15 "
                       "in v3), RL's KL weight (0.02 in 2510, 0.1 in v3)", minimind=True, only=("dpo", *RL_MODES))  # fmt: skip
    teacher_hidden_size: int = flag(768, "the teacher's hidden size", minimind=True, only="distill")
    teacher_num_layers: int = flag(16, "the teacher's layers", minimind=True, only="distill")
    teacher_use_moe: int | None = flag(
        None, "1 = the teacher is MoE (default: as --use_moe, as in 2510)", minimind=True, only="distill"
    )
    from_teacher_weight: str = flag(
        "full_sft", "the teacher's weights: a MiniMind name, a .pth or our checkpoint", minimind=True, only="distill"
    )
    alpha: float = flag(0.5, "weight of the CE; 1 - alpha weighs the distillation KL", minimind=True, only="distill")
    temperature: float = flag(1.5, "softens both logits in the KL, which is scaled by its square", minimind=True,
                              only="distill")  # fmt: skip
    num_generations: int = flag(8, "completions per prompt (G)", minimind=True, only=GROUP_MODES)
    max_gen_len: int = flag(1536, "the most tokens a completion (agent: a turn) has", minimind=True, only=RL_MODES)
    max_total_len: int = flag(2500, "agent: a trajectory's last ids kept for training", minimind=True, only="agent")
    loss_type: str = flag("cispo", "v3's GRPO loss: cispo or grpo", minimind=True, only=GROUP_MODES)
    epsilon: float = flag(0.2, "v3 grpo: the ratio is clipped to 1 ± epsilon", minimind=True, only=GROUP_MODES)
    epsilon_high: float = flag(5.0, "v3 cispo: the ratio's upper clamp", minimind=True, only=GROUP_MODES)
    reasoning: int = flag(1, "2510: 1 = the <think>/<answer> format rewards (and the reason weights)", minimind=True,
                          only=("grpo", "spo", "ppo"))  # fmt: skip
    thinking_ratio: float = flag(0.9, "v3: the share of prompts with thinking open", minimind=True, only=RL_MODES)
    critic_learning_rate: float = flag(8e-8, "the critic's peak learning rate", minimind=True, only="ppo")
    clip_epsilon: float = flag(0.1, "the policy ratio is clipped to 1 ± clip_epsilon", minimind=True, only="ppo")
    vf_coef: float = flag(0.5, "weight of the critic's loss", minimind=True, only="ppo")
    kl_coef: float = flag(0.02, "weight of the KL to the reference", minimind=True, only="ppo")
    update_old_actor_freq: int = flag(4, "2510: the old actor becomes the actor every N steps", minimind=True,
                                      only="ppo")  # fmt: skip
    gamma: float = flag(1.0, "v3: GAE's discount", minimind=True, only="ppo")
    lam: float = flag(0.95, "v3: GAE's lambda", minimind=True, only="ppo")
    cliprange_value: float = flag(0.2, "v3: the critic's values are clipped to old ± this in its loss", minimind=True,
                                  only="ppo")  # fmt: skip
    ppo_update_iters: int = flag(2, "v3: epochs over each rollout", minimind=True, only="ppo")
    early_stop_kl: float = flag(0.25, "v3: a rollout's epochs stop once a minibatch's approx KL exceeds this",
                                minimind=True, only="ppo")  # fmt: skip
    mini_batch_size: int = flag(2, "v3: rows per PPO minibatch", minimind=True, only="ppo")
    reward_model_path: str | None = flag(
        None,
        "a local Hugging Face reward model (one label); without it only the rule rewards count",
        minimind=True,
        only=RL_MODES,
    )
    # ---- ours ----
    trust_remote_code: int = flag(0, "1 = load --reward_model_path with its own code (InternLM2-Reward)", only=RL_MODES)
    critic_weight: str | None = flag(
        None,
        "a MiniMind critic state dict (value_head included) to start the critic from (default: the actor's "
        "weights and a new value head, as MiniMind starts it)",
        only="ppo",
    )
    rollouts: str | None = flag(None, "replay recorded rollouts from this jsonl instead of sampling", only=RL_MODES)
    reward_fn: str | None = flag(
        None,
        "module:function scoring (prompts, completions, **record_fields) instead of MiniMind's rewards",
        only=RL_MODES,
    )
    arch: str = flag("minimind2", "minimind2: the 2510 era; minimind3: v3")
    tokenizer_path: str = flag("model", "MiniMind tokenizer directory or SentencePiece .model")
    mesh: str | None = flag(None, "device mesh, e.g. data=8 or data=2,fsdp=2,tensor=2 (default: all devices on data)")
    # Several processes (hosts): jax.distributed; see runtime.maybe_initialize_distributed.
    coordinator_address: str | None = flag(
        None,
        "host:port of process 0 in a multi-process run (default: $JAX_COORDINATOR_ADDRESS, or what "
        "jax.distributed detects on a TPU pod slice, under SLURM or Open MPI)",
    )
    num_processes: int | None = flag(None, "processes in the run (default: $JAX_NUM_PROCESSES, or detected)")
    process_id: int | None = flag(
        None, "this process's id, 0 to num_processes - 1 (default: $JAX_PROCESS_ID, or detected)"
    )
    seed: int = flag(42, "seed for init, shuffling and dropout")
    loss_norm: str = flag(
        "tokens", "tokens (global token-weighted) | minimind (per micro-batch mean / accumulation_steps)"
    )
    eval_data_path: str | None = flag(None, "held-out jsonl: masked eval loss at the end")
    warmup_steps: int = flag(0, "linear warmup micro-steps (MiniMind: 0)")
    checkpoint_dir: str | None = flag(
        None, "Orbax checkpoints go to {checkpoint_dir}/{save_weight}_{hidden}{_moe} (default: {save_dir}/checkpoints)"
    )
    overwrite: int = flag(
        0,
        "1 = start over where an earlier run left checkpoints: move them and its logs to a "
        "dated folder (without it, such a run stops: continue with --from_resume 1)",
    )
    keep_checkpoints: int = flag(3, "how many checkpoints to keep")
    max_steps: int | None = flag(None, "stop at optimizer update N, counted from the run's start (a resumed run too)")
    remat: str = flag("none", "recompute activations in the backward pass: all (full) or all but matmul outputs (dots)")
    # The train step: fast_path=True takes the backend's fastest exact settings (config.fast_path_settings),
    # False MiniMind's literal computation (config.LITERAL_STEP); the three after it, when not None, win.
    fast_path: bool = flag(
        True,
        "1 (default) = the backend's fastest exact step (CPU: causal_blocks attention, loss "
        "chunks of 512, unrolled layers; GPU: cuDNN attention in bf16; TPU: Splash attention); 0 = MiniMind's "
        "literal computation (full logits, xla attention, scanned layers). The three flags "
        "below override it",
    )
    scan_layers: bool | None = flag(None, "1 = the layers in lax.scan; 0 = unrolled: faster on CPU, slower to compile")
    attention_impl: str | None = flag(
        None,
        "xla is MiniMind's explicit softmax; causal_blocks skips keys above the diagonal; cudnn: GPU, bf16/fp16; "
        "splash: TPU (elsewhere Pallas' interpreter, slow)",
    )
    moe_impl: str = flag("tiles", "MoE experts: tiles (each on its own tokens) or ragged_dot (jax.lax.ragged_dot)")
    loss_chunk_size: int | None = flag(
        None, "lm_head + CE only at loss positions, this many at a time; 0 = the full logits"
    )
    num_attention_heads: int | None = flag(None, "heads (2510 weights cannot tell; default 8)")
    cache_dir: str | None = flag(None, "tokenized-data cache directory")
    # None: $JAX_COMPILATION_CACHE_DIR if set, else {cache}/xla.
    compilation_cache_dir: str | None = flag(
        None, "persistent XLA compilation cache (default ~/.cache/minimind_jax/xla; 'none': off)"
    )
    system_prompt_ratio: float | None = flag(None, "v3: chance of adding a random system prompt (MiniMind: 0.2)")
    drop_empty_think_ratio: float | None = flag(None, "v3: chance of dropping an empty think block (MiniMind: 0.8)")
    max_consecutive_skips: int = flag(10, "stop after N consecutive non-finite updates")
    packing: bool = flag(False, "1 = pack several examples per row")
    from_lora: str | None = flag(None, "start from these MiniMind LoRA weights (load_lora's file)", only="lora")
    lora_rank: int | None = flag(None, "adapter rank (MiniMind: 8 in 2510, 16 in v3)", only="lora")
    lora_targets: str | None = flag(
        None,
        "comma-separated projections to adapt, of q_proj,k_proj,v_proj,o_proj (MiniMind: the square ones)",
        only="lora",
    )
    strict: bool = flag(False, "a bad jsonl line is an error, not a skip", switch=True)
    shuffle: bool = flag(True, "0 = the data in file order, and v3 PPO's minibatches in rollout order")
    # ---- not flags (the Python API's; --no_progress sets progress) ----
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
        positive = ["learning_rate", "beta", "temperature", "epsilon", "epsilon_high", "critic_learning_rate",
                    "clip_epsilon"]  # fmt: skip
        if self.mode in RL_MODES:  # MiniMind's RL trainers skip clipping when grad_clip <= 0
            if not (_is_number(self.grad_clip) and self.grad_clip >= 0):
                raise UserError(f"--grad_clip must be a number >= 0 (0: no clipping), got {self.grad_clip!r}")
        else:
            positive.append("grad_clip")
        for name in positive:
            if not (_is_number(given[name]) and given[name] > 0):
                raise UserError(f"--{name} must be a number > 0, got {given[name]!r}")
        for name in ("system_prompt_ratio", "drop_empty_think_ratio", "alpha", "thinking_ratio"):
            if name in given and not (_is_number(given[name]) and 0 <= given[name] <= 1):
                raise UserError(f"--{name} must be a number in [0, 1], got {given[name]!r}")
        try:  # the model the flags describe (a loaded weight file must match it: build_model)
            ModelConfig(
                arch=self.arch,
                hidden_size=self.hidden_size,
                num_hidden_layers=self.num_hidden_layers,
                use_moe=bool(self.use_moe),
                remat=self.remat,
                moe_impl=self.moe_impl,
                **{name: given[name] for name in ("dtype", "num_attention_heads", "attention_impl") if name in given},
            )
        except ValueError as error:  # its message names the fields, which are the flags' names
            raise UserError(str(error)) from None
        era_only = V3_PPO_FLAGS if self.arch == "minimind2" else ("update_old_actor_freq",)
        other_era = [
            name for name in era_only if self.mode == "ppo" and given.get(name, defaults[name]) != defaults[name]
        ]
        if other_era:
            raise UserError(f"--{other_era[0]} belongs to the other era's PPO: 2510's is sequence-level with an old "
                            "actor, v3's token-level with GAE and minibatch epochs")  # fmt: skip
        for name in ("gamma", "lam"):
            if not (_is_number(given[name]) and 0 <= given[name] <= 1):
                raise UserError(f"--{name} must be a number in [0, 1], got {given[name]!r}")
        for name in ("cliprange_value", "early_stop_kl"):
            if not _is_number(given[name]) or not math.isfinite(given[name]):
                raise UserError(f"--{name} must be a finite number, got {given[name]!r}")
        if self.mode == "agent" and self.arch != "minimind3":
            raise UserError("agent is v3's recipe (train_agent.py); 2510 has none: give --arch minimind3")
        if self.mode == "spo" and self.arch != "minimind2":
            raise UserError("spo is 2510's recipe (train_spo.py); v3 has none: give --arch minimind2")
        if self.mode == "distill_reason" and self.arch != "minimind2":
            raise UserError(
                "distill_reason is 2510's recipe (train_distill_reason.py); v3 has none: give --arch minimind2"
            )
        if self.mode == "dpo" and self.eval_data_path:
            raise UserError("--eval_data_path scores a masked LM loss; DPO's pairs have none (drop it for dpo)")
        if self.mode == "dpo" and self.packing:
            raise UserError("--packing 1: DPO keeps each pair's chosen and rejected rows apart and together; give 0")
        if self.mode in GROUP_MODES and self.num_generations < 2:
            raise UserError("--num_generations must be >= 2: GRPO's advantages compare a prompt's generations")
        if self.mode in RL_MODES:
            unused = [name for name in ("eval_data_path", "packing", "warmup_steps", "loss_chunk_size",
                                        "system_prompt_ratio", "drop_empty_think_ratio")
                      if given.get(name, defaults[name]) != defaults[name]]  # fmt: skip
            if unused:
                raise UserError(f"--{unused[0]} does not apply to {self.mode}: RL trains on rollouts of its prompts "
                                "(no held-out LM loss, packing, warmup or loss chunks; v3's prompts draw their "
                                "system prompt and thinking as its RLAIFDataset does)")  # fmt: skip
        if self.from_resume and self.overwrite:
            raise UserError("--from_resume 1 continues the earlier run and --overwrite 1 starts over; give one")
        unknown = sorted(set(self.lora_target_names or ()) - set(LORA_TARGETS))
        if unknown:
            raise UserError(
                f"--lora_targets {self.lora_targets}: {', '.join(unknown)} not among {', '.join(LORA_TARGETS)}"
            )

    @property
    def data_kind(self) -> str:
        """The records the run trains on: pretrain, dpo (preference pairs), rlaif (RL's prompts), or sft (also
        LoRA's)."""
        if self.mode in RL_MODES:
            return "rlaif"
        return self.mode if self.mode in ("pretrain", "dpo") else "sft"

    @property
    def teacher_moe(self) -> bool:
        """The teacher's MoE layout: --teacher_use_moe, else the student's (2510 has one --use_moe for both)."""
        return bool(self.use_moe if self.teacher_use_moe is None else self.teacher_use_moe)

    @property
    def lora_target_names(self) -> tuple[str, ...] | None:
        return tuple(name.strip() for name in self.lora_targets.split(",")) if self.lora_targets else None

    @property
    def run_name(self) -> str:
        """MiniMind's weight file stem: {save_weight}_{hidden}{_moe}; LoRA's {lora_name}_{hidden}, with {_moe}
        in v3 only (2510's train_lora.py leaves it out)."""
        if self.mode == "lora":
            return weight_stem(self.lora_name, self.hidden_size, self.use_moe and self.arch == "minimind3")
        return weight_stem(self.save_weight, self.hidden_size, self.use_moe)

    @property
    def run_checkpoint_dir(self) -> pathlib.Path:
        """{checkpoint_dir}/{run_name}; by default under the run's --save_dir, so runs with different save
        dirs never share checkpoints."""
        return pathlib.Path(self.checkpoint_dir or pathlib.Path(self.save_dir) / "checkpoints") / self.run_name

    @property
    def log_dir(self) -> pathlib.Path:
        return pathlib.Path(self.save_dir) / "logs" / self.run_name


# MiniMind's defaults per script: (2510's, what v3 changes). TrainConfig's own defaults are 2510's
# train_full_sft.py.
SCRIPT_DEFAULTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "sft": (
        {},
        dict(learning_rate=1e-5, hidden_size=768, max_seq_len=768, save_interval=1000,
             data_path="dataset/sft_t2t_mini.jsonl"),
    ),
    "pretrain": (
        dict(save_weight="pretrain", epochs=1, batch_size=32, learning_rate=5e-4, accumulation_steps=8,
             data_path="dataset/pretrain_hq.jsonl", from_weight="none", wandb_project="MiniMind-Pretrain"),
        dict(epochs=2, hidden_size=768, max_seq_len=340, save_interval=1000,
             data_path="dataset/pretrain_t2t_mini.jsonl"),
    ),
    "distill_reason": (  # 2510's train_distill_reason.py; v3 has none (TrainConfig refuses it)
        dict(save_weight="reason", epochs=1, batch_size=8, learning_rate=1e-6, max_seq_len=1024,
             data_path="dataset/r1_mix_1024.jsonl", from_weight="dpo", wandb_project="MiniMind-Reasoning"),
        {},
    ),
    "distill": (  # train_distillation.py
        dict(save_weight="full_dist", epochs=6, batch_size=32, learning_rate=5e-6, from_weight="full_sft",
             wandb_project="MiniMind-Distillation"),
        dict(hidden_size=768, teacher_num_layers=8, teacher_use_moe=1, max_seq_len=340,
             data_path="dataset/sft_t2t_mini.jsonl"),
    ),
    "dpo": (  # train_dpo.py
        dict(save_weight="dpo", epochs=1, batch_size=4, learning_rate=4e-8, max_seq_len=1024,
             data_path="dataset/dpo.jsonl", from_weight="full_sft", wandb_project="MiniMind-DPO"),
        dict(hidden_size=768, beta=0.15),
    ),
    "grpo": (  # train_grpo.py; 2510 loads reason weights with --reasoning 1 (cli/train.py), full_sft without
        dict(save_weight="grpo", epochs=1, batch_size=2, learning_rate=8e-8, log_interval=1, save_interval=10,
             max_seq_len=66, max_gen_len=1536, data_path="dataset/rlaif-mini.jsonl", num_generations=8, beta=0.02,
             from_weight="reason", wandb_project="MiniMind-GRPO"),
        dict(learning_rate=3e-7, hidden_size=768, max_seq_len=768, max_gen_len=1024, data_path="dataset/rlaif.jsonl",
             num_generations=6, beta=0.1, from_weight="full_sft"),
    ),
    "ppo": (  # train_ppo.py; 2510 loads reason weights with --reasoning 1 (cli/train.py), full_sft without
        dict(save_weight="ppo_actor", epochs=1, batch_size=2, learning_rate=8e-8, critic_learning_rate=8e-8,
             log_interval=1, save_interval=10, max_seq_len=66, max_gen_len=1536, data_path="dataset/rlaif-mini.jsonl",
             num_generations=1, from_weight="reason", wandb_project="MiniMind-PPO"),
        dict(learning_rate=3e-7, critic_learning_rate=5e-7, clip_epsilon=0.2, hidden_size=768, max_seq_len=768,
             max_gen_len=1024, data_path="dataset/rlaif.jsonl", from_weight="full_sft"),
    ),
    "agent": (  # v3's train_agent.py; 2510 has none (TrainConfig refuses it)
        dict(save_weight="agent", epochs=1, batch_size=2, learning_rate=3e-7, log_interval=1, save_interval=10,
             hidden_size=768, max_seq_len=1024, max_gen_len=768, max_total_len=2500,
             data_path="dataset/agent_rl.jsonl", num_generations=4, beta=0.1, thinking_ratio=0.1,
             from_weight="full_sft", wandb_project="MiniMind-Agent-RL"),
        {},
    ),
    "spo": (  # 2510's train_spo.py (one completion per prompt); v3 has none (TrainConfig refuses it)
        dict(save_weight="spo", epochs=1, batch_size=2, learning_rate=1e-7, accumulation_steps=4, log_interval=1,
             save_interval=10, max_seq_len=66, max_gen_len=1536, data_path="dataset/rlaif-mini.jsonl",
             num_generations=1, beta=0.02, from_weight="reason", wandb_project="MiniMind-SPO"),
        {},
    ),
    "lora": (  # train_lora.py
        dict(save_dir="out/lora", epochs=50, batch_size=32, learning_rate=1e-4, log_interval=10, save_interval=1,
             data_path="dataset/lora_identity.jsonl", from_weight="full_sft", wandb_project="MiniMind-LoRA"),
        dict(save_dir="out", lora_name="lora_medical", epochs=10, save_interval=1000, hidden_size=768,
             max_seq_len=340, data_path="dataset/lora_medical.jsonl"),
    ),
}  # fmt: skip


def defaults_for(mode: str, arch: str) -> dict[str, Any]:
    """MiniMind's defaults for the script of `mode` in the era of `arch`."""
    era_2510, v3_changes = SCRIPT_DEFAULTS[mode]
    return {**era_2510, **(v3_changes if arch == "minimind3" else {})}
