"""`python main.py bench_serve`: generated tokens/s of `main.py serve` with many clients at once against one at
a time.

It starts the server in a process of its own (a preset with random weights, or --load_from), runs both
phases once to compile what they need, then times them on the same prompts, greedy, with a fixed
max_tokens: one client sending its requests one after another, and --clients clients each sending theirs as
soon as the last one came back. Tokens are the server's own count
(`usage.completion_tokens`); a reply may end early at eos, so tokens/s is the figure, not requests/s.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

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


def add_arguments(parser, command: str = "bench_serve") -> None:
    parser.description = __doc__.split("\n\n")[1].replace("\n", " ")
    parser.add_argument("--tokenizer_path", required=True, help="MiniMind's model/ directory (the preset's era)")
    parser.add_argument(
        "--preset", default="minimind2-small", help="random weights of this preset (without --load_from)"
    )
    parser.add_argument("--load_from", default=None, help="serve these weights instead (.pth or checkpoint)")
    parser.add_argument("--clients", default=16, type=int, help="concurrent clients (and the server's batch size)")
    parser.add_argument("--requests", default=2, type=int, help="timed requests per client in the concurrent phase")
    parser.add_argument("--sequential_requests", default=8, type=int, help="timed requests of the one-client phase")
    parser.add_argument("--max_tokens", default=128, type=int, help="greedy tokens asked for in every request")
    parser.add_argument("--port", default=18998, type=int)
    parser.add_argument("--dtype", default=None, help="the server's --dtype (default: its own)")
    parser.add_argument("--batch_window_ms", default=None, help="the server's --batch_window_ms (default: its own)")


def _post(base_url: str, question: str, max_tokens: int) -> int:
    body = {"model": "bench", "messages": [{"role": "user", "content": question}]}
    body.update(max_tokens=max_tokens, temperature=0)
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=3600) as response:
        return json.load(response)["usage"]["completion_tokens"]


def _wait_for(server: subprocess.Popen, base_url: str, log_path: pathlib.Path) -> None:
    for _ in range(3000):
        if server.poll() is not None:
            raise UserError(f"the server exited with {server.returncode}: {log_path.read_text().strip()[-500:]}")
        try:
            urllib.request.urlopen(f"{base_url}/health", timeout=1).close()
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise UserError("the server did not answer /health within 10 minutes")


def _batches(base_url: str) -> int:
    with urllib.request.urlopen(f"{base_url}/health", timeout=60) as response:
        return json.load(response)["batches"]


def _timed(base_url: str, questions: list[str], clients: int, max_tokens: int) -> dict:
    """Sends `questions` from `clients` threads (each takes the next question when its reply is back)."""
    batches = _batches(base_url)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = list(pool.map(lambda q: _post(base_url, q, max_tokens), questions))
    seconds = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": len(questions),
        "mean_batch": round(len(questions) / (_batches(base_url) - batches), 1),
        "completion_tokens": sum(tokens),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(sum(tokens) / seconds, 1),
    }


def run(args) -> int:
    if args.clients < 1 or args.requests < 1 or args.sequential_requests < 1 or args.max_tokens < 1:
        raise UserError("--clients, --requests, --sequential_requests and --max_tokens must be >= 1")
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as scratch:
        weights_file = args.load_from
        if weights_file is None:
            from flax import nnx

            from minimind_jax import weights
            from minimind_jax.model.config import load_preset
            from minimind_jax.model.transformer import MiniMind

            model = MiniMind(load_preset(args.preset), rngs=nnx.Rngs(0))
            weights_file = str(weights.save_pth(model, pathlib.Path(scratch) / f"{args.preset}.pth"))
            del model
        batch_size = 1 << (args.clients - 1).bit_length()
        command = [sys.executable, "-c", SERVE_MAIN, "serve", "--load_from", weights_file]
        command += ["--tokenizer_path", args.tokenizer_path, "--port", str(args.port)]
        command += ["--max_batch_size", str(batch_size)] + (["--dtype", args.dtype] if args.dtype else [])
        command += ["--batch_window_ms", args.batch_window_ms] if args.batch_window_ms else []
        log_path = pathlib.Path(scratch) / "server.log"
        base_url = f"http://127.0.0.1:{args.port}"
        with open(log_path, "w") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for(server, base_url, log_path)
            questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.clients * args.requests)]
            alone = questions[: args.sequential_requests]
            # Each phase runs once untimed first, so that the programs it needs are compiled before the clock runs.
            for _round in ("untimed", "timed"):
                one = _timed(base_url, alone, 1, args.max_tokens)
                many = _timed(base_url, questions, args.clients, args.max_tokens)
        finally:
            server.terminate()
            server.wait(timeout=60)
    source = args.load_from or f"{args.preset} (random weights)"
    for row in (one, many):
        print(json.dumps({"model": source, "max_tokens": args.max_tokens, **row}))
    print(f"{args.clients} concurrent clients: {many['tokens_per_s'] / one['tokens_per_s']:.2f}x the tokens/s of one")
    return 0
