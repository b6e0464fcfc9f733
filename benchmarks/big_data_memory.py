"""Peak host memory of preprocessing and training on a big SFT jsonl: the input pipeline streams.

    python benchmarks/big_data_memory.py --sizes_mb 100 400 [--work_dir /tmp/big_data] [--num_workers 2]

MiniMind reads its whole SFT jsonl into RAM (sft_512.jsonl is 7.5 GB). Here the file is tokenized chunk by
chunk into a memory-mapped cache and batches are read from that, so the peak RSS should not grow with the
size of the file. For each size this writes an SFT jsonl of about that many MB (the demo corpus's
conversations, joined and numbered so that no two records are the same), then runs `main.py sft` on it in a
child process: tokenize into a fresh cache, then `--max_steps` updates of a tiny model at max_seq_len 512. It
reports the time, the peak RSS of the largest process (the children's ru_maxrss: the trainer or a tokenizing
worker) and the peak of the summed RSS of the whole process tree (sampled every 0.2 s; shared pages are
counted once per process, so this overstates), overall and up to the moment the trainer prints its header
(data loaded and batched, nothing compiled yet), and prints one JSON object. On a CPU host the training
part also holds the model's activations (the "device" memory), which depend on batch and sequence length,
not on the data file.

Tokenizer: MiniMind's 2510 tokenizer from ../shared when present, else a SentencePiece one trained here.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import threading
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
# Runs a command and writes the ru_maxrss (KiB) of its process tree to a file: a fresh process per size, as
# RUSAGE_CHILDREN keeps the maximum over every child ever waited for.
MAXRSS_WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
    "sys.exit(code)"
)


def write_big_sft(path: pathlib.Path, size_bytes: int, conversations: list[list[dict]], seed: int = 0) -> int:
    """Writes about `size_bytes` of SFT records, each 1-4 corpus conversations joined, the first user turn
    numbered; returns the number of records."""
    rng = random.Random(seed)
    written = records = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_bytes:
            turns = [dict(turn) for _ in range(rng.randint(1, 4)) for turn in rng.choice(conversations)]
            turns[0]["content"] = f"[{records}] {turns[0]['content']}"
            line = json.dumps({"conversations": turns}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            records += 1
    return records


def process_tree_rss(root: int) -> int:
    """Summed resident bytes of `root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            total += int(pathlib.Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
        except (OSError, IndexError, ValueError):
            pass
    return total


def measure(command: list[str], log_path: pathlib.Path, maxrss_path: pathlib.Path) -> dict:
    """Runs `command` (main.py sft) in a child: wall time, ru_maxrss of its tree, and the sampled peak of its
    summed RSS, overall and while the data is prepared (until the trainer's header line)."""
    peak = data_peak = 0
    data_seconds = None
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", MAXRSS_WRAPPER, str(maxrss_path), *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=log_path.parent,
        )
        stopped = threading.Event()

        def sample():
            nonlocal peak, data_peak, data_seconds
            while not stopped.wait(0.2):
                rss = process_tree_rss(process.pid)
                peak = max(peak, rss)
                if data_seconds is None:
                    data_peak = max(data_peak, rss)
                    if any(line.startswith("sft: ") for line in log_path.read_text().splitlines()):
                        data_seconds = time.perf_counter() - start

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        stopped.set()
        sampler.join()
    if code:
        raise SystemExit(f"{' '.join(command)} failed (exit {code}); see {log_path}")
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "data_ready_seconds": round(data_seconds, 1),
        "largest_process_peak_rss_mb": round(int(maxrss_path.read_text()) / 1024, 1),
        "process_tree_peak_rss_mb": round(peak / 2**20, 1),
        "process_tree_peak_rss_mb_until_data_ready": round(data_peak / 2**20, 1),
    }


def tokenizer_path(work_dir: pathlib.Path, corpus: dict) -> str:
    shared = REPO_ROOT.parent / "shared" / "minimind" / "2510"
    if shared.is_dir():
        return str(shared)
    from minimind_jax.data.tokenizer import train_sentencepiece

    return str(train_sentencepiece([corpus["pretrain"]], work_dir / "tokenizer" / "sp", vocab_size=6400))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes_mb", type=float, nargs="+", default=[100, 400])
    parser.add_argument("--work_dir", default="/tmp/minimind_big_data")
    parser.add_argument("--num_workers", type=int, default=None, help="tokenizing processes (default: one per CPU)")
    parser.add_argument("--max_steps", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--loss_chunk_size", type=int, default=128, help="lm_head + CE this many positions at a time")
    parser.add_argument("--keep", action="store_true", help="keep the generated files and caches")
    args = parser.parse_args(argv)

    from minimind_jax.data.corpus import build_corpus

    work_dir = pathlib.Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(work_dir / "corpus")
    conversations = [json.loads(line)["conversations"] for line in corpus["sft"].read_text("utf-8").splitlines()]
    tokenizer = tokenizer_path(work_dir, corpus)
    results = {"tokenizer": tokenizer, "cpus": os.cpu_count(), "runs": []}
    for size_mb in args.sizes_mb:
        run_dir = work_dir / f"sft_{size_mb:g}mb"
        run_dir.mkdir(exist_ok=True)
        data_path = run_dir / "sft.jsonl"
        records = write_big_sft(data_path, int(size_mb * 2**20), conversations)
        command = [
            sys.executable,
            str(REPO_ROOT / "main.py"),
            "sft",
            "--data_path",
            str(data_path),
            "--tokenizer_path",
            tokenizer,
            "--from_weight",
            "none",
            "--hidden_size",
            "64",
            "--num_hidden_layers",
            "2",
            "--max_seq_len",
            str(args.max_seq_len),
            "--batch_size",
            str(args.batch_size),
            "--max_steps",
            str(args.max_steps),
            "--log_interval",
            "1",
            "--save_interval",
            "1000000",
            "--loss_chunk_size",
            str(args.loss_chunk_size),
            "--cache_dir",
            str(run_dir / "cache"),
            "--save_dir",
            str(run_dir / "out"),
            "--checkpoint_dir",
            str(run_dir / "checkpoints"),
            "--no_progress",
        ]
        if args.num_workers is not None:
            command += ["--num_workers", str(args.num_workers)]
        figures = measure(command, run_dir / "train.log", run_dir / "maxrss_kib")
        run = {
            "file_mb": round(data_path.stat().st_size / 2**20, 1),
            "records": records,
            **figures,
            "records_per_s_until_data_ready": round(records / figures["data_ready_seconds"], 1),
        }
        results["runs"].append(run)
        print(json.dumps(run), file=sys.stderr, flush=True)
        if not args.keep:
            data_path.unlink()
            subprocess.run(["rm", "-rf", str(run_dir / "cache"), str(run_dir / "checkpoints")], check=True)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
