"""A training run, assembled: weights in, data, the sharded step, the run loop with its hooks, `.pth` out.

`train(TrainConfig)` is what `main.py sft` and `main.py pretrain` call.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.experimental.multihost_utils
import jax.numpy as jnp
import tqdm
from flax import nnx

from minimind_jax.data.examples import ExampleConfig, load_dataset
from minimind_jax.data.pipeline import make_batches
from minimind_jax.data.preference import PairBatches, load_preference_data
from minimind_jax.data.tokenizer import check_fits, load_tokenizer
from minimind_jax.errors import UserError
from minimind_jax.model.config import (
    LITERAL_STEP,
    ModelConfig,
    default_dtype,
    square_projections,
    train_step_settings,
    weight_stem,
)
from minimind_jax.model.transformer import MiniMind
from minimind_jax.runtime import maybe_initialize_distributed, use_compilation_cache
from minimind_jax.training import sharding
from minimind_jax.training.accumulation import update_plan
from minimind_jax.training.config import TrainConfig
from minimind_jax.training.evaluation import make_loss_sums
from minimind_jax.training.hooks import Checkpointer, Evaluation, Preemption
from minimind_jax.training.loop import RunState, Trainer
from minimind_jax.training.metrics import (
    LossPanel,
    MetricLogger,
    MetricsWriter,
    TooManySkips,
    drop_metrics_after,
    plot_loss_curves,
)
from minimind_jax.training.objectives import (
    DistillLoss,
    DPOLoss,
    NextTokenLoss,
    Objective,
    TagWeightedLoss,
    split_trainable,
)
from minimind_jax.training.optimizer import make_optimizer, update_lr_schedule
from minimind_jax.training.perf import attention_flops_per_token, model_flops_per_token, total_peak_flops
from minimind_jax.training.run_lock import RunLock
from minimind_jax.training.step import init_train_state, make_train_step
from minimind_jax.training.wandb_log import WandbRun, require_wandb
from minimind_jax.weights import load, save_pth
from minimind_jax.weights.lora import load_lora, save_lora, with_adapters
from minimind_jax.weights.orbax import TrainCheckpoints, complete_steps


def resolve_weight(cfg: TrainConfig, role: str = "") -> pathlib.Path | None:
    """MiniMind's `{save_dir}/{from_weight}_{hidden}{_moe}.pth`, or a path / checkpoint of ours. LoRA also looks
    one level up, where 2510's train_lora.py (save_dir out/lora) finds its base in out/. role "teacher": the
    distillation teacher's (--from_teacher_weight, its size)."""
    flag, weight, hidden, moe = (
        ("from_teacher_weight", cfg.from_teacher_weight, cfg.teacher_hidden_size, cfg.teacher_moe)
        if role == "teacher"
        else ("from_weight", cfg.from_weight, cfg.hidden_size, cfg.use_moe)
    )
    if weight == "none":
        return None
    direct = pathlib.Path(weight)
    if direct.exists():
        return direct
    name = f"{weight_stem(weight, hidden, moe)}.pth"
    save_dir = pathlib.Path(cfg.save_dir)
    candidates = [save_dir / name] + ([save_dir.parent / name] if cfg.mode == "lora" else [])
    found = next((path for path in candidates if path.exists()), None)
    if found is None:
        raise UserError(
            f"--{flag} {weight}: none of {', '.join(map(str, [direct, *candidates]))} exists"
            + ("" if role else " (use --from_weight none to start from random weights)")
        )
    return found


def load_checked(path: pathlib.Path, expected: dict[str, Any], **overrides) -> MiniMind:
    """The model in `path`, which must have the sizes, MoE layout and era the flags name (`expected`: flag ->
    (ModelConfig field, value))."""
    model = load(path, **overrides)
    for flag, (field, value) in expected.items():
        found = getattr(model.config, field)
        same = bool(found) == bool(value) if field == "use_moe" else found == value
        if not same:
            raise UserError(f"--{flag} {value} but {path} has {field} {found}")
    return model


