"""`main.py chat` driven through standard input, and `main.py eval` against the loss computed directly."""

import argparse
import io
import json
import math
import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import main
from minimind_jax import weights
from minimind_jax.cli import chat as chat_cli
from minimind_jax.data import examples
from minimind_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from minimind_jax.errors import UserError
from minimind_jax.inference.generation import Decoder, generate
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.transformer import MiniMind
from minimind_jax.training.loss import masked_ce_sums, safe_divide
from minimind_jax.weights.lora import save_lora, with_adapters
from tests.conftest import require_shared

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the sky?"},
        {"role": "assistant", "content": "Blue, mostly."},
    ],
    [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "Hi! How can I help you today?"},
        {"role": "user", "content": "tell me a joke about cats and dogs and birds"},
        {"role": "assistant", "content": "A cat, a dog and a bird walk into a bar. The bar was empty."},
    ],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "green"}],
    [{"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine, thank you"}],
]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Cats sleep a lot.", "Rain falls on the plain in spring."]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A small SentencePiece tokenizer and a tiny random model per era, saved as MiniMind .pth files."""
    root = tmp_path_factory.mktemp("chat_eval")
    corpus = write_jsonl(
        root / "corpus.jsonl", [{"conversations": c} for c in CONVERSATIONS] + [{"text": t} for t in TEXTS] * 3
    )
    (root / "weights").mkdir()
    train_sentencepiece([corpus], root / "weights" / "tok", vocab_size=400)
    tokenizer = load_tokenizer(root / "weights")
    for arch in ("minimind2", "minimind3"):
        config = ModelConfig(
            arch=arch, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, vocab_size=tokenizer.vocab_size
        )
        weights.save_pth(MiniMind(config, rngs=nnx.Rngs(3)), root / "weights" / f"full_sft_{arch}.pth")
    return root


def run_chat(monkeypatch, capsys, argv, stdin_text=""):
    """Runs `main.py chat` with `stdin_text` as standard input; returns (stdout, the prompt ids of each turn)."""
    prompts = []
    start = Decoder.start

    def recording_start(self, input_ids, *args, **kwargs):
        prompts.append(np.asarray(input_ids)[0].tolist())
        return start(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(Decoder, "start", recording_start)
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin_text))
    assert main.main(["chat", *argv]) == 0
    return capsys.readouterr().out, prompts


def greedy_reply(model, tokenizer, prompt_ids, max_new_tokens):
    """The reply text greedy decoding gives, computed with `generate` (not through the chat code)."""
    new = generate(model, np.asarray([prompt_ids]), max_new_tokens, eos_token_id=tokenizer.eos_id)[0, len(prompt_ids) :]
    if tokenizer.eos_id in new:
        new = new[: list(new).index(tokenizer.eos_id)]
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("historys", [2, 0])
def test_chat_repl_renders_history_with_the_template(workdir, monkeypatch, capsys, historys):
    pth = workdir / "weights" / "full_sft_minimind2.pth"
    out, prompts = run_chat(
        monkeypatch,
        capsys,
        [
            "--load_from",
            str(pth),
            "--historys",
            str(historys),
            "--do_sample",
            "0",
            "--max_new_tokens",
            "12",
            "--show_speed",
            "0",
        ],
        stdin_text="hello there\nhow are you\n\nnever read\n",
    )

    tokenizer, model = load_tokenizer(workdir / "weights"), weights.load(pth)
    first = [{"role": "user", "content": "hello there"}]
    first_ids = tokenizer.encode(tokenizer.apply_chat_template(first, add_generation_prompt=True))
    reply = greedy_reply(model, tokenizer, first_ids, 12)
    second = [{"role": "user", "content": "how are you"}]
    if historys:
        second = first + [{"role": "assistant", "content": reply}] + second
    second_ids = tokenizer.encode(tokenizer.apply_chat_template(second, add_generation_prompt=True))

    assert len(prompts) == 2  # the empty line ends the session
    assert len(reply) > 3
    assert prompts == [first_ids, second_ids]
    assert f"💬: hello there\n🧠: {reply}\n" in out
    assert "never read" not in out


def test_chat_one_shot_prompt_samples_and_reports_speed(workdir, monkeypatch, capsys):
    argv = [
        "--load_from",
        str(workdir / "weights" / "full_sft_minimind2.pth"),
        "--prompt",
        "name a colour",
        "--max_new_tokens",
        "10",
        "--temperature",
        "0.9",
        "--top_k",
        "20",
        "--seed",
        "4",
    ]
    out, prompts = run_chat(monkeypatch, capsys, argv)
    assert len(prompts) == 1 and out.startswith("💬: name a colour\n🧠: ")
    again, _ = run_chat(monkeypatch, capsys, argv)
    assert re.fullmatch(r"\[Speed\]: [0-9.]+ tokens/s", out.strip().splitlines()[-1])
    strip_speed = lambda text: text.rsplit("[Speed]", 1)[0]
    assert strip_speed(out) == strip_speed(again)  # a fixed seed gives the same reply


