"""Crash safety of real `main.py sft` processes: SIGKILL at random moments (some in the middle of an async
checkpoint write), then `--from_resume 1`, until the run ends.

One uninterrupted reference run, then one chain of runs on the same settings: each link resumes the previous
one and is killed, ten times, then stopped once with SIGTERM and once with SIGINT (Ctrl-C), then allowed to
finish. After every interruption the next link must resume from the newest complete checkpoint; at the end
every logged update and the final parameters must equal the reference run's exactly (CPU, fp32).

The model is tiny (hidden 32, 2 layers, seq 64) on a corpus from `minimind_jax.corpus` with a SentencePiece
tokenizer trained here, so no ../shared is needed. The persistent XLA compilation cache
(--compilation_cache_dir) makes every process after the first skip compilation.
"""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from minimind_jax.data.corpus import build_corpus
from minimind_jax.data.tokenizer import train_sentencepiece
from tests.conftest import REPO_ROOT

RUN_NAME = "full_sft_32"
TIMEOUT_S = 120  # for one process; a healthy one needs ~15 s here
KILL_MODES = ["checkpoint_write"] * 4 + ["after_updates"] * 4 + ["any_time"] * 2
TMP_MARK = ".orbax-checkpoint-tmp"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Corpus, tokenizer, the training command and its environment."""
    work = tmp_path_factory.mktemp("crash")
    corpus = build_corpus(
        work / "corpus",
        sources=("chatterbot", "chitchat"),
        languages=("english",),
        max_conversations=60,
        heldout_fraction=0.0,
    )
    tokenizer = train_sentencepiece([corpus["pretrain"]], work / "tokenizer" / "sp", vocab_size=600)
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONUNBUFFERED="1",
    )
    flags = [
        "--tokenizer_path",
        str(tokenizer),
        "--data_path",
        str(corpus["sft"]),
        "--from_weight",
        "none",
        "--hidden_size",
        "32",
        "--num_hidden_layers",
        "2",
        "--max_seq_len",
        "64",
        "--batch_size",
        "4",
        "--epochs",
        "2",
        "--learning_rate",
        "1e-3",
        "--log_interval",
        "1",
        "--save_interval",
        "1",
        "--cache_dir",
        str(work / "data_cache"),
        "--compilation_cache_dir",
        str(work / "xla_cache"),
        "--mesh",
        "data=2",
        "--no_progress",
    ]
    return {"work": work, "env": env, "flags": flags}


class Run:
    """One `main.py sft` process in `directory`; its stdout and stderr lines are collected as they come."""

    def __init__(self, setup, directory: pathlib.Path, resume: bool):
        self.directory = directory
        self.checkpoints = directory / "checkpoints" / RUN_NAME
        self.metrics = directory / "out" / "logs" / RUN_NAME / "metrics.jsonl"
        directory.mkdir(exist_ok=True)
        command = [
            sys.executable,
            str(REPO_ROOT / "main.py"),
            "sft",
            *setup["flags"],
            "--save_dir",
            str(directory / "out"),
            "--checkpoint_dir",
            str(directory / "checkpoints"),
            "--from_resume",
            str(int(resume)),
        ]
        self.process = subprocess.Popen(
            command, cwd=directory, env=setup["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.started = time.monotonic()
        self.started_ns = time.time_ns()
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self._reader.start()

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_until(self, condition, what: str, interval_s: float = 0.01) -> bool:
        """Polls `condition`; False if the process ended first."""
        while not condition():
            if not self.alive():
                return False
            if time.monotonic() - self.started > TIMEOUT_S:
                self.process.kill()
                pytest.fail(f"{what}: no progress after {TIMEOUT_S} s\n{self.output()}")
            time.sleep(interval_s)
        return True

    def finish(self) -> int:
        try:
            code = self.process.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"did not finish in {TIMEOUT_S} s\n{self.output()}")
        self._reader.join()
        return code

    def output(self) -> str:
        return "".join(self.lines[-40:])

    def started_from(self) -> int | None:
        """The update the trainer said it resumed at, 0 for a fresh start, None if it got killed before saying."""
        for line in self.lines:
            if line.startswith("resumed "):
                return int(line.split(" at update ")[1].split()[0])
            if line.startswith("sft: "):  # the run's header, printed after restoring
                return 0
        return None


def complete_steps(checkpoints: pathlib.Path) -> list[int]:
    """Steps whose directory got its final name: Orbax writes a step under a temporary name and renames it
    when every file is written."""
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.exists() else []


def steps_being_written(checkpoints: pathlib.Path, since_ns: int = 0) -> list[int]:
    """Steps with a temporary directory created after `since_ns` (a killed run may have left older ones)."""
    steps = []
    for path in checkpoints.iterdir() if checkpoints.exists() else []:
        try:
            if TMP_MARK in path.name and path.stat().st_mtime_ns >= since_ns:
                steps.append(int(path.name.split(".")[0]))
        except FileNotFoundError:  # renamed or deleted since the listing
            pass
    return steps


def read_metrics(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def records_written(run: Run) -> int:
    """Complete lines of the run's metrics.jsonl."""
    try:
        return run.metrics.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def assert_pth_loads(path: pathlib.Path) -> None:
    """The exported weights are never half-written: if the file is there, it loads."""
    if path.exists():
        from minimind_jax.weights.pth import read_state_dict

        assert "model.embed_tokens.weight" in read_state_dict(path)


