"""The metric logger's own rules, on a clock the test moves: throughput counts from the end of the compile."""

import numpy as np

from minimind_jax.training import metrics as metrics_lib
from minimind_jax.training.accumulation import update_plan
from minimind_jax.training.compilation import CompiledStep
from minimind_jax.training.config import TrainConfig
from minimind_jax.training.loop import RunState


def step_metrics(loss: float) -> dict:
    return {
        "loss": np.float32(loss),
        "logits_loss": np.float32(loss),
        "aux_loss": np.float32(0),
        "micro_losses": np.asarray([loss], np.float32),
        "loss_tokens": np.float32(100),
        "grad_norm": np.float32(1),
        "skipped": np.int32(0),
    }


def test_the_first_update_throughput_leaves_the_compile_out(tmp_path, monkeypatch, capsys):
    """A 100 s compile, then updates of 0.5 s each: every update's tokens/s and MFU are those of 0.5 s, the first
    included, and the compile is reported on its own line."""
    now = [0.0]
    monkeypatch.setattr(metrics_lib.time, "perf_counter", lambda: now[0])
    cfg = TrainConfig(save_dir=str(tmp_path), log_interval=1, progress=False)
    logger = metrics_lib.MetricLogger(
        cfg,
        steps_per_epoch=10,
        plan=update_plan("minimind2", iters=10, epochs=1, accumulation_steps=1),
        last_update=3,
        start_update=0,
        tokens_per_micro_batch=1000,
        flops_per_token=1e6,
        peak_flops=1e10,
        writer=metrics_lib.MetricsWriter(tmp_path / "logs", enabled=False),
        is_main=True,
    )
    now[0] += 100.0
    logger.step_compiled(CompiledStep(executable=None, seconds=100.0, cache="miss", memory_bytes=None))
    for update in (1, 2, 3):  # each update is read when the next is dispatched, as its 0.5 s end
        logger(RunState(update=update, params=None, opt_state=None, rng=None, batches=None, metrics=step_metrics(1.0)))
        now[0] += 0.5
    logger.flush()
    assert [record["tokens_per_s"] for record in logger.history] == [2000.0, 2000.0, 2000.0]
    assert [record["mfu"] for record in logger.history] == [0.2, 0.2, 0.2]
    out = capsys.readouterr().out
    assert "compiled in 100.0 s (cache miss)" in out and "tokens/s:2,000" in out and "mfu:20.0%" in out
    assert logger.summary()["compile_s"] == 100.0
