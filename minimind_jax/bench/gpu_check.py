"""benchmarks/gpu_check.sh's Python: the data it carries and the summary it ends with.

`python -m minimind_jax.bench.gpu_check data DIR RECORDS` writes what `main.py bench --data_dir DIR
--num_records RECORDS` reads (bench_data's layout: the first RECORDS SFT records of the chat corpus and the
corpus's stats.json), so the GPU machine needs neither network nor the corpus packages.
`python -m minimind_jax.bench.gpu_check summary WORK_DIR RESULTS_JSON` reads the benches' status lines
(WORK_DIR/status.tsv: name, kind, exit status or "skipped", seconds, flags), their JSON (WORK_DIR/NAME.json) and
logs (WORK_DIR/NAME.log), prints one compact table of every figure and what failed, and writes it all to
RESULTS_JSON. Needs no JAX.
"""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import re
import shutil
import sys
import tempfile
from typing import Any

VERSIONS = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "torch", "numpy")
EXIT_MEANINGS = {124: "time limit", 137: "killed after the time limit"}
GIB = 2**30


def prepare_data(data_dir: pathlib.Path, records: int) -> pathlib.Path:
    """The subset bench_data reads (data_dir/sft_first_{records}.jsonl) and the corpus's stats.json, from a
    corpus built in a temporary directory; returns the subset's path."""
    from minimind_jax.data.corpus import build_corpus

    (data_dir / "corpus").mkdir(parents=True, exist_ok=True)
    subset = data_dir / f"sft_first_{records}.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_corpus(tmp)
        with open(paths["sft"], encoding="utf-8") as source:
            subset.write_text("".join(line for _, line in zip(range(records), source)), "utf-8")
        shutil.copy(paths["stats"], data_dir / "corpus" / "stats.json")
    return subset


# ---------------------------------------------------------------------------------------------------------
# Reading the benches


def read_benches(work_dir: pathlib.Path) -> list[dict[str, Any]]:
    """One entry per status line, in run order, with its result (None if it wrote none) and its log's tail."""
    benches = []
    status_file = work_dir / "status.tsv"
    lines = status_file.read_text().splitlines() if status_file.exists() else []
    for line in lines:
        name, kind, status, seconds, flags = line.split("\t")
        result_file, log_file = work_dir / f"{name}.json", work_dir / f"{name}.log"
        try:
            result = json.loads(result_file.read_text())
        except (OSError, ValueError):
            result = None
        log = log_file.read_text(errors="replace").splitlines() if log_file.exists() else []
        benches.append(
            {
                "name": name,
                "kind": kind,
                "status": status,
                "seconds": int(seconds),
                "flags": flags,
                "result": result,
                "log_tail": log[-8:],
            }
        )
    return benches


def environment(work_dir: pathlib.Path) -> dict[str, Any]:
    """The card (nvidia-smi's line, if the script saved one) and the installed versions of what runs."""
    gpu_file = work_dir / "gpu.txt"
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    gpu = gpu_file.read_text().strip() if gpu_file.exists() else ""
    return {"gpu": gpu or "no nvidia-smi", "versions": versions}


# ---------------------------------------------------------------------------------------------------------
# The summary


def status_text(bench: dict) -> str:
    if bench["status"] in ("0", "skipped"):
        return "ok" if bench["status"] == "0" else "skipped"
    code = int(bench["status"])
    return f"exit {code}" + (f" ({EXIT_MEANINGS[code]})" if code in EXIT_MEANINGS else "")


def side_label(row: dict) -> str:
    settings = row.get("settings")  # our rows have them
    if settings:
        parts = [settings["attention_impl"], "packed" if settings["packing"] else "padded"]
        parts += [f"remat {settings['remat']}"] if settings["remat"] != "none" else []
        return f"ours ({', '.join(parts)})"
    if "torch.compile" in row["name"]:
        return "MiniMind + torch.compile"
    return "MiniMind eager" if "MiniMind" in row["name"] else "torch reference"


def only_one_step(result: dict) -> bool:
    """Whether our process ran one step alone, so that its peak memory is that step's."""
    return sum("settings" in row for row in result["rows"]) == 1


