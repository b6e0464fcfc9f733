"""minimind-jax command line: one subcommand per job.

The `minimind-jax` command (pyproject's [project.scripts]) and, in a repository checkout, `python main.py`.
Each subcommand lives in the module named below, which defines `add_arguments(parser, command)` and `run(args)`.
Modules are imported only when their subcommand is chosen, so `minimind-jax convert --help` does not start JAX.
"""

import argparse
import importlib
import sys

from minimind_jax.errors import UserError
from minimind_jax.runtime import keep_freed_memory

SUBCOMMANDS = {
    "sft": ("minimind_jax.cli.train", "full-parameter SFT with the loss mask (MiniMind's train_full_sft.py flags)"),
    "pretrain": ("minimind_jax.cli.train", "pretraining (MiniMind's train_pretrain.py flags)"),
    "lora": ("minimind_jax.cli.train", "LoRA adapters on a frozen model (MiniMind's train_lora.py flags)"),
    "dpo": (
        "minimind_jax.cli.train",
        "preference alignment against a frozen reference (MiniMind's train_dpo.py flags)",
    ),
    "distill": (
        "minimind_jax.cli.train",
        "white-box distillation from a teacher (MiniMind's train_distillation.py flags)",
    ),
    "distill_reason": ("minimind_jax.cli.train", "2510's reasoning distillation: SFT, tag tokens weighed 10x"),
    "grpo": ("minimind_jax.cli.train", "GRPO / CISPO on rollouts of the policy (MiniMind's train_grpo.py flags)"),
    "spo": ("minimind_jax.cli.train", "2510's SPO: one rollout per prompt against a tracked baseline (train_spo.py)"),
    "ppo": ("minimind_jax.cli.train", "PPO: the policy and a critic trained together (MiniMind's train_ppo.py flags)"),
    "agent": ("minimind_jax.cli.train", "v3's agentic RL: multi-turn tool calls, rewarded (MiniMind's train_agent.py)"),
    "convert": ("minimind_jax.cli.convert", "convert MiniMind .pth <-> minimind-jax checkpoint <-> Hugging Face"),
    "inspect": ("minimind_jax.cli.inspect", "show which tokens of a jsonl record are learned"),
    "tokenizer": ("minimind_jax.cli.tokenizer", "train a SentencePiece tokenizer for MiniMind"),
    "chat": ("minimind_jax.cli.chat", "chat with a model (REPL or --prompt)"),
    "eval": ("minimind_jax.cli.eval", "masked loss and perplexity on a jsonl"),
    "serve": ("minimind_jax.cli.serve", "an OpenAI-compatible chat server with a chat page at / (serve_openai_api.py)"),
    "web": ("minimind_jax.cli.serve", "`serve`, opening its chat page in the browser (MiniMind's web_demo.py)"),
    "bench": ("minimind_jax.bench.command", "side-by-side train step (or RL update) benchmark against PyTorch"),
    "bench_serve": ("minimind_jax.bench.serve", "tokens/s of main.py serve: concurrent clients against one at a time"),
    "demo": ("minimind_jax.cli.demo", "end-to-end: corpus, tokenizer, pretrain, SFT, export, chat"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves first): nothing to save yet
        print("interrupted", file=sys.stderr)
        return 130


def console_main() -> int:
    """The process entry point: restart once with malloc settings for XLA:CPU, then run the command line."""
    keep_freed_memory()
    return main()
