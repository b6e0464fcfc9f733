"""benchmarks/gpu_check.sh: its shell parses, every module and name it imports exists, the data it carries is
what the bench reads, and its summary reports the benches' own figures and what failed."""

import argparse
import importlib
import importlib.util
import json
import re
import subprocess

import pytest

import main
from minimind_jax.bench import gpu_check
from minimind_jax.bench import train_step as bench
from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.sh"


@pytest.fixture
def tiny_preset(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("arch: minimind2\nhidden_size: 64\nnum_hidden_layers: 2\n")
    return path


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_every_python_module_and_name_the_script_uses_exists():
    text = SCRIPT.read_text()
    modules = re.findall(r"-m (minimind_jax[\w.]*)", text)
    imports = re.findall(r"from (minimind_jax[\w.]*) import ([\w, ]+)", text)
    assert modules and imports
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module
    for module, names in imports:
        loaded = importlib.import_module(module)
        for name in names.split(","):
            assert hasattr(loaded, name.strip()), f"{module}.{name.strip()}"


def test_prepared_data_is_what_the_bench_reads(tmp_path, monkeypatch):
    """`gpu_check.py data` writes bench_data's layout: the bench then builds no corpus (the GPU machine has
    neither network nor the corpus packages) and reads the first RECORDS records."""
    subset = gpu_check.prepare_data(tmp_path, 30)
    from minimind_jax.data import corpus

    monkeypatch.setattr(corpus, "build_corpus", lambda *args, **kwargs: pytest.fail("rebuilt the corpus"))
    args = argparse.Namespace(
        num_records=30, data_dir=str(tmp_path), objective="sft", tokenizer_path="unused", minimind_dir=None
    )
    data_path, _, _ = bench.bench_data(args)
    assert data_path == subset and len(subset.read_text().splitlines()) == 30
    assert all(json.loads(line)["conversations"] for line in subset.read_text().splitlines())


def test_summary_reports_the_benches_figures_and_failures(tmp_path, capsys, tiny_preset):
    """A real (tiny) bench's JSON and a failed bench's log: the summary's row carries the JSON's own tokens/s
    and compile time, and the failure its exit status and last log lines."""
    flags = ["--preset", str(tiny_preset), "--batch_size", "8", "--max_seq_len", "64", "--steps", "1"]
    flags += ["--warmup", "0", "--num_records", "80", "--data_dir", str(tmp_path / "data"), "--no_torch"]
    assert main.main(["bench", *flags, "--literal_row", "0", "--json"]) == 0
    (tmp_path / "tiny.json").write_text(capsys.readouterr().out)
    (tmp_path / "broken.log").write_text("starting\nTraceback (most recent call last):\nValueError: no luck\n")
    status = [
        f"tiny\ttrain\t0\t12\t{' '.join(flags)}",
        "broken\ttrain\t124\t30\t--preset x",
        "late\tdecode\tskipped\t0\t",
    ]
    (tmp_path / "status.tsv").write_text("\n".join(status) + "\n")

    results = tmp_path / "results.json"
    assert gpu_check.main(["summary", str(tmp_path), str(results), "99"]) == 0
    out = capsys.readouterr().out
    row = json.loads((tmp_path / "tiny.json").read_text())["rows"][0]
    (line,) = [line for line in out.splitlines() if line.startswith(f"{tiny_preset} 8×63")]
    assert f"{row['tokens_per_s']:,.0f}" in line and f"{row['compile_s']:.1f}" in line
    assert "tiny ok 12 s | broken exit 124 (time limit) 30 s | late skipped 0 s" in out
    assert "FAILED broken: exit 124 (time limit)" in out and "  | ValueError: no luck" in out
    saved = json.loads(results.read_text())
    assert [b["name"] for b in saved["benches"]] == ["tiny", "broken", "late"] and saved["total_s"] == 99
    assert saved["benches"][0]["result"]["rows"][0] == row


def memory_bench(kind: str, batch: int, remat: str, peak: float, limit: float | None = None) -> dict:
    setup = {"preset": "minimind2", "seq_len": 511, "batch_size": batch}
    rows = [{"settings": {"remat": remat}}]
    memory = {"peak_memory_bytes": peak, "peak_memory_source": "peak_bytes_in_use", "memory_limit_bytes": limit}
    return {"kind": kind, "result": {"setup": setup, "rows": rows, **memory}}


def test_memory_probe_extrapolates_the_largest_batch_on_a_line():
    """Peaks exactly affine in the batch (fixed part + per-row rate): the largest batch within each limit is
    where that line meets it; remat's line shares the fixed part."""
    fixed, rate, remat_rate, limit = 3 * gpu_check.GIB, 400 * 2**20, 90 * 2**20, 60 * gpu_check.GIB
    card = gpu_check.card_memory_bytes("NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04")
    assert card == 81559 * 2**20
    benches = [
        memory_bench("train", 16, "none", fixed + 16 * rate),
        memory_bench("memory", 64, "none", fixed + 64 * rate, limit),
        memory_bench("memory", 64, "full", fixed + 64 * remat_rate, limit),
    ]
    lines = gpu_check.memory_lines(benches, card)
    assert "remat none: batch 16 " in lines[0] and "remat full: batch 64 " in lines[0]
    for line, bound in zip(lines[2:], (limit, card)):
        assert f"remat none ~{int((bound - fixed) / rate)}, remat full ~{int((bound - fixed) / remat_rate)}" in line
