"""Where the metrics go: metrics.jsonl, TensorBoard, W&B and the loss-curve plot."""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from minimind_jax.training.wandb_log import WandbRun



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
