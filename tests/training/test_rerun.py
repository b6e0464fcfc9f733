"""Running a training command again never loses the earlier run, not with a bad flag, nor while the earlier one
still runs; `--max_steps` counts every update of a run, and `--use_wandb` logs MiniMind's curves (W&B offline
here: no network)."""

import argparse
import dataclasses
import json
import os
import pathlib
import re
import shutil
import socket
import struct
import subprocess
import sys

import pytest

from minimind_jax.cli.train import add_arguments, config_from_args
from minimind_jax.errors import UserError
from minimind_jax.training import run
from minimind_jax.training.config import TrainConfig
from minimind_jax.training.run import train
from minimind_jax.training.run_lock import RunLock
from minimind_jax.weights.orbax import TrainCheckpoints, complete_steps
from tests.conftest import REPO_ROOT
from tests.support.runs import metrics_of, run_config

RUN_NAME = "full_sft_64"


def files_of(directory: pathlib.Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def refuse_compute(monkeypatch) -> None:
    """Fails the test if the run goes on to build the model or read the data."""

    def compute(*args, **kwargs):
        raise AssertionError("the run went on to compute")

    monkeypatch.setattr(run, "build_model", compute)
    monkeypatch.setattr(run, "load_run_data", compute)


def die_after_checkpoint(monkeypatch, step: int) -> None:
    """The process dies (a preemption without warning) right after checkpoint `step` is committed."""
    real_save = TrainCheckpoints.save

    def save_then_die(self, at_step, *args, **kwargs):
        real_save(self, at_step, *args, **kwargs)
        if at_step == step:
            self.wait()
            raise KeyboardInterrupt(f"killed after checkpoint {step}")

    monkeypatch.setattr(TrainCheckpoints, "save", save_then_die)


@pytest.mark.slow
def test_running_a_command_again_never_loses_the_earlier_run(tmp_path, chat_data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    command = run_config(
        tmp_path, chat_data, from_weight="none", checkpoint_dir=None, save_interval=1, max_steps=3, from_resume=1
    )
    checkpoints = tmp_path / "out" / "checkpoints" / RUN_NAME  # the default: under --save_dir
    logs = tmp_path / "out" / "logs" / RUN_NAME

    # --from_resume 1 with nothing to resume says so, then starts from --from_weight. Killed after update 1.
    with monkeypatch.context() as patch:
        die_after_checkpoint(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            train(command)
    notice = f"--from_resume 1: no checkpoint in {checkpoints}; starting from --from_weight none\n"
    assert notice in capsys.readouterr().out
    assert complete_steps(checkpoints) == [1]
    assert not (tmp_path / "checkpoints").exists()  # nothing relative to the working directory

    # The same command as a fresh run stops before any compute, in one line, and leaves everything as it was.
    before = files_of(tmp_path / "out")
    with monkeypatch.context() as patch:
        refuse_compute(patch)
        with pytest.raises(UserError) as refused:
            train(dataclasses.replace(command, from_resume=0))
    assert str(refused.value) == (
        f"{checkpoints} holds an earlier run's checkpoints (newest step 1): continue it "
        f"with --from_resume 1, or start over with --overwrite 1 (moves it and its logs "
        f"to a dated folder)"
    )
    assert files_of(tmp_path / "out") == before

    # Resumed, it ends where the uninterrupted run would: --max_steps counts the run's updates, not this
    # process's. Checkpointing every update goes on past the steps already there.
    assert train(command)["updates"] == 3
    assert [r["update"] for r in metrics_of(command)] == [1, 2, 3]
    longer = dataclasses.replace(command, max_steps=4)
    assert train(longer)["updates"] == 4
    assert [r["update"] for r in metrics_of(longer)] == [1, 2, 3, 4]
    assert complete_steps(checkpoints) == [2, 3, 4]  # keep_checkpoints 3
    capsys.readouterr()

    # --overwrite 1 starts over and keeps the earlier run, whole, in dated folders next to it.
    earlier_checkpoints, earlier_logs = files_of(checkpoints), files_of(logs)
    over = dataclasses.replace(command, from_resume=0, overwrite=1, max_steps=1)
    train(over)
    (moved_checkpoints,) = [path for path in checkpoints.parent.iterdir() if path != checkpoints]
    (moved_logs,) = [path for path in logs.parent.iterdir() if path != logs]
    assert re.fullmatch(rf"{RUN_NAME}\.\d{{8}}-\d{{6}}", moved_checkpoints.name)
    assert moved_logs.name == moved_checkpoints.name
    assert files_of(moved_checkpoints) == earlier_checkpoints and files_of(moved_logs) == earlier_logs
    assert (
        f"kept the earlier run: moved {checkpoints} to {moved_checkpoints} and {logs} to {moved_logs}\n"
        in capsys.readouterr().out
    )
    assert complete_steps(checkpoints) == [1] and [r["update"] for r in metrics_of(over)] == [1]

    # Another --save_dir is another run: its own checkpoints, nothing refused.
    elsewhere = dataclasses.replace(command, save_dir=str(tmp_path / "other"), from_resume=0, max_steps=1)
    train(elsewhere)
    assert complete_steps(tmp_path / "other" / "checkpoints" / RUN_NAME) == [1]
    assert complete_steps(checkpoints) == [1]


@pytest.fixture(scope="module")
def earlier_run(chat_data, tmp_path_factory) -> TrainConfig:
    """The command of a finished run (one update, checkpointed): everything under its --save_dir."""
    cfg = run_config(
        tmp_path_factory.mktemp("earlier"), chat_data, from_weight="none", checkpoint_dir=None, max_steps=1
    )
    train(cfg)
    assert complete_steps(cfg.run_checkpoint_dir) == [1] and metrics_of(cfg)
    return cfg


def saved(cfg: TrainConfig) -> dict[str, bytes]:
    return files_of(pathlib.Path(cfg.save_dir))


MISSING = "/nonexistent/minimind-jax-test"
BAD_RERUNS = {  # a flag that only a later check than the earlier run's refuses, and what the error says
    "mesh": (dict(mesh="fsdp=2,tensor=8"), "--mesh 'fsdp=2,tensor=8' needs 16 devices, but only 8 are present"),
    "data": (dict(data_path=f"{MISSING}/sft.jsonl"), f"{MISSING}/sft.jsonl"),
    "tokenizer": (dict(tokenizer_path=f"{MISSING}/tokenizer"), f"{MISSING}/tokenizer"),
    "accumulation": (dict(accumulation_steps=1000), "batches are fewer than --accumulation_steps 1000"),
    "eval data": (dict(eval_data_path=f"{MISSING}/heldout.jsonl"), f"{MISSING}/heldout.jsonl: no such data file"),
}


@pytest.mark.parametrize("bad", list(BAD_RERUNS))
def test_overwrite_with_a_bad_flag_keeps_the_earlier_run_in_place(earlier_run, bad):
    changes, expected = BAD_RERUNS[bad]
    before = saved(earlier_run)
    with pytest.raises(UserError) as error:
        train(dataclasses.replace(earlier_run, overwrite=1, **changes))
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert saved(earlier_run) == before  # nothing moved aside or written; --from_resume 1 finds it
    assert complete_steps(earlier_run.run_checkpoint_dir) == [1]


HOLD_LOCK = """
import pathlib, sys, time
from minimind_jax.training.run_lock import RunLock
lock = RunLock(pathlib.Path(sys.argv[1]), is_main=True)
lock.take()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def lock_holder():
    """Starts a process that holds a checkpoint directory's run lock, as a live run does; kills it at the end."""
    holders = []

    def start(directory: pathlib.Path) -> subprocess.Popen:
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(directory)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
        )
        holders.append(holder)
        assert holder.stdout.readline() == "held\n"
        return holder

    yield start
    for holder in holders:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def in_use(directory: pathlib.Path, pid: int) -> str:
    """The pattern of the line that refuses a run while process `pid` holds `directory`."""
    started = r"\(started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\)"
    return (
        rf"{re.escape(str(directory))} is in use by pid {pid} on host {re.escape(socket.gethostname())} {started}; "
        rf"wait for it or give another --checkpoint_dir"
    )


def test_a_second_copy_of_a_live_run_is_refused_before_it_touches_anything(earlier_run, lock_holder, monkeypatch):
    holder = lock_holder(earlier_run.run_checkpoint_dir)
    before = saved(earlier_run)  # with the live run's lock file
    refuse_compute(monkeypatch)
    for changes in ({}, {"overwrite": 1}, {"from_resume": 1}):
        with pytest.raises(UserError) as refused:
            train(dataclasses.replace(earlier_run, **changes))
        assert re.fullmatch(in_use(earlier_run.run_checkpoint_dir, holder.pid), str(refused.value)), changes
        assert saved(earlier_run) == before


def test_a_run_that_starts_meanwhile_is_refused_before_anything_is_written(
    tmp_path, chat_data, lock_holder, monkeypatch
):
    cfg = run_config(tmp_path, chat_data, from_weight="none", checkpoint_dir=None, max_steps=1)
    holders, read_data = [], run.load_run_data

    def another_run_starts(*args, **kwargs):  # after this run's first look, when --save_dir did not exist yet
        holders.append(lock_holder(cfg.run_checkpoint_dir))
        return read_data(*args, **kwargs)

    monkeypatch.setattr(run, "load_run_data", another_run_starts)
    with pytest.raises(UserError) as refused:
        train(cfg)
    assert re.fullmatch(in_use(cfg.run_checkpoint_dir, holders[0].pid), str(refused.value))
    assert list(saved(cfg)) == [f"checkpoints/{RUN_NAME}.lock"]  # the live run's lock file alone


def test_a_killed_run_leaves_no_lock_and_a_finished_one_releases_it(earlier_run, lock_holder, tmp_path, capsys):
    cfg = dataclasses.replace(earlier_run, save_dir=str(tmp_path / "out"), overwrite=1)
    shutil.copytree(earlier_run.save_dir, cfg.save_dir)
    lock_file = cfg.run_checkpoint_dir.with_name(f"{RUN_NAME}.lock")
    holder = lock_holder(cfg.run_checkpoint_dir)
    holder.kill()  # SIGKILL: no chance to clean up
    holder.wait()
    assert f"pid {holder.pid} on host" in lock_file.read_text()  # its file stays behind, unlocked

    assert train(cfg)["updates"] == 1
    assert "kept the earlier run: moved" in capsys.readouterr().out
    assert complete_steps(cfg.run_checkpoint_dir) == [1]
    assert not lock_file.exists()
    lock = RunLock(cfg.run_checkpoint_dir, is_main=True)
    lock.take()  # nothing holds it still
    assert lock_file.read_text().startswith(f"pid {os.getpid()} on host")
    lock.release()


def test_resume_and_overwrite_together_is_one_line_error():
    with pytest.raises(
        UserError,
        match=r"^--from_resume 1 continues the earlier run and --overwrite 1 starts over; "
        r"give one$",
    ):
        TrainConfig(from_resume=1, overwrite=1)


def parsed(command: str, *argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser, command)
    return config_from_args(parser.parse_args(list(argv)), command)


def test_checkpoint_wandb_and_overwrite_flags():
    cfg = parsed("sft", "--save_dir", "runs/a", "--overwrite", "1", "--use_wandb")
    assert cfg.overwrite == 1 and cfg.use_wandb and cfg.wandb_project == "MiniMind-Full-SFT"
    assert cfg.run_checkpoint_dir == pathlib.Path("runs/a/checkpoints/full_sft_512")
    assert parsed("sft", "--save_dir", "runs/b").run_checkpoint_dir == pathlib.Path("runs/b/checkpoints/full_sft_512")
    assert parsed("sft", "--checkpoint_dir", "ckpt").run_checkpoint_dir == pathlib.Path("ckpt/full_sft_512")
    pretrain = parsed("pretrain", "--wandb_project", "mine")
    assert pretrain.wandb_project == "mine" and parsed("pretrain").wandb_project == "MiniMind-Pretrain"
    assert not parsed("sft").use_wandb


def test_use_wandb_without_the_package_is_one_line_error_before_compute(tmp_path, chat_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    refuse_compute(monkeypatch)
    with pytest.raises(UserError) as error:
        train(run_config(tmp_path, chat_data, from_weight="none", use_wandb=True))
    assert str(error.value) == "--use_wandb needs the wandb package: pip install 'minimind-jax[wandb]'"
    assert not (tmp_path / "out").exists() and not (tmp_path / "checkpoints").exists()


def wandb_records(path: pathlib.Path):
    """The protobuf records of a run's `.wandb` file, read as wandb's own `wandb sync` does: a 7-byte header,
    then LevelDB-log framing (32 KiB blocks; each record's fragments carry checksum, length, type)."""
    from wandb.proto import wandb_internal_pb2

    block = 32 * 1024
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, fragments = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little room left in the block for a header: padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:  # zero-filled: the end
            break
        fragments += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(fragments)
            fragments = b""
            yield record


def offline_run(path: pathlib.Path) -> dict:
    """The run record (id, name, project) and the logged history {step: {key: value}} of an offline run."""
    run, history = None, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            history[record.history.step.num] = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
            }
    return {"id": run.run_id, "name": run.display_name, "project": run.project, "history": history}


@pytest.mark.slow
def test_use_wandb_logs_minimind_metrics_and_resumes_the_same_run(tmp_path, chat_data, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = run_config(tmp_path, chat_data, from_weight="none", use_wandb=True, save_interval=1, max_steps=2)
    train(cfg)
    resumed = dataclasses.replace(cfg, from_resume=1, max_steps=4)
    train(resumed)

    first, second = [offline_run(path) for path in sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))]
    checkpoints = TrainCheckpoints(pathlib.Path(cfg.checkpoint_dir) / RUN_NAME, create=False)
    assert first["id"] == second["id"] == checkpoints.restore_meta(4)["wandb_id"]
    assert first["name"] == second["name"] == "MiniMind-Full-SFT-Epoch-1-BatchSize-8-LearningRate-0.001"
    assert first["project"] == "MiniMind-Full-SFT"
    assert sorted(first["history"]) == [1, 2] and sorted(second["history"]) == [3, 4]

    # Every log interval (here every update): MiniMind's 2510 keys, and each metrics.jsonl field as train/*.
    logged = {**first["history"], **second["history"]}
    for record in metrics_of(resumed):
        values = logged[record["update"]]
        assert values["loss"] == pytest.approx(record["last_micro_loss"], rel=1e-12)
        assert values["lr"] == pytest.approx(record["lr"], rel=1e-12)
        assert values["epoch_Time"] >= 0
        for key, value in record.items():
            if key != "update":
                assert values[f"train/{key}"] == pytest.approx(value, rel=1e-12), key
