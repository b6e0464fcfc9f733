"""Training runs on the tiny model and the chat_data fixture, and the metrics they log."""

import json

from minimind_jax.training.config import TrainConfig


def tiny_config(tmp_path, data_path, tokenizer_path, **changes) -> TrainConfig:
    """A tiny SFT run: 2 layers, rows of 48 ids, a global batch of 8 over the 8 devices, no worker processes or
    progress bars, its weights and checkpoints under tmp_path; `changes` set the rest."""
    fields = dict(
        data_path=str(data_path),
        tokenizer_path=str(tokenizer_path),
        num_hidden_layers=2,
        max_seq_len=48,
        batch_size=8,
        num_workers=0,
        progress=False,
        save_dir=str(tmp_path / "out"),
        checkpoint_dir=str(tmp_path / "checkpoints"),
    )
    return TrainConfig(**{**fields, **changes})


def run_config(tmp_path, chat_data, **changes) -> TrainConfig:
    fields = dict(
        mode="sft",
        cache_dir=str(tmp_path.parent / "cache"),
        hidden_size=64,
        epochs=1,
        learning_rate=1e-3,
        log_interval=1,
        save_interval=1000,
        mesh=None,
    )
    return tiny_config(tmp_path, chat_data["sft"], chat_data["tokenizer"], **{**fields, **changes})


def metrics_of(cfg: TrainConfig):
    path = f"{cfg.save_dir}/logs/{cfg.run_name}/metrics.jsonl"
    with open(path) as lines:
        return [json.loads(line) for line in lines]
