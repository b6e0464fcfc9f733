"""`main.py grpo` as a user runs it: rollouts sampled from a small model, MiniMind's metrics and weight file,
exact resume, and bad input answered in one line with nothing lost (no ../shared needed)."""

import argparse
import json

import numpy as np
import pytest
import torch

from minimind_jax.cli.main import main
from minimind_jax.cli.train import add_arguments, config_from_args
from tests.support.data import random_chats, write_jsonl


def grpo_argv(tokenizer, data, out, *extra):
    return ["grpo", "--arch", "minimind3", "--hidden_size", "32", "--num_hidden_layers", "2", "--from_weight", "none",
            "--tokenizer_path", str(tokenizer), "--data_path", str(data), "--batch_size", "2",
            "--num_generations", "4", "--max_gen_len", "12", "--max_seq_len", "32", "--learning_rate", "1e-3",
            "--save_dir", str(out), "--save_interval", "1", "--mesh", "data=2", "--no_progress", *extra]  # fmt: skip


# Per command: its flags beyond the shared ones (2510 for SPO and PPO; PPO's old actor refreshed every 2 steps,
# one prompt per update), its weight file, and the metrics MiniMind logs.
RUNS = {
    "grpo": ([], "grpo_32", ("reward", "kl_ref", "advantages_std", "advantages_mean", "policy_loss",
                             "avg_response_len", "learning_rate")),
    "spo": (["--arch", "minimind2", "--accumulation_steps", "1"], "spo_32",
            ("policy_loss", "reward", "kl", "rho", "baseline", "advantages_mean", "learning_rate")),
    "ppo": (["--arch", "minimind2", "--batch_size", "1", "--update_old_actor_freq", "2", "--mesh", "data=1"],
            "ppo_actor_32", ("actor_loss", "critic_loss", "reward", "kl", "kl_ref", "avg_response_len", "actor_lr")),
    # v3's: 2 epochs of 2 minibatches of 1 per rollout, accumulated in pairs
    "ppo_v3": (["--mini_batch_size", "1", "--accumulation_steps", "2", "--mesh", "data=1"], "ppo_actor_32",
               ("reward", "kl_ref", "approx_kl", "clipfrac", "critic_loss", "avg_response_len", "actor_lr",
                "critic_lr")),
    # v3's agentic RL: records with tools and gt, trajectories cut to their last 40 ids
    "agent": (["--num_generations", "2", "--max_total_len", "40"], "agent_32",
              ("reward", "kl_ref", "group_reward_std", "advantages_std", "policy_loss", "avg_response_len",
               "advantages_mean", "learning_rate")),
}  # fmt: skip


def rl_argv(run, tokenizer, data, out, *extra):
    argv = grpo_argv(tokenizer, data, out, *RUNS[run][0], *extra)
    if run not in ("grpo", "agent"):
        del argv[argv.index("--num_generations") : argv.index("--num_generations") + 2]
    return [run.removesuffix("_v3"), *argv[1:]]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("rlaif") / "rlaif.jsonl", random_chats(6, seed=4))


@pytest.fixture(scope="module")
def agent_prompts(tmp_path_factory):
    tools = json.dumps([{"type": "function", "function": {"name": "calculate_math", "parameters": {}}}])
    chats = random_chats(6, seed=5)
    for chat in chats:
        chat["conversations"] = [{"role": "system", "content": "tools", "tools": tools},
                                 *[turn for turn in chat["conversations"] if turn["role"] != "system"]]  # fmt: skip
        chat["gt"] = ["cat"]
    return write_jsonl(tmp_path_factory.mktemp("agent") / "agent_rl.jsonl", chats)


