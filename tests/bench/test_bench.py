"""The bench's plumbing on a tiny model: same weights and batches on every side (PyTorch in processes of its
own), figures present, errors in one line."""

import argparse
import json
import math
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import main
from minimind_jax.bench import train_step as bench
from tests.conftest import REPO_ROOT

TINY_PRESET = "arch: minimind2\nhidden_size: 64\nnum_hidden_layers: 2\n"


def bench_args(**changes):
    fields = dict(
        objective="sft",
        packing=False,
        loss_chunk_size=None,
        attention_impl=None,
        remat="none",
        scan_layers=None,
        fast_path=1,
        ablation=False,
        literal_row=1,
    )
    return argparse.Namespace(**{**fields, **changes})


def test_bench_rows_default_literal_and_ablation():
    variants = bench.variants_for(bench_args(), "cpu", "float32", 511)
    assert [v.name for v in variants] == ["default (main.py sft)", "--fast_path 0 (MiniMind's literal)"]
    assert bench.settings_of(variants[0]) == (False, 512, "causal_blocks", "none", False)
    assert bench.settings_of(variants[1]) == (False, None, "xla", "none", True)
    assert bench.variants_for(bench_args(fast_path=0), "cpu", "float32", 511) == variants[1:]
    assert bench.variants_for(bench_args(literal_row=0), "cpu", "float32", 511) == variants[:1]
    asked = bench.variants_for(bench_args(packing=True, loss_chunk_size=0), "cpu", "float32", 511)[0]
    assert (asked.name, bench.settings_of(asked)) == ("", (True, None, "causal_blocks", "none", False))

    ablation = bench.variants_for(bench_args(ablation=True), "cpu", "float32", 511)
    settings = [bench.settings_of(v) for v in ablation]
    assert len(set(settings)) == len(settings), "a variant is measured twice"
    assert ablation[:2] == variants and {v.attention_impl for v in ablation} == {"xla", "causal_blocks"}
    assert any(v.packing and v.loss_chunk_size and v.attention_impl != "xla" and not v.scan_layers for v in ablation)
    gpu = bench.variants_for(bench_args(ablation=True), "gpu", "bfloat16", 512)
    assert gpu[0].attention_impl == "cudnn" and gpu[0].scan_layers  # accelerators keep lax.scan


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_data")


@pytest.fixture
def tiny_preset(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_PRESET)
    return path


def run_bench(capsys, *flags):
    assert main.main(["bench", *flags]) == 0
    return capsys.readouterr().out


def test_bench_runs_every_side_on_the_same_batches(capsys, data_dir, tiny_preset):
    """Tiny model, 8 simulated devices: the JSON has every figure, no step recompiles, and our default and
    literal steps and the torch reference's step (in its own process), from the same weights on the same
    batches, log the same losses."""
    out = run_bench(
        capsys,
        "--preset",
        str(tiny_preset),
        "--batch_size",
        "8",
        "--max_seq_len",
        "128",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--num_records",
        "80",
        "--data_dir",
        str(data_dir),
        "--loss_chunk_size",
        "64",
        "--json",
    )
    result = json.loads(out)
    for key in (
        "tokens_per_s",
        "loss_tokens_per_s",
        "torch_tokens_per_s",
        "compile_s",
        "peak_memory_bytes",
        "mfu",
        "speedup",
        "loss_tokens_speedup",
    ):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert 0 <= result["data_wait_fraction"] < 1
    assert result["recompilations"] == 0
    ours, literal, torch_row = result["rows"]
    assert ours["settings"] == {
        "name": "",
        "packing": False,
        "loss_chunk_size": 64,
        "attention_impl": "causal_blocks",
        "remat": "none",
        "scan_layers": False,
    }
    assert literal["name"].startswith("ours, --fast_path 0") and literal["settings"]["attention_impl"] == "xla"
    assert result["baseline"] == torch_row["name"] == "PyTorch: project torch reference, own process"
    assert "speedup" in ours and "speedup" in literal and "speedup" not in torch_row
    (process,) = result["setup"]["torch_processes"]
    assert process["pid"] not in (os.getpid(), result["setup"]["pid"]) and process["python"] == sys.executable
    assert result["setup"]["devices"] == jax.device_count() and result["setup"]["seq_len"] == 127
    assert 0 < result["setup"]["padded_loss_fraction"] < result["setup"]["packed_loss_fraction"] < 1
    np.testing.assert_allclose(ours["losses"], torch_row["losses"], rtol=1e-4)
    np.testing.assert_allclose(literal["losses"], torch_row["losses"], rtol=1e-4)
    assert ours["memory_bytes"] > 0
    assert bench.format_table(result).count("\n") > 5