def shape_label(setup: dict) -> str:
    moe = f" {setup['moe_impl']}" if setup.get("moe_impl") else ""
    return f"{setup['preset']} {setup['batch_size']}×{setup['seq_len']} {setup['dtype']}{moe}"


def mb(value) -> str:
    return f"{value / 2**20:,.0f}" if value else "-"


def train_lines(bench: dict) -> list[str]:
    result = bench["result"]
    lines = []
    for index, row in enumerate(result["rows"]):
        ours = "settings" in row
        # Our process's peak is its step's only when it ran one; XLA's own account is per step.
        peak = (result["peak_memory_bytes"] if only_one_step(result) else None) if ours else row["memory_bytes"]
        speedup = f"{row['speedup']:.2f}" if "speedup" in row else "1.00" if row["name"] == result["baseline"] else "-"
        lines.append(
            f"{shape_label(result['setup']) if index == 0 else '':<34} {side_label(row)[:36]:<36} "
            f"{row['tokens_per_s']:>10,.0f} {speedup:>6} {row['mfu']:>6.1%} {row['compile_s']:>8.1f} "
            f"{row['recompilations']:>6} {mb(peak):>8} {mb(row['memory_bytes']) if ours else '-':>7}"
        )
    return lines


def warm_line(bench: dict, benches: list[dict]) -> str:
    setup, row = bench["result"]["setup"], bench["result"]["rows"][0]
    cold = next(
        (
            other["result"]["rows"][0]["compile_s"]
            for other in benches
            if other["kind"] == "train" and other["result"] and same_step(other["result"]["setup"], setup)
        ),
        None,
    )
    cold_text = f" (cold {cold:.1f} s)" if cold is not None else ""
    return (
        f"warm compile, new process with the persistent cache: ours {shape_label(setup)} {row['compile_s']:.1f} s"
        f"{cold_text}, {row['compile_cache_hits']} cache hits"
    )


def same_step(a: dict, b: dict) -> bool:
    return all(a[key] == b[key] for key in ("preset", "batch_size", "seq_len", "dtype"))


def decode_line(bench: dict) -> str:
    result = bench["result"]
    rows = result.get("decode", [])
    if not rows:
        return "decode: no rows"
    first = rows[0]
    parts = []
    for row in rows:
        theirs = (
            f", MiniMind's generate {row['minimind_tokens_per_s']:,.0f}, ours × {row['speedup']:.2f}"
            if "speedup" in row
            else ""
        )
        parts.append(f"batch {row['batch']}: ours {row['tokens_per_s']:,.0f} tokens/s{theirs}")
    line = (
        f"decode {first['preset']} {result['setup']['dtype']}, prompt {first['prompt_len']} + "
        f"{first['new_tokens']} new tokens, eos off: " + "; ".join(parts)
    )
    if result.get("minimind_decode_error"):
        line += f"; MiniMind's generate failed: {result['minimind_decode_error']}"
    return line


def card_memory_bytes(gpu: str) -> int | None:
    """memory.total from nvidia-smi's line (name, memory.total, driver)."""
    found = re.search(r", (\d+) MiB", gpu)
    return int(found.group(1)) * 2**20 if found else None


