"""The training run: weights in, sharded steps, logs, Orbax checkpoints, MiniMind `.pth` out.

`train(TrainConfig)` is what `main.py sft` and `main.py pretrain` call. Every flag of MiniMind's
train_full_sft.py / train_pretrain.py has a field of the same name and meaning here."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import signal
import time
from typing import Any

import jax
import jax.experimental.multihost_utils
import numpy as np
import tqdm
from flax import nnx

from minimind_jax.training import sharding
from minimind_jax.weights.orbax import TrainCheckpoints, complete_steps
from minimind_jax.model.config import LITERAL_STEP, ModelConfig, default_dtype, train_step_settings, weight_stem
from minimind_jax.errors import UserError
from minimind_jax.runtime import maybe_initialize_distributed, use_compilation_cache
from minimind_jax.training.config import TrainConfig
from minimind_jax.training.metrics import LossPanel, MetricsWriter, drop_metrics_after, plot_loss_curves
from minimind_jax.training.evaluation import evaluate, make_loss_sums
from minimind_jax.model.transformer import MiniMind
from minimind_jax.training.perf import total_peak_flops
from minimind_jax.training.step import init_train_state, make_train_step
from minimind_jax.training.perf import attention_flops_per_token, model_flops_per_token
from minimind_jax.training.optimizer import make_optimizer, minimind_lr, update_lr_schedule
from minimind_jax.training.wandb_log import WandbRun, require_wandb



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
    from minimind_jax.data.examples import ExampleConfig

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
    from minimind_jax.data.examples import ExampleConfig, load_dataset
    from minimind_jax.data.tokenizer import check_fits, load_tokenizer

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

    from minimind_jax.data.pipeline import make_batches

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
        drop_metrics_after(log_dir / "metrics.jsonl", update)
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

    writer = MetricsWriter(log_dir, enabled=is_main, wandb_run=wandb_run)
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


class _TooManySkips(Exception):
    def __init__(self, update: int):
        self.update = update