def minimind_checkout(era: str):
    """A MiniMind checkout of the era next to the repository and an interpreter with transformers, or skip."""
    directory = REPO_ROOT.parent / ("minimind-2510" if era == "2510" else "minimind")
    if not (directory / "model" / "model_minimind.py").is_file():
        pytest.skip(f"no MiniMind {era} checkout at {directory}")
    python = os.environ.get("MINIMIND_TORCH_PYTHON", sys.executable)
    if subprocess.run([python, "-c", "import transformers"], capture_output=True).returncode:
        pytest.skip(f"{python} has no transformers (set MINIMIND_TORCH_PYTHON to an interpreter that has)")
    if bench.minimind_checkout_arch(str(directory)) != {"2510": "minimind2", "v3": "minimind3"}[era]:
        pytest.skip(f"{directory} is not MiniMind's {era} code")
    return directory, python


@pytest.mark.parametrize("era, arch", [("2510", "minimind2"), ("v3", "minimind3")])
def test_bench_times_minimind_own_model_from_the_same_weights(era, arch, capsys, data_dir, tmp_path):
    """--minimind_dir: MiniMind's own MiniMindForCausalLM (MoE, so the expert and router mapping is used too)
    with its train_full_sft loss, in its own process, from our initial weights: the same losses as ours."""
    directory, python = minimind_checkout(era)
    preset = tmp_path / "tiny_moe.yaml"
    preset.write_text(f"arch: {arch}\nhidden_size: 64\nnum_hidden_layers: 2\nuse_moe: true\n")
    result = json.loads(
        run_bench(
            capsys,
            "--preset",
            str(preset),
            "--batch_size",
            "8",
            "--max_seq_len",
            "64",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--num_records",
            "80",
            "--data_dir",
            str(data_dir),
            "--minimind_dir",
            str(directory),
            "--torch_python",
            python,
            "--json",
        )
    )
    names = [row["name"] for row in result["rows"]]
    assert names[2:] == [
        "PyTorch: project torch reference, own process",
        "PyTorch: MiniMind's model_minimind.py, own process",
    ]
    assert result["baseline"] == names[3]
    assert result["setup"]["torch_processes"][1]["model_class"].endswith("MiniMindForCausalLM")
    for row in result["rows"][:3]:
        np.testing.assert_allclose(row["losses"], result["rows"][3]["losses"], rtol=1e-4)


@pytest.mark.parametrize("era, arch, moe", [("2510", "minimind2", False), ("v3", "minimind3", True)])
def test_bench_times_minimind_under_torch_compile(era, arch, moe, capsys, data_dir, tmp_path):
    """--torch_compile: MiniMind's own model through torch.compile (dynamo's eager backend: the plumbing, not
    inductor's minute of C++ builds on a CPU) in a process of its own, from the same weights: the losses of its
    eager run, which stays the baseline; its first step's extra time is its compile time."""
    directory, python = minimind_checkout(era)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(f"arch: {arch}\nhidden_size: 64\nnum_hidden_layers: 2\nuse_moe: {str(moe).lower()}\n")
    flags = ["--preset", str(preset), "--batch_size", "8", "--max_seq_len", "64", "--steps", "2", "--warmup", "1"]
    flags += ["--num_records", "80", "--data_dir", str(data_dir), "--minimind_dir", str(directory)]
    flags += ["--torch_python", python, "--torch_reference", "0", "--literal_row", "0", "--json"]
    result = json.loads(run_bench(capsys, *flags, "--torch_compile", "1", "--torch_compile_backend", "eager"))
    ours, eager, compiled = result["rows"]
    assert eager["name"] == result["baseline"] == "PyTorch: MiniMind's model_minimind.py, own process"
    assert compiled["name"] == "PyTorch: MiniMind's model_minimind.py + torch.compile, own process"
    assert compiled["compile_s"] > 0 and eager["compile_s"] == 0 and "speedup" in compiled
    if not moe:  # MiniMind's MoE routes a different number of tokens to each expert every step: new shapes
        assert compiled["recompilations"] == 0
    assert result["setup"]["torch_processes"][1]["model_class"].endswith("MiniMindForCausalLM")
    for row in (ours, compiled):
        np.testing.assert_allclose(row["losses"], eager["losses"], rtol=1e-4)


