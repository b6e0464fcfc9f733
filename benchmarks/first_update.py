"""Time to the first update of a training command: from its start until its first loss line, cold (an empty
persistent compilation cache) and then warm (the same command again, on the cache the first run filled).

    python benchmarks/first_update.py --repo . -- sft --data_path D --tokenizer_path T --from_weight none \
        --hidden_size 768 --num_hidden_layers 16 --batch_size 16 --max_seq_len 512

Each run is `python main.py ARGS --max_steps 1` in the checkout --repo (so an older commit's checkout can be
timed the same way), with its own --save_dir and --checkpoint_dir and the shared --compilation_cache_dir in a
temporary directory. One JSON line per run: seconds to the first loss line (MiniMind's `Epoch:[…]` line), to the
end, and the `compiled in …` line when the command prints one.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time


def timed_run(repo: pathlib.Path, args: list[str], workdir: pathlib.Path, cache: pathlib.Path, label: str) -> dict:
    out = workdir / label
    command = [sys.executable, "main.py", *args, "--max_steps", "1", "--no_progress"]
    command += [
        "--save_dir",
        str(out),
        "--checkpoint_dir",
        str(out / "checkpoints"),
        "--compilation_cache_dir",
        str(cache),
    ]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_loss, compiled = None, None
    for line in process.stdout:
        if line.startswith("Epoch:[") and first_loss is None:
            first_loss = time.perf_counter() - start
        if line.startswith("compiled in "):
            compiled = line.strip()
    if process.wait():
        raise SystemExit(f"{label}: exit status {process.returncode}")
    return {"run": label, "first_loss_line_s": round(first_loss, 1), "total_s": round(time.perf_counter() - start, 1),
            "compiled": compiled}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=".", help="the checkout whose main.py runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the training command's arguments")
    options = parser.parse_args()
    args = options.args[1:] if options.args[:1] == ["--"] else options.args
    repo = pathlib.Path(options.repo).resolve()
    with tempfile.TemporaryDirectory(prefix="first_update_") as tmp:
        workdir = pathlib.Path(tmp)
        for label in ("cold", "warm"):
            print(json.dumps(timed_run(repo, args, workdir, workdir / "xla_cache", label)), flush=True)


if __name__ == "__main__":
    main()