def kill_at_random_moment(run: Run, mode: str, rng: random.Random) -> dict:
    """SIGKILLs `run` at a moment chosen by `mode`; returns what was going on at that moment."""
    start_records = records_written(run)
    if mode == "checkpoint_write":
        # The first checkpoint this link starts writing after it has logged an update of its own.
        run.wait_until(lambda: records_written(run) > start_records, "first update")
        logged = [r["update"] for r in read_metrics(run.metrics)]
        assert logged, f"the run ended before logging an update\n{run.output()}"
        target = max(logged) + rng.randint(0, 1)
        run.wait_until(
            lambda: any(step >= target for step in steps_being_written(run.checkpoints, run.started_ns)),
            "checkpoint write",
            interval_s=0.001,
        )
    elif mode == "after_updates":
        count = rng.randint(1, 4)
        run.wait_until(lambda: records_written(run) >= start_records + count, f"{count} updates")
        time.sleep(rng.uniform(0, 0.3))
    else:
        time.sleep(rng.uniform(1.0, 12.0))  # imports, tokenizing, restoring, compiling or training
    writing = steps_being_written(run.checkpoints, run.started_ns)
    run.process.send_signal(signal.SIGKILL)
    code = run.finish()
    return {
        "mode": mode,
        "code": code,
        "writing": writing,
        "caught_mid_write": bool(set(writing) & set(steps_being_written(run.checkpoints))),
    }


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted_run(setup):
    reference = Run(setup, setup["work"] / "reference", resume=False)  # runs alongside the chain
    rng = random.Random(20250101)
    modes = KILL_MODES[:]
    rng.shuffle(modes)
    chain = setup["work"] / "chain"
    trials = []
    expected_start = 0  # no checkpoint yet: the first link starts afresh despite --from_resume 1
    for link, mode in enumerate(modes + ["SIGTERM", "SIGINT", "finish"]):
        run = Run(setup, chain, resume=True)
        if mode == "finish":
            assert run.finish() == 0, run.output()
        elif mode in ("SIGTERM", "SIGINT"):
            start_records = records_written(run)
            assert run.wait_until(
                lambda run=run, start=start_records: records_written(run) >= start + 2, "2 updates"
            ), run.output()
            run.process.send_signal(getattr(signal, mode))
            assert run.finish() == 0, run.output()
            saved = [line for line in run.lines if line.startswith(f"{mode}: saved update")]
            assert saved and not any("Traceback" in line for line in run.lines), run.output()
            stopped_at = int(saved[0].split()[3])
            assert complete_steps(run.checkpoints)[-1] == stopped_at
            assert read_metrics(run.metrics)[-1]["update"] == stopped_at  # its metrics were written first
        else:
            trial = kill_at_random_moment(run, mode, rng)
            assert trial["code"] == -signal.SIGKILL, f"link {link} ended by itself before the kill\n{run.output()}"
            trials.append(trial)
        # The link resumed from the newest complete checkpoint its predecessor left.
        assert run.started_from() in (expected_start, None), (link, mode, run.output())
        assert_pth_loads(chain / "out" / f"{RUN_NAME}.pth")
        steps = complete_steps(run.checkpoints)
        expected_start = steps[-1] if steps else 0
        print(
            f"link {link} {mode}: started at {run.started_from()}, ran {time.monotonic() - run.started:.1f} s, "
            f"newest complete step {expected_start}"
        )

    assert not steps_being_written(chain / "checkpoints" / RUN_NAME)  # half-written steps were cleaned up
    assert any((setup["work"] / "xla_cache").iterdir())  # --compilation_cache_dir reached JAX
    assert reference.finish() == 0, reference.output()
    expected_records = read_metrics(reference.metrics)
    assert [r["update"] for r in expected_records] == list(range(1, len(expected_records) + 1))
    assert len(expected_records) > 50  # room for every link to make progress

    # Every update is logged once, and each number equals the uninterrupted run's bit for bit.
    records = read_metrics(chain / "out" / "logs" / RUN_NAME / "metrics.jsonl")
    assert [r["update"] for r in records] == [r["update"] for r in expected_records]
    for got, expected in zip(records, expected_records):
        for key in ("loss", "logits_loss", "grad_norm", "lr", "skipped"):
            assert got[key] == expected[key], (key, got["update"])

    from minimind_jax.weights.orbax import restore_params

    _, final = restore_params(chain / "checkpoints" / RUN_NAME)
    _, expected_final = restore_params(reference.checkpoints)
    import jax

    for got, expected in zip(jax.tree.leaves(final), jax.tree.leaves(expected_final)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))

    assert len(trials) == 10
    mid_write = sum(t["caught_mid_write"] for t in trials)
    print(
        f"{len(trials)} SIGKILL trials ({', '.join(t['mode'] for t in trials)}); {mid_write} killed an "
        f"unfinished checkpoint write"
    )
    assert mid_write >= 2, trials