def attach_adapters(cfg: TrainConfig, model: MiniMind) -> MiniMind:
    """LoRA: --from_lora's adapters, or new ones of --lora_rank on --lora_targets (MiniMind's defaults: rank 8 in
    2510, 16 in v3, on every square projection)."""
    if cfg.from_lora:
        model = load_lora(model, cfg.from_lora)
        if cfg.lora_rank is not None and cfg.lora_rank != model.config.lora_rank:
            raise UserError(f"--lora_rank {cfg.lora_rank} but {cfg.from_lora} has rank {model.config.lora_rank}")
        if cfg.lora_target_names is not None and set(cfg.lora_target_names) != set(model.config.lora_targets):
            raise UserError(
                f"--lora_targets {cfg.lora_targets} but {cfg.from_lora} adapts {','.join(model.config.lora_targets)}"
            )
        return model
    rank = cfg.lora_rank or (16 if model.config.is_v3 else 8)
    return with_adapters(model, rank, cfg.lora_target_names or square_projections(model.config), seed=cfg.seed)


def row_length(cfg: TrainConfig) -> int:
    """T, the positions of a row fed to the model: DPO feeds ids[:-1] in both eras; see ExampleConfig."""
    if cfg.data_kind == "dpo":
        return cfg.max_seq_len - 1
    return ExampleConfig(kind=cfg.data_kind, arch=cfg.arch, max_seq_len=cfg.max_seq_len).seq_len


def step_settings(cfg: TrainConfig, dtype: str) -> dict[str, Any]:
    """The run's attention_impl, loss_chunk_size and scan_layers on this backend (model.config.train_step_settings)."""
    seq_len = row_length(cfg)
    return train_step_settings(
        cfg.fast_path,
        jax.devices()[0].platform,
        dtype,
        seq_len,
        attention_impl=cfg.attention_impl,
        loss_chunk_size=cfg.loss_chunk_size,
        scan_layers=cfg.scan_layers,
    )


def build_model(cfg: TrainConfig, dtype: str, step: dict[str, Any]) -> MiniMind:
    """The model to train: --from_weight's, checked against the flags, or a new one. step: step_settings."""
    ours = dict(dtype=dtype, remat=cfg.remat, moe_impl=cfg.moe_impl, scan_layers=step["scan_layers"],
                attention_impl=step["attention_impl"])  # fmt: skip
    weight = resolve_weight(cfg)
    if weight is not None:
        overrides = dict(ours, **({"num_attention_heads": cfg.num_attention_heads} if cfg.num_attention_heads else {}))
        expected = {"hidden_size": ("hidden_size", cfg.hidden_size), "num_hidden_layers": ("num_hidden_layers",
                    cfg.num_hidden_layers), "use_moe": ("use_moe", cfg.use_moe), "arch": ("arch", cfg.arch)}  # fmt: skip
        return load_checked(weight, expected, **overrides)
    fields = dict(
        arch=cfg.arch,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        use_moe=bool(cfg.use_moe),
        **ours,
    )
    if cfg.num_attention_heads:
        fields["num_attention_heads"] = cfg.num_attention_heads
    return MiniMind(ModelConfig(**fields), rngs=nnx.Rngs(cfg.seed))


def build_teacher(cfg: TrainConfig, dtype: str, step: dict[str, Any]) -> MiniMind:
    """The distillation teacher, checked against the --teacher_* flags."""
    expected = {"teacher_hidden_size": ("hidden_size", cfg.teacher_hidden_size),
                "teacher_num_layers": ("num_hidden_layers", cfg.teacher_num_layers),
                "teacher_use_moe": ("use_moe", cfg.teacher_moe), "arch": ("arch", cfg.arch)}  # fmt: skip
    return load_checked(resolve_weight(cfg, "teacher"), expected, dtype=dtype, scan_layers=step["scan_layers"],
                        attention_impl=step["attention_impl"])  # fmt: skip


def load_run_data(cfg: TrainConfig, data_path: str, model_config: ModelConfig, held_out: bool = False):
    """data_path's examples (or DPO's pairs) as the run's flags make them, for this model (its RoPE table and
    vocabulary). held_out: evaluation data, never augmented (ExampleConfig.held_out)."""
    if cfg.max_seq_len > model_config.max_position_embeddings:
        raise UserError(
            f"--max_seq_len {cfg.max_seq_len} exceeds the model's max_position_embeddings "
            f"{model_config.max_position_embeddings} (the end of MiniMind's RoPE table)"
        )
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    check_fits(tokenizer, model_config.arch, model_config.vocab_size)
    if cfg.data_kind == "dpo":
        return load_preference_data(data_path, tokenizer, model_config.arch, cfg.max_seq_len, seed=cfg.seed,
                                    strict=cfg.strict)  # fmt: skip
    examples = ExampleConfig(
        kind=cfg.data_kind,
        arch=model_config.arch,
        max_seq_len=cfg.max_seq_len,
        system_prompt_ratio=cfg.system_prompt_ratio,
        drop_empty_think_ratio=cfg.drop_empty_think_ratio,
        seed=cfg.seed,
    )
    return load_dataset(
        data_path,
        cfg.tokenizer_path,
        examples.held_out() if held_out else examples,
        cache_dir=cfg.cache_dir,
        num_workers=cfg.num_workers,
        strict=cfg.strict,
        progress=cfg.progress and jax.process_index() == 0,
    )


