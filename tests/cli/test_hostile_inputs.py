"""Hostile inputs end in a one-line UserError or a counted skip: never a traceback, never code run from a
file, never work silently lost.

Covered here: jsonl lines that are malformed, truncated, binary, NUL-filled, too deeply nested, over 10 MB or
carry lone surrogates, and whole files that are binary or empty, or directories (plus hypothesis fuzzing of the
reader and of the chat template); a file where the data cache directory goes; an unknown model preset; `convert`
outputs that exist or lie under a file; a tokenizer of the wrong era or vocabulary for the model; `.pth` files
that are truncated, empty, text, of the wrong shapes or keys, or a pickle with a code payload; damaged Orbax model
checkpoints and training runs; `max_seq_len` beyond the RoPE table or below the chat template's overhead;
`batch_size` not divisible by the data-parallel size. A few cases also go through
`python main.py` to check the exit code and the single `error:` line.
"""

import codecs
import json
import os
import pathlib
import pickle
import random
import re
import shutil
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from flax import nnx

import main
import minimind_jax
from minimind_jax.data import examples, records
from minimind_jax.data.tokenizer import load_tokenizer
from minimind_jax.errors import UserError, first_line
from minimind_jax.model.config import ModelConfig, load_preset
from minimind_jax.model.transformer import MiniMind
from minimind_jax.training.config import TrainConfig
from minimind_jax.training.run import load_run_data, train
from minimind_jax.weights.orbax import TrainCheckpoints, abstract_params, save_model_checkpoint
from tests.conftest import REPO_ROOT, require_shared
from tests.support.data import GOOD, random_chats, write_jsonl
from tests.support.runs import tiny_config

SFT_32 = examples.ExampleConfig("sft", "minimind2", 32)


def load(path, tokenizer, config=SFT_32, **kwargs):
    return examples.load_dataset(
        path, tokenizer, config, cache_dir=pathlib.Path(path).parent / "cache", num_workers=0, progress=False, **kwargs
    )


# ---------------------------------------------------------------------------------------------------------
# jsonl


def hostile_lines() -> list[tuple[str, bytes]]:
    """(reason it is skipped for, line) per kind of damage; no line holds a newline."""
    rng = random.Random(0)
    good = json.dumps(GOOD).encode()
    lone_surrogate = json.dumps(
        {"conversations": [{"role": "user", "content": "hi \ud800"}, {"role": "assistant", "content": "yo"}]}
    ).encode()
    return [
        ("malformed JSON", good[: len(good) // 2]),  # a line cut in the middle (a torn write)
        ("not UTF-8", bytes(rng.choice([b for b in range(256) if b != 0x0A]) for _ in range(300))),
        ("malformed JSON", b"\0" * 64),  # NUL bytes where a record was (a crash before a flush)
        ("JSON nested too deeply", b"[" * 100_000 + b"]" * 100_000),
        ("line over 10 MB", b'{"conversations": "' + b"x" * records.MAX_LINE_BYTES + b'"}'),
        ("text is not valid Unicode (lone surrogate)", lone_surrogate),  # valid JSON, but no tokenizer takes it
    ]


@pytest.mark.parametrize("kind", records.KINDS)
def test_damaged_lines_are_skipped_counted_and_the_good_ones_kept(tmp_path, small_tokenizer, kind):
    good = json.dumps(GOOD if kind == "sft" else {"text": "the cat sat on the mat"}).encode()
    lines = hostile_lines()
    if kind == "pretrain":
        lines[-1] = (lines[-1][0], json.dumps({"text": "a \udfff b"}).encode())
    path = tmp_path / "hostile.jsonl"
    with open(path, "wb") as f:
        for _, line in lines:
            f.write(good + b"\n" + line + b"\n")
        f.write(good[:-7])  # the last line truncated, without its newline
    dataset = load(path, small_tokenizer, examples.ExampleConfig(kind, "minimind2", 32))
    assert dataset.line_numbers.tolist() == list(range(1, 2 * len(lines), 2))
    expected = {}
    for reason in [reason for reason, _ in lines] + ["malformed JSON"]:
        expected[reason] = expected.get(reason, 0) + 1
    assert dataset.report.skipped == expected
    with pytest.raises(UserError, match=r"hostile.jsonl:2: malformed JSON$"):
        load(path, small_tokenizer, examples.ExampleConfig(kind, "minimind2", 32), strict=True)


@pytest.mark.parametrize("content", [os.urandom(4096).replace(b"\n", b" "), b"", b"\n\n  \n", b"\x1f\x8b\x08\x00"])
def test_a_file_with_nothing_usable_is_one_error(tmp_path, small_tokenizer, content):
    path = tmp_path / "nothing.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"nothing.jsonl: no usable sft records$"):
        load(path, small_tokenizer)


def test_a_directory_or_missing_file_as_data_is_one_error(tmp_path, small_tokenizer):
    for path, expected in (
        (tmp_path, "is a directory, not a jsonl file"),
        (tmp_path / "missing.jsonl", "no such data file"),
    ):
        with pytest.raises(UserError, match=f"^{re.escape(str(path))}: {expected}$"):
            load(path, small_tokenizer)


def test_a_file_as_the_cache_directory_is_one_error(tmp_path, small_tokenizer):
    chats = write_jsonl(tmp_path / "chats.jsonl", random_chats(4))
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    for cache_dir in (taken, taken / "below"):
        with pytest.raises(
            UserError, match=f"^{re.escape(str(taken))}(/below)?: cannot be the data cache directory .*--cache_dir$"
        ):
            examples.load_dataset(chats, small_tokenizer, SFT_32, cache_dir=cache_dir, num_workers=0, progress=False)
    assert taken.read_text() == "not a directory"


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    line=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
            lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
            max_leaves=20,
        ).map(lambda v: json.dumps(v).encode()),
        st.builds(
            lambda c: json.dumps({"conversations": c}).encode(),
            st.lists(
                st.dictionaries(
                    st.sampled_from(["role", "content", "x"]), st.one_of(st.text(), st.integers(), st.none())
                )
            ),
        ),
    ),
    kind=st.sampled_from(records.KINDS),
)
def test_fuzzed_lines_parse_or_are_bad_records(line, kind):
    try:
        record = records.parse_record(line, kind)
    except records.BadRecord:
        return
    assert isinstance(record, dict)