def test_chat_v3_history_carries_the_think_blocks(monkeypatch, capsys):
    pth = require_shared("golden", "v3", "dense.pth")
    tokenizer_dir = require_shared("minimind", "v3")
    out, prompts = run_chat(
        monkeypatch,
        capsys,
        [
            "--load_from",
            str(pth),
            "--tokenizer_path",
            str(tokenizer_dir),
            "--historys",
            "2",
            "--do_sample",
            "0",
            "--max_new_tokens",
            "6",
            "--open_thinking",
            "1",
            "--show_speed",
            "0",
        ],
        stdin_text="你好\nwhy is the sky blue\n",
    )
    tokenizer, model = load_tokenizer(tokenizer_dir), weights.load(pth)
    first = [{"role": "user", "content": "你好"}]
    first_text = tokenizer.apply_chat_template(first, add_generation_prompt=True, open_thinking=True)
    assert first_text.endswith("<|im_start|>assistant\n<think>\n")
    reply = greedy_reply(model, tokenizer, tokenizer.encode(first_text), 6)
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "why is the sky blue"}]
    second_text = tokenizer.apply_chat_template(second, add_generation_prompt=True, open_thinking=True)
    assert prompts == [tokenizer.encode(first_text), tokenizer.encode(second_text)]


def test_chat_refuses_replies_past_the_rope_table_in_one_line(workdir, monkeypatch, capsys):
    pth = workdir / "weights" / "full_sft_minimind2.pth"
    monkeypatch.setattr(Decoder, "start", lambda *args, **kwargs: pytest.fail("generation started"))
    positions = weights.load(pth).config.max_position_embeddings
    assert main.main(["chat", "--load_from", str(pth), "--max_new_tokens", "100000"]) == 1  # before a turn is read
    err = capsys.readouterr().err
    assert err == (
        f"error: max_new_tokens 100000 runs past the model's {positions} positions "
        f"(max_position_embeddings, where MiniMind's RoPE table ends); at most {positions} new tokens fit\n"
    )
    assert main.main(["chat", "--load_from", str(pth), "--prompt", "hello", "--max_new_tokens", str(positions)]) == 1
    err = capsys.readouterr().err
    prompt_len = int(re.search(r"after a (\d+)-token prompt", err)[1])
    assert (
        err.count("\n") == 1 and err.endswith(f"at most {positions - prompt_len} new tokens fit\n") and prompt_len > 1
    )


def test_chat_prints_each_piece_of_a_reply_as_it_is_generated(workdir, monkeypatch):
    model = weights.load(workdir / "weights" / "full_sft_minimind2.pth")
    tokenizer = load_tokenizer(workdir / "weights")
    events = []
    step = Decoder.step
    monkeypatch.setattr(Decoder, "step", lambda self, state: (events.append(None), step(self, state))[1])
    session = chat_cli.ChatSession(model, tokenizer, max_new_tokens=24, do_sample=False)
    reply, _, _ = session.reply("tell me a joke", events.append)
    pieces = [event for event in events if event is not None]
    assert "".join(pieces) == reply == greedy_reply(model, tokenizer, session.prompt_ids("tell me a joke"), 24)
    assert len(pieces) > 3 and events.index(pieces[0]) < len(events) - 3  # written between the steps


@pytest.mark.parametrize("source", ["sentencepiece", "minimind"])
def test_stream_printer_prints_whole_characters_as_they_complete(workdir, source):
    tokenizer = load_tokenizer(workdir / "weights" if source == "sentencepiece" else require_shared("minimind", "2510"))
    ids = tokenizer.encode("Cats 🐱 sleep 你好, a lot 𝄞. Cats sleep")
    pieces = []
    printer = chat_cli.StreamPrinter(tokenizer, pieces.append)
    for token in ids:
        printer.add(token)
    assert printer.finish() == "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert "🐱" in pieces and "𝄞" in "".join(pieces) and not any("\ufffd" in piece for piece in pieces)
    assert len(pieces) > 8  # one piece per word or character, not the whole reply at the end
    unfinished = []  # a reply cut inside a character prints it as the replacement character, at the end
    printer = chat_cli.StreamPrinter(tokenizer, unfinished.append)
    for token in tokenizer.encode("a 🐱")[:-1]:
        printer.add(token)
    assert printer.finish() == "".join(unfinished) and unfinished[-1].endswith("\ufffd")
    never_whole = []  # bytes no token can complete (a lone continuation byte) are printed, not held forever
    printer = chat_cli.StreamPrinter(tokenizer, never_whole.append)
    for token in tokenizer.encode("🐱")[1:2] * 10:
        printer.add(token)
    assert "".join(never_whole).count("\ufffd") >= 10 - chat_cli.StreamPrinter.MAX_HELD_TOKENS
    for token in tokenizer.encode("你好"):
        printer.add(token)
    assert "".join(never_whole).endswith("\ufffd你好")


