"""The training run: weights in, sharded steps, logs, Orbax checkpoints, MiniMind `.pth` out.

`train(TrainConfig)` is what `main.py sft` and `main.py pretrain` call. Every flag of MiniMind's
train_full_sft.py / train_pretrain.py has a field of the same name and meaning here.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import os
import pathlib
import signal
import time
from typing import Any

import jax
import jax.experimental.multihost_utils
import numpy as np
import tqdm
from flax import nnx

from minimind_jax import sharding
from minimind_jax.checkpoint import TrainCheckpoints, complete_steps
from minimind_jax.config import (ARCHS, ATTENTION_IMPLS, LITERAL_STEP, REMATS, TRAIN_DTYPES, ModelConfig,
                                 default_dtype, train_step_settings, weight_stem)
from minimind_jax.errors import UserError
from minimind_jax.evaluation import evaluate, make_loss_sums
from minimind_jax.model import MiniMind
from minimind_jax.perf import total_peak_flops
from minimind_jax.train import (LOSS_NORMS, attention_flops_per_token, init_train_state, make_optimizer,
                                make_train_step, minimind_lr, model_flops_per_token, update_lr_schedule)
from minimind_jax.wandb_log import WandbRun, require_wandb


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


def use_compilation_cache(directory: str | None, cache_every_compile: bool = False) -> None:
    """JAX's persistent compilation cache, so a resumed or repeated run skips the XLA compiles done before.

    directory: None: $JAX_COMPILATION_CACHE_DIR if set, else {cache}/xla; "none": off.
    cache_every_compile: also the compiles under JAX's 1 s threshold (the bench counts cache hits).
    """
    if directory == "none" or (directory is None and os.environ.get("JAX_COMPILATION_CACHE_DIR")):
        return
    from minimind_jax.data import default_cache_dir

    jax.config.update("jax_compilation_cache_dir", directory or str(default_cache_dir() / "xla"))
    if cache_every_compile:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def maybe_initialize_distributed() -> None:
    """jax.distributed for multi-process launches (TPU pod slices, SLURM, or explicit coordinator env)."""
    multi_process = (os.environ.get("JAX_COORDINATOR_ADDRESS") or int(os.environ.get("SLURM_NTASKS", "1")) > 1
                     or len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1)
    if multi_process and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def resolve_weight(cfg: TrainConfig) -> pathlib.Path | None:
    """MiniMind's `{save_dir}/{from_weight}_{hidden}{_moe}.pth`, or a path / checkpoint of ours."""
    if cfg.from_weight == "none":
        return None
    direct = pathlib.Path(cfg.from_weight)
    if direct.exists():
        return direct
    minimind_path = pathlib.Path(cfg.save_dir) / f"{weight_stem(cfg.from_weight, cfg.hidden_size, cfg.use_moe)}.pth"
    if minimind_path.exists():
        return minimind_path
    raise UserError(f"--from_weight {cfg.from_weight}: neither {direct} nor {minimind_path} exists "
                    f"(use --from_weight none to start from random weights)")


def step_settings(cfg: TrainConfig, dtype: str) -> dict[str, Any]:
    """The run's attention_impl, loss_chunk_size and scan_layers on this backend (config.train_step_settings)."""
    from minimind_jax.data import ExampleConfig

    seq_len = ExampleConfig(kind=cfg.mode, arch=cfg.arch, max_seq_len=cfg.max_seq_len).seq_len
    return train_step_settings(cfg.fast_path, jax.devices()[0].platform, dtype, seq_len,
                               attention_impl=cfg.attention_impl, loss_chunk_size=cfg.loss_chunk_size,
                               scan_layers=cfg.scan_layers)