def records(out, name="grpo_32"):
    return [json.loads(line) for line in (out / "logs" / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", RUNS)
def test_a_sampled_run_logs_minimind_metrics_and_resumes_exactly(mode, small_tokenizer, prompts, agent_prompts,
                                                                 tmp_path, capsys):  # fmt: skip
    """Stopped after update 2, then resumed: the same rollouts (sampler keys, data position), SPO's tracker,
    PPO's critic and old actor (at update 2 it is the actor after update 1), v3 PPO's minibatch count and
    optimizer steps, hence the same weights."""
    _, name, metrics = RUNS[mode]
    prompts = agent_prompts if mode == "agent" else prompts
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(rl_argv(mode, small_tokenizer, prompts, whole)) == 0
    logged = records(whole, name)
    assert len(logged) == (6 if mode == "ppo" else 3)  # 6 prompts in batches of 2 (2510 PPO: of 1)
    for metric in metrics:
        assert all(np.isfinite(r[metric]) for r in logged), metric
    assert all(1 <= r["avg_response_len"] <= 12 for r in logged if "avg_response_len" in r)
    printed = capsys.readouterr().out
    assert ", Reward:" in printed
    assert "no --reward_model_path: only MiniMind's rule rewards count" in printed
    weights = torch.load(whole / f"{name}.pth", weights_only=True)
    assert {value.dtype for value in weights.values()} == {torch.float16}
    assert "lm_head.weight" in weights and "model.embed_tokens.weight" in weights and len(weights) > 10

    assert main([*rl_argv(mode, small_tokenizer, prompts, cut), "--max_steps", "2"]) == 0
    assert main([*rl_argv(mode, small_tokenizer, prompts, cut), "--from_resume", "1"]) == 0
    resumed = torch.load(cut / f"{name}.pth", weights_only=True)
    assert all(torch.equal(resumed[key], weights[key]) for key in weights)
    assert [r["reward"] for r in records(cut, name)] == [r["reward"] for r in logged]


def replay_file(path, completions, **fields):
    prompt = "<|im_start|>user\nhi cat<|im_end|>\n<|im_start|>assistant\n"
    return write_jsonl(path, [{"prompt": prompt, "completions": completions, **fields}] * 2)


@pytest.mark.parametrize(
    "case, message",
    [
        ("three_completions", "rollouts.jsonl:1: 3 completions; --num_generations 4 needs 4"),
        ("id_out_of_range", "rollouts.jsonl:1: completion 1 holds id 7000, outside the vocabulary (0..6399)"),
        ("after_eos", "rollouts.jsonl:1: completion 0 goes on after eos (2)"),
        ("short_without_eos", "rollouts.jsonl:1: completion 0 has 3 ids and no eos"),
        ("nan_reward", "rollouts.jsonl:1: 'rewards' must be 4 finite numbers"),
        ("empty_replay", "rollouts.jsonl: no replay record (the file is empty)"),
        ("empty_prompts", "rlaif.jsonl: no usable prompt (the file is empty)"),
        ("missing_reward_model", "--reward_model_path"),
    ],
)
def test_bad_rl_input_is_one_line_and_writes_nothing(small_tokenizer, prompts, tmp_path, capsys, case, message):
    out, data = tmp_path / "out", prompts
    ok = [[5, 6, 2], [7, 2], [8, 9, 10, 2], [2]]
    extra = []
    if case == "empty_prompts":
        data = write_jsonl(tmp_path / "rlaif.jsonl", [])
    elif case == "missing_reward_model":
        extra = ["--reward_model_path", str(tmp_path / "internlm2-1_8b-reward")]
    else:
        completions = {
            "three_completions": ok[:3],
            "id_out_of_range": [ok[0], [7000, 2], *ok[2:]],
            "after_eos": [[5, 2, 6], *ok[1:]],
            "short_without_eos": [[5, 6, 7], *ok[1:]],
        }.get(case, ok)
        fields = {"rewards": [0.0, float("nan"), 1.0, 1.0]} if case == "nan_reward" else {}
        replay = replay_file(tmp_path / "rollouts.jsonl", completions, **fields)
        if case == "empty_replay":
            replay = write_jsonl(replay, [])
        extra = ["--rollouts", str(replay)]
    argv = grpo_argv(small_tokenizer, data, out, *extra)
    argv[argv.index("--tokenizer_path") + 1] = str(small_tokenizer)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (out / "grpo_32.pth").exists() and not any((out / "checkpoints").glob("*/*"))


@pytest.mark.parametrize(
    "case, message",
    [
        ("turns_beyond_the_last", "rollouts.jsonl:1: trajectory 0 records 2 turns, but its tool calls end it after 1"),
        ("four_turns", "rollouts.jsonl:1: trajectory 0 is not a list of 1 to 3 turns of ids"),
        ("turn_after_eos", "rollouts.jsonl:1: trajectory 1 turn 0: a turn ends at its first eos (2)"),
        ("no_gt", "agent_rl.jsonl: no usable record"),
    ],
)
def test_bad_agent_input_is_one_line_and_writes_nothing(small_tokenizer, agent_prompts, tmp_path, capsys, case,
                                                        message):  # fmt: skip
    out, data, extra = tmp_path / "out", agent_prompts, []
    if case == "no_gt":
        data = write_jsonl(tmp_path / "agent_rl.jsonl", [{"conversations": [{"role": "user", "content": "hi"},
                                                                             {"role": "assistant", "content": "x"}]}])  # fmt: skip
    else:
        trajectories = {"turns_beyond_the_last": [[[5, 2], [6, 2]], [[7, 2]]],
                        "four_turns": [[[5, 2]] * 4, [[7, 2]]],
                        "turn_after_eos": [[[5, 2]], [[7, 2, 8]]]}[case]  # fmt: skip
        record = {"conversations": [{"role": "user", "content": "hi cat"}, {"role": "assistant", "content": "x"}],
                  "gt": ["cat"], "completions": trajectories}  # fmt: skip
        extra = ["--rollouts", str(write_jsonl(tmp_path / "rollouts.jsonl", [record] * 2))]
    assert main([*rl_argv("agent", small_tokenizer, data, out), *extra]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (out / "agent_32.pth").exists() and not any((out / "checkpoints").glob("*/*"))


@pytest.mark.parametrize("failure, message", [("return [float('nan')] * len(completions)", "returned nan for completion 0"),
                                              ("raise ValueError('service down')", "raised ValueError: service down")])  # fmt: skip
def test_a_reward_fn_that_fails_mid_run_keeps_the_updates_before_it(small_tokenizer, prompts, tmp_path, capsys,
                                                                     monkeypatch, failure, message):  # fmt: skip
    """The function fails on its third call: updates 1 and 2 stay saved, and the error is one line."""
    module = f"flaky_rewards_{abs(hash(failure))}"
    (tmp_path / f"{module}.py").write_text(
        "calls = []\n"
        "def score(prompts, completions, **fields):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3:\n"
        f"        {failure}\n"
        "    return [float(len(c) % 3) for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main([*grpo_argv(small_tokenizer, prompts, out), "--reward_fn", f"{module}:score"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--reward_fn {module}:score {message}" in err
    assert "saved update 2" in err
    assert [r["update"] for r in records(out)] == [1, 2] and (out / "grpo_32.pth").exists()


@pytest.mark.parametrize("flag, value", [("--packing", "1"), ("--warmup_steps", "10"), ("--eval_data_path", "x.jsonl"),
                                         ("--loss_chunk_size", "128")])  # fmt: skip
def test_sft_flags_that_rl_has_no_use_for_are_refused(small_tokenizer, prompts, tmp_path, capsys, flag, value):
    assert main([*grpo_argv(small_tokenizer, prompts, tmp_path / "out"), flag, value]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag} does not apply to grpo" in err


def test_minimind_rl_command_lines_parse_and_sglang_is_pointed_to_rollouts(capsys):
    """MiniMind's debugging and engine flags are accepted as its scripts take them (its torch engine is our
    sampler); its SGLang engine is refused in one line that names --rollouts."""
    extra = ["--debug_mode", "--debug_interval", "5", "--debug_log_ratio", "--sglang_base_url", "http://x:1",
             "--device", "cpu"]  # fmt: skip
    for command in ("grpo", "ppo", "agent"):
        parser = argparse.ArgumentParser()
        add_arguments(parser, command)
        cfg = config_from_args(parser.parse_args([*extra, "--rollout_engine", "torch"]), command)
        assert cfg.mode == command
    assert main(["grpo", "--rollout_engine", "sglang"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--rollout_engine sglang" in err and "--rollouts" in err
