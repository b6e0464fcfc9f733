"""`main.py inspect`: shows exactly the ids and loss mask training uses, for SFT and pretrain records."""

import json
import re
import sys

import pytest

import main
from minimind_jax.cli import inspect as inspect_cli
from minimind_jax.data.tokenizer import load_tokenizer
from tests.conftest import require_shared
from tests.support.data import GOOD, golden_records, write_jsonl

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def inspect(capsys, *args) -> tuple[int, str, str]:
    code = main.main(["inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("era, arch", [("2510", "minimind2"), ("v3", "minimind3")])
def test_json_matches_minimind_goldens(capsys, era, arch):
    path = require_shared("golden", era, "sft_masks.jsonl")
    code, out, _ = inspect(
        capsys,
        "--data_path",
        path,
        "--tokenizer_path",
        require_shared("minimind", era),
        "--max_seq_len",
        128,
        "--arch",
        arch,
        "--json",
    )
    assert code == 0
    shown = [json.loads(line) for line in out.splitlines()]
    records = golden_records(era, "sft_masks.jsonl")
    assert len(shown) == len(records)
    for view, record in zip(shown, records):
        assert set(view) == {"prompt", "input_ids", "loss_mask"} and view["prompt"] == record["prompt"]
        n = len(view["input_ids"])
        assert len(view["loss_mask"]) == n and view["input_ids"] == record["input_ids"][:n]
        assert not any(record["input_ids"][n:])  # only padding is left out
        if arch == "minimind2":
            target_mask = [0] + record["loss_mask"]  # loss_mask[t] is about Y[t] = ids[t+1]
        else:
            target_mask = [0] + [int(label != -100) for label in record["labels"][1:]]
        assert view["loss_mask"] == target_mask[:n] and not any(target_mask[n:])


def test_tells_sft_and_pretrain_apart(capsys, tmp_path, small_tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, {"text": "the cat sat"}])
    code, out, _ = inspect(
        capsys,
        "--data_path",
        path,
        "--tokenizer_path",
        small_tokenizer,
        "--max_seq_len",
        64,
        "--arch",
        "minimind2",
        "--json",
    )
    tokenizer = load_tokenizer(small_tokenizer)
    sft, pretrain = (json.loads(line) for line in out.splitlines())
    learned = [i for i, m in zip(sft["input_ids"], sft["loss_mask"]) if m]
    assert code == 0 and tokenizer.decode(learned) == "the mat<|im_end|>\n"
    assert sft["prompt"].startswith("<|im_start|>user\nhi cat")
    # 2510 pretrain: the text's ids with no BOS/EOS, every id after the first learned.
    assert pretrain["prompt"] == "the cat sat" and pretrain["input_ids"] == tokenizer.encode("the cat sat")
    assert pretrain["loss_mask"] == [0] + [1] * (len(pretrain["input_ids"]) - 1)


def as_terminal(monkeypatch, no_color: str | None = None) -> None:
    """Standard output (capsys's, so called in the test body) taken for a terminal; NO_COLOR as given."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    if no_color is not None:
        monkeypatch.setenv("NO_COLOR", no_color)


def test_colours_mark_the_learned_tokens(capsys, monkeypatch, tmp_path, small_tokenizer):
    as_terminal(monkeypatch)
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, {"conversations": [{"role": "user", "content": "hi"}]}])
    code, out, _ = inspect(
        capsys, "--data_path", path, "--tokenizer_path", small_tokenizer, "--max_seq_len", 64, "--arch", "minimind3"
    )
    assert code == 0
    learned_styles = "|".join(re.escape(style) for style in inspect_cli.LEARNED_STYLES)
    learned_text = "".join(
        re.findall(rf"(?:{learned_styles})(.*?)\x1b\[0m", out.split("record 1")[0].split("record 0")[1])
    )
    assert learned_text == "the mat<|im_end|>↵"
    plain = ANSI.sub("", out)
    assert "<|im_start|>user↵\nhi cat<|im_end|>↵\n<|im_start|>assistant↵\nthe mat<|im_end|>↵\n" in plain
    assert "dropped in training: no assistant turn" in plain


@pytest.mark.parametrize("no_color", [None, "1"])
def test_no_colours_into_a_pipe_or_with_no_color(capsys, monkeypatch, tmp_path, small_tokenizer, no_color):
    if no_color:  # a terminal, but NO_COLOR set
        as_terminal(monkeypatch, no_color)
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD])
    code, out, _ = inspect(
        capsys, "--data_path", path, "--tokenizer_path", small_tokenizer, "--max_seq_len", 64, "--arch", "minimind3"
    )
    assert code == 0 and not ANSI.search(out)
    assert out.startswith("⟦learned (a training target)⟧ context only\n")
    assert "<|im_start|>user↵\nhi cat<|im_end|>↵\n<|im_start|>assistant↵\n⟦the mat<|im_end|>↵\n⟧" in out


def test_an_empty_file_is_one_line_error(capsys, tmp_path, small_tokenizer):
    for name, content in (("empty.jsonl", b""), ("blank.jsonl", b"\n \n")):
        path = tmp_path / name
        path.write_bytes(content)
        code, out, err = inspect(
            capsys, "--data_path", path, "--tokenizer_path", small_tokenizer, "--arch", "minimind2"
        )
        assert code == 1 and out == "" and err == f"error: {path}: empty, no records\n"


def test_a_lone_surrogate_is_a_skipped_line_not_a_traceback(capsys, caplog, tmp_path, small_tokenizer):
    r"""A record with a lone surrogate (\ud800), which no tokenizer takes, is a malformed line: --index counts
    well-formed records, so it shows the next one, and names the line in the warning."""
    lone = json.dumps({"conversations": [{"role": "user", "content": "hi \ud800"}, GOOD["conversations"][1]]})
    path = write_jsonl(tmp_path / "lone.jsonl", [lone, GOOD])
    argv = ["--data_path", path, "--tokenizer_path", small_tokenizer, "--arch", "minimind2", "--max_seq_len", 64]
    code, out, err = inspect(capsys, *argv, "--index", 0)
    assert code == 0 and f"record 0 ({path}:2, sft, minimind2)" in out
    assert f"text is not valid Unicode (lone surrogate) (e.g. {path}:1)" in caplog.records[-1].getMessage()
    code, out, err = inspect(capsys, *argv, "--index", 1)
    assert code == 1 and err == f"error: {path}: no record 1; it has 1 well-formed records\n"
    path.write_text(lone + "\n")
    code, out, err = inspect(capsys, *argv, "--index", 0)
    assert code == 1 and out == "" and err == f"error: {path}: no well-formed records\n"


def test_a_directory_as_data_is_one_line_error(capsys, tmp_path, small_tokenizer):
    code, _, err = inspect(capsys, "--data_path", tmp_path, "--tokenizer_path", small_tokenizer, "--arch", "minimind2")
    assert code == 1 and err == f"error: {tmp_path}: is a directory, not a jsonl file\n"


def test_index_and_errors(capsys, caplog, tmp_path, small_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", ["{broken", GOOD, {"text": "the cat"}])
    code, out, err = inspect(
        capsys, "--data_path", path, "--tokenizer_path", small_tokenizer, "--arch", "minimind2", "--index", 1, "--json"
    )
    assert code == 0 and [json.loads(line)["prompt"] for line in out.splitlines()] == ["the cat"]
    code, out, err = inspect(
        capsys, "--data_path", path, "--tokenizer_path", small_tokenizer, "--arch", "minimind2", "--index", 2, "--json"
    )
    assert code == 1 and out == ""
    assert err.splitlines()[-1] == f"error: {path}: no record 2; it has 2 well-formed records"
    assert f"malformed JSON (e.g. {path}:1)" in caplog.records[-1].getMessage()
    code, _, err = inspect(capsys, "--data_path", path, "--tokenizer_path", small_tokenizer)
    assert code == 1 and "give --arch" in err
    code, _, err = inspect(
        capsys, "--data_path", tmp_path / "missing.jsonl", "--tokenizer_path", small_tokenizer, "--arch", "minimind2"
    )
    assert code == 1 and err == f"error: {tmp_path / 'missing.jsonl'}: cannot read (No such file or directory)\n"


@pytest.mark.parametrize("era, arch", [("2510", "minimind2"), ("v3", "minimind3")])
def test_shows_both_sides_of_a_dpo_pair_as_dpo_trains_on_them(capsys, era, arch):
    from minimind_jax.data.preference import load_preference_data

    path = require_shared(f"golden/post_sft/{era}/inputs/dpo.jsonl")
    tokenizer_path = require_shared(f"minimind/{era}")
    argv = ["inspect", "--data_path", str(path), "--tokenizer_path", str(tokenizer_path), "--max_seq_len", "64"]
    assert main.main([*argv, "--json"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    pairs = load_preference_data(path, load_tokenizer(tokenizer_path), arch, 64)
    assert len(shown) == len(pairs) == 4
    for record, inputs, mask in zip(shown, pairs.inputs, pairs.loss_mask):
        for side, side_inputs, side_mask in zip(("chosen", "rejected"), inputs, mask):
            view = record[side]
            n = len(view["input_ids"])
            assert view["input_ids"][: n - 1] == side_inputs.tolist()[: n - 1]  # the ids fed, padding cut
            assert view["loss_mask"][1:] == side_mask.tolist()[: n - 1] and sum(side_mask[n - 1 :]) == 0
    assert main.main([*argv, "--index", "0"]) == 0
    out = capsys.readouterr().out
    assert "record 0 chosen" in out and "record 0 rejected" in out