@hypothesis.settings(max_examples=50, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(content=st.binary(max_size=400))
def test_fuzzed_files_read_into_records_or_counted_skips(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.jsonl"
    path.write_bytes(content)
    report = records.SkipReport(str(path))
    read = list(records.read_jsonl(path, kind=None, report=report))
    lines = content.removeprefix(codecs.BOM_UTF8).split(b"\n")  # a leading byte order mark is dropped
    nonblank = sum(1 for line in lines if line.strip())
    assert len(read) + report.num_skipped == nonblank
    assert all(isinstance(record, dict) for _, record in read)


messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "tool"]),
            "content": st.one_of(
                st.text(max_size=40), st.sampled_from(["<|im_start|>", "<|im_end|>", "{{ x }}", "{% if %}"])
            ),
        },
        optional={
            "reasoning_content": st.text(max_size=20),
            "tool_calls": st.one_of(st.text(max_size=20), st.just("[]")),
        },
    ),
    min_size=1,
    max_size=5,
)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(conversations=messages, arch=st.sampled_from(["minimind2", "minimind3"]))
def test_fuzzed_chats_render_encode_or_are_skipped(small_tokenizer, conversations, arch):
    """Whatever a well-formed record holds, turning it into an example gives an example, a counted skip or a
    counted drop, for both eras' rules."""
    encoder = examples.RecordEncoder(load_tokenizer(small_tokenizer), examples.ExampleConfig("sft", arch, 64))
    record = {"conversations": conversations}
    try:
        records.check_record(record, "sft")
        tokens, learned = encoder.encode(record, line_no=1)
    except (records.BadRecord, records.DroppedRecord):
        return
    assert len(tokens) == len(learned) <= 64 and learned.any()


@pytest.fixture(scope="module")
def minimind_tokenizers() -> dict:
    return {era: load_tokenizer(require_shared("minimind", era)) for era in ("2510", "v3")}


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(conversations=messages, add_generation_prompt=st.booleans())
def test_fuzzed_chats_through_minimind_templates(minimind_tokenizers, conversations, add_generation_prompt):
    for tokenizer in minimind_tokenizers.values():
        try:
            prompt = tokenizer.apply_chat_template(conversations, add_generation_prompt=add_generation_prompt)
        except UserError as error:
            assert "\n" not in str(error)
            continue
        assert isinstance(prompt, str)


# ---------------------------------------------------------------------------------------------------------
# Settings that cannot work


