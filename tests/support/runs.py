"""Training runs on the tiny model and the chat_data fixture, and the metrics they log."""

import json

from minimind_jax.training.config import TrainConfig


def run_config(tmp_path, chat_data, **changes) -> TrainConfig:
    fields = dict(
        mode="sft",
        save_dir=str(tmp_path / "out"),
        checkpoint_dir=str(tmp_path / "checkpoints"),
        cache_dir=str(tmp_path.parent / "cache"),
        data_path=str(chat_data["sft"]),
        tokenizer_path=str(chat_data["tokenizer"]),
        hidden_size=64,
        num_hidden_layers=2,
        max_seq_len=48,
        batch_size=8,
        epochs=1,
        learning_rate=1e-3,
        log_interval=1,
        save_interval=1000,
        num_workers=0,
        progress=False,
        mesh=None,
    )
    fields.update(changes)
    return TrainConfig(**fields)


def metrics_of(cfg: TrainConfig):
    path = f"{cfg.save_dir}/logs/{cfg.run_name}/metrics.jsonl"
    with open(path) as lines:
        return [json.loads(line) for line in lines]