def keep_earlier_run(cfg: TrainConfig, is_main: bool) -> list[pathlib.Path]:
    """Nothing of an earlier run with the same name is replaced silently; checked before any compute. Returns
    the directories `move_earlier_run_aside` moves once the run has passed every other check.

    --from_resume 1 continues it (saying so when there is no checkpoint to continue). A fresh run refuses a
    checkpoint directory that is not empty, unless --overwrite 1, which moves it to a dated sibling
    `{run_name}.{YYYYmmdd-HHMMSS}`. The run's logs directory is moved the same way, with --overwrite 1 or
    when there are no checkpoints (logs alone are nothing to continue).
    """
    checkpoint_dir, log_dir = cfg.run_checkpoint_dir, cfg.log_dir
    if cfg.from_resume:
        if is_main and not complete_steps(checkpoint_dir):
            tqdm.tqdm.write(
                f"--from_resume 1: no checkpoint in {checkpoint_dir.resolve()}; starting from "
                f"--from_weight {cfg.from_weight}"
            )
        return []
    earlier = [directory for directory in (checkpoint_dir, log_dir) if directory.is_dir() and any(directory.iterdir())]
    if checkpoint_dir in earlier and not cfg.overwrite:
        steps = complete_steps(checkpoint_dir)
        held = f"newest step {steps[-1]}" if steps else "no complete step"
        raise UserError(
            f"{checkpoint_dir.resolve()} holds an earlier run's checkpoints ({held}): continue it with "
            f"--from_resume 1, or start over with --overwrite 1 (moves it and its logs to a dated folder)"
        )
    return earlier


def move_earlier_run_aside(earlier: list[pathlib.Path], is_main: bool) -> None:
    """Moves `keep_earlier_run`'s directories to dated siblings, last before the run writes: a run stopped by a
    bad flag leaves the earlier one where --from_resume 1 finds it."""
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


def run_batches(cfg: TrainConfig, dataset, sharding):
    """The run's global batches over its epochs. Like MiniMind's DataLoader, the short last batch is kept,
    filled with loss-free rows (or pairs): iters = ceil(N / B)."""
    if cfg.data_kind == "dpo":
        return PairBatches(dataset, batch_size=cfg.batch_size, seed=cfg.seed, epochs=cfg.epochs, shuffle=cfg.shuffle,
                           sharding=sharding)  # fmt: skip
    return make_batches(dataset, batch_size=cfg.batch_size, seed=cfg.seed, epochs=cfg.epochs, packing=cfg.packing,
                        shuffle=cfg.shuffle, sharding=sharding, drop_remainder=False)  # fmt: skip


def frozen_models(cfg: TrainConfig, graphdef, params, mesh, dtype: str, step: dict[str, Any]) -> tuple[dict, dict]:
    """(graphdefs, params) of the models the objective reads but does not train, sharded like the policy: DPO's
    reference, the policy as it starts (the checkpoints need not keep it: --from_weight has it), and the
    distillation teacher."""
    frozen_params = {"reference": jax.tree.map(jnp.copy, params)} if cfg.mode == "dpo" else {}
    frozen_graphdefs = dict.fromkeys(frozen_params, graphdef)
    if cfg.mode == "distill":
        teacher = build_teacher(cfg, dtype, step)
        frozen_graphdefs["teacher"], teacher_state = nnx.split(teacher, nnx.Param)
        teacher_params = nnx.to_pure_dict(teacher_state)
        frozen_params["teacher"] = jax.device_put(
            teacher_params, sharding.tree_shardings(teacher_params, mesh, teacher.config)
        )
    return frozen_graphdefs, frozen_params


