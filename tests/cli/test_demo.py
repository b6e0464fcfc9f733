"""`python main.py demo --quick` end to end, and MiniMind compatibility of the `.pth` files it writes."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from minimind_jax.cli.demo import DEFAULT_CONFIG, STAGES, load_settings
from minimind_jax.errors import UserError
from tests.conftest import REPO_ROOT


def run_demo(out_dir, *extra: str) -> subprocess.CompletedProcess:
    """The demo as a user runs it: the CLI in a fresh process with one CPU device."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "main.py", "demo", "--quick", "--no_progress", "--out_dir", str(out_dir), *extra],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, f"demo failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo")
    result = run_demo(out_dir)
    summary = json.loads((out_dir / "summary.json").read_text("utf-8"))
    return out_dir, result.stdout, summary


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_writes_its_files(quick_demo):
    out_dir, stdout, summary = quick_demo
    assert list(summary["stage_seconds"]) == [stage.name for stage in STAGES]
    assert summary["reused"] == []
    hidden = load_settings(DEFAULT_CONFIG, quick=True)["model"]["hidden_size"]
    for path in (
        f"out/pretrain_{hidden}.pth",
        f"out/full_sft_{hidden}.pth",
        "tokenizer/demo.model",
        "corpus/pretrain.jsonl",
        "corpus/sft.jsonl",
        "corpus/sft_heldout.jsonl",
        f"converted/pretrain_{hidden}/config.json",
        f"out/logs/pretrain_{hidden}/metrics.jsonl",
        f"out/logs/pretrain_{hidden}/loss_curve.png",
        f"out/logs/full_sft_{hidden}/loss_curve.png",
        f"out/lora_identity_{hidden}.pth",
        f"out/dpo_{hidden}.pth",
        "loss_curves.png",
        "chats.md",
    ):
        assert (out_dir / path).is_file(), path
    assert (out_dir / "loss_curves.png").read_bytes().startswith(b"\x89PNG")
    results = summary["results"]
    assert results["convert"]["max_abs_diff_checkpoint_vs_pth"] == 0.0
    assert results["convert"]["max_abs_diff_torch_vs_jax"] < 1e-3
    chats = results["chat"]["chats"]
    assert [c["prompt"] for c in chats] == load_settings(DEFAULT_CONFIG, quick=True)["chat"]["prompts"]
    for chat in chats:
        assert chat["prompt"] in stdout and repr(chat["sft"]) in stdout
    assert "held-out masked loss" in stdout
    lora = results["lora"]
    assert 0 < lora["trainable_params"] < lora["params"] / 50  # the adapters alone
    assert [turn["prompt"] for turn in lora["replies"]] == ["请问你是谁?", "Tell me who you are."]
    assert "LoRA identity adapter" in stdout and repr(lora["replies"][0]["after"]) in stdout
    dpo = results["dpo"]
    assert dpo["pairs"]["train"] > 0 and dpo["pairs"]["heldout"] > 0 and "DPO (" in stdout
    before, after = dpo["heldout"]["before"], dpo["heldout"]["after"]
    # The policy starts as its reference: no margin, no pair won; DPO moves it toward the real replies.
    assert before["reward_margin"] == 0 and before["reward_accuracy"] == 0 and before["pairs"] == after["pairs"]
    assert after["reward_margin"] > 0 and after["reward_accuracy"] > 0
    grpo = results["grpo"]
    assert (out_dir / grpo["figure"]).is_file() and len(grpo["reward_curve"]) == grpo["updates"]
    assert "GRPO (" in stdout and f"out/grpo_{hidden}.pth" in grpo["weights"]


@pytest.mark.slow
def test_grpo_raises_the_heldout_reward(quick_demo):
    """The same held-out prompts, sampled with the same seeds, score higher after GRPO than before (measured:
    0.748 -> 0.878 on the quick demo)."""
    _, _, summary = quick_demo
    before, after = (summary["results"]["grpo"]["heldout_reward"][when] for when in ("before", "after"))
    assert before["completions"] == after["completions"] > 0
    assert after["reward"] > before["reward"] + 0.05, (before, after)


