"""`python main.py eval`: masked loss and perplexity of a model on an SFT or pretrain jsonl.

The examples, loss masks and batches come from the training data pipeline, so a token counts here exactly
when training learns it. The model runs in eval mode (no dropout, no MoE aux loss). The loss is
Σ(ce·mask) / Σmask over the whole file (token-weighted) and perplexity is exp(loss). v3's random training
augmentations are off: every record is evaluated as written. The summary counts the malformed lines skipped
and the records dropped (nothing left to learn after truncation), as the data pipeline reports them.
"""

from __future__ import annotations

import json
import pathlib

from flax import nnx

from minimind_jax.cli.chat import add_model_arguments, load_model, load_tokenizer_for
from minimind_jax.data.examples import ExampleConfig, load_dataset
from minimind_jax.data.pipeline import make_batches
from minimind_jax.data.records import read_jsonl, record_kind
from minimind_jax.errors import UserError
from minimind_jax.training.evaluation import evaluate, make_loss_sums

# MiniMind's --max_seq_len defaults: train_full_sft / train_pretrain per era.
DEFAULT_MAX_SEQ_LEN = {
    ("minimind2", "sft"): 512,
    ("minimind2", "pretrain"): 512,
    ("minimind3", "sft"): 768,
    ("minimind3", "pretrain"): 340,
}


def add_arguments(parser, command: str) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data_path", required=True, help="jsonl of {'conversations': ...} or {'text': ...}")
    parser.add_argument(
        "--kind", default="auto", choices=("auto", "sft", "pretrain"), help="record kind (auto: from the first record)"
    )
    parser.add_argument(
        "--max_seq_len",
        default=None,
        type=int,
        help="examples are cut to this many tokens (default: MiniMind's training default)",
    )
    parser.add_argument("--batch_size", default=16, type=int)
    parser.add_argument(
        "--packing",
        default=0,
        type=int,
        choices=(0, 1),
        help="pack several examples per row (same loss, fewer padded positions)",
    )
    parser.add_argument("--max_batches", default=0, type=int, help="evaluate only the first N batches (0: all)")
    parser.add_argument("--cache_dir", default=None, help="preprocessing cache (default ~/.cache/minimind_jax)")
    parser.add_argument("--num_workers", default=None, type=int, help="tokenizing processes (default: one per CPU)")
    parser.add_argument("--out", default=None, help="also write the JSON summary to this file")


def detect_kind(data_path) -> str:
    for line_no, record in read_jsonl(data_path, kind=None):
        kind = record_kind(record)
        if kind == "dpo":
            raise UserError(
                f"{data_path}:{line_no}: a DPO pair (chosen/rejected); eval scores SFT (conversations) or "
                f"pretrain (text) records"
            )
        return kind
    raise UserError(f"{data_path}: no sft or pretrain record found")


def run(args) -> int:
    model = load_model(args)
    tokenizer = load_tokenizer_for(args, model)
    arch = model.config.arch
    kind = detect_kind(args.data_path) if args.kind == "auto" else args.kind
    max_seq_len = args.max_seq_len or DEFAULT_MAX_SEQ_LEN[arch, kind]
    config = ExampleConfig(kind=kind, arch=arch, max_seq_len=max_seq_len).held_out()
    dataset = load_dataset(args.data_path, tokenizer, config, cache_dir=args.cache_dir, num_workers=args.num_workers)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be positive, got {args.batch_size}")
    batches = make_batches(
        dataset, batch_size=args.batch_size, seed=0, packing=bool(args.packing), shuffle=False, drop_remainder=False
    )
    num_batches = len(batches) if args.max_batches <= 0 else min(args.max_batches, len(batches))
    if num_batches == len(batches):
        examples = len(dataset)
    elif batches.rows is None:
        examples = num_batches * args.batch_size
    else:
        examples = sum(len(row) for row in batches.rows[: num_batches * args.batch_size])
    graphdef, params = nnx.split(model)
    summary = {
        **evaluate(make_loss_sums(graphdef), params, batches, num_batches, progress=True),
        "examples": examples,
        "batches": num_batches,
        "kind": kind,
        "max_seq_len": max_seq_len,
        "data_path": str(args.data_path),
        "skipped": dataset.report.num_skipped,
        "dropped": dataset.report.num_dropped,
    }
    batches.close()
    text = json.dumps(summary, ensure_ascii=False)
    print(text)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return 0