def short_chats_learn(tokenizer, arch: str, max_seq_len: int) -> list[bool]:
    """Whether each of the shortest chats (a reply, with or without an empty system turn) keeps a token to learn."""
    encoder = examples.RecordEncoder(tokenizer, examples.ExampleConfig("sft", arch, max_seq_len))
    reply = {"role": "assistant", "content": "hi"}
    learns = []
    for turns in ([reply], [{"role": "system", "content": ""}, reply]):
        try:
            learns.append(bool(encoder.encode({"conversations": turns}, 1)[1].any()))
        except records.DroppedRecord:
            learns.append(False)
    return learns


def test_max_seq_len_that_leaves_no_room_for_a_reply_is_refused_before_tokenizing(tmp_path, small_tokenizer):
    tokenizer = load_tokenizer(small_tokenizer)
    shortest = examples.shortest_sft_prompt(tokenizer, "minimind2")
    # The bound is exact: at it the shortest chats learn nothing, one position more and one of them does.
    assert not any(short_chats_learn(tokenizer, "minimind2", shortest))
    assert any(short_chats_learn(tokenizer, "minimind2", shortest + 1))
    path = write_jsonl(tmp_path / "chats.jsonl", random_chats(5))
    with pytest.raises(UserError, match=f"^--max_seq_len {shortest} leaves no room for a reply"):
        load(path, tokenizer, examples.ExampleConfig("sft", "minimind2", shortest))
    assert not (tmp_path / "cache").exists()  # refused before anything was tokenized


@pytest.mark.parametrize("era,arch", [("2510", "minimind2"), ("v3", "minimind3")])
def test_shortest_prompt_of_minimind_templates(minimind_tokenizers, era, arch):
    tokenizer = minimind_tokenizers[era]
    shortest = examples.shortest_sft_prompt(tokenizer, arch)
    assert not any(short_chats_learn(tokenizer, arch, shortest))
    assert any(short_chats_learn(tokenizer, arch, shortest + 1))


def run_config(tmp_path, tokenizer, data_path, **overrides) -> TrainConfig:
    fields = dict(from_weight="none", hidden_size=32, cache_dir=str(tmp_path / "cache"))
    return tiny_config(tmp_path, data_path, tokenizer, **{**fields, **overrides})


def test_impossible_run_settings_fail_before_training(tmp_path, small_tokenizer):
    chats = write_jsonl(tmp_path / "chats.jsonl", random_chats(20))
    cases = {
        "--batch_size 12 is not divisible by the data-parallel size 8": dict(batch_size=12),
        "--max_seq_len 40000 exceeds the model's max_position_embeddings 32768": dict(max_seq_len=40000),
        "--max_seq_len must be an integer >= 1, got 0": dict(max_seq_len=0),
        "--packing 1: DPO keeps each pair's chosen and rejected rows apart and together": dict(
            mode="dpo", packing=True
        ),
        "--eval_data_path scores a masked LM loss; DPO's pairs have none": dict(mode="dpo", eval_data_path=chats),
        "--lora_targets q_proj,gate_proj: gate_proj not among": dict(mode="lora", lora_targets="q_proj,gate_proj"),
        "--alpha must be a number in [0, 1], got 2": dict(mode="distill", alpha=2),
        "distill_reason is 2510's recipe": dict(mode="distill_reason", arch="minimind3"),
    }
    for expected, overrides in cases.items():
        with pytest.raises(UserError) as error:
            train(run_config(tmp_path, small_tokenizer, chats, **overrides))
        assert expected in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "checkpoints").exists()


def test_an_unknown_model_preset_is_one_line_error_listing_the_presets():
    with pytest.raises(
        UserError, match=r"^nope: no such preset or file \(looked for .*nope.yaml\); presets: .*minimind3-moe$"
    ):
        load_preset("nope")


def test_tokenizer_must_fit_the_model(tmp_path, small_tokenizer):
    chats = write_jsonl(tmp_path / "chats.jsonl", random_chats(4))
    cfg = run_config(tmp_path, small_tokenizer, chats)
    with pytest.raises(UserError, match=r"tok.model: vocab 300 exceeds the model's 256$"):
        load_run_data(cfg, cfg.data_path, ModelConfig(hidden_size=32, num_hidden_layers=2, vocab_size=256))


@pytest.mark.parametrize("era,model_arch", [("2510", "minimind3"), ("v3", "minimind2")])
def test_tokenizer_of_the_other_era_is_refused(tmp_path, era, model_arch):
    tokenizer = require_shared("minimind", era)
    chats = write_jsonl(tmp_path / "chats.jsonl", random_chats(4))
    cfg = run_config(tmp_path, tokenizer, chats, arch=model_arch)
    with pytest.raises(
        UserError,
        match=f"is the {'minimind2' if era == '2510' else 'minimind3'} tokenizer but the "
        f"model is {model_arch}; their token ids differ$",
    ):
        load_run_data(cfg, cfg.data_path, ModelConfig(arch=model_arch, hidden_size=32, num_hidden_layers=2))


