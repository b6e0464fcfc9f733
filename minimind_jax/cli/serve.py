"""`python main.py serve`: an OpenAI-compatible chat server (MiniMind's scripts/serve_openai_api.py) with a
chat page at `/` (MiniMind's scripts/web_demo.py); `main.py web` is the same command, and opens the page in
the browser once the server listens.

The model and tokenizer are found and checked as `main.py chat` finds them (same flags). The server itself is
minimind_jax/inference/server.py; it needs FastAPI and uvicorn (`pip install minimind-jax[serve]`).
"""

from __future__ import annotations

import importlib.util
import pathlib
import socket
import sys
import threading
import urllib.parse
import webbrowser

from minimind_jax.cli.chat import add_model_arguments, load_model, load_tokenizer_for, weights_path
from minimind_jax.errors import UserError
from minimind_jax.model.config import ARCHS


def add_arguments(parser, command: str) -> None:
    add_model_arguments(parser)
    parser.add_argument("--arch", default=None, choices=ARCHS, help="refuse weights of the other era")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", default=8998, type=int, help="MiniMind's server port by default")
    parser.add_argument("--model_name", default=None, help="the id /v1/models lists (default: the weights' name)")
    parser.add_argument(
        "--max_batch_size", default=16, type=int, help="most requests decoded together (a power of two)"
    )
    parser.add_argument(
        "--batching",
        default="continuous",
        choices=("continuous", "static"),
        help="continuous: a request joins the running decode at the next step; static: it waits for the batch",
    )
    parser.add_argument(
        "--kv_cache_mb",
        default=1024.0,
        type=float,
        help="continuous: the KV cache's memory, shared by --max_batch_size slots; a request whose prompt and "
        "max_tokens do not fit a slot gets a 400",
    )
    parser.add_argument(
        "--api_key",
        default=None,
        help="require `Authorization: Bearer KEY` on every /v1 request, and the key for the page (default: none)",
    )
    parser.add_argument("--max_request_mb", default=8.0, type=float, help="larger request bodies get a 413")
    parser.add_argument(
        "--cors_origins", default=None, help="comma-separated origins whose pages may call the API (default: none)"
    )
    parser.add_argument(
        "--batch_window_ms",
        default=20.0,
        type=float,
        help="static: after a batch of several requests, the longest the next one waits to fill up",
    )


def run(args) -> int:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        command = pathlib.Path(sys.argv[0]).name  # main.py in a checkout, minimind-jax installed
        raise UserError(f"{command} {args.command} needs {' and '.join(missing)}: pip install minimind-jax[serve]")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    if args.max_batch_size < 1 or args.max_batch_size & (args.max_batch_size - 1):
        raise UserError(f"--max_batch_size must be a power of two, got {args.max_batch_size}")
    if args.batch_window_ms < 0:
        raise UserError(f"--batch_window_ms must be >= 0, got {args.batch_window_ms}")
    if not args.kv_cache_mb > 0:
        raise UserError(f"--kv_cache_mb must be > 0, got {args.kv_cache_mb}")
    if not args.max_request_mb > 0:
        raise UserError(f"--max_request_mb must be > 0, got {args.max_request_mb}")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api_key is empty")
    listener = listening_socket(args.host, args.port)  # a port in use or a bad host fails here, before the model loads
    model = load_model(args)
    if args.arch and args.arch != model.config.arch:
        raise UserError(f"--arch {args.arch}, but {weights_path(args)} holds a {model.config.arch} model")
    tokenizer = load_tokenizer_for(args, model)
    if tokenizer.chat_template is None:
        raise UserError(f"{tokenizer.path}: this tokenizer has no chat_template, which the server needs")

    import uvicorn

    from minimind_jax.inference.server import create_app

    model_id = args.model_name or weights_path(args).name.removesuffix(".pth")
    origins = (
        [origin.strip() for origin in args.cors_origins.split(",") if origin.strip()] if args.cors_origins else None
    )
    app = create_app(model, tokenizer, model_id, args.max_batch_size, args.batch_window_ms / 1000, args.batching,
                     args.kv_cache_mb, args.api_key, int(args.max_request_mb * 2**20), origins)  # fmt: skip
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    print(f"serving {model_id} at {url}/v1 (OpenAI API; /health, /v1/models; {args.batching} batching); "
          f"chat page at {url}/", flush=True)  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    if args.command == "web":
        page = f"{url}/?{urllib.parse.urlencode({'api_key': args.api_key})}" if args.api_key else f"{url}/"
        threading.Thread(target=_open_when_started, args=(server, page), daemon=True).start()
    server.run(sockets=[listener])
    return 0


def _open_when_started(server, page: str) -> None:
    while not server.started:
        if server.should_exit:
            return
        threading.Event().wait(0.1)
    if not webbrowser.open(page):
        print(f"open {page} in a browser", flush=True)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or a one-line UserError saying why not."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, protocol)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
    except OSError as error:  # socket.gaierror (a bad host) is one too
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return listener
