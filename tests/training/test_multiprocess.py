"""Multi-process training for real: `main.py sft` in 2 processes of 4 CPU devices each, joined by
jax.distributed (--coordinator_address, gloo collectives), against 1 process of 8 devices with the same flags
and mesh. The same global batches, sharded the same way, give the same losses and weights, through a SIGKILL of
both processes after a checkpoint and a SIGTERM to one of them, each followed by --from_resume 1.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from minimind_jax.weights.orbax import complete_steps
from tests.conftest import REPO_ROOT

RUN_NAME = "full_sft_32"
UPDATES = 12
TIMEOUT_S = 300  # for one run; ~20 s on 2 idle cores


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(setup, directory, num_processes: int, resume: bool = False) -> list[subprocess.Popen]:
    """The run's processes, each seeing 8 / num_processes CPU devices; output goes to {directory}.p{i}.log."""
    port = free_port()
    env = dict(setup["env"], XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // num_processes}")
    processes = []
    for process_id in range(num_processes):
        command = [sys.executable, str(REPO_ROOT / "main.py"), "sft", *setup["flags"]]
        command += ["--save_dir", str(directory / "out"), "--checkpoint_dir", str(directory / "checkpoints")]
        command += ["--from_resume", str(int(resume))]
        if num_processes > 1:
            command += ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(num_processes)]
            command += ["--process_id", str(process_id)]
        log = open(f"{directory}.p{process_id}.log", "a")
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return processes


def output(directory, num_processes: int) -> str:
    return "\n".join(open(f"{directory}.p{i}.log").read()[-3000:] for i in range(num_processes))


def finish(processes, directory) -> None:
    for process in processes:
        try:
            code = process.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail(f"no end after {TIMEOUT_S} s\n{output(directory, len(processes))}")
        assert code == 0, output(directory, len(processes))


def metrics(directory) -> list[dict]:
    lines = (directory / "out" / "logs" / RUN_NAME / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def final_params(directory) -> dict:
    from minimind_jax.weights.orbax import restore_params

    return restore_params(directory / "checkpoints" / RUN_NAME)[1]


@pytest.fixture(scope="module")
def setup(chat_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("multiprocess")
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONUNBUFFERED="1",
    )
    flags = ["--tokenizer_path", str(chat_data["tokenizer"]), "--data_path", str(chat_data["sft"])]
    flags += ["--from_weight", "none", "--hidden_size", "32", "--num_hidden_layers", "2", "--max_seq_len", "48"]
    flags += ["--batch_size", "8", "--epochs", "1", "--max_steps", str(UPDATES), "--learning_rate", "1e-3"]
    flags += ["--log_interval", "1", "--save_interval", "2", "--num_workers", "0", "--no_progress"]
    flags += ["--eval_data_path", str(chat_data["sft_heldout"])]  # at the end, over both processes' rows too
    # data splits the batch over the processes; fsdp and tensor split the weights within each
    flags += ["--mesh", "data=2,fsdp=2,tensor=2"]
    flags += ["--cache_dir", str(work / "data_cache"), "--compilation_cache_dir", str(work / "xla_cache")]
    return {"work": work, "env": env, "flags": flags}


def wait_for(processes, directory, condition) -> None:
    """Polls `condition` while every process runs."""
    started = time.monotonic()
    while not condition():
        assert all(process.poll() is None for process in processes), output(directory, len(processes))
        assert time.monotonic() - started < TIMEOUT_S, output(directory, len(processes))
        time.sleep(0.01)


@pytest.mark.slow
def test_two_processes_equal_one_through_sigkill_and_sigterm(setup):
    one, two = setup["work"] / "one_process", setup["work"] / "two_processes"
    checkpoints = two / "checkpoints" / RUN_NAME
    finish(launch(setup, one, 1), one)
    expected = metrics(one)
    assert [record["update"] for record in expected] == list(range(1, UPDATES + 1))

    # Both processes are killed once a checkpoint is complete, mid-run.
    processes = launch(setup, two, 2)
    wait_for(processes, two, lambda: complete_steps(checkpoints))
    for process in processes:
        process.send_signal(signal.SIGKILL)
    assert [process.wait() for process in processes] == [-signal.SIGKILL] * 2
    killed_at = complete_steps(checkpoints)[-1]

    # Both resume from it; a preemption notice to process 1 alone, an update later, stops both at one update.
    processes = launch(setup, two, 2, resume=True)
    wait_for(processes, two, lambda: "Epoch:[" in open(f"{two}.p0.log").read().partition("resumed ")[2])
    processes[1].send_signal(signal.SIGTERM)
    finish(processes, two)
    log = output(two, 2)
    assert f"resumed {checkpoints.resolve()} at update {killed_at}" in log
    (stopped_at,) = {int(line.split()[3]) for line in log.splitlines() if line.startswith("SIGTERM: saved update")}
    assert log.count('"preempted": true') == 1 and complete_steps(checkpoints)[-1] == stopped_at < UPDATES

    finish(launch(setup, two, 2, resume=True), two)
    logs = [open(f"{two}.p{process_id}.log").read() for process_id in range(2)]
    assert logs[0].count("resumed ") == 2 and "resumed " not in logs[1]  # process 0 alone reports
    assert '"updates": ' in logs[0] and '"updates": ' not in logs[1]  # and prints the summary
    records = metrics(two)
    assert [record["update"] for record in records] == list(range(1, UPDATES + 1))
    print(f"SIGKILL after checkpoint {killed_at}, SIGTERM saved update {stopped_at}; loss, 2 processes | 1 process:")
    print("\n".join(f"{got['update']}: {got['loss']!r} | {want['loss']!r}" for got, want in zip(records, expected)))
    for got, want in zip(records, expected):
        for key in ("loss", "logits_loss", "grad_norm", "lr"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (key, got["update"])

    evals = [json.loads((run / "out" / "logs" / RUN_NAME / "summary.json").read_text())["eval"] for run in (two, one)]
    print("eval loss, 2 processes | 1 process:", evals[0]["loss"], "|", evals[1]["loss"])
    assert evals[0]["loss"] == pytest.approx(evals[1]["loss"], rel=1e-5)
    assert evals[0]["loss_tokens"] == evals[1]["loss_tokens"]

    import jax

    for got, want in zip(jax.tree.leaves(final_params(two)), jax.tree.leaves(final_params(one))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    from minimind_jax.weights.pth import read_state_dict

    got_pth, want_pth = (
        read_state_dict(two / "out" / f"{RUN_NAME}.pth"),
        read_state_dict(one / "out" / f"{RUN_NAME}.pth"),
    )
    assert list(got_pth) == list(want_pth)
    print("largest .pth difference:", max(float(np.abs(got_pth[n] - want_pth[n]).max()) for n in want_pth))
    for name in want_pth:  # float16, as MiniMind saves: equal up to one rounding step of fp32 differences
        np.testing.assert_allclose(np.asarray(got_pth[name], np.float32), np.asarray(want_pth[name], np.float32),
                                   rtol=1e-3, atol=1e-6)  # fmt: skip