# ---------------------------------------------------------------------------------------------------------
# .pth files


class CodePayload:
    """Unpickling this runs `touch marker`: what a malicious .pth does."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def pth_files(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Hostile .pth files next to a good one, and the marker a code payload would create."""
    directory = tmp_path_factory.mktemp("pth")
    marker = directory / "payload_ran"
    good = minimind_jax.save_pth(
        MiniMind(ModelConfig(hidden_size=32, num_hidden_layers=2), rngs=nnx.Rngs(0)), directory / "good.pth"
    )
    state = torch.load(good, weights_only=True)
    files = {"good": good, "marker": marker}

    def write(name, save):
        files[name] = directory / f"{name}.pth"
        save(files[name])

    write("zip_payload", lambda p: torch.save({**state, "extra": CodePayload(marker)}, p))
    write("legacy_payload", lambda p: torch.save({"x": CodePayload(marker)}, p, _use_new_zipfile_serialization=False))
    write("pickle_payload", lambda p: p.write_bytes(pickle.dumps(CodePayload(marker))))
    write("truncated", lambda p: p.write_bytes(good.read_bytes()[: good.stat().st_size // 2]))
    write("empty", lambda p: p.write_bytes(b""))
    write("text", lambda p: p.write_text("hello, not weights"))
    write(
        "wrong_shape", lambda p: torch.save({**state, "model.layers.1.self_attn.q_proj.weight": torch.zeros(10, 32)}, p)
    )
    write("missing_key", lambda p: torch.save({k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k}, p))
    write("untied", lambda p: torch.save({**state, "lm_head.weight": state["lm_head.weight"] + 1}, p))
    write("not_a_dict", lambda p: torch.save([torch.zeros(2)], p))
    return files


PTH_ERRORS = {
    "zip_payload": "refused to load: it holds objects other than tensors (Trying to load unsupported GLOBAL",
    "legacy_payload": "refused to load: it holds objects other than tensors (Trying to load unsupported GLOBAL",
    "pickle_payload": "not a .pth file (truncated or corrupt?)",
    "truncated": "not a readable .pth file (truncated or corrupt?)",
    "empty": "not a readable .pth file (truncated or corrupt?)",
    "text": "not a readable .pth file (truncated or corrupt?)",
    "wrong_shape": "model.layers.1.self_attn.q_proj.weight has shape [10, 32], expected [32, 32]",
    "missing_key": "missing 1 key(s): model.layers.1.mlp.up_proj.weight",
    "untied": "lm_head.weight differs from model.embed_tokens.weight",
    "not_a_dict": "not a state dict of tensors (got list)",
}


@pytest.mark.parametrize("name", list(PTH_ERRORS))
def test_hostile_pth_is_one_line_error_and_runs_no_code(pth_files, name):
    with pytest.raises(UserError) as error:
        minimind_jax.load(pth_files[name])
    message = str(error.value)
    assert message.startswith(f"{pth_files[name]}: ") and PTH_ERRORS[name] in message and "\n" not in message
    assert not pth_files["marker"].exists()


def convert(capsys, *args) -> tuple[int, str]:
    code = main.main(["convert", *map(str, args)])
    return code, capsys.readouterr().err


def test_convert_refuses_outputs_it_cannot_or_must_not_write(pth_files, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    full = tmp_path / "full"
    (full / "x").mkdir(parents=True)
    cases = {  # output -> the error line
        a_file / "x.pth": f"{a_file / 'x.pth'}: cannot be written, {a_file} is a file",
        a_file / "ckpt": f"{a_file / 'ckpt'}: cannot be written, {a_file} is a file",
        a_file: f"{a_file}: exists; choose a new output path (convert never overwrites)",
        pth_files["good"]: f"{pth_files['good']}: exists; choose a new output path (convert never overwrites)",
        full: f"{full}: exists; choose a new output path (convert never overwrites)",
    }
    before = pth_files["good"].read_bytes()
    for output, expected in cases.items():
        for extra in ((), ("--format", "hf")) if output.suffix != ".pth" else ((),):
            assert convert(capsys, pth_files["good"], output, *extra) == (1, f"error: {expected}\n"), output
    assert a_file.read_text() == "keep me" and pth_files["good"].read_bytes() == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert(capsys, pth_files["good"], empty)[0] == 0 and (empty / "config.json").is_file()


def test_convert_help_names_every_hugging_face_architecture(capsys):
    from minimind_jax.weights.hf import ARCHITECTURES

    with pytest.raises(SystemExit):
        main.main(["convert", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for (arch, moe), (name, _) in ARCHITECTURES.items():
        assert f"{name} ({'2510' if arch == 'minimind2' else 'v3'} {'MoE' if moe else 'dense'})" in help_text


# ---------------------------------------------------------------------------------------------------------
# Orbax checkpoints


def damage_all(directory: pathlib.Path, how) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            path.write_bytes(how(path.read_bytes()))


@pytest.fixture(scope="module")
def model_checkpoint(tmp_path_factory) -> pathlib.Path:
    model = MiniMind(ModelConfig(hidden_size=32, num_hidden_layers=2), rngs=nnx.Rngs(0))
    return save_model_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "model")


CHECKPOINT_DAMAGE = {
    "truncated params": (
        lambda d: damage_all(d / "params", lambda b: b[: len(b) // 2]),
        "params: corrupt or incomplete",
    ),
    "garbled params": (
        lambda d: damage_all(
            d / "params" / "ocdbt.process_0" / "d", lambda b: bytes(random.Random(len(b)).randbytes(len(b)))
        ),
        "params: corrupt or incomplete",
    ),
    "no manifest": (
        lambda d: [p.unlink() for p in (d / "params").rglob("manifest.ocdbt")],
        "params: corrupt or incomplete",
    ),
    "config not JSON": (lambda d: (d / "config.json").write_text("{oops"), "config.json: corrupt config"),
    "config of another size": (
        lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "hidden_size": 64})
        ),
        "params: corrupt or incomplete",
    ),
    "config with unknown field": (
        lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "bogus": 1})
        ),
        "config.json: not a valid model config",
    ),
    "config with another activation": (
        lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "hidden_act": "gelu"})
        ),
        "config.json: not a valid model config (hidden_act must be 'silu'",
    ),
    "no params": (lambda d: shutil.rmtree(d / "params"), "neither a model checkpoint (params/) nor a training run"),
}