def objective_for(cfg: TrainConfig, model_config: ModelConfig, step: dict[str, Any]) -> Objective:
    """What the run's command optimizes."""
    if (
        cfg.mode == "distill_reason"
    ):  # the ids MiniMind's tokenizer gives each tag, as train_distill_reason.py takes them
        tokenizer = load_tokenizer(cfg.tokenizer_path)
        tags = ("<think>", "</think>", "<answer>", "</answer>")
        return TagWeightedLoss(tuple(sorted({i for tag in tags for i in tokenizer.encode(tag)})))
    if cfg.mode == "dpo":
        return DPOLoss(cfg.beta, mean_over_mask=not model_config.is_v3, add_aux_loss=model_config.is_v3)
    if cfg.mode == "distill":
        return DistillLoss(cfg.alpha, cfg.temperature, ignore_pad_targets=not model_config.is_v3)
    return NextTokenLoss(step["loss_chunk_size"], adapters_only=cfg.mode == "lora")


def resume(cfg: TrainConfig, checkpoints: TrainCheckpoints, state: RunState, param_shardings, opt_shardings,
           is_main: bool) -> dict:  # fmt: skip
    """With --from_resume 1, the newest checkpoint into `state` (train state, data position); its meta, or {}."""
    abstract = lambda tree, shardings: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
    params_abstract, opt_abstract = abstract(state.params, param_shardings), abstract(state.opt_state, opt_shardings)
    newest = checkpoints.restore_newest(params_abstract, opt_abstract) if cfg.from_resume else None
    if newest is None:
        return {}
    state.update, meta, restored = newest
    state.params, state.opt_state, state.rng = restored["params"], restored["opt_state"], restored["rng"]
    state.batches.set_state(meta["data_state"])
    if is_main:
        tqdm.tqdm.write(f"resumed {checkpoints.directory} at update {state.update} (micro-step {state.batches.step})")
    return meta


