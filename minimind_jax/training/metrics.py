"""The run's metrics: one record per update, to metrics.jsonl, TensorBoard, W&B, the progress bar and
MiniMind's own log line; and the loss-curve plot."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import numpy as np
import tqdm

from minimind_jax.runtime import seconds_since_process_start
from minimind_jax.training.accumulation import UpdatePlan
from minimind_jax.training.compilation import CompiledStep, peak_device_memory_bytes
from minimind_jax.training.optimizer import minimind_lr
from minimind_jax.training.wandb_log import WandbRun

THROUGHPUT_WINDOW = 20  # updates per tokens/s window
# What every step reports (training/step.py); an objective's own metrics (DPO's rewards) are recorded as they come.
STEP_METRICS = ("loss", "logits_loss", "aux_loss", "micro_losses", "per_micro", "loss_tokens", "grad_norm", "skipped")


def drop_metrics_after(path: pathlib.Path, update: int) -> None:
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

    figure, axes = plt.subplots(
        1, len(panels), figsize=(7, 4) if len(panels) == 1 else (6 * len(panels), 4.2), squeeze=False
    )
    for axis, panel in zip(axes[0], panels):
        axis.plot(
            [r["update"] for r in panel.history],
            [r["loss"] for r in panel.history],
            label="training loss (per update)",
            linewidth=1,
        )
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


class MetricsWriter:
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


class TooManySkips(Exception):
    def __init__(self, update: int, limit: int):
        super().__init__(f"{limit} consecutive non-finite updates (last: update {update})")


class MetricLogger:
    """The hook that turns each update's metrics into a record and writes it everywhere.

    An update's metrics are read one update late, after the next step is dispatched, so the device never
    waits for the host; `flush()` reads the newest now (before a checkpoint, so that no checkpoint is newer
    than the logged metrics, and at the end).
    """

    def __init__(
        self,
        cfg,
        *,
        steps_per_epoch: int,
        plan: UpdatePlan,
        last_update: int,
        start_update: int,
        tokens_per_micro_batch: int,
        flops_per_token: float,
        peak_flops: float,
        writer: MetricsWriter,
        is_main: bool,
    ):
        self.cfg, self.steps_per_epoch, self.plan = cfg, steps_per_epoch, plan
        self.last_update, self.start_update, self.is_main = last_update, start_update, is_main
        self.tokens_per_micro_batch, self.flops_per_token = tokens_per_micro_batch, flops_per_token
        self.peak_flops = peak_flops
        self.writer = writer
        self.bar = tqdm.tqdm(
            total=last_update,
            initial=start_update,
            disable=not (cfg.progress and is_main),
            unit="step",
            dynamic_ncols=True,
        )
        self.history: list[dict] = []
        self.pending = None  # (update, metrics on the device, its data batches)
        self.compiled: dict = {}  # compile_s, compile_cache, planned_memory_bytes (XLA's plan)
        self.first_update_s = None  # from the command's start to the first update's metrics
        self.consecutive_skips = self.total_skips = 0
        self.train_start = time.perf_counter()
        self._reset_window()

    def _reset_window(self) -> None:
        self.window_start, self.window_updates, self.window_tokens, self.window_loss_tokens = (
            time.perf_counter(),
            0,
            0,
            0.0,
        )

    def step_compiled(self, compiled: CompiledStep) -> None:
        """Trainer's on_compiled: the one line that says how the compile went; throughput counts from here."""
        self.compiled = {
            "compile_s": compiled.seconds,
            "compile_cache": compiled.cache,
            "planned_memory_bytes": compiled.memory_bytes,
        }
        if self.is_main:
            tqdm.tqdm.write(compiled.describe())
        self._reset_window()

    def __call__(self, state) -> None:
        self.flush()
        self.pending = (state.update, state.metrics, state.data_batches, state.host_metrics)

    def flush(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._finish(*pending)

    def learning_rate(self, update: int) -> float:
        """The LR MiniMind logs for update `update` (1-based): its schedule at the update's micro-step."""
        cfg = self.cfg
        micro_step = self.plan.micro_steps[update - 1]
        return float(minimind_lr(cfg.arch, micro_step, self.plan.total_micro_steps, cfg.learning_rate,
                                 cfg.warmup_steps, np))  # fmt: skip

    def update_tokens(self, update: int, host_metrics: dict) -> int:
        """The tokens update `update` ran through the model (for tokens/s and MFU)."""
        return self.tokens_per_micro_batch * self.plan.sizes[update - 1]

    def finish_record(self, record: dict) -> None:
        """Adds what a kind of run records beyond the step's metrics (RL: MiniMind's names)."""

    def log_line(self, record: dict, step_in_epoch: int, eta_min: float) -> str:
        """MiniMind's own log line, so its log parsers keep working."""
        return (
            f"Epoch:[{record['epoch']}/{self.cfg.epochs}]({step_in_epoch + 1}/{self.steps_per_epoch}) "
            f"loss:{record['last_micro_loss']:.6f} lr:{record['lr']:.12f} epoch_Time:{eta_min:.1f}min: "
            f"tokens/s:{record['tokens_per_s']:,.0f} loss_tokens/s:{record['loss_tokens_per_s']:,.0f} "
            f"mfu:{record['mfu']:.1%}"
        )

    def _finish(self, update: int, device_metrics: dict, data_batches: range, host_metrics: dict) -> None:
        cfg = self.cfg
        metrics = jax.device_get(device_metrics)
        if self.first_update_s is None:
            self.first_update_s = seconds_since_process_start()
        micro_step = self.plan.micro_steps[update - 1]  # MiniMind counts micro-steps (1-based within the epoch)
        epoch, step_in_epoch = divmod(micro_step - 1, self.steps_per_epoch)
        lr = self.learning_rate(update)
        if metrics["skipped"]:
            self.consecutive_skips += 1
            self.total_skips += 1
            if self.is_main:
                tqdm.tqdm.write(
                    f"update {update}: non-finite loss or gradient (loss {float(metrics['loss'])}, grad norm "
                    f"{float(metrics['grad_norm'])}) at data batches {list(data_batches)}; update skipped"
                )
        else:
            self.consecutive_skips = 0
        self.window_updates += 1
        self.window_tokens += self.update_tokens(update, host_metrics)
        self.window_loss_tokens += float(metrics["loss_tokens"])
        elapsed = time.perf_counter() - self.window_start
        tokens_per_s = self.window_tokens / elapsed if elapsed > 0 else float("nan")
        record = {
            "update": update,
            "micro_step": micro_step,
            "epoch": epoch + 1,
            "loss": float(metrics["loss"]),
            "logits_loss": float(metrics["logits_loss"]),
            "aux_loss": float(metrics["aux_loss"]),
            "last_micro_loss": float(metrics["micro_losses"][-1]),
            "grad_norm": float(metrics["grad_norm"]),
            "lr": lr,
            "tokens_per_s": tokens_per_s,
            "loss_tokens_per_s": self.window_loss_tokens / elapsed,
            "mfu": tokens_per_s * self.flops_per_token / self.peak_flops,
            "skipped": int(metrics["skipped"]),
        }
        record.update({name: float(value) for name, value in metrics.items() if name not in STEP_METRICS})
        record.update(host_metrics)
        self.finish_record(record)
        self.history.append(record)
        self.writer.write(record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.bar.update(1)
        crossed_log = (micro_step // cfg.log_interval) > (self.plan.previous_micro_step(update) // cfg.log_interval)
        if self.is_main and (crossed_log or update == self.last_update):
            done = max(update - self.start_update, 1)
            eta_min = (time.perf_counter() - self.train_start) / done * (self.last_update - update) / 60
            tqdm.tqdm.write(self.log_line(record, step_in_epoch, eta_min))
            self.writer.at_log_interval(record, eta_min)
        if self.window_updates >= THROUGHPUT_WINDOW:
            self._reset_window()
        if self.consecutive_skips >= cfg.max_consecutive_skips:
            raise TooManySkips(update, cfg.max_consecutive_skips)

    def summary(self) -> dict:
        """compile_s, compile_cache, planned_memory_bytes, first_update_s, peak_memory_bytes (the device's own
        account, where it keeps one), skipped_updates, and over the last window: final_loss, tokens_per_s, mfu."""
        summary = {
            **self.compiled,
            "first_update_s": self.first_update_s,
            "peak_memory_bytes": peak_device_memory_bytes(),
            "skipped_updates": self.total_skips,
            "history": self.history,
        }
        if self.history:
            recent = self.history[-min(len(self.history), THROUGHPUT_WINDOW) :]
            summary.update(
                final_loss=self.history[-1]["loss"],
                tokens_per_s=float(np.median([r["tokens_per_s"] for r in recent])),
                mfu=float(np.median([r["mfu"] for r in recent])),
            )
        return summary

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