def build_model(cfg: TrainConfig, dtype: str) -> MiniMind:
    from minimind_jax.weights import load

    step = step_settings(cfg, dtype)
    ours = dict(dtype=dtype, remat=cfg.remat, scan_layers=step["scan_layers"], attention_impl=step["attention_impl"])
    weight = resolve_weight(cfg)
    if weight is not None:
        overrides = dict(ours, **({"num_attention_heads": cfg.num_attention_heads} if cfg.num_attention_heads else {}))
        model = load(weight, **overrides)
        loaded = model.config
        for name in ("hidden_size", "num_hidden_layers"):
            if getattr(loaded, name) != getattr(cfg, name):
                raise UserError(f"--{name} {getattr(cfg, name)} but {weight} has {getattr(loaded, name)}")
        if bool(loaded.use_moe) != bool(cfg.use_moe) or loaded.arch != cfg.arch:
            raise UserError(f"{weight} is a {loaded.arch}{' MoE' if loaded.use_moe else ''} model, but the run asks "
                            f"for --arch {cfg.arch} --use_moe {cfg.use_moe}")
        return model
    fields = dict(arch=cfg.arch, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                  use_moe=bool(cfg.use_moe), **ours)
    if cfg.num_attention_heads:
        fields["num_attention_heads"] = cfg.num_attention_heads
    return MiniMind(ModelConfig(**fields), rngs=nnx.Rngs(cfg.seed))


def load_run_data(cfg: TrainConfig, data_path: str, model_config: ModelConfig):
    from minimind_jax.data import ExampleConfig, load_dataset
    from minimind_jax.tokenizer import check_fits, load_tokenizer

    if cfg.max_seq_len > model_config.max_position_embeddings:
        raise UserError(f"--max_seq_len {cfg.max_seq_len} exceeds the model's max_position_embeddings "
                        f"{model_config.max_position_embeddings} (the end of MiniMind's RoPE table)")
    check_fits(load_tokenizer(cfg.tokenizer_path), model_config.arch, model_config.vocab_size)
    examples = ExampleConfig(kind=cfg.mode, arch=model_config.arch, max_seq_len=cfg.max_seq_len,
                             system_prompt_ratio=cfg.system_prompt_ratio,
                             drop_empty_think_ratio=cfg.drop_empty_think_ratio, seed=cfg.seed)
    return load_dataset(data_path, cfg.tokenizer_path, examples, cache_dir=cfg.cache_dir,
                        num_workers=cfg.num_workers, strict=cfg.strict, progress=cfg.progress and jax.process_index() == 0)


def keep_earlier_run(cfg: TrainConfig, is_main: bool) -> None:
    """Nothing of an earlier run with the same name is replaced silently; checked before any compute.

    --from_resume 1 continues it (saying so when there is no checkpoint to continue). A fresh run refuses a
    checkpoint directory that is not empty, unless --overwrite 1, which moves it to a dated sibling
    `{run_name}.{YYYYmmdd-HHMMSS}`. The run's logs directory is moved the same way, with --overwrite 1 or
    when there are no checkpoints (logs alone are nothing to continue).
    """
    checkpoint_dir, log_dir = cfg.run_checkpoint_dir, cfg.log_dir
    if cfg.from_resume:
        if is_main and not complete_steps(checkpoint_dir):
            tqdm.tqdm.write(f"--from_resume 1: no checkpoint in {checkpoint_dir.resolve()}; starting from "
                            f"--from_weight {cfg.from_weight}")
        return
    earlier = [directory for directory in (checkpoint_dir, log_dir) if directory.is_dir() and any(directory.iterdir())]
    if checkpoint_dir in earlier and not cfg.overwrite:
        steps = complete_steps(checkpoint_dir)
        held = f"newest step {steps[-1]}" if steps else "no complete step"
        raise UserError(f"{checkpoint_dir.resolve()} holds an earlier run's checkpoints ({held}): continue it with "
                        f"--from_resume 1, or start over with --overwrite 1 (moves it and its logs to a dated folder)")
    if jax.process_count() > 1:  # every process has looked before process 0 moves anything
        jax.experimental.multihost_utils.sync_global_devices("trainer: earlier run found")
    if earlier and is_main:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = [f"{directory.resolve()} to {_move_aside(directory, stamp).resolve()}" for directory in earlier]
        tqdm.tqdm.write(f"kept the earlier run: moved {' and '.join(moved)}")
    if jax.process_count() > 1:
        jax.experimental.multihost_utils.sync_global_devices("trainer: earlier run moved aside")


