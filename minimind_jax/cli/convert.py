"""`minimind-jax convert IN OUT` (or, in the repository, `python main.py convert IN OUT` or `python -m convert IN OUT`).

IN.pth  -> OUT/   MiniMind weights (plain fp16/fp32 state dict or resume dict) to our Orbax checkpoint;
                  era, sizes and MoE layout are read off the keys and shapes.
IN/     -> OUT.pth  our checkpoint (or a training run's newest step) to MiniMind's .pth, fp16 by default.
IN -> OUT/ --format hf  to the Hugging Face format (safetensors, config.json, generation_config.json and, with
                  --tokenizer_path, the tokenizer files): LlamaForCausalLM (2510 dense), Qwen2MoeForCausalLM
                  (2510 MoE), Qwen3ForCausalLM (v3 dense), Qwen3MoeForCausalLM (v3 MoE). A Hugging Face
                  directory of one of these (as written here) as IN goes to .pth or a checkpoint.
OUT is never overwritten: it must not exist (or be an empty directory, for a checkpoint or HF model).
--merge_lora LORA.pth  folds a MiniMind LoRA file into the weights first (MiniMind's merge_lora).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from minimind_jax.errors import UserError


def add_arguments(parser: argparse.ArgumentParser, command: str = "convert") -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("input", help="a MiniMind .pth, a minimind-jax checkpoint or a Hugging Face directory")
    parser.add_argument("output", help="a .pth path, or a directory: a checkpoint, or with --format hf a HF model")
    parser.add_argument(
        "--format",
        default="minimind",
        choices=("minimind", "hf"),
        help="minimind: a .pth or our checkpoint, by OUT's suffix (default); hf: the Hugging Face format",
    )
    parser.add_argument(
        "--tokenizer_path", default=None, help="--format hf: the MiniMind tokenizer directory to add (model/)"
    )
    parser.add_argument("--arch", choices=("minimind2", "minimind3"), help="override the inferred era")
    parser.add_argument("--num_attention_heads", type=int, help="2510 shapes cannot tell the head count (default 8)")
    parser.add_argument("--num_experts_per_tok", type=int, help="MoE top-k (default: the era's)")
    parser.add_argument(
        "--dtype",
        default="float16",
        choices=("float16", "float32", "bfloat16"),
        help="dtype of an exported .pth or Hugging Face model (MiniMind saves float16)",
    )
    parser.add_argument("--merge_lora", default=None, help="a MiniMind LoRA file to merge into the weights: W + A·B")


def check_output(target: pathlib.Path, is_file: bool) -> None:
    """Refuse, before the slow load, an output that exists (an empty directory may take a checkpoint or HF
    model) or that cannot be made because a folder above it is a file."""
    empty_directory = target.is_dir() and not any(target.iterdir())
    if target.exists() and (is_file or not empty_directory):
        raise UserError(f"{target}: exists; choose a new output path (convert never overwrites)")
    above = next(parent for parent in target.absolute().parents if parent.exists())
    if not above.is_dir():
        raise UserError(f"{target}: cannot be written, {above} is a file")


def run(args) -> int:
    from minimind_jax.weights import load, save_pth  # JAX and Orbax load here, not for --help
    from minimind_jax.weights.orbax import save_model_checkpoint

    overrides = {
        k: v for k in ("arch", "num_attention_heads", "num_experts_per_tok") if (v := getattr(args, k)) is not None
    }
    source, target = pathlib.Path(args.input), pathlib.Path(args.output)
    if args.tokenizer_path is not None and args.format != "hf":
        raise UserError("--tokenizer_path is for --format hf only (a .pth or checkpoint holds no tokenizer)")
    check_output(target, is_file=args.format != "hf" and target.suffix == ".pth")
    model = load(source, **overrides)
    if args.merge_lora:
        from minimind_jax.weights.lora import load_lora, merge_adapters

        model = merge_adapters(load_lora(model, args.merge_lora))
    cfg = model.config
    if args.format == "hf":
        from minimind_jax.weights.hf import save_hf

        save_hf(model, target, dtype=args.dtype, tokenizer_path=args.tokenizer_path)
        if args.tokenizer_path is None:
            print(f"note: no --tokenizer_path, so {target} has no tokenizer files")
    elif target.suffix == ".pth":
        save_pth(model, target, dtype=args.dtype)
    else:
        save_model_checkpoint(model, target)
    print(
        f"{source} -> {target}: {cfg.arch}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads{', MoE' if cfg.use_moe else ''}"
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
