"""`python main.py chat`: talk to a model, with the flags of MiniMind's `eval_llm.py`.

Without --prompt it is a REPL: one user turn per line of standard input (a terminal or a pipe), ended by an
empty line or end of input. Each turn is rendered with the tokenizer's chat template, carrying the last
--historys messages (MiniMind's default 0 carries none), and the reply is printed as it is generated.
A turn whose prompt plus --max_new_tokens would run past the model's max_position_embeddings (where
MiniMind's RoPE table ends) is refused with one line, before anything is generated.
Weights named like MiniMind's pretrain ones (`pretrain_*`) get `<|im_start|>` + the text instead of a chat.

The model and tokenizer helpers here are shared with `main.py eval`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from minimind_jax.data.tokenizer import Tokenizer, check_fits, load_tokenizer
from minimind_jax.errors import UserError
from minimind_jax.inference.generation import Decoder, check_room
from minimind_jax.inference.text import StreamPrinter
from minimind_jax.model.config import DTYPES, EVAL_SAMPLING, weight_stem
from minimind_jax.model.transformer import MiniMind

DEFAULT_SEED = 2026  # MiniMind 2510's eval_llm.py seeds every turn with 2026


# ---------------------------------------------------------------------------------------------------------
# Model and tokenizer (shared with eval_cli)


def add_model_arguments(parser) -> None:
    """Where the weights and tokenizer come from: --load_from, or MiniMind's {save_dir}/{weight}_{hidden}.pth."""
    parser.add_argument(
        "--load_from",
        "--from_weight",
        dest="load_from",
        default=None,
        help="a MiniMind .pth or a minimind-jax checkpoint directory "
        "(default: MiniMind's {save_dir}/{weight}_{hidden_size}{_moe}.pth)",
    )
    parser.add_argument("--save_dir", default="out", help="MiniMind's weight directory (without --load_from)")
    parser.add_argument("--weight", default="full_sft", help="MiniMind's weight name prefix (without --load_from)")
    parser.add_argument("--hidden_size", default=512, type=int, help="names MiniMind's weight file")
    parser.add_argument("--use_moe", default=0, type=int, choices=(0, 1), help="names MiniMind's weight file")
    parser.add_argument(
        "--tokenizer_path",
        default=None,
        help="tokenizer directory or .model (default: beside the weights, else ./model)",
    )
    parser.add_argument(
        "--inference_rope_scaling",
        action="store_true",
        help="YaRN RoPE extrapolation for long contexts (the era's MiniMind settings)",
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (weights stay fp32)")
    parser.add_argument("--lora", default=None, help="a MiniMind LoRA file (train_lora.py's), merged into the weights")
    # eval_llm.py's flags, so its command lines run unchanged.
    parser.add_argument(
        "--lora_weight",
        default=None,
        help="eval_llm.py's LoRA name: {save_dir}/lora/{name}_{hidden_size}.pth (2510) or {save_dir}/{name}_"
        "{hidden_size}.pth (v3), merged into the weights",
    )
    parser.add_argument(
        "--num_hidden_layers", default=None, type=int, help="checked against the weights, which say the layer count"
    )
    parser.add_argument("--device", help=argparse.SUPPRESS)  # JAX picks the device


def weights_path(args) -> pathlib.Path:
    if args.load_from and args.load_from != "model":  # MiniMind's --load_from model means "use --weight"
        return pathlib.Path(args.load_from)
    return pathlib.Path(args.save_dir) / f"{weight_stem(args.weight, args.hidden_size, args.use_moe)}.pth"


def load_model(args) -> MiniMind:
    from minimind_jax import weights

    path = weights_path(args)
    if not path.exists():
        raise UserError(f"{path}: no such weights file or checkpoint (pass --load_from)")
    model = weights.load(path, inference_rope_scaling=args.inference_rope_scaling, dtype=args.dtype)
    if args.num_hidden_layers is not None and args.num_hidden_layers != model.config.num_hidden_layers:
        raise UserError(f"--num_hidden_layers {args.num_hidden_layers} but {path} has {model.config.num_hidden_layers}")
    lora = lora_path(args)
    if lora:  # merged once: W + A·B is the adapted model's projection, at the unadapted model's speed
        from minimind_jax.weights.lora import load_lora, merge_adapters

        model = merge_adapters(load_lora(model, lora))
    return model


def lora_path(args) -> pathlib.Path | None:
    """--lora's file, or eval_llm.py's --lora_weight name in either era's place ("None": no adapter)."""
    name = None if args.lora_weight in (None, "None") else args.lora_weight
    if args.lora and name:
        raise UserError("--lora and --lora_weight both name an adapter: give one")
    if not name:
        return pathlib.Path(args.lora) if args.lora else None
    stem = f"{name}_{args.hidden_size}.pth"
    candidates = [pathlib.Path(args.save_dir) / "lora" / stem, pathlib.Path(args.save_dir) / stem]
    found = next((path for path in candidates if path.exists()), None)
    if found is None:
        raise UserError(f"--lora_weight {name}: none of {', '.join(map(str, candidates))} exists")
    return found


def load_tokenizer_for(args, model: MiniMind) -> Tokenizer:
    """--tokenizer_path, else a tokenizer beside the weights, else ./model (MiniMind's layout). The
    tokenizer must fit the model: its vocabulary and, for MiniMind's own vocabularies, its era."""
    if args.tokenizer_path:
        tokenizer = load_tokenizer(args.tokenizer_path)
    else:
        weights = weights_path(args)
        beside = weights if weights.is_dir() else weights.parent
        for candidate in (beside, pathlib.Path("model")):
            if (candidate / "tokenizer.json").exists() or len(list(candidate.glob("*.model"))) == 1:
                tokenizer = load_tokenizer(candidate)
                break
        else:
            raise UserError(f"no tokenizer in {beside} or ./model: pass --tokenizer_path")
    check_fits(tokenizer, model.config.arch, model.config.vocab_size)
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# Chat


def add_arguments(parser, command: str) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="a user turn to answer instead of reading standard input (repeat for several turns)",
    )
    parser.add_argument(
        "--max_new_tokens",
        default=8192,
        type=int,
        help="most tokens per reply; with the prompt, at most the model's max_position_embeddings",
    )
    parser.add_argument("--temperature", default=0.85, type=float)
    parser.add_argument("--top_p", default=None, type=float, help="nucleus threshold (default 0.85 for 2510, 0.95 v3)")
    parser.add_argument("--top_k", default=50, type=int, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--repetition_penalty", default=1.0, type=float)
    parser.add_argument("--do_sample", default=1, type=int, choices=(0, 1), help="0: greedy decoding")
    parser.add_argument(
        "--open_thinking",
        default=0,
        type=int,
        choices=(0, 1),
        help="v3: let the model think first (the template opens a <think> block)",
    )
    parser.add_argument(
        "--historys", default=0, type=int, help="earlier messages to carry into each turn (even; 0: none, as MiniMind)"
    )
    parser.add_argument(
        "--show_speed",
        default=1,
        type=int,
        choices=(0, 1),
        help="print each reply's tokens/s (wall clock from the prompt on, so the first prompt "
        "of a new length bucket includes compiling)",
    )
    parser.add_argument("--seed", default=DEFAULT_SEED, type=int, help="sampling seed of every turn")


class ChatSession:
    """MiniMind's eval_llm loop: a conversation, the template, and one streamed reply per user turn."""

    def __init__(
        self,
        model: MiniMind,
        tokenizer: Tokenizer,
        *,
        historys: int = 0,
        open_thinking: bool = False,
        raw: bool = False,
        max_new_tokens: int = 8192,
        seed: int = DEFAULT_SEED,
        do_sample: bool = True,
        temperature: float = 0.85,
        top_k: int = 50,
        top_p: float = 0.85,
        repetition_penalty: float = 1.0,
    ):
        self.tokenizer, self.model_config = tokenizer, model.config
        self.historys, self.open_thinking, self.raw = historys, open_thinking, raw
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.decoder = Decoder(
            model,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            eos_token_id=tokenizer.eos_id,
        )
        self.conversation: list[dict] = []

    def prompt_ids(self, user_text: str) -> list[int]:
        """Starts a turn: keeps the last `historys` messages, adds the user's, and renders them."""
        self.conversation = self.conversation[-self.historys :] if self.historys else []
        self.conversation.append({"role": "user", "content": user_text})
        if self.raw:
            return [self.tokenizer.bos_id] + self.tokenizer.encode(user_text)
        template_kwargs = {"open_thinking": True} if self.open_thinking else {}
        text = self.tokenizer.apply_chat_template(self.conversation, add_generation_prompt=True, **template_kwargs)
        return self.tokenizer.encode(text)

    def reply(self, user_text: str, write: Callable[[str], None]) -> tuple[str, int, float]:
        """Generates and streams the reply; returns (reply text, tokens generated, seconds)."""
        ids = self.prompt_ids(user_text)
        check_room(self.model_config, len(ids), self.max_new_tokens)
        printer = StreamPrinter(self.tokenizer, write)
        start = time.perf_counter()
        state = self.decoder.start(np.asarray([ids]), seed=self.seed, expected_new_tokens=min(self.max_new_tokens, 256))
        num_tokens = 0
        while num_tokens < self.max_new_tokens:
            if num_tokens:
                state = self.decoder.step(state)
            token = int(state.tokens_B[0])
            num_tokens += 1
            if token == self.tokenizer.eos_id:
                break
            printer.add(token)
        seconds = time.perf_counter() - start
        response = printer.finish()
        self.conversation.append({"role": "assistant", "content": response})
        return response, num_tokens, seconds


def user_turns(prompts: Sequence[str] | None, write: Callable[[str], None]):
    """The --prompt turns, else lines of standard input until an empty line or its end."""
    if prompts:
        for prompt in prompts:
            write(f"💬: {prompt}\n")
            yield prompt
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            try:
                line = input("💬: ")
            except EOFError:
                return
        else:
            line = sys.stdin.readline()
            if line:
                write(f"💬: {line.rstrip()}\n")
        line = line.rstrip("\r\n")
        if not line:
            return
        yield line


def run(args) -> int:
    if args.historys < 0 or args.historys % 2:
        raise UserError(f"--historys must be an even number >= 0, got {args.historys}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    model = load_model(args)
    check_room(model.config, 0, args.max_new_tokens)  # before a turn is read; each turn checks its prompt too
    tokenizer = load_tokenizer_for(args, model)
    if args.open_thinking and not model.config.is_v3:
        raise UserError("--open_thinking is for minimind3 (v3) models")
    raw = "pretrain" in (args.weight if args.load_from in (None, "model") else weights_path(args).name)
    session = ChatSession(
        model,
        tokenizer,
        historys=args.historys,
        open_thinking=bool(args.open_thinking),
        raw=raw,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        do_sample=bool(args.do_sample),
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=EVAL_SAMPLING[model.config.arch]["top_p"] if args.top_p is None else args.top_p,
        repetition_penalty=args.repetition_penalty,
    )

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    for user_text in user_turns(args.prompt, write):
        write("🧠: ")
        _, num_tokens, seconds = session.reply(user_text, write)
        write(f"\n[Speed]: {num_tokens / seconds:.2f} tokens/s\n\n" if args.show_speed else "\n\n")
    return 0
