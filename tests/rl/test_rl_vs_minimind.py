"""The RL trainers against MiniMind's own on the same recorded rollouts, judged by the rules of
../shared/golden/rl/README.md: per update the loss, mean reward and learning rate, and the written weights
within MiniMind's own noise floor.

- `main.py grpo --rollouts`: MiniMind's train_grpo.py runs of ../shared/golden/rl (both eras, v3's cispo and
  grpo, rewards computed and given);
- `main.py spo|ppo|agent --rollouts`: 2510's train_spo.py and train_ppo.py, v3's train_ppo.py and
  train_agent.py, run the same way (tests/fixtures/rl/spo, ppo, ppo_v3 and agent, made by their
  make_*_golden.py; their 1-thread runs changed no weight beyond one fp16 ulp, so the limit is the README's
  floor of 2e-5).
"""

import json
import pathlib
import shlex

import pytest
import torch

from minimind_jax.cli.main import main
from tests.conftest import GOLDEN, require_shared
from tests.support.parity import fraction_beyond_one_fp16_ulp

CASES = [("2510", "reasoning_computed"), ("v3", "cispo_computed"), ("v3", "grpo_given")]
FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "rl"
NOISE_FLOOR = 2e-5  # the README's limit when MiniMind's own 1-thread and float64 runs move no weight


def golden_flags(era: str, case: str) -> list[str]:
    """The case's command line from flags.env (paths relative to the era's folder)."""
    for line in (GOLDEN / "rl" / era / "flags.env").read_text().splitlines():
        name, _, value = line.partition("=")
        if name == case.upper():
            return shlex.split(shlex.split(value)[0])
    raise KeyError(case)


# The README's tolerances: losses 1e-4 relative or 1e-6 absolute, the mean reward 1e-5, the learning rate 1e-6
# relative; the rest of what MiniMind logs 1e-6 absolute. 2510 PPO's kl and kl_ref are differences of two sums
# of a completion's log-probs (|S| of 300 to 700 here), each rounded by fp32 to 3e-5 to 6e-5 in MiniMind's run
# as in ours: they get 1e-4 absolute (measured: at most 6.1e-5 apart).
LOSSES = ("policy_loss", "actor_loss", "critic_loss")
SEQUENCE_KLS = ("kl", "kl_ref")
LEARNING_RATES = ("learning_rate", "actor_lr", "critic_lr")