def _earlier_summary(log_dir: pathlib.Path) -> dict:
    """The summary.json an earlier process of this run wrote, or {}."""
    try:
        return json.loads((log_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def write_summary(cfg: TrainConfig, summary: dict, history: list[dict], is_main: bool) -> dict:
    """The run's summary, with the loss curve and summary.json written (process 0). When no update ran here (the
    run was at its end), the figures of the updates that did are kept from the earlier summary.json."""
    if not history:
        summary.update({k: v for k, v in _earlier_summary(cfg.log_dir).items() if summary.get(k) is None})
    if is_main:
        plot_loss_curves(cfg.log_dir / "loss_curve.png", [LossPanel(f"{cfg.mode} {cfg.run_name}", history)])
        (cfg.log_dir / "summary.json").write_text(
            json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1)
        )
    return summary


def run_meta(cfg: TrainConfig, model_config: ModelConfig, wandb_id: str | None, **extra) -> dict:
    """What every checkpoint keeps besides the train state. How the step ran is in train_config; the model
    config keeps the literal settings, so that a checkpoint written with cuDNN attention on a GPU loads on any
    backend."""
    portable_config = model_config.replace(
        attention_impl=LITERAL_STEP["attention_impl"],
        scan_layers=LITERAL_STEP["scan_layers"],
        moe_impl=ModelConfig.moe_impl,
    )
    return {"model_config": portable_config.to_dict(), "train_config": dataclasses.asdict(cfg), "wandb_id": wandb_id,
            **extra}  # fmt: skip


def save_due(plan, save_interval: int, last_update: int):
    """When a periodic checkpoint is due: MiniMind saves every save_interval micro-steps, so after each update
    that crosses a multiple of it (the last update saves anyway)."""
    return lambda update: (
        update < last_update
        and plan.micro_steps[update - 1] // save_interval > plan.previous_micro_step(update) // save_interval
    )


def describe_run(cfg, model_config, mesh, dtype, step, objective, num_examples, batches, total_updates) -> str:
    """The line a run starts with: the model, mesh, data and how the step runs."""
    layers = "scanned" if step["scan_layers"] else "unrolled"
    # Only the next-token losses compute their logits in chunks; DPO and distillation read every position's.
    loss_chunk = objective.loss_chunk_size if isinstance(objective, NextTokenLoss) else None
    return (
        f"{cfg.mode}: {model_config.arch} hidden {model_config.hidden_size} × {model_config.num_hidden_layers} "
        f"layers, mesh {dict(mesh.shape)}, compute {dtype} (weights and optimizer float32), {num_examples} examples, "
        f"{len(batches)} batches/epoch, {total_updates} updates; step: {step['attention_impl']} attention, loss chunk "
        f"{loss_chunk or 'none (full logits)'}, layers {layers}"
        f"{f', MoE {model_config.moe_impl}' if model_config.use_moe else ''}"
        f"{'' if cfg.fast_path else ' (--fast_path 0)'}"
        + (
            f"; packing efficiency {batches.stats['token_fraction']:.1%}, loss tokens {batches.stats['loss_fraction']:.1%}"
            if batches.stats  # DPO's pairs are never packed
            else ""
        )
    )


def run_job(cfg: TrainConfig, job: Callable[[TrainConfig, bool, RunLock], dict[str, Any]]) -> dict[str, Any]:
    """job(cfg, is_main, lock) once the processes have joined, with the compilation cache on and the run's lock
    held (one live run per checkpoint directory): what every trainer's `train` does around its own run."""
    maybe_initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    use_compilation_cache(cfg.compilation_cache_dir)
    is_main = jax.process_index() == 0
    if cfg.use_wandb:
        require_wandb()
    with RunLock(cfg.run_checkpoint_dir, is_main) as lock:
        return job(cfg, is_main, lock)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs the whole training job; returns a summary (final losses, throughput, paths)."""
    return run_job(cfg, _train)


def _train(cfg: TrainConfig, is_main: bool, lock: RunLock) -> dict[str, Any]:
    """train() while the checkpoint directory is this run's: every check, then the run."""
    earlier = keep_earlier_run(cfg, is_main)
    mesh = sharding.make_mesh(cfg.mesh)
    split = sharding.batch_size_per_step(mesh)
    if cfg.batch_size % split:
        raise UserError(
            f"--batch_size {cfg.batch_size} is not divisible by the data-parallel size {split} "
            f"(mesh {dict(mesh.shape)})"
        )
    dtype = cfg.dtype or default_dtype(jax.devices()[0].platform)
    step = step_settings(cfg, dtype)
    model = build_model(cfg, dtype, step)
    if cfg.mode == "lora":
        model = attach_adapters(cfg, model)
    model_config = model.config
    dataset = load_run_data(cfg, cfg.data_path, model_config)
    eval_dataset = load_run_data(cfg, cfg.eval_data_path, model_config, held_out=True) if cfg.eval_data_path else None
    batch_sharding = sharding.batch_sharding(mesh)
    batches = run_batches(cfg, dataset, batch_sharding)
    acc = cfg.accumulation_steps
    plan = update_plan(model_config.arch, len(batches), cfg.epochs, acc)
    total_updates = len(plan)
    if total_updates < 1:
        raise UserError(
            f"{cfg.data_path}: {len(batches)} batches are fewer than --accumulation_steps {acc} needs for one "
            f"update (2510 updates after acc - 1 batches of an epoch, and carries the rest into the next)"
        )
    objective = objective_for(cfg, model_config, step)
    schedule = update_lr_schedule(model_config.arch, cfg.learning_rate, plan, cfg.warmup_steps)
    optimizer = make_optimizer(schedule, cfg.grad_clip)
    graphdef, params, opt_state, param_shardings, opt_shardings = init_train_state(model, optimizer, mesh, objective)
    del model
    sizes = {  # what trains, and what its optimizer holds (LoRA: the adapters' moments alone)
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "trainable_params": sum(x.size for x in jax.tree.leaves(split_trainable(objective, params)[0])),
        "optimizer_state_bytes": sum(x.nbytes for x in jax.tree.leaves(opt_state)),
    }
    frozen_graphdefs, frozen_params = frozen_models(cfg, graphdef, params, mesh, dtype, step)
    step_fn = make_train_step(
        graphdef,
        optimizer,
        mesh,
        objective=objective,
        frozen_graphdefs=frozen_graphdefs,
        accumulation_steps=acc,
        loss_norm=cfg.loss_norm,
        param_shardings=param_shardings,
        opt_shardings=opt_shardings,
    )

    lock.take()  # every check passed: from here on the run moves and writes
    move_earlier_run_aside(earlier, is_main)
    checkpoints = TrainCheckpoints(cfg.run_checkpoint_dir, max_to_keep=cfg.keep_checkpoints)
    state = RunState(
        update=0, params=params, opt_state=opt_state, rng=jax.random.key_data(jax.random.key(cfg.seed)), batches=batches
    )
    resumed_meta = resume(cfg, checkpoints, state, param_shardings, opt_shardings, is_main)
    wandb_id = resumed_meta.get("wandb_id")  # kept in every checkpoint, so a resumed run logs to the same W&B run
    if is_main:  # the updates after the checkpoint are computed again (a fresh run has moved earlier logs aside)
        drop_metrics_after(cfg.log_dir / "metrics.jsonl", state.update)
    wandb_run = WandbRun(cfg, resume_id=wandb_id) if cfg.use_wandb and is_main else None
    wandb_id = wandb_run.id if wandb_run is not None else wandb_id

    last_update = total_updates if cfg.max_steps is None else min(total_updates, cfg.max_steps)
    if state.update >= last_update and is_main:
        limit = f" (--max_steps {cfg.max_steps} counts every update of the run)" if cfg.max_steps else ""
        tqdm.tqdm.write(
            f"nothing to train: the run is at update {state.update} and ends at update {last_update}{limit}"
        )
    peak_flops, peak_source = total_peak_flops(dtype)
    logger = MetricLogger(
        cfg,
        steps_per_epoch=len(batches),
        plan=plan,
        last_update=last_update,
        start_update=state.update,
        tokens_per_micro_batch=(2 if cfg.mode == "dpo" else 1) * cfg.batch_size * dataset.seq_len,  # DPO: pairs
        flops_per_token=model_flops_per_token(model_config) + attention_flops_per_token(model_config, dataset.seq_len),
        peak_flops=peak_flops,
        writer=MetricsWriter(cfg.log_dir, is_main, wandb_run),
        is_main=is_main,
    )
    pth_path = pathlib.Path(cfg.save_dir) / f"{cfg.run_name}.pth"
    export = functools.partial(save_lora if cfg.mode == "lora" else save_pth, path=pth_path)
    checkpointer = Checkpointer(checkpoints, logger, graphdef, export, run_meta(cfg, model_config, wandb_id),
                                state.update, is_main)  # fmt: skip
    preemption = Preemption(checkpointer)
    trainer = Trainer(step_fn, update_sizes=plan.sizes, last_update=last_update, frozen_params=frozen_params,
                      on_compiled=logger.step_compiled)  # fmt: skip
    trainer.add_hook(logger)
    trainer.add_hook(checkpointer, every=save_due(plan, cfg.save_interval, last_update))
    trainer.add_hook(preemption)
    evaluation = None
    if eval_dataset is not None:
        eval_batches = lambda: make_batches(
            eval_dataset,
            batch_size=cfg.batch_size,
            seed=0,
            shuffle=False,
            sharding=batch_sharding,
            drop_remainder=False,
        )
        evaluation = Evaluation(make_loss_sums(graphdef), eval_batches, cfg.eval_data_path, is_main)
        trainer.add_hook(evaluation, every=lambda update: update == last_update)
    if is_main:
        tqdm.tqdm.write(
            describe_run(cfg, model_config, mesh, dtype, step, objective, len(dataset), batches, total_updates)
        )
        tqdm.tqdm.write(
            f"trainable parameters {sizes['trainable_params']:,} of {sizes['params']:,} "
            f"({sizes['trainable_params'] / sizes['params']:.2%}); optimizer state "
            f"{sizes['optimizer_state_bytes'] / 2**20:,.2f} MiB"
        )
    try:
        finished = trainer.train(state)
        logger.flush()
    except TooManySkips as error:  # skipped updates left params unchanged: this is the last good state
        checkpointer.save(state, wait=True)
        raise UserError(f"{error}; saved the last good state to {checkpoints.directory}") from None
    finally:
        preemption.restore()
        logger.close()
    if not finished:
        return {"preempted": True, "update": state.update}
    checkpointer.save(state, wait=True)
    checkpoints.close()
    if evaluation is not None and evaluation.result is None:  # no update ran: the run was already at its end
        evaluation(state)
    summary = {
        "updates": state.update,
        **sizes,
        **logger.summary(),
        "weights": str(pth_path),
        "checkpoints": str(checkpoints.directory),
        "peak_flops": peak_flops,
        "peak_flops_source": peak_source,
        **({"eval": evaluation.result} if evaluation is not None and evaluation.result else {}),
    }
    return write_summary(cfg, summary, logger.history, is_main)
