"""`main.py tokenizer`: train a SentencePiece tokenizer on MiniMind jsonl files, or look at how text encodes.

main.py tokenizer train --input corpus.jsonl [--input more.jsonl] --vocab_size 6400 --out DIR_OR_PREFIX
main.py tokenizer encode --tokenizer_path PATH --text "你好<|im_end|>"
"""

from __future__ import annotations

import argparse
import json
import pathlib

from minimind_jax.data import tokenizer as tokenizer_lib


def add_arguments(parser, command):
    del command  # one module serves only `tokenizer`
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = actions.add_parser("train", help="train a byte-fallback BPE SentencePiece tokenizer")
    train.add_argument("--input", action="append", required=True, help="MiniMind jsonl (pretrain or SFT); repeatable")
    train.add_argument("--vocab_size", type=int, default=6400)
    train.add_argument(
        "--out", required=True, help="output prefix, or a directory (then DIR/tokenizer.model is written)"
    )
    train.add_argument("--character_coverage", type=float, default=0.9995)
    train.add_argument("--default_system_prompt", default=None, help="system turn added when a chat has none")
    train.add_argument(
        "--max_sentences",
        type=int,
        default=2_000_000,
        help="train on at most this many texts (each cut to 2048 characters)",
    )

    encode = actions.add_parser("encode", help="print the token ids and pieces of a text")
    encode.add_argument(
        "--tokenizer_path",
        default="model",
        help="MiniMind tokenizer directory or SentencePiece .model (default: ./model, MiniMind's)",
    )
    encode.add_argument(
        "--tokenizer", dest="tokenizer_path", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )  # old name
    encode.add_argument("--text", required=True)


def _model_prefix(out: str) -> pathlib.Path:
    path = pathlib.Path(out)
    if path.is_dir() or out.endswith(("/", "\\")):
        return path / "tokenizer"
    return path


def run(args):
    if args.action == "train":
        model_file = tokenizer_lib.train_sentencepiece(
            args.input,
            _model_prefix(args.out),
            vocab_size=args.vocab_size,
            character_coverage=args.character_coverage,
            default_system_prompt=args.default_system_prompt,
            max_sentences=args.max_sentences,
        )
        tokenizer = tokenizer_lib.load_tokenizer(model_file)
        config_file = tokenizer_lib.sentencepiece_config_path(model_file)
        trained_on = json.loads(config_file.read_text("utf-8"))["trained_on"]
        print(
            f"wrote {model_file} and {config_file.name}: vocab_size {tokenizer.vocab_size} "
            f"(requested {args.vocab_size}), trained on {trained_on['sentences']} texts, "
            f"skipped {trained_on['skipped_lines']} bad records"
        )
    elif args.action == "encode":
        tokenizer = tokenizer_lib.load_tokenizer(args.tokenizer_path)
        ids = tokenizer.encode(args.text)
        print(f"{len(ids)} tokens: {ids}")
        print(" | ".join(repr(tokenizer.decode([i])) for i in ids))
    return 0
