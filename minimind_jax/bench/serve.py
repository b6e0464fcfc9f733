"""`python main.py bench_serve`: a chat server under clients that arrive apart, each server in its own process:
`main.py serve` with continuous batching, the same with static batching, and MiniMind's own
scripts/serve_openai_api.py (--minimind_dir) as the anchor.

Every server gets the same work: --clients requests, each a question of the bench's list asking for a
reply of --min_tokens to --max_tokens tokens (drawn per request, seeded), streamed, with MiniMind's server
defaults for sampling (temperature 0.7, top-p 0.92; random weights rarely emit eos, so a reply runs to its
max_tokens). With --arrivals poisson they come at the times of one Poisson process (seeded, the same for
every server) of --rate requests a second: by default 4 per one request's time alone (the first server's),
so that gaps are about a quarter of it. With --arrivals together they come at once.

Each server first answers one request alone and one round of the clients together, untimed, so that what it
compiles is compiled; then one request alone (timed: the sequential rate), then the timed run. Reported per
server: throughput (completion tokens over the run's span), the most these arrivals allow it (`bound`: every
request decoded at the server's alone rate from its arrival), time to first token (the first streamed text)
and end-to-end latency, p50 and p95. Tokens are our server's count (`usage`); MiniMind's server reports none,
so its replies' text is tokenized again.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np

from minimind_jax.errors import UserError

QUESTIONS = (
    "你好，请介绍一下你自己。",
    "What is the capital of France?",
    "请写一首关于春天的短诗。",
    "Explain why the sky is blue.",
    "如何学习一门新的编程语言？",
    "Give me three tips for better sleep.",
    "太阳系有几颗行星？",
    "What is machine learning?",
    "推荐一本好看的小说。",
    "How do airplanes fly?",
    "为什么海水是咸的？",
    "Tell me a short joke.",
    "什么是人工智能？",
    "How many days are in a leap year?",
    "请用一句话描述大海。",
    "What should I cook for dinner tonight?",
)
SERVE_MAIN = "import sys; from minimind_jax.cli.main import console_main; sys.exit(console_main())"
SERVERS = ("continuous", "static", "minimind")
MINIMIND_PORT = 8998  # serve_openai_api.py listens there, on every interface
TEMPERATURE, TOP_P = 0.7, 0.92  # MiniMind's server defaults


def add_arguments(parser, command: str = "bench_serve") -> None:
    parser.description = __doc__.split("\n\n")[0].replace("\n", " ")
    parser.add_argument("--tokenizer_path", required=True, help="MiniMind's model/ directory (the preset's era)")
    parser.add_argument(
        "--preset", default="minimind2-small", help="random weights of this preset (without --load_from)"
    )
    parser.add_argument("--load_from", default=None, help="serve these weights instead (.pth)")
    parser.add_argument("--servers", default="continuous,static", help=f"which of {','.join(SERVERS)} to run")
    parser.add_argument("--minimind_dir", default=None, help="a MiniMind checkout of the weights' era (minimind)")
    parser.add_argument("--torch_python", default=sys.executable, help="the interpreter of MiniMind's server")
    parser.add_argument("--clients", default=16, type=int, help="requests of the timed run (and our slots)")
    parser.add_argument("--arrivals", default="poisson", choices=("poisson", "together"))
    parser.add_argument("--rate", default=None, type=float, help="poisson: requests a second (default: see above)")
    parser.add_argument("--min_tokens", default=64, type=int, help="the shortest reply asked for")
    parser.add_argument("--max_tokens", default=128, type=int, help="the longest reply asked for")
    parser.add_argument("--seed", default=0, type=int, help="of the arrivals and the reply lengths")
    parser.add_argument("--port", default=18998, type=int, help="our servers' port")
    parser.add_argument("--dtype", default=None, help="our servers' --dtype (default: their own)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _stream(base_url: str, question: str, max_tokens: int, record: dict) -> None:
    """Sends one streamed request; fills `record` with its times (from `record['sent']`), text and tokens."""
    body = {"model": "bench", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": TEMPERATURE, "top_p": TOP_P, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    text = []
    with urllib.request.urlopen(request, timeout=3600) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                record["tokens"] = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                piece = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
                if piece and "first" not in record:
                    record["first"] = time.perf_counter() - record["sent"]
                text.append(piece)
    record["end"] = time.perf_counter() - record["sent"]
    record["text"] = "".join(text)


def _run(base_url: str, plan: list[tuple[float, str, int]]) -> list[dict]:
    """Sends each (offset s, question, max_tokens) of `plan` at its offset from now; returns the records."""
    records = [{} for _ in plan]
    start = time.perf_counter()

    def client(index: int) -> None:
        offset, question, max_tokens = plan[index]
        time.sleep(max(0.0, start + offset - time.perf_counter()))
        records[index]["sent"] = time.perf_counter()
        records[index]["offset"] = records[index]["sent"] - start
        _stream(base_url, question, max_tokens, records[index])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(plan))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


def _wait_for(server: subprocess.Popen, base_url: str, log_path: pathlib.Path, probe: str) -> None:
    for _ in range(3000):
        if server.poll() is not None:
            raise UserError(f"the server exited with {server.returncode}: {log_path.read_text().strip()[-500:]}")
        try:
            urllib.request.urlopen(f"{base_url}{probe}", timeout=1).close()
            return
        except urllib.error.HTTPError:  # it answers: up
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise UserError("the server did not answer within 10 minutes")


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def summarize(records: list[dict], count_tokens, alone_tokens_per_s: float) -> dict:
    """The run's figures. `bound_tokens_per_s`: the throughput of a server that decoded every request at its
    alone rate from the moment it arrived (no batch ever slowing a row): the most these arrivals allow."""
    tokens = [r.get("tokens", count_tokens(r["text"])) for r in records]
    start = min(r["offset"] for r in records)
    span = max(r["offset"] + r["end"] for r in records) - start
    bound_span = max(r["offset"] + n / alone_tokens_per_s for r, n in zip(records, tokens)) - start
    firsts = [r.get("first", r["end"]) for r in records]
    ends = [r["end"] for r in records]
    return {
        "requests": len(records),
        "completion_tokens": int(sum(tokens)),
        "span_s": round(span, 2),
        "tokens_per_s": round(sum(tokens) / span, 1),
        "bound_tokens_per_s": round(sum(tokens) / bound_span, 1),
        "ttft_p50_s": round(_percentile(firsts, 50), 2),
        "ttft_p95_s": round(_percentile(firsts, 95), 2),
        "latency_p50_s": round(_percentile(ends, 50), 2),
        "latency_p95_s": round(_percentile(ends, 95), 2),
    }


def _server_command(kind: str, args, weights_file: str, minimind_weight: str | None) -> tuple[list, str | None]:
    if kind == "minimind":
        config = json.loads(pathlib.Path(weights_file).with_suffix(".json").read_text())
        return [args.torch_python, "serve_openai_api.py", "--load_from", "../model", "--weight", minimind_weight,
                "--hidden_size", str(config["hidden_size"]), "--num_hidden_layers", str(config["num_hidden_layers"]),
                "--use_moe", str(int(config["use_moe"]))], str(pathlib.Path(args.minimind_dir) / "scripts")  # fmt: skip
    slots = 1 << (args.clients - 1).bit_length()
    command = [sys.executable, "-c", SERVE_MAIN, "serve", "--load_from", weights_file, "--tokenizer_path",
               args.tokenizer_path, "--port", str(args.port), "--max_batch_size", str(slots), "--batching", kind]  # fmt: skip
    return command + (["--dtype", args.dtype] if args.dtype else []), None


def run(args) -> int:
    servers = args.servers.split(",")
    if not set(servers) <= set(SERVERS) or not servers:
        raise UserError(f"--servers takes some of {','.join(SERVERS)}, got {args.servers}")
    if args.clients < 1 or not 1 <= args.min_tokens <= args.max_tokens:
        raise UserError("--clients must be >= 1 and 1 <= --min_tokens <= --max_tokens")
    if "minimind" in servers:
        if not (args.minimind_dir and (pathlib.Path(args.minimind_dir) / "scripts").is_dir()):
            raise UserError("--servers minimind runs MiniMind's scripts/serve_openai_api.py: give --minimind_dir")
        torch_python = shutil.which(args.torch_python)
        if torch_python is None:
            raise UserError(f"--torch_python {args.torch_python}: not an executable")
        args.torch_python = str(pathlib.Path(torch_python).absolute())  # the server runs in the checkout's scripts/
    from flax import nnx

    from minimind_jax import weights
    from minimind_jax.data.tokenizer import load_tokenizer
    from minimind_jax.model.config import load_preset
    from minimind_jax.model.transformer import MiniMind

    tokenizer = load_tokenizer(args.tokenizer_path)
    count_tokens = lambda text: len(tokenizer.encode(text))
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.min_tokens, args.max_tokens + 1, args.clients)
    gaps = rng.exponential(1.0, args.clients)  # scaled by the rate once it is known
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.clients)]
    results, rate = [], args.rate
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as scratch:
        model = (weights.load(args.load_from) if args.load_from
                 else MiniMind(load_preset(args.preset), rngs=nnx.Rngs(0)))  # fmt: skip
        weights_file = weights.save_pth(model, pathlib.Path(scratch) / "bench.pth")
        config = model.config
        weights_file.with_suffix(".json").write_text(json.dumps(config.to_dict()))
        minimind_weight = None
        if "minimind" in servers:  # its server reads ../out/{weight}_{hidden}.pth of its checkout
            minimind_weight = f"bench_serve_{pathlib.Path(scratch).name}"
            suffix = "_moe" if config.use_moe else ""
            minimind_pth = (
                pathlib.Path(args.minimind_dir) / "out" / f"{minimind_weight}_{config.hidden_size}{suffix}.pth"
            )
            minimind_pth.parent.mkdir(exist_ok=True)
            weights.save_pth(model, minimind_pth)
        del model
        try:
            for kind in servers:
                command, cwd = _server_command(kind, args, str(weights_file), minimind_weight)
                port = MINIMIND_PORT if kind == "minimind" else args.port
                base_url = f"http://127.0.0.1:{port}"
                log_path = pathlib.Path(scratch) / f"{kind}.log"
                with open(log_path, "w") as log:
                    server = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
                try:
                    _wait_for(server, base_url, log_path, "/health" if kind != "minimind" else "/")
                    print(f"{kind}: warming up", file=sys.stderr, flush=True)
                    _run(base_url, [(0.0, questions[0], args.max_tokens)])
                    _run(base_url, [(0.0, q, int(n)) for q, n in zip(questions, lengths)])
                    alone = _run(base_url, [(0.0, questions[0], args.max_tokens)])[0]
                    if rate is None:
                        rate = 4.0 / alone["end"]
                    offsets = (
                        np.cumsum(gaps / rate) - gaps[0] / rate if args.arrivals == "poisson" else np.zeros(len(gaps))
                    )
                    print(f"{kind}: timed run", file=sys.stderr, flush=True)
                    records = _run(base_url, [(float(o), q, int(n)) for o, q, n in zip(offsets, questions, lengths)])
                finally:
                    server.terminate()
                    server.wait(timeout=60)
                alone_tokens_per_s = alone.get("tokens", count_tokens(alone["text"])) / alone["end"]
                results.append({"server": kind, "alone_s": round(alone["end"], 2),
                                "alone_tokens_per_s": round(alone_tokens_per_s, 1),
                                **summarize(records, count_tokens, alone_tokens_per_s)})  # fmt: skip
        finally:
            if minimind_weight is not None:
                minimind_pth.unlink(missing_ok=True)
    result = {"model": args.load_from or f"{args.preset} (random weights)", "clients": args.clients,
              "arrivals": args.arrivals, "rate_per_s": round(rate, 3), "reply_tokens": [args.min_tokens, args.max_tokens],
              "servers": results}  # fmt: skip
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def format_table(result: dict) -> str:
    lines = [
        f"{result['model']}, {result['clients']} clients, {result['arrivals']} arrivals at {result['rate_per_s']}/s, "
        f"replies of {result['reply_tokens'][0]}-{result['reply_tokens'][1]} tokens",
        f"{'server':<12} {'alone s':>8} {'tokens/s':>9} {'seq tok/s':>10} {'bound':>7} {'TTFT p50':>9} "
        f"{'TTFT p95':>9} {'e2e p50':>8} {'e2e p95':>8}",
    ]
    for row in result["servers"]:
        lines.append(f"{row['server']:<12} {row['alone_s']:>8.2f} {row['tokens_per_s']:>9.1f} "
                     f"{row['alone_tokens_per_s']:>10.1f} {row['bound_tokens_per_s']:>7.1f} "
                     f"{row['ttft_p50_s']:>9.2f} {row['ttft_p95_s']:>9.2f} "
                     f"{row['latency_p50_s']:>8.2f} {row['latency_p95_s']:>8.2f}")  # fmt: skip
    return "\n".join(lines)
