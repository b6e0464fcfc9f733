"""The whole training run: MiniMind's per-step losses and LRs, its weight file, and exact resume."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch

import main
from minimind_jax.bench.torch_reference import reference_train_loop
from minimind_jax.data.examples import ExampleConfig, load_dataset
from minimind_jax.data.pipeline import make_batches
from minimind_jax.model.config import ModelConfig
from minimind_jax.training.config import TrainConfig
from minimind_jax.training.metrics import LossPanel, plot_loss_curves
from minimind_jax.training.objectives import DistillLoss, DPOLoss, NextTokenLoss, TagWeightedLoss
from minimind_jax.training.run import describe_run, resolve_weight, train
from minimind_jax.training.sharding import make_mesh
from tests.support.models import random_torch_model, tiny_config, torch_batch
from tests.support.parity import assert_near_truth, assert_scalar_near_truth, float64_twin
from tests.support.runs import metrics_of, run_config

pytestmark = pytest.mark.slow
RUN_MODEL = tiny_config("minimind2", False).replace(vocab_size=6400)  # what hidden 64, 2 layers builds


@pytest.fixture
def pretrained(tmp_path, chat_data):
    """A MiniMind-format weight file out/pretrain_64.pth, as a user of MiniMind has."""
    reference = random_torch_model(RUN_MODEL, seed=12)
    path = tmp_path / "out" / "pretrain_64.pth"
    path.parent.mkdir(parents=True)
    torch.save({k: v.half() for k, v in reference.state_dict().items()}, path)
    return path


def test_weight_files_are_named_as_minimind_names_them(tmp_path):
    cfg = TrainConfig(
        save_dir=str(tmp_path), from_weight="pretrain", save_weight="full_sft", hidden_size=768, use_moe=1
    )
    (tmp_path / "pretrain_768_moe.pth").write_bytes(b"")
    assert resolve_weight(cfg) == tmp_path / "pretrain_768_moe.pth" and cfg.run_name == "full_sft_768_moe"


def test_loss_curves_are_drawn_only_when_there_is_a_loss(tmp_path):
    history = [{"update": update, "loss": 5.0 / update} for update in (1, 2, 3)]
    plot_loss_curves(tmp_path / "one.png", [LossPanel("sft", history)])
    plot_loss_curves(
        tmp_path / "two.png",
        [LossPanel("pretrain", history, heldout=("held-out", [0, 3], [6.0, 2.0])), LossPanel("sft", history)],
        title="both",
    )
    plot_loss_curves(tmp_path / "none.png", [LossPanel("sft", [])])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["one.png", "two.png"]
    assert all((tmp_path / name).read_bytes().startswith(b"\x89PNG") for name in ("one.png", "two.png"))


def test_same_run_as_minimind(tmp_path, chat_data, pretrained):
    """main.py sft on MiniMind's weight file, data in a fixed order: MiniMind's losses, LRs and full_sft .pth."""
    cfg = run_config(tmp_path, chat_data, from_weight="pretrain", shuffle=False, max_steps=6)
    summary = train(cfg)
    ours = metrics_of(cfg)

    dataset = load_dataset(
        cfg.data_path,
        cfg.tokenizer_path,
        ExampleConfig("sft", "minimind2", cfg.max_seq_len),
        cache_dir=cfg.cache_dir,
        num_workers=0,
        progress=False,
    )
    order = make_batches(dataset, batch_size=cfg.batch_size, seed=cfg.seed, shuffle=False, drop_remainder=False)
    batches = [torch_batch(next(order)) for _ in range(6)]
    reference = random_torch_model(RUN_MODEL)
    reference.load_state_dict({k: v.float() for k, v in torch.load(pretrained, weights_only=True).items()})
    truth = float64_twin(reference)
    loop = dict(arch="minimind2", lr=cfg.learning_rate, total_steps=len(order), accumulation_steps=1, grad_clip=1.0)
    expected = reference_train_loop(reference, batches, **loop)
    exact = reference_train_loop(truth, batches, **loop)

    for step, losses in enumerate(zip([r["last_micro_loss"] for r in ours], expected["loss"], exact["loss"])):
        assert_scalar_near_truth(f"step {step} loss", *losses)
    np.testing.assert_allclose([r["lr"] for r in ours], expected["lr"], rtol=1e-6)
    written = torch.load(summary["weights"], weights_only=True)
    assert summary["weights"].endswith("full_sft_64.pth") and all(v.dtype == torch.float16 for v in written.values())
    final = reference.state_dict()
    assert list(written) == list(final)
    # Compared as MiniMind saves them: ours as written; the fp32 reference and the float64 run rounded to fp16.
    as_saved = lambda state: {k: v.half().float().numpy() for k, v in state.items()}
    assert_near_truth(as_saved(written), as_saved(final), as_saved(truth.state_dict()))


def test_interrupted_run_resumes_exactly(tmp_path, chat_data):
    whole = run_config(tmp_path / "whole", chat_data, from_weight="none", epochs=2, save_interval=3, packing=True)
    train(whole)
    expected = [r["loss"] for r in metrics_of(whole)]
    assert len(expected) >= 8

    part = run_config(
        tmp_path / "part", chat_data, from_weight="none", epochs=2, save_interval=3, packing=True, max_steps=5
    )
    train(part)
    resumed = run_config(
        tmp_path / "part", chat_data, from_weight="none", epochs=2, save_interval=3, packing=True, from_resume=1
    )
    train(resumed)
    assert [r["loss"] for r in metrics_of(resumed)] == expected


def test_resume_on_another_mesh(tmp_path, chat_data):
    first = run_config(tmp_path, chat_data, from_weight="none", max_steps=2, save_interval=2, mesh="data=8")
    train(first)
    resumed = run_config(
        tmp_path,
        chat_data,
        from_weight="none",
        max_steps=4,
        from_resume=1,  # 4 in all
        mesh="data=2,fsdp=2,tensor=2",
    )
    train(resumed)
    reference = run_config(
        tmp_path / "reference", chat_data, from_weight="none", max_steps=4, save_interval=2, mesh="data=8"
    )
    train(reference)
    np.testing.assert_allclose(
        [r["loss"] for r in metrics_of(resumed)], [r["loss"] for r in metrics_of(reference)], rtol=1e-5
    )
    assert len(jax.devices()) == 8


def test_eval_data_is_scored_with_the_final_weights(tmp_path, chat_data, capsys):
    """--eval_data_path: the masked held-out loss of the run's last update, the number `main.py eval` gives on
    the run's newest checkpoint. v3, whose training augmentation (random system prompts, dropped empty think
    blocks) must not touch held-out data."""
    cfg = run_config(
        tmp_path, chat_data, arch="minimind3", from_weight="none", max_steps=3, eval_data_path=str(chat_data["sft"])
    )
    assert ExampleConfig(kind="sft", arch="minimind3", max_seq_len=48).augmented  # what training applies
    summary = train(cfg)
    capsys.readouterr()
    flags = ["--load_from", str(cfg.run_checkpoint_dir), "--tokenizer_path", cfg.tokenizer_path]
    flags += ["--data_path", cfg.eval_data_path, "--max_seq_len", "48", "--cache_dir", cfg.cache_dir]
    assert main.main(["eval", *flags]) == 0
    expected = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["updates"] == 3
    np.testing.assert_allclose(summary["eval"]["loss"], expected["loss"], rtol=1e-6)
    assert summary["eval"]["loss_tokens"] == expected["loss_tokens"] > 0
    assert json.loads((cfg.log_dir / "summary.json").read_text())["eval"] == summary["eval"]
    again = train(dataclasses.replace(cfg, from_resume=1))  # already at its last update: evaluates all the same
    assert again["updates"] == 3 and again["eval"] == summary["eval"]
    for key in ("final_loss", "tokens_per_s", "mfu", "compile_s"):  # the figures of the updates that ran
        assert again[key] == summary[key] is not None, key
        assert json.loads((cfg.log_dir / "summary.json").read_text())[key] == summary[key]


class _Batches(list):
    stats = None  # as DPO's pair batches: never packed


def test_the_first_line_says_loss_chunks_only_for_the_losses_that_take_them():
    """dpo, distill and distill_reason read every position's logits: their line says full logits, while the step
    settings hold the fast path's loss chunk."""
    mesh, model_config = make_mesh(None), ModelConfig(hidden_size=64, num_hidden_layers=2)
    step = {"attention_impl": "causal_blocks", "loss_chunk_size": 512, "scan_layers": False}
    for mode, objective, expected in [
        ("sft", NextTokenLoss(512), "loss chunk 512"),
        ("dpo", DPOLoss(0.1, mean_over_mask=True, add_aux_loss=False), "loss chunk none (full logits)"),
        ("distill", DistillLoss(0.5, 1.5, ignore_pad_targets=True), "loss chunk none (full logits)"),
        ("distill_reason", TagWeightedLoss((1, 2)), "loss chunk none (full logits)"),
    ]:
        cfg = TrainConfig(mode=mode)
        line = describe_run(cfg, model_config, mesh, "float32", step, objective, 10, _Batches([0, 1]), 2)
        assert f"step: causal_blocks attention, {expected}, layers unrolled" in line, (mode, line)
        assert "compute float32 (weights and optimizer float32)" in line
