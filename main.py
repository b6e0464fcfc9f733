"""minimind-jax command line: one subcommand per job.

Each subcommand lives in the module named below, which defines `add_arguments(parser, command)` and `run(args)`.
Modules are imported only when their subcommand is chosen, so `main.py convert --help` does not start JAX.
"""
import argparse
import importlib
import os
import sys

from minimind_jax.errors import UserError

SUBCOMMANDS = {
    "sft": ("minimind_jax.train_cli", "full-parameter SFT with the loss mask (MiniMind's train_full_sft.py flags)"),
    "pretrain": ("minimind_jax.train_cli", "pretraining (MiniMind's train_pretrain.py flags)"),
    "convert": ("convert.cli", "convert MiniMind .pth <-> minimind-jax checkpoint"),
    "inspect": ("minimind_jax.inspect_cli", "show which tokens of a jsonl record are learned"),
    "tokenizer": ("minimind_jax.tokenizer_cli", "train a SentencePiece tokenizer for MiniMind"),
    "chat": ("minimind_jax.chat_cli", "chat with a model (REPL or --prompt)"),
    "eval": ("minimind_jax.eval_cli", "masked loss and perplexity on a jsonl"),
    "bench": ("minimind_jax.bench", "side-by-side SFT step benchmark against PyTorch"),
    "demo": ("minimind_jax.demo", "end-to-end: corpus, tokenizer, pretrain, SFT, export, chat"),
}


# glibc hands every freed block of 32 MB or more (and any large block freed by a worker thread) back to the
# OS at once, so each XLA:CPU train step faults its multi-GB working set in again: about 700k page faults and
# 2 s of kernel time per minimind2-small step at 8 x 512. One malloc arena that keeps what it frees avoids it.
KEEP_FREED_MEMORY_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def keep_freed_memory() -> None:
    """Restarts this process once with KEEP_FREED_MEMORY_ENV (glibc reads it only at start), unless the user
    set any of those variables (then theirs stand) or MINIMIND_JAX_SYSTEM_MALLOC=1."""
    if not sys.platform.startswith("linux") or os.environ.get("MINIMIND_JAX_SYSTEM_MALLOC") == "1":
        return
    if any(name in os.environ for name in KEEP_FREED_MEMORY_ENV):
        return
    os.environ.update(KEEP_FREED_MEMORY_ENV)
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # the interpreter's own flags included


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="main.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub, name)
            sub.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    try:
        return args._run(args) or 0
    except UserError as error:
        # Bad input is reported in one line that names the file, line or key; no traceback.
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    keep_freed_memory()
    sys.exit(main())
