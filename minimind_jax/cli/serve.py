"""`python main.py serve`: an OpenAI-compatible chat server (MiniMind's scripts/serve_openai_api.py).

The model and tokenizer are found and checked as `main.py chat` finds them (same flags). The server itself is
minimind_jax/inference/server.py; it needs FastAPI and uvicorn (`pip install minimind-jax[serve]`).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

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
        "--batch_window_ms",
        default=20.0,
        type=float,
        help="after a batch of several requests, the longest the next one waits to fill up",
    )


def run(args) -> int:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        command = pathlib.Path(sys.argv[0]).name  # main.py in a checkout, minimind-jax installed
        raise UserError(f"{command} serve needs {' and '.join(missing)}: pip install minimind-jax[serve]")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    if args.max_batch_size < 1 or args.max_batch_size & (args.max_batch_size - 1):
        raise UserError(f"--max_batch_size must be a power of two, got {args.max_batch_size}")
    if args.batch_window_ms < 0:
        raise UserError(f"--batch_window_ms must be >= 0, got {args.batch_window_ms}")
    model = load_model(args)
    if args.arch and args.arch != model.config.arch:
        raise UserError(f"--arch {args.arch}, but {weights_path(args)} holds a {model.config.arch} model")
    tokenizer = load_tokenizer_for(args, model)
    if tokenizer.chat_template is None:
        raise UserError(f"{tokenizer.path}: this tokenizer has no chat_template, which the server needs")

    import uvicorn

    from minimind_jax.inference.server import create_app

    model_id = args.model_name or weights_path(args).name.removesuffix(".pth")
    app = create_app(model, tokenizer, model_id, args.max_batch_size, args.batch_window_ms / 1000)
    print(f"serving {model_id} at http://{args.host}:{args.port}/v1 (OpenAI API; /health, /v1/models)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
