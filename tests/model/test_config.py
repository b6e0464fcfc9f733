"""The step settings a model config derives: the fast path per backend and dtype, MiniMind's literal step, and
what the trainer takes from its flags."""

import jax
import pytest

from minimind_jax.errors import UserError
from minimind_jax.model.config import LITERAL_STEP, fast_path_settings, train_step_settings
from minimind_jax.training.config import TrainConfig
from minimind_jax.training.run import step_settings


def test_fast_path_settings_per_backend_and_what_the_trainer_takes():
    assert fast_path_settings("cpu", "float32", 511) == {
        "attention_impl": "causal_blocks",
        "loss_chunk_size": 512,
        "scan_layers": False,
    }
    # cuDNN for every row length (MiniMind 2510's rows are max_seq_len - 1: padded inside attention), in half
    # precision; float32 on a GPU keeps causal_blocks
    for seq_len in (511, 512, 1023):
        for dtype in ("bfloat16", "float16"):
            assert fast_path_settings("gpu", dtype, seq_len) == {
                "attention_impl": "cudnn",
                "loss_chunk_size": 512,
                "scan_layers": True,
            }
        assert fast_path_settings("gpu", "float32", seq_len)["attention_impl"] == "causal_blocks"
        # TPU: Pallas' Splash kernel in any dtype
        for dtype in ("bfloat16", "float32"):
            assert fast_path_settings("tpu", dtype, seq_len) == {
                "attention_impl": "splash",
                "loss_chunk_size": 512,
                "scan_layers": True,
            }
    assert train_step_settings(False, "gpu", "bfloat16", 512) == LITERAL_STEP
    assert train_step_settings(True, "cpu", "float32", 511, scan_layers=True, loss_chunk_size=0) == {
        "attention_impl": "causal_blocks",
        "loss_chunk_size": None,
        "scan_layers": True,
    }  # given values win
    assert step_settings(TrainConfig(), "float32") == fast_path_settings(jax.devices()[0].platform, "float32", 511)
    assert step_settings(TrainConfig(fast_path=False, attention_impl="causal_blocks"), "float32") == {
        **LITERAL_STEP,
        "attention_impl": "causal_blocks",
    }
    with pytest.raises(UserError, match="--fast_path must be one of 0, 1"):
        TrainConfig(fast_path=2)
    with pytest.raises(UserError, match="--loss_chunk_size must be an integer >= 0"):
        TrainConfig(loss_chunk_size=-1)