def assert_run_is_minimind(out, name: str, minimind_run: pathlib.Path, limit: float, label: str) -> None:
    ours = [json.loads(line) for line in (out / "logs" / name / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (minimind_run / "metrics.jsonl").read_text().splitlines()]
    assert len(ours) == len(theirs) >= 1
    for update, (mine, minimind) in enumerate(zip(ours, theirs), 1):
        for metric, value in minimind.items():
            sequence_level = name == "ppo_actor_32" and "actor_loss" in minimind  # 2510's PPO
            if metric in LOSSES or (metric in SEQUENCE_KLS and not sequence_level):
                expected = pytest.approx(value, rel=1e-4, abs=1e-6)
            elif metric in SEQUENCE_KLS:
                expected = pytest.approx(value, abs=1e-4)
            elif metric in LEARNING_RATES:
                expected = pytest.approx(value, rel=1e-6)
            else:
                expected = pytest.approx(value, abs=1e-5 if metric == "reward" else 1e-6)
            assert mine[metric] == expected, (update, metric)
    weights = torch.load(out / f"{name}.pth", weights_only=True)
    expected = torch.load(minimind_run / f"{name}.pth", weights_only=True)
    assert list(weights) == list(expected)
    fraction = fraction_beyond_one_fp16_ulp(weights, expected)
    print(f"{label}: {fraction:.2e} of the weights beyond one fp16 ulp (limit {limit:.0e})")
    assert fraction <= limit


@pytest.mark.parametrize("era, case", CASES)
def test_grpo_updates_are_minimind(era, case, tmp_path, monkeypatch):
    folder = require_shared("golden", "rl", era)
    monkeypatch.chdir(folder)  # the flags name the inputs relative to it
    out = tmp_path / "out"
    argv = ["grpo", *golden_flags(era, case), "--tokenizer_path", str(require_shared("minimind", era)),
            "--save_dir", str(out), "--checkpoint_dir", str(out / "checkpoints"), "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    limit = json.loads((folder / "noise.json").read_text())[case]["limit"]
    assert_run_is_minimind(out, "grpo_32", folder / "minimind" / case, limit, f"{era} {case}")


def test_spo_updates_are_minimind(tmp_path):
    """2510's SPO on the first completion of each golden prompt: its tracker's baseline and ρ, the loss, and
    the weights, which a tracker step off by anything would move."""
    inputs = require_shared("golden", "rl", "2510", "inputs")
    out = tmp_path / "out"
    argv = ["spo", "--arch", "minimind2", "--hidden_size", "32", "--num_hidden_layers", "2", "--batch_size", "2",
            "--max_seq_len", "64", "--max_gen_len", "320", "--learning_rate", "1e-3", "--beta", "0.02",
            "--accumulation_steps", "1", "--save_interval", "1", "--from_weight", str(inputs / "full_sft_32.pth"),
            "--rollouts", str(FIXTURES / "spo" / "rollouts.jsonl"), "--tokenizer_path",
            str(require_shared("minimind", "2510")), "--save_dir", str(out), "--mesh", "data=2", "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    assert_run_is_minimind(out, "spo_32", FIXTURES / "spo", NOISE_FLOOR, "2510 spo")


def test_ppo_updates_are_minimind(tmp_path):
    """2510's PPO, one prompt per update: its critic from MiniMind's own initial critic, its old actor refreshed
    after updates 1 and 3 (--update_old_actor_freq 2), so update 3's ratio is not 1; the actor's and critic's
    losses, both KLs, and the actor's weights."""
    inputs = require_shared("golden", "rl", "2510", "inputs")
    golden, out = FIXTURES / "ppo", tmp_path / "out"
    argv = ["ppo", "--arch", "minimind2", "--hidden_size", "32", "--num_hidden_layers", "2", "--batch_size", "1",
            "--max_seq_len", "64", "--max_gen_len", "320", "--learning_rate", "1e-3", "--critic_learning_rate",
            "2e-3", "--update_old_actor_freq", "2", "--save_interval", "1",
            "--from_weight", str(inputs / "full_sft_32.pth"), "--critic_weight", str(golden / "critic_init_32.pth"),
            "--rollouts", str(golden / "rollouts.jsonl"), "--tokenizer_path", str(require_shared("minimind", "2510")),
            "--save_dir", str(out), "--mesh", "data=1", "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    assert_run_is_minimind(out, "ppo_actor_32", golden, NOISE_FLOOR, "2510 ppo")


# v3 PPO cases (tests/fixtures/rl/ppo_v3, made by make_ppo_v3_golden.py): the flags beyond the shared ones
PPO_V3_CASES = {
    "epochs": ["--batch_size", "2"],
    "early_stop": ["--batch_size", "4", "--early_stop_kl", "1e-6"],
    "early_stop_accumulated": ["--batch_size", "6", "--early_stop_kl", "1e-6", "--accumulation_steps", "2",
                               "--loss_norm", "minimind", "--rollouts", str(FIXTURES / "ppo_v3" / "rollouts6.jsonl"),
                               "--mesh", "data=2"],  # the halt crosses the devices
}  # fmt: skip


@pytest.mark.parametrize("case", PPO_V3_CASES)
def test_v3_ppo_updates_are_minimind(case, tmp_path):
    """v3's token-level PPO: GAE and whitening from MiniMind's own initial critic, 2 epochs of minibatches per
    rollout in rollout order, and the early stop (a halted minibatch's step runs with a zero loss, the later
    epochs do not; with accumulation, a step that would have held the next epoch's minibatch). Per rollout:
    the reward, both KLs, clipfrac, the critic's loss and both learning rates; then the actor's weights."""
    inputs = require_shared("golden", "rl", "v3", "inputs")
    golden, out = FIXTURES / "ppo_v3", tmp_path / "out"
    argv = ["ppo", "--arch", "minimind3", "--hidden_size", "32", "--num_hidden_layers", "2", "--max_seq_len", "64",
            "--max_gen_len", "320", "--learning_rate", "1e-3", "--critic_learning_rate", "2e-3", "--mini_batch_size",
            "2", "--shuffle", "0", "--save_interval", "1", "--from_weight", str(inputs / "full_sft_32.pth"),
            "--critic_weight", str(golden / "critic_init_32.pth"), "--rollouts", str(golden / "rollouts.jsonl"),
            "--tokenizer_path", str(require_shared("minimind", "v3")), "--save_dir", str(out), "--mesh", "data=1",
            "--no_progress", *PPO_V3_CASES[case]]  # fmt: skip
    assert main(argv) == 0
    assert_run_is_minimind(out, "ppo_actor_32", golden / case, NOISE_FLOOR, f"v3 ppo {case}")


def test_agent_updates_are_minimind(tmp_path):
    """v3's agentic RL on scripted trajectories (tests/fixtures/rl/agent, make_agent_golden.py): multi-turn
    packing with the tool observations and MiniMind's re-rendered slices, each turn's old log-probs on its own
    context, max_total_len's cut, the rewards and the CISPO update, split over 2 devices."""
    inputs = require_shared("golden", "rl", "v3", "inputs")
    golden, out = FIXTURES / "agent", tmp_path / "out"
    argv = ["agent", "--hidden_size", "32", "--num_hidden_layers", "2", *shlex.split((golden / "flags.txt").read_text()),
            "--from_weight", str(inputs / "full_sft_32.pth"), "--rollouts", str(golden / "rollouts.jsonl"),
            "--tokenizer_path", str(require_shared("minimind", "v3")), "--save_dir", str(out), "--mesh", "data=2",
            "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    assert_run_is_minimind(out, "agent_32", golden, NOISE_FLOOR, "v3 agent")