@pytest.mark.slow
def test_training_lowers_the_heldout_losses(quick_demo):
    _, _, summary = quick_demo
    evaluation = summary["results"]["evaluate"]
    for name in ("pretrain_text", "sft_assistant_tokens"):
        before, after = evaluation[name]["before"], evaluation[name]["after"]
        assert before["loss_tokens"] == after["loss_tokens"] > 0
        assert math.isfinite(before["loss"]) and math.isfinite(after["loss"])
        assert after["loss"] < before["loss"] - 0.1, (name, before["loss"], after["loss"])
    identity = summary["results"]["lora"]["heldout_identity_loss"]  # the adapter learns who it is
    assert identity["before"]["loss_tokens"] == identity["after"]["loss_tokens"] > 0
    assert identity["after"]["loss"] < identity["before"]["loss"] - 0.1, identity
    # Random weights start near the uniform distribution over the vocabulary.
    assert abs(evaluation["pretrain_text"]["before"]["loss"] - math.log(6400)) < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("weight", ["pretrain", "full_sft"])
def test_exported_pth_loads_strictly_into_the_torch_reference_with_our_logits(quick_demo, weight):
    from minimind_jax.bench.torch_reference import MiniMindTorch
    from minimind_jax.data.tokenizer import load_tokenizer
    from minimind_jax.weights import load

    out_dir, _, summary = quick_demo
    pth = out_dir / "out" / f"{weight}_{load_settings(DEFAULT_CONFIG, quick=True)['model']['hidden_size']}.pth"
    state_dict = torch.load(pth, map_location="cpu", weights_only=True)
    assert all(tensor.dtype == torch.float16 for tensor in state_dict.values())  # as MiniMind's trainers save
    ours = load(pth)
    reference = MiniMindTorch(ours.config)
    reference.load_state_dict(state_dict, strict=True)

    tokenizer = load_tokenizer(out_dir / "tokenizer" / "demo.model")
    with open(out_dir / "corpus" / "sft_heldout.jsonl", encoding="utf-8") as heldout:
        chats = [json.loads(next(heldout))["conversations"] for _ in range(2)]
    rows = [tokenizer.encode(tokenizer.apply_chat_template(chat))[:96] for chat in chats]
    length = max(map(len, rows))
    ids_BT = np.zeros((2, length), np.int32)  # left-padded, with the attention mask
    mask_BT = np.zeros((2, length), np.int32)
    for i, row in enumerate(rows):
        ids_BT[i, length - len(row) :], mask_BT[i, length - len(row) :] = row, 1
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids_BT).long(), torch.from_numpy(mask_BT).long()).logits.numpy()
    actual = np.asarray(ours(ids_BT, mask_BT))
    keep = mask_BT.astype(bool)
    assert np.abs(actual[keep] - expected[keep]).max() <= 1e-3
    assert np.abs(expected[keep]).max() > 1.0  # trained weights, not a trivial all-zero output


@pytest.mark.slow
def test_rerun_reuses_finished_stages_and_redoes_from_a_changed_one(quick_demo, tmp_path):
    out_dir, _, _ = quick_demo
    weights = sorted((out_dir / "out").glob("*.pth"))
    modified = {path: path.stat().st_mtime_ns for path in weights}
    settings = yaml.safe_load(DEFAULT_CONFIG.read_text("utf-8"))
    settings["quick"]["chat"]["max_new_tokens"] = 8
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(settings, allow_unicode=True), "utf-8")

    result = run_demo(out_dir, "--config", str(config))
    summary = json.loads((out_dir / "summary.json").read_text("utf-8"))
    assert summary["reused"] == ["corpus", "tokenizer", "pretrain", "convert", "sft", "evaluate", "lora", "dpo", "grpo"]
    assert "chat: reused" not in result.stdout + result.stderr
    assert {path: path.stat().st_mtime_ns for path in weights} == modified
    assert "max 8 new tokens" in (out_dir / "chats.md").read_text("utf-8")


def test_settings_merge_quick_overrides():
    full, quick = load_settings(DEFAULT_CONFIG), load_settings(DEFAULT_CONFIG, quick=True)
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text("utf-8"))
    assert full["pretrain"] == raw["pretrain"]
    assert quick["pretrain"] == {**raw["pretrain"], **raw["quick"]["pretrain"]}
    assert quick["chat"]["prompts"] == full["chat"]["prompts"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("modle: {hidden_size: 64}\n", "unknown section modle"),
        ("pretrain: {learning_rat: 0.1}\n", "unknown setting pretrain.learning_rat"),
        ("pretrain: {data_path: x.jsonl}\n", "unknown setting pretrain.data_path"),  # the demo sets paths itself
        ("quick: {chat: {max_tokens: 3}}\n", "unknown setting quick.chat.max_tokens"),
        ("chat: [1, 2]\n", "chat must be a mapping"),
        ("chat: {prompts: []}\n", "chat.prompts must list at least one prompt"),
        ("corpus: [\n", "cannot read demo settings"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as error:
        load_settings(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
