"""`--use_wandb`: the run's curves on Weights & Biases, named and keyed as MiniMind's trainers log them.

MiniMind imports SwanLab, which has the W&B API, under the name `wandb`; this uses the `wandb` package, an
optional extra (`pip install 'minimind-jax[wandb]'`). Only process 0 logs. With `WANDB_MODE=offline` the run
is written under `$WANDB_DIR/wandb/` without a network; `wandb sync` uploads it later. The run id is kept in
each checkpoint's meta, so `--from_resume 1` continues the same W&B run.
"""

from __future__ import annotations

import dataclasses

from minimind_jax.errors import UserError, first_line

INSTALL = "pip install 'minimind-jax[wandb]'"


def require_wandb():
    """The wandb module, or a one-line error that says how to install it."""
    try:
        import wandb
    except ImportError:
        raise UserError(f"--use_wandb needs the wandb package: {INSTALL}") from None
    return wandb


def minimind_run_name(cfg) -> str:
    """The run name MiniMind's train_full_sft.py / train_pretrain.py give W&B (the same in both eras)."""
    script = "Pretrain" if cfg.mode == "pretrain" else "Full-SFT"
    return f"MiniMind-{script}-Epoch-{cfg.epochs}-BatchSize-{cfg.batch_size}-LearningRate-{cfg.learning_rate}"


def minimind_metrics(arch: str, record: dict, eta_min: float) -> dict:
    """MiniMind's wandb.log keys for the era: the last micro-batch's loss, the learning rate, minutes left.

    v3 also logs the loss's two parts; these are the update's (MiniMind's are the last micro-batch's, the same
    when accumulation_steps is 1).
    """
    if arch == "minimind3":
        return {
            "loss": record["last_micro_loss"],
            "logits_loss": record["logits_loss"],
            "aux_loss": record["aux_loss"],
            "learning_rate": record["lr"],
            "epoch_time": eta_min,
        }
    return {"loss": record["last_micro_loss"], "lr": record["lr"], "epoch_Time": eta_min}


class WandbRun:
    """One W&B run: a new one, or the run `resume_id` names (the id a checkpoint kept)."""

    def __init__(self, cfg, resume_id: str | None):
        wandb = require_wandb()
        self.arch = cfg.arch
        try:
            # A resumed run may change settings (--max_steps, --mesh): its config takes the new values.
            self.run = wandb.init(
                project=cfg.wandb_project,
                name=minimind_run_name(cfg),
                id=resume_id,
                resume="must" if resume_id else None,
                config=dataclasses.asdict(cfg),
                allow_val_change=True,
            )
        except wandb.Error as error:  # no API key, an unknown run id, no network
            raise UserError(
                f"--use_wandb: {first_line(error)} (WANDB_MODE=offline logs without an account or network)"
            ) from None

    @property
    def id(self) -> str:
        return self.run.id

    def log(self, record: dict, eta_min: float) -> None:
        """At MiniMind's log interval: its keys, and every metrics.jsonl field as train/{name}, at step = update."""
        ours = {f"train/{key}": value for key, value in record.items() if key != "update"}
        self.run.log({**minimind_metrics(self.arch, record, eta_min), **ours}, step=record["update"])

    def finish(self) -> None:
        self.run.finish()