def test_chat_rejects_a_tokenizer_of_the_other_era(workdir, capsys):
    pth = require_shared("golden", "v3", "dense.pth")
    tokenizer_dir = require_shared("minimind", "2510")
    assert main.main(["chat", "--load_from", str(pth), "--tokenizer_path", str(tokenizer_dir), "--prompt", "x"]) == 1
    assert "is the minimind2 tokenizer but the model is minimind3" in capsys.readouterr().err


def test_model_flags_follow_minimind(workdir):
    parser = argparse.ArgumentParser()
    chat_cli.add_arguments(parser, "chat")
    pth = workdir / "weights" / "full_sft_minimind2.pth"
    model = chat_cli.load_model(
        parser.parse_args(["--load_from", str(pth), "--inference_rope_scaling", "--dtype", "bfloat16"])
    )
    assert model.config.dtype == "bfloat16" and model.config.rope_scaling["factor"] == 4  # 2510's YaRN
    # Without --load_from the file is named as MiniMind's eval_llm.py names it.
    names = [
        chat_cli.weights_path(parser.parse_args(flags))
        for flags in ([], ["--save_dir", "ckpt", "--weight", "pretrain", "--hidden_size", "768", "--use_moe", "1"])
    ]
    assert names == [pathlib.Path("out/full_sft_512.pth"), pathlib.Path("ckpt/pretrain_768_moe.pth")]


# ---------------------------------------------------------------------------------------------------------
# eval


def expected_loss(model, tokenizer, arch, kind, records, max_seq_len):
    """safe_divide(masked_ce_sums(...)) over MiniMind's own example forms, one record at a time; also how
    many records have a token to learn."""
    ce_total, tokens, learning = 0.0, 0.0, 0
    for record in records:
        if kind == "sft":
            prompt = examples.chat_prompt(tokenizer, record["conversations"], arch=arch)
            forms = (examples.minimind2_sft if arch == "minimind2" else examples.minimind3_sft)(
                tokenizer, prompt, max_seq_len
            )
        else:
            forms = (examples.minimind2_pretrain if arch == "minimind2" else examples.minimind3_pretrain)(
                tokenizer, record["text"], max_seq_len
            )
        if arch == "minimind2":
            x, y, loss_mask = (np.asarray(f)[None] for f in forms)
            logits = model(jnp.asarray(x))
        else:  # v3 feeds all ids and shifts after the forward
            input_ids, labels = (np.asarray(f)[None] for f in forms)
            logits = model(jnp.asarray(input_ids))[:, :-1]
            y, loss_mask = input_ids[:, 1:], labels[:, 1:] != examples.IGNORE_INDEX
        ce, count = masked_ce_sums(logits, jnp.asarray(y), jnp.asarray(loss_mask))
        ce_total, tokens, learning = ce_total + float(ce), tokens + float(count), learning + int(count > 0)
    return float(safe_divide(jnp.float32(ce_total), jnp.float32(tokens))), int(tokens), learning


def run_eval(workdir, capsys, pth, data_path, *extra):
    out_file = workdir / f"summary_{data_path.stem}.json"
    argv = [
        "eval",
        "--load_from",
        str(pth),
        "--data_path",
        str(data_path),
        "--cache_dir",
        str(workdir / "cache"),
        "--num_workers",
        "0",
        "--out",
        str(out_file),
        *extra,
    ]
    assert main.main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(out_file.read_text()) == printed
    return printed


@pytest.mark.parametrize("arch", ["minimind2", "minimind3"])
def test_eval_sft_loss_equals_the_masked_loss_computed_directly(workdir, capsys, arch):
    pth = workdir / "weights" / f"full_sft_{arch}.pth"
    records = [{"conversations": c} for c in CONVERSATIONS]
    data_path = write_jsonl(workdir / f"sft_{arch}.jsonl", records)
    summary = run_eval(workdir, capsys, pth, data_path, "--max_seq_len", "40", "--batch_size", "2")

    tokenizer, model = load_tokenizer(workdir / "weights"), weights.load(pth)
    loss, tokens, learning = expected_loss(model, tokenizer, arch, "sft", records, 40)
    # The first record's answer lies past 40 tokens: the pipeline drops it (and says so), MiniMind learns
    # nothing from it; either way it adds nothing to the loss.
    assert learning == len(records) - 1
    assert summary["examples"] == learning and summary["dropped"] == 1 and summary["skipped"] == 0
    assert summary["batches"] == 2 and summary["kind"] == "sft"
    assert summary["loss_tokens"] == tokens
    assert summary["loss"] == pytest.approx(loss, rel=1e-5)
    assert summary["perplexity"] == pytest.approx(math.exp(summary["loss"]), rel=1e-9)

    packed = run_eval(workdir, capsys, pth, data_path, "--max_seq_len", "40", "--batch_size", "2", "--packing", "1")
    assert packed["loss_tokens"] == tokens and packed["examples"] == learning
    assert packed["loss"] == pytest.approx(loss, rel=1e-4)