def _move_aside(directory: pathlib.Path, stamp: str) -> pathlib.Path:
    aside, number = directory.with_name(f"{directory.name}.{stamp}"), 0
    while aside.exists():  # a second start within the same second
        number += 1
        aside = directory.with_name(f"{directory.name}.{stamp}-{number}")
    return directory.rename(aside)


class _Preemption:
    """SIGTERM (a preempted TPU or spot VM) asks the loop to checkpoint at the next step boundary and exit 0."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs the whole training job; returns a summary (final losses, throughput, paths)."""
    maybe_initialize_distributed()
    use_compilation_cache(cfg.compilation_cache_dir)
    is_main = jax.process_index() == 0
    if cfg.use_wandb:
        require_wandb()
    keep_earlier_run(cfg, is_main)
    mesh = sharding.make_mesh(cfg.mesh)
    split = sharding.batch_size_per_step(mesh)
    if cfg.batch_size % split:
        raise UserError(f"--batch_size {cfg.batch_size} is not divisible by the data-parallel size {split} "
                        f"(mesh {dict(mesh.shape)})")
    dtype = cfg.dtype or default_dtype(jax.devices()[0].platform)
    step = step_settings(cfg, dtype)
    model = build_model(cfg, dtype)
    model_config = model.config

    from minimind_jax.pipeline import make_batches

    dataset = load_run_data(cfg, cfg.data_path, model_config)
    batch_sharding = sharding.batch_sharding(mesh)
    # Like MiniMind's DataLoader, keep the short last batch (filled with loss-free rows): iters = ceil(N / B).
    batches = make_batches(dataset, batch_size=cfg.batch_size, seed=cfg.seed, epochs=cfg.epochs,
                           packing=cfg.packing, shuffle=cfg.shuffle, sharding=batch_sharding, drop_remainder=False)
    acc = cfg.accumulation_steps
    total_micro = batches.total_steps - batches.total_steps % acc
    total_updates = total_micro // acc
    if total_updates < 1:
        raise UserError(f"{cfg.data_path}: {batches.total_steps} batches are fewer than --accumulation_steps {acc}")
    schedule = update_lr_schedule(model_config.arch, cfg.learning_rate, acc, total_micro, cfg.warmup_steps)
    optimizer = make_optimizer(schedule, cfg.grad_clip)
    graphdef, params, opt_state, param_shardings, opt_shardings = init_train_state(model, optimizer, mesh)
    del model
    step_fn = make_train_step(graphdef, optimizer, mesh, accumulation_steps=acc, loss_norm=cfg.loss_norm,
                              loss_chunk_size=step["loss_chunk_size"], param_shardings=param_shardings,
                              opt_shardings=opt_shardings)

    run_dir = pathlib.Path(cfg.save_dir)
    log_dir = cfg.log_dir
    checkpoints = TrainCheckpoints(cfg.run_checkpoint_dir, max_to_keep=cfg.keep_checkpoints)
    rng = jax.random.key_data(jax.random.key(cfg.seed))
    update = 0
    newest = None
    wandb_id = None  # kept in every checkpoint, so that a resumed run logs to the same W&B run
    if cfg.from_resume:
        newest = checkpoints.restore_newest(
            model_config, param_shardings,
            jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_state, opt_shardings))
    if newest is not None:
        update, meta, restored = newest
        params, opt_state, rng = restored["params"], restored["opt_state"], restored["rng"]
        batches.set_state(meta["data_state"])
        wandb_id = meta.get("wandb_id")
        if is_main:
            tqdm.tqdm.write(f"resumed {checkpoints.directory} at update {update} (micro-step {update * acc})")
    if is_main:  # the updates after the checkpoint are computed again (a fresh run has moved earlier logs aside)
        _drop_metrics_after(log_dir / "metrics.jsonl", update)
    wandb_run = WandbRun(cfg, resume_id=wandb_id) if cfg.use_wandb and is_main else None
    if wandb_run is not None:
        wandb_id = wandb_run.id

    peak_flops, peak_source = total_peak_flops(dtype)
    flops_per_token = model_flops_per_token(model_config) + attention_flops_per_token(model_config, dataset.seq_len)
    last_update = total_updates if cfg.max_steps is None else min(total_updates, cfg.max_steps)
    if update >= last_update and is_main:
        limit = f" (--max_steps {cfg.max_steps} counts every update of the run)" if cfg.max_steps else ""
        tqdm.tqdm.write(f"nothing to train: the run is at update {update} and ends at update {last_update}{limit}")
    tokens_per_update = cfg.batch_size * dataset.seq_len * acc
    # How the step ran is in train_config; the model config keeps the literal settings, so that a checkpoint
    # written with cuDNN attention on a GPU loads on any backend.
    portable_config = model_config.replace(attention_impl=LITERAL_STEP["attention_impl"],
                                           scan_layers=LITERAL_STEP["scan_layers"])
    run_meta = {"model_config": portable_config.to_dict(), "train_config": dataclasses.asdict(cfg)}

    checkpointed = update or None  # the update of the newest checkpoint (resumed from), None before one

    def save(at_update: int, wait: bool = False) -> None:
        nonlocal checkpointed
        if at_update != checkpointed:  # SIGTERM or the end can follow a periodic save of the same update
            host_rng = np.asarray(jax.device_get(rng))
            checkpoints.save(at_update, {"params": params, "opt_state": opt_state, "rng": host_rng},
                             {**run_meta, "update": at_update, "epoch": batches.epoch,
                              "data_state": batches.get_state(), "wandb_id": wandb_id}, force=True)
            checkpointed = at_update
        if is_main:
            from minimind_jax.weights import save_pth

            save_pth(nnx.merge(graphdef, params), run_dir / f"{cfg.run_name}.pth")
        if wait:
            checkpoints.wait()

    writer = _MetricsWriter(log_dir, enabled=is_main, wandb_run=wandb_run)
    if is_main:
        stats = batches.stats
        tqdm.tqdm.write(f"{cfg.mode}: {model_config.arch} hidden {model_config.hidden_size} × {model_config.num_hidden_layers} "
                        f"layers, mesh {dict(mesh.shape)}, dtype {dtype}, {len(dataset)} examples, "
                        f"{len(batches)} batches/epoch, {total_updates} updates; step: {step['attention_impl']} "
                        f"attention, loss chunk {step['loss_chunk_size'] or 'none (full logits)'}, layers "
                        f"{'scanned' if step['scan_layers'] else 'unrolled'}"
                        f"{'' if cfg.fast_path else ' (--fast_path 0)'}; packing efficiency "
                        f"{stats.get('token_fraction', float('nan')):.1%}, loss tokens {stats.get('loss_fraction', float('nan')):.1%}")
    preemption = _Preemption()
    bar = tqdm.tqdm(total=last_update, initial=update, disable=not (cfg.progress and is_main), unit="step",
                    dynamic_ncols=True)
    pending = None  # metrics of the step in flight, read after the next one is dispatched
    consecutive_skips, total_skips = 0, 0
    compile_seconds = None
    window_start, window_updates, window_loss_tokens = time.perf_counter(), 0, 0.0
    history = []

    def finish_step(done: dict) -> None:
        nonlocal consecutive_skips, total_skips, window_start, window_updates, window_loss_tokens
        metrics = jax.device_get(done["metrics"])
        at = done["update"]
        micro_step = at * acc  # MiniMind counts micro-steps (1-based within the epoch)
        epoch, step_in_epoch = divmod(micro_step - 1, len(batches))
        lr = float(minimind_lr(model_config.arch, micro_step, total_micro, cfg.learning_rate, cfg.warmup_steps))
        if metrics["skipped"]:
            consecutive_skips += 1
            total_skips += 1
            tqdm.tqdm.write(f"update {at}: non-finite loss or gradient (loss {float(metrics['loss'])}, grad norm "
                            f"{float(metrics['grad_norm'])}) at data batches {done['batches']}; update skipped")
        else:
            consecutive_skips = 0
        window_updates += 1
        window_loss_tokens += float(metrics["loss_tokens"])
        elapsed = time.perf_counter() - window_start
        tokens_per_s = window_updates * tokens_per_update / elapsed if elapsed > 0 else float("nan")
        record = {"update": at, "micro_step": micro_step, "epoch": epoch + 1, "loss": float(metrics["loss"]),
                  "logits_loss": float(metrics["logits_loss"]), "aux_loss": float(metrics["aux_loss"]),
                  "last_micro_loss": float(metrics["micro_losses"][-1]), "grad_norm": float(metrics["grad_norm"]),
                  "lr": lr, "tokens_per_s": tokens_per_s, "loss_tokens_per_s": window_loss_tokens / elapsed,
                  "mfu": tokens_per_s * flops_per_token / peak_flops, "skipped": int(metrics["skipped"])}
        history.append(record)
        writer.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        bar.update(1)
        crossed_log = (micro_step // cfg.log_interval) > ((micro_step - acc) // cfg.log_interval)
        if is_main and (crossed_log or at == last_update):
            eta_min = (time.perf_counter() - train_start) / max(at - start_update, 1) * (last_update - at) / 60
            # MiniMind's own log line, so its log parsers keep working.
            tqdm.tqdm.write(f"Epoch:[{epoch + 1}/{cfg.epochs}]({step_in_epoch + 1}/{len(batches)}) "
                            f"loss:{record['last_micro_loss']:.6f} lr:{lr:.12f} epoch_Time:{eta_min:.1f}min: "
                            f"tokens/s:{tokens_per_s:,.0f} loss_tokens/s:{record['loss_tokens_per_s']:,.0f} "
                            f"mfu:{record['mfu']:.1%}")
            writer.at_log_interval(record, eta_min)
        if window_updates >= 20:
            window_start, window_updates, window_loss_tokens = time.perf_counter(), 0, 0.0
        if consecutive_skips >= cfg.max_consecutive_skips:
            raise _TooManySkips(at)

    start_update = update
    train_start = time.perf_counter()
    try:
        while update < last_update:
            first_batch = batches.step
            micro_batches = [next(batches) for _ in range(acc)]
            step_key = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(rng), update))
            started = time.perf_counter()
            params, opt_state, metrics = step_fn(params, opt_state, micro_batches, step_key)
            update += 1
            if compile_seconds is None:
                jax.block_until_ready(metrics)
                compile_seconds = time.perf_counter() - started
                window_start = time.perf_counter()
            if pending is not None:
                finish_step(pending)
            pending = {"metrics": metrics, "update": update, "batches": list(range(first_batch, first_batch + acc))}
            crossed_save = (update * acc // cfg.save_interval) > ((update - 1) * acc // cfg.save_interval)
            preempted = preemption.requested  # read once: SIGTERM may arrive at any point of this iteration
            if (crossed_save and update < last_update) or preempted:
                finish_step(pending)  # log it first: a checkpoint never exists without its update's metrics
                pending = None
                save(update, wait=preempted)
            if preempted:
                tqdm.tqdm.write(f"SIGTERM: saved update {update} to {checkpoints.directory}; resume with --from_resume 1")
                writer.close()
                return {"preempted": True, "update": update}
        if pending is not None:
            finish_step(pending)
            pending = None
    except _TooManySkips as stop:
        save(update, wait=True)  # skipped updates left params unchanged: this is the last good state
        raise UserError(f"{cfg.max_consecutive_skips} consecutive non-finite updates (last: update {stop.update}); "
                        f"saved the last good state to {checkpoints.directory}") from None
    finally:
        preemption.restore()
        bar.close()
    save(update, wait=True)
    checkpoints.close()
    summary = {"updates": update, "compile_s": compile_seconds, "skipped_updates": total_skips,
               "weights": str(run_dir / f"{cfg.run_name}.pth"), "checkpoints": str(checkpoints.directory),
               "peak_flops": peak_flops, "peak_flops_source": peak_source, "history": history}
    if history:
        recent = history[-min(len(history), 20):]
        summary.update(final_loss=history[-1]["loss"], tokens_per_s=float(np.median([r["tokens_per_s"] for r in recent])),
                       mfu=float(np.median([r["mfu"] for r in recent])))
    if cfg.eval_data_path:
        eval_data = load_run_data(cfg, cfg.eval_data_path, model_config)
        eval_batches = make_batches(eval_data, batch_size=cfg.batch_size, seed=0, epochs=1, packing=False,
                                    shuffle=False, sharding=batch_sharding, drop_remainder=False)
        summary["eval"] = evaluate(make_loss_sums(graphdef), params, eval_batches)
        if is_main:
            tqdm.tqdm.write(f"eval {cfg.eval_data_path}: masked loss {summary['eval']['loss']:.4f} "
                            f"(perplexity {summary['eval']['perplexity']:.2f}, {summary['eval']['loss_tokens']:.0f} tokens)")
    if is_main:
        plot_loss_curves(log_dir / "loss_curve.png", [LossPanel(f"{cfg.mode} {cfg.run_name}", history)])
        (log_dir / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    writer.close()
    return summary


def _drop_metrics_after(path: pathlib.Path, update: int) -> None:
    """Keep the records of updates up to the resumed checkpoint: a killed run may have logged later ones
    (they are computed again) or died mid-line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("update", update + 1) <= update:
            kept.append(line + "\n")
    temp = path.with_name(path.name + ".tmp")
    temp.write_text("".join(kept))
    temp.replace(path)


class _TooManySkips(Exception):
    def __init__(self, update: int):
        self.update = update


@dataclasses.dataclass(frozen=True)
class LossPanel:
    """One panel of `plot_loss_curves`: the training loss per update, and held-out losses as points."""

    title: str
    history: list[dict]  # metrics records, each with `update` and `loss`
    heldout: tuple[str, list[int], list[float]] | None = None  # (legend label, updates, losses)


def plot_loss_curves(path: pathlib.Path, panels: list[LossPanel], title: str | None = None) -> None:
    """The panels side by side in one PNG (nothing is written when no panel has a loss to draw)."""
    if not any(panel.history for panel in panels):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(7, 4) if len(panels) == 1 else (6 * len(panels), 4.2),
                                squeeze=False)
    for axis, panel in zip(axes[0], panels):
        axis.plot([r["update"] for r in panel.history], [r["loss"] for r in panel.history],
                  label="training loss (per update)", linewidth=1)
        if panel.heldout is not None:
            label, updates, losses = panel.heldout
            axis.scatter(updates, losses, color="C3", zorder=3, label=label)
            axis.legend()
        axis.set(title=panel.title, xlabel="optimizer update", ylabel="masked loss")
        axis.grid(alpha=0.3)
    if title is not None:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


class _MetricsWriter:
    """metrics.jsonl and TensorBoard event files in the run's log directory, every update; W&B (when on) at
    MiniMind's log interval."""

    def __init__(self, log_dir: pathlib.Path, enabled: bool, wandb_run: WandbRun | None = None):
        self.enabled = enabled
        self.wandb_run = wandb_run
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(log_dir / "metrics.jsonl", "a")
        from tensorboardX import SummaryWriter

        self.tensorboard = SummaryWriter(str(log_dir))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if key not in ("update", "micro_step", "epoch") and np.isfinite(value):
                self.tensorboard.add_scalar(f"train/{key}", value, record["update"])

    def at_log_interval(self, record: dict, eta_min: float) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log(record, eta_min)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