@pytest.mark.parametrize("era, arch", [("2510", "minimind2"), ("v3", "minimind3")])
def test_bench_decode_against_minimind_generate(era, arch, capsys, data_dir, tmp_path):
    """--decode_only with --minimind_dir: our generate and MiniMind's own (its process) on the same prompts,
    each batch size's ratio from the two rates. MiniMind 2510's generate is transformers' and loses its KV cache
    under transformers 5: the bench says so instead of timing it."""
    directory, python = minimind_checkout(era)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(f"arch: {arch}\nhidden_size: 64\nnum_hidden_layers: 2\n")
    flags = ["--preset", str(preset), "--decode_only", "--decode_batch_sizes", "1,3", "--decode_new_tokens", "5"]
    result = json.loads(run_bench(capsys, *flags, "--minimind_dir", str(directory), "--torch_python", python, "--json"))
    rows = result["decode"]
    assert [(row["batch"], row["new_tokens"], row["prompt_len"]) for row in rows] == [(1, 5, 64), (3, 5, 64)]
    transformers_major = subprocess.run(
        [python, "-c", "import transformers; print(transformers.__version__.split('.')[0])"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if era == "2510" and int(transformers_major) >= 5:
        assert "does not continue greedily" in result["minimind_decode_error"]
        assert all("speedup" not in row for row in rows)
        return
    info = result["minimind_decode"]["info"]
    assert info["model_class"].endswith("MiniMindForCausalLM") and info["dtype"] == "float32"
    for row, theirs in zip(rows, result["minimind_decode"]["rows"]):
        assert theirs["greedy_agreement"] >= 0.5 and theirs["batch"] == row["batch"]
        assert row["speedup"] == pytest.approx(row["tokens_per_s"] / theirs["tokens_per_s"])


def objective_bench(capsys, data_dir, tmp_path, objective: str, arch: str, *flags) -> dict:
    """A tiny (MoE) model of the era, and for distillation a wider dense teacher: 2 turns of every side."""
    preset, teacher = tmp_path / "tiny_moe.yaml", tmp_path / "teacher.yaml"
    preset.write_text(f"arch: {arch}\nhidden_size: 64\nnum_hidden_layers: 2\nuse_moe: true\n")
    teacher.write_text(f"arch: {arch}\nhidden_size: 96\nnum_hidden_layers: 2\n")
    out = run_bench(
        capsys,
        *("--objective", objective, "--preset", str(preset), "--teacher_preset", str(teacher)),
        *("--batch_size", "8", "--max_seq_len", "64", "--steps", "2", "--warmup", "0"),
        *("--num_records", "80", "--data_dir", str(data_dir), "--json", *flags),
    )
    return json.loads(out)


@pytest.mark.parametrize("objective, arch", [("lora", "minimind2"), ("dpo", "minimind3"), ("distill", "minimind3"),
                                             ("dpo", "minimind2")])  # fmt: skip
def test_bench_objective_steps_agree_with_the_torch_reference(objective, arch, capsys, data_dir, tmp_path):
    """--objective: our default and literal steps, built as `main.py {objective}` builds them, and the torch
    reference's step of MiniMind's script (own process), from the same weights (LoRA: the same adapters) on
    the same batches (DPO: pairs), log the same losses before and after an update."""
    result = objective_bench(capsys, data_dir, tmp_path, objective, arch)
    ours, literal, reference = result["rows"]
    assert ours["name"].startswith(f"ours, default (main.py {objective})")
    assert reference["name"] == result["baseline"] == "PyTorch: project torch reference, own process"
    assert result["setup"]["objective"] == objective and result["recompilations"] == 0
    assert ours["settings"]["loss_chunk_size"] == (None if objective in ("dpo", "distill") else 512)
    teacher = result["setup"]["teacher"]
    assert teacher.startswith("96 × 2, ") if objective == "distill" else teacher is None
    if (objective, arch) == ("dpo", "minimind2"):  # policy = reference: log 2 (v3 adds the MoE aux loss)
        assert ours["losses"][0] == pytest.approx(math.log(2), rel=1e-6)
    for row in (ours, literal):
        np.testing.assert_allclose(row["losses"], reference["losses"], rtol=1e-4)
    assert ours["losses"][1] != ours["losses"][0]


@pytest.mark.parametrize("objective", ["lora", "dpo", "distill"])
@pytest.mark.parametrize("era, arch", [("2510", "minimind2"), ("v3", "minimind3")])
def test_bench_objective_times_minimind_own_code(objective, era, arch, capsys, data_dir, tmp_path):
    """With a MiniMind checkout: its own model class (and model_lora.apply_lora) with its script's loss logs
    the losses of our step."""
    directory, python = minimind_checkout(era)
    flags = ("--minimind_dir", str(directory), "--torch_python", python, "--torch_reference", "0")
    result = objective_bench(capsys, data_dir, tmp_path, objective, arch, *flags)
    ours, literal, minimind = result["rows"]
    assert minimind["name"] == result["baseline"] == "PyTorch: MiniMind's model_minimind.py, own process"
    for row in (ours, literal):
        np.testing.assert_allclose(row["losses"], minimind["losses"], rtol=1e-4)


def test_bench_table_without_torch_reports_variants_that_cannot_run(capsys, data_dir, tiny_preset, monkeypatch):
    asked = bench.variants_for
    unsupported = bench.Variant("cudnn attention in float32", attention_impl="cudnn")
    monkeypatch.setattr(bench, "variants_for", lambda *args: asked(*args) + [unsupported])
    out = run_bench(
        capsys,
        "--preset",
        str(tiny_preset),
        "--batch_size",
        "8",
        "--max_seq_len",
        "64",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--num_records",
        "80",
        "--data_dir",
        str(data_dir),
        "--no_torch",
        "--packing",
        "--fast_path",
        "0",
        "--attention_impl",
        "causal_blocks",
    )
    assert "ours (packed, full logits, causal_blocks, scanned)" in out
    assert "ours, --fast_path 0 (MiniMind's literal) (padded, full logits, xla, scanned)" in out
    assert "PyTorch" not in out and "tokens/s" in out
    assert (
        "cudnn attention in float32 (padded, full logits, cudnn, scanned): could not run here (UserError: "
        "attention_impl=cudnn needs dtype" in out
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch_size", "3"], "--batch_size 3 is not divisible"),
        (["--num_records", "0"], "--num_records must be at least 1"),
        (["--preset", "no-such-preset"], "--preset no-such-preset"),
        (["--loss_chunk_size", "-1"], "--loss_chunk_size must be at least 0"),
        (["--minimind_dir", "/nonexistent"], "--minimind_dir /nonexistent: no model/model_minimind.py there"),
        (["--torch_python", "/nonexistent/python"], "--torch_python /nonexistent/python: not an executable"),
        (["--minimind_dir", str(REPO_ROOT), "--no_torch"], "--minimind_dir times a PyTorch side"),
        (["--torch_compile", "1"], "--torch_compile compiles MiniMind's own model: it needs --minimind_dir"),
        (["--decode", "--decode_batch_sizes", "1,x"], "--decode_batch_sizes 1,x: comma-separated positive"),
        (["--decode_only", "--decode_new_tokens", "0"], "--decode_new_tokens must be at least 1"),
    ],
)
def test_bench_bad_flags_are_one_line_errors(flags, message, capsys, data_dir):
    assert main.main(["bench", "--data_dir", str(data_dir), "--steps", "1", *flags]) == 1
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error


def fake_minimind_checkout(directory, source: str):
    (directory / "model").mkdir()
    (directory / "model" / "model_minimind.py").write_text(source)
    return directory


def test_bench_refuses_a_minimind_checkout_of_the_other_era(capsys, data_dir, tmp_path):
    v3_code = fake_minimind_checkout(tmp_path, "self.num_experts = kwargs.get('num_experts', 4)\n")
    assert main.main(["bench", "--data_dir", str(data_dir), "--minimind_dir", str(v3_code)]) == 1
    error = capsys.readouterr().err.strip()
    assert "holds MiniMind's minimind3 model code but --preset minimind2-small is minimind2" in error
    assert "\n" not in error


def test_bench_says_why_a_pytorch_process_failed(capsys, data_dir, tiny_preset, tmp_path, monkeypatch):
    """A checkout whose model code cannot be imported (here: it raises): one line with the process's last
    line of stderr, before any of our steps is compiled."""
    broken = fake_minimind_checkout(tmp_path, "n_routed_experts = 4\nraise ImportError('no transformers here')\n")
    monkeypatch.setattr(bench, "JaxSide", None)  # never reached
    assert (
        main.main(
            [
                "bench",
                "--preset",
                str(tiny_preset),
                "--batch_size",
                "8",
                "--max_seq_len",
                "64",
                "--num_records",
                "80",
                "--data_dir",
                str(data_dir),
                "--minimind_dir",
                str(broken),
            ]
        )
        == 1
    )
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: PyTorch: MiniMind's model_minimind.py, own process")
    assert "exited with status 1: ImportError: no transformers here" in error


def rl_bench(capsys, data_dir, tmp_path, objective: str, arch: str, *flags) -> dict:
    preset = tmp_path / "tiny.yaml"
    preset.write_text(f"arch: {arch}\nhidden_size: 64\nnum_hidden_layers: 2\n")
    out = run_bench(
        capsys,
        *("--objective", objective, "--preset", str(preset), "--batch_size", "2", "--num_generations", "2"),
        *("--max_gen_len", "8", "--max_seq_len", "64", "--steps", "2", "--warmup", "1", "--num_records", "80"),
        *("--data_dir", str(data_dir), "--mesh", "data=2", "--json", *flags),
    )
    return json.loads(out)


@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_bench_rl_times_each_part_of_our_update(objective, capsys, data_dir, tmp_path):
    """v3's GRPO (CISPO) and PPO (2 epochs of minibatches per rollout): the rollout, its old log-probs and the
    rest, which add up to the whole update."""
    result = rl_bench(capsys, data_dir, tmp_path, objective, "minimind3", "--no_torch")
    (ours,) = result["sides"]
    assert result["setup"]["num_generations"] == (2 if objective == "grpo" else 1) and len(ours["turns"]) == 2
    for turn in ours["turns"]:
        assert turn["rollout_s"] > 0 and turn["log_probs_s"] > 0 and turn["update_s"] > 0  # both read them
        assert turn["seconds"] == pytest.approx(turn["rollout_s"] + turn["log_probs_s"] + turn["update_s"])
        assert 1 <= turn["avg_response_len"] <= 8


@pytest.mark.parametrize("objective", ["grpo", "ppo"])
@pytest.mark.parametrize("era, arch", [("2510", "minimind2"), ("v3", "minimind3")])
def test_bench_rl_times_minimind_own_trainer(objective, era, arch, capsys, data_dir, tmp_path):
    """With a MiniMind checkout: its train_grpo.py's or train_ppo.py's whole update on the same prompts, in its
    own process."""
    directory, python = minimind_checkout(era)
    # Its trainers import `datasets`; 2510's rollout is HF generate, whose KV cache transformers 5 changed.
    needs = "import datasets, transformers; assert int(transformers.__version__.split('.')[0]) < 5 or " + repr(
        era == "v3"
    )
    if subprocess.run([python, "-c", needs], capture_output=True).returncode:
        pytest.skip(f"{python} lacks MiniMind's requirements for its {era} trainer (datasets, transformers<5 for 2510)")
    result = rl_bench(capsys, data_dir, tmp_path, objective, arch, "--minimind_dir", str(directory),
                      "--torch_python", python)  # fmt: skip
    ours, minimind = result["sides"]
    assert minimind["name"] == f"MiniMind's train_{objective}.py (own process)"
    for turn in minimind["turns"]:
        assert turn["rollout_s"] > 0 and 1 <= turn["avg_response_len"] <= 8
        assert (turn["log_probs_s"] is None) == (era == "2510")  # 2510 computes them inside its update
    assert result["speedup"]["update"] == pytest.approx(minimind["median"]["seconds"] / ours["median"]["seconds"])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_bench_serve_times_clients_that_arrive_apart(capsys, chat_data, tmp_path):
    """Both of our batching modes, each in its own server process, on the same Poisson arrivals: every
    request is counted, and a first token never comes after the reply's end."""
    preset = tmp_path / "tiny.yaml"
    preset.write_text("arch: minimind2\nhidden_size: 64\nnum_hidden_layers: 2\n")
    flags = ["--preset", str(preset), "--tokenizer_path", str(chat_data["tokenizer"]), "--servers",
             "continuous,static", "--clients", "4", "--min_tokens", "4", "--max_tokens", "8", "--rate", "20",
             "--port", str(free_port()), "--json"]  # fmt: skip
    assert main.main(["bench_serve", *flags]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["server"] for row in result["servers"]] == ["continuous", "static"]
    assert result["rate_per_s"] == 20 and result["arrivals"] == "poisson"
    for row in result["servers"]:
        assert row["requests"] == 4 and 0 < row["completion_tokens"] <= 4 * 8
        assert 0 < row["ttft_p50_s"] <= row["latency_p50_s"] and row["ttft_p95_s"] <= row["latency_p95_s"]
        assert row["bound_tokens_per_s"] > 0