def memory_lines(benches: list[dict], card_bytes: int | None = None) -> list[str]:
    """Peak device memory of our step at each measured batch, and the largest batch that would fit in JAX's
    allocator limit and in the card's memory, extrapolated on the line through the lowest and highest batch
    without remat (memory is about affine in the batch size); with remat, on the line from the same fixed part
    (weights and optimizer state) through its own point."""
    probes = [b for b in benches if b["kind"] == "memory" and b["result"]]
    if not probes:
        return []
    setup = probes[0]["result"]["setup"]
    points = {}  # remat: {batch: the highest peak seen at that batch}
    for bench in benches:
        result = bench["result"]
        if bench["kind"] not in ("train", "warm", "memory") or not only_one_step(result):
            continue
        if (result["setup"]["preset"], result["setup"]["seq_len"]) != (setup["preset"], setup["seq_len"]):
            continue
        peaks = points.setdefault(result["rows"][0]["settings"]["remat"], {})
        batch = result["setup"]["batch_size"]
        peaks[batch] = max(peaks.get(batch, 0), result["peak_memory_bytes"])
    measured = "; ".join(
        f"remat {remat}: " + ", ".join(f"batch {batch} {peak / GIB:.2f} GiB" for batch, peak in sorted(peaks.items()))
        for remat, peaks in points.items()
    )
    source = probes[0]["result"]["peak_memory_source"]
    lines = [f"memory, ours {setup['preset']} ×{setup['seq_len']} ({source}): {measured}"]
    plain = sorted(points.get("none", {}).items())
    limits = {"JAX's allocator limit": probes[0]["result"].get("memory_limit_bytes"), "the card": card_bytes}
    limits = {name: limit for name, limit in limits.items() if limit}
    if len(plain) < 2 or not limits:
        return lines + ["  (too few points or no device limit to extrapolate the largest batch)"]
    (b0, m0), (b1, m1) = plain[0], plain[-1]
    per_row = {"none": (m1 - m0) / (b1 - b0)}
    fixed = m0 - b0 * per_row["none"]
    for remat, peaks in points.items():
        if remat != "none":
            batch, peak = max(peaks.items())
            per_row[remat] = (peak - fixed) / batch
    lines.append(
        f"  extrapolated (affine in the batch), fixed {fixed / GIB:.2f} GiB + per row "
        + ", ".join(f"{rate / 2**20:,.1f} MiB (remat {remat})" for remat, rate in per_row.items())
    )
    for name, limit in limits.items():
        fits = ", ".join(f"remat {remat} ~{int((limit - fixed) / rate)}" for remat, rate in per_row.items())
        lines.append(f"  largest batch within {name} ({limit / GIB:.1f} GiB): {fits}")
    return lines


def summary_lines(benches: list[dict], env: dict, total_s: int | None = None) -> list[str]:
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items())
    minimind_env = {
        f"torch {p['torch']}, transformers {p.get('transformers')}"
        for bench in benches
        if bench["result"]
        for p in bench["result"].get("setup", {}).get("torch_processes", [])
    }
    lines = [
        "==== gpu_check summary" + (f" ({total_s} s)" if total_s is not None else ""),
        f"card: {env['gpu']}",
        f"ours: {versions}",
        f"MiniMind's processes: {'; '.join(sorted(minimind_env)) or '-'}",
        "benches: " + " | ".join(f"{b['name']} {status_text(b)} {b['seconds']} s" for b in benches),
        "",
        f"{'train step':<34} {'side':<36} {'tokens/s':>10} {'×eager':>6} {'MFU':>6} {'compile':>8} {'recomp':>6} "
        f"{'peak MB':>8} {'XLA MB':>7}",
    ]
    done = [b for b in benches if b["result"] and b["status"] == "0"]
    for bench in done:
        if bench["kind"] == "train":
            lines += train_lines(bench)
    for bench in done:
        if bench["kind"] == "warm":
            lines.append(warm_line(bench, benches))
        elif bench["kind"] == "decode":
            lines.append(decode_line(bench))
    lines += memory_lines(done, card_memory_bytes(env["gpu"]))
    train = [b for b in done if b["kind"] == "train"]
    if train:
        source = train[0]["result"]["setup"]["peak_flops_source"]
        lines.append(f"MFU against {source}; ×eager: tokens/s over MiniMind's eager step's, in the same turns")
    for bench in benches:
        if bench["status"] not in ("0", "skipped"):
            lines.append(f"FAILED {bench['name']}: {status_text(bench)}; main.py bench {bench['flags']}; last lines:")
            lines += [f"  | {line[:150]}" for line in bench["log_tail"]]
    return lines


def main(argv: list[str]) -> int:
    command, *rest = argv
    if command == "data":
        print(prepare_data(pathlib.Path(rest[0]), int(rest[1])))
    elif command == "summary":
        work_dir, results = pathlib.Path(rest[0]), pathlib.Path(rest[1])
        benches, env = read_benches(work_dir), environment(work_dir)
        total_s = int(rest[2]) if len(rest) > 2 else None
        print("\n".join(summary_lines(benches, env, total_s)))
        results.write_text(json.dumps({"environment": env, "total_s": total_s, "benches": benches}, indent=1))
    else:
        print(f"usage: {sys.argv[0]} data DIR RECORDS | summary WORK_DIR RESULTS_JSON [TOTAL_S]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