def test_eval_pretrain_kind_is_detected(workdir, capsys):
    pth = workdir / "weights" / "full_sft_minimind2.pth"
    records = [{"text": t} for t in TEXTS]
    summary = run_eval(workdir, capsys, pth, write_jsonl(workdir / "pretrain.jsonl", records), "--max_seq_len", "24")
    loss, tokens, _ = expected_loss(
        weights.load(pth), load_tokenizer(workdir / "weights"), "minimind2", "pretrain", records, 24
    )
    assert summary["kind"] == "pretrain" and summary["examples"] == 3 and summary["loss_tokens"] == tokens
    assert summary["loss"] == pytest.approx(loss, rel=1e-5)


def test_eval_bad_inputs_are_one_line_errors(workdir, capsys):
    pth = workdir / "weights" / "full_sft_minimind2.pth"
    assert main.main(["eval", "--load_from", str(workdir / "missing.pth"), "--data_path", "x.jsonl"]) == 1
    assert "missing.pth: no such weights file" in capsys.readouterr().err
    bad = workdir / "bad.jsonl"
    bad.write_text("not json\n")
    assert main.main(["eval", "--load_from", str(pth), "--data_path", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1


def test_eval_refuses_dpo_pairs_in_one_line(workdir, capsys):
    pth = workdir / "weights" / "full_sft_minimind2.pth"
    pair = {"chosen": CONVERSATIONS[2], "rejected": [CONVERSATIONS[2][0], {"role": "assistant", "content": "5"}]}
    data_path = write_jsonl(workdir / "dpo.jsonl", [pair])
    assert main.main(["eval", "--load_from", str(pth), "--data_path", str(data_path)]) == 1
    assert capsys.readouterr().err == (
        f"error: {data_path}:1: a DPO pair (chosen/rejected); eval scores SFT (conversations) or pretrain (text) "
        f"records\n"
    )


@pytest.mark.parametrize("arch, lora_dir", [("minimind2", "lora"), ("minimind3", "")])
def test_eval_llm_flags_run_unchanged(workdir, tmp_path, arch, lora_dir):
    """eval_llm.py's command line: --lora_weight NAME (where the era's eval_llm.py looks: {save_dir}/lora/ in 2510,
    {save_dir}/ in v3) gives the model --lora FILE gives; --num_hidden_layers is checked; --device is accepted."""
    import shutil

    parser = argparse.ArgumentParser()
    chat_cli.add_arguments(parser, "chat")
    shutil.copy(workdir / "weights" / f"full_sft_{arch}.pth", tmp_path / "full_sft_64.pth")
    model = with_adapters(chat_cli.load_model(parser.parse_args(["--load_from", str(tmp_path / "full_sft_64.pth")])),
                          rank=4, targets=("q_proj",), seed=0)  # fmt: skip
    model.layers.self_attn.q_proj_lora.B[...] = 0.1 * jnp.ones_like(model.layers.self_attn.q_proj_lora.B[...])
    lora_file = tmp_path / lora_dir / "lora_x_64.pth"
    lora_file.parent.mkdir(exist_ok=True)
    save_lora(model, lora_file)
    minimind = ["--save_dir", str(tmp_path), "--weight", "full_sft", "--hidden_size", "64", "--num_hidden_layers", "2"]
    by_name = chat_cli.load_model(parser.parse_args([*minimind, "--lora_weight", "lora_x", "--device", "cuda"]))
    by_file = chat_cli.load_model(parser.parse_args([*minimind, "--lora", str(lora_file)]))
    plain = chat_cli.load_model(parser.parse_args([*minimind, "--lora_weight", "None"]))
    ids = np.arange(1, 9)[None]
    np.testing.assert_array_equal(by_name(ids), by_file(ids))
    assert np.abs(np.asarray(by_name(ids)) - np.asarray(plain(ids))).max() > 1e-3  # the adapter counts
    with pytest.raises(UserError, match="--num_hidden_layers 8 but .* has 2"):
        chat_cli.load_model(parser.parse_args([*minimind[:-1], "8"]))
    with pytest.raises(UserError, match="--lora_weight nope: none of"):
        chat_cli.load_model(parser.parse_args([*minimind, "--lora_weight", "nope"]))