def test_first_line_of_an_error_is_one_short_line():
    assert first_line(ValueError("  bad header\n  at byte 12\n")) == "bad header"
    assert first_line(KeyError()) == "KeyError" and len(first_line(OSError("x" * 500))) == 200


@pytest.mark.parametrize(
    "field, value", [("hidden_act", "gelu"), ("tie_word_embeddings", False), ("scoring_func", "sigmoid")]
)
def test_a_field_minimind_fixes_takes_only_its_value(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be .* got {value!r}$"):
        ModelConfig(**{field: value})
    assert ModelConfig.from_dict({field: getattr(ModelConfig(), field)})  # MiniMind's own value passes


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_damaged_model_checkpoint_is_one_line_error(model_checkpoint, tmp_path, damage):
    damaged = tmp_path / "damaged"
    shutil.copytree(model_checkpoint, damaged)
    apply, expected = CHECKPOINT_DAMAGE[damage]
    apply(damaged)
    with pytest.raises(UserError) as error:
        minimind_jax.load(damaged)
    assert expected in str(error.value) and "\n" not in str(error.value)


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory, small_tokenizer) -> dict:
    """A tiny training run of 2 updates whose newest checkpoint (2) has its state files cut in half."""
    directory = tmp_path_factory.mktemp("run")
    chats = write_jsonl(directory / "chats.jsonl", random_chats(40))
    cfg = run_config(directory, small_tokenizer, chats, max_steps=2, save_interval=1)
    train(cfg)
    run = pathlib.Path(cfg.checkpoint_dir) / cfg.run_name
    damage_all(run / "2" / "state", lambda b: b[: len(b) // 2])
    return {"cfg": cfg, "run": run}


def test_damaged_training_checkpoint_is_one_line_error_on_load(damaged_run):
    run = damaged_run["run"]
    with pytest.raises(UserError) as error:
        minimind_jax.load(run)
    assert str(error.value).startswith(f"{run.resolve()}/2/state: corrupt or incompatible checkpoint (")
    assert "\n" not in str(error.value)
    # The step before it is untouched and still loads.
    checkpoints = TrainCheckpoints(run, create=False)
    config = ModelConfig.from_dict(checkpoints.restore_meta(1)["model_config"])
    assert np.isfinite(
        np.asarray(checkpoints.restore_state(1, abstract_params(config))["params"]["embed_tokens"])
    ).all()


def resumed_copy(damaged_run, tmp_path, **overrides) -> TrainConfig:
    """The damaged run's config resuming from a copy of its checkpoints, writing under tmp_path."""
    cfg = TrainConfig(
        **{
            **damaged_run["cfg"].__dict__,
            "checkpoint_dir": str(tmp_path / "checkpoints"),
            "save_dir": str(tmp_path / "out"),
            "from_resume": 1,
            **overrides,
        }
    )
    shutil.copytree(damaged_run["run"], pathlib.Path(cfg.checkpoint_dir) / cfg.run_name)
    return cfg


def test_resume_moves_a_damaged_newest_checkpoint_aside_and_goes_on_from_the_one_before(damaged_run, tmp_path, caplog):
    cfg = resumed_copy(damaged_run, tmp_path, max_steps=3)  # 3 updates in all
    run = pathlib.Path(cfg.checkpoint_dir) / cfg.run_name
    train(cfg)
    assert f"{run}/2/state: corrupt or incompatible checkpoint (" in caplog.text
    assert "moved it to 2.damaged, resuming from step 1" in caplog.text
    assert (run / "2.damaged" / "state").is_dir()  # kept, not deleted
    checkpoints = TrainCheckpoints(run, create=False)
    assert checkpoints.latest_step() == 3  # updates 2 and 3 trained again from step 1
    assert checkpoints.restore_meta(3)["update"] == 3


def test_resume_with_no_restorable_checkpoint_moves_nothing(damaged_run, tmp_path):
    cfg = resumed_copy(damaged_run, tmp_path)
    run = pathlib.Path(cfg.checkpoint_dir) / cfg.run_name
    damage_all(run / "1" / "state", lambda b: b[: len(b) // 2])
    with pytest.raises(UserError) as error:
        train(cfg)
    assert str(error.value).startswith(f"{run}/2/state: corrupt or incompatible checkpoint (")
    assert sorted(p.name for p in run.iterdir()) == ["1", "2"]


# ---------------------------------------------------------------------------------------------------------
# Through the command line


@pytest.mark.slow
def test_cli_prints_one_error_line_and_no_traceback(tmp_path, small_tokenizer, pth_files, damaged_run):
    """Several hostile cases at once, each its own `python main.py` process, run side by side."""
    chats = write_jsonl(tmp_path / "chats.jsonl", random_chats(20))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(os.urandom(20_000))
    sft = [
        sys.executable,
        str(REPO_ROOT / "main.py"),
        "sft",
        "--tokenizer_path",
        str(small_tokenizer),
        "--hidden_size",
        "32",
        "--num_hidden_layers",
        "2",
        "--max_seq_len",
        "48",
        "--batch_size",
        "8",
        "--num_workers",
        "0",
        "--no_progress",
        "--cache_dir",
        str(tmp_path / "cache"),
        "--save_dir",
        str(tmp_path / "out"),
        "--checkpoint_dir",
        str(tmp_path / "checkpoints"),
    ]
    resume = resumed_copy(damaged_run, tmp_path / "resume")
    damage_all(pathlib.Path(resume.checkpoint_dir) / resume.run_name / "1" / "state", lambda b: b[: len(b) // 2])
    cases = {
        "refused to load: it holds objects other than tensors": [
            sys.executable,
            str(REPO_ROOT / "main.py"),
            "convert",
            str(pth_files["zip_payload"]),
            str(tmp_path / "o"),
        ],
        "legacy_payload.pth: refused to load": [
            *sft,
            "--data_path",
            str(chats),
            "--from_weight",
            str(pth_files["legacy_payload"]),
        ],
        "binary.jsonl: no usable sft records": [*sft, "--data_path", str(binary), "--from_weight", "none"],
        "/2/state: corrupt or incompatible checkpoint": [  # no step restores
            *sft,
            "--data_path",
            resume.data_path,
            "--from_weight",
            "none",
            "--from_resume",
            "1",
            "--checkpoint_dir",
            resume.checkpoint_dir,
            "--cache_dir",
            resume.cache_dir,
            "--max_steps",
            "3",
        ],
    }
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    processes = {
        expected: subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for expected, command in cases.items()
    }
    for expected, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 1, stderr
        assert "Traceback" not in stderr, stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and expected in last, stderr
    assert not pth_files["marker"].exists()
