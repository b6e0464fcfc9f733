"""A burst against `main.py serve` (minimind2-small, random weights): an ~8k-token prompt, 7 "hi"s sent 1 s
after it, and a 20k-word prompt. Prints each one's time to first token and end, and the server's resident
memory idle and after the burst.

    python benchmarks/long_prompt_burst.py --tokenizer_path ../minimind-2510/model
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from flax import nnx

from minimind_jax import weights
from minimind_jax.model.config import load_preset
from minimind_jax.model.transformer import MiniMind

REPO = pathlib.Path(__file__).resolve().parents[1]


def resident_mib(pid: int) -> int:
    line = next(line for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS"))
    return int(line.split()[1]) // 1024


def ask(base_url: str, text: str, max_tokens: int, out: dict) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "stream": True, "temperature": 0}  # fmt: skip
    request = urllib.request.Request(f"{base_url}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=3600) as response:
            for line in response:
                if "first_s" not in out and b'"content"' in line and b'"content": ""' not in line:
                    out["first_s"] = round(time.perf_counter() - started, 2)
    except urllib.error.HTTPError as error:
        out["status"] = error.code
    out["end_s"] = round(time.perf_counter() - started, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer_path", required=True)
    parser.add_argument("--port", type=int, default=18777)
    args = parser.parse_args()
    scratch = pathlib.Path(tempfile.mkdtemp())
    pth = weights.save_pth(MiniMind(load_preset("minimind2-small"), rngs=nnx.Rngs(0)), scratch / "m.pth")
    command = [sys.executable, str(REPO / "main.py"), "serve", "--load_from", str(pth), "--tokenizer_path",
               args.tokenizer_path, "--port", str(args.port)]  # fmt: skip
    server = subprocess.Popen(command, stdout=open(scratch / "log", "w"), stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{args.port}"
    try:
        while True:
            try:
                print(json.load(urllib.request.urlopen(f"{base_url}/health")))
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        ask(base_url, "hello", 16, {})  # compiles the short shapes
        ask(base_url, "你好 " * 2000, 16, {})  # and those of a long prompt
        time.sleep(2)  # both memory readings come 2 s after the last reply
        print("resident memory idle:", resident_mib(server.pid), "MiB")
        outs = [{} for _ in range(9)]
        threads = [threading.Thread(target=ask, args=(base_url, "今天天气很好，我们去公园散步吧。" * 560, 64, outs[0]))]
        threads += [threading.Thread(target=lambda out=out: (time.sleep(1.0), ask(base_url, "hi", 16, out)))
                    for out in outs[1:8]]  # fmt: skip
        threads += [threading.Thread(target=ask, args=(base_url, "word " * 20000, 64, outs[8]))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print("the ~8k-token prompt:", outs[0])
        print("the 7 his, sent 1 s later:", outs[1:8])
        print("the 20k-word prompt:", outs[8])
        time.sleep(2)
        print("resident memory after the burst:", resident_mib(server.pid), "MiB")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
