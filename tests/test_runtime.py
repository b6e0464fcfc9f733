"""Process set-up: the malloc that keeps freed memory (one restart), and the compilation cache as asked."""

import re

import jax
import pytest

from minimind_jax.runtime import use_compilation_cache


def test_cli_restarts_once_with_a_malloc_that_keeps_freed_memory(monkeypatch):
    import os
    import sys

    from minimind_jax import runtime as malloc

    restarts = []
    monkeypatch.setattr(malloc.os, "execv", lambda executable, argv: restarts.append((executable, argv)))
    for name in [*malloc.KEEP_FREED_MEMORY_ENV, malloc.OPT_OUT_ENV]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(malloc.sys, "orig_argv", ["python3", "-u", "main.py", "sft", "--epochs", "1"])
    malloc.keep_freed_memory()
    assert restarts == [(sys.executable, [sys.executable, "-u", "main.py", "sft", "--epochs", "1"])]
    assert {name: os.environ[name] for name in malloc.KEEP_FREED_MEMORY_ENV} == malloc.KEEP_FREED_MEMORY_ENV
    malloc.keep_freed_memory()  # the restarted process finds the variables set: no second restart
    assert len(restarts) == 1

    for name in malloc.KEEP_FREED_MEMORY_ENV:  # a user's own setting stands
        monkeypatch.delenv(name)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    malloc.keep_freed_memory()
    assert len(restarts) == 1 and os.environ["MALLOC_ARENA_MAX"] == "4"


def test_compilation_cache_is_set_as_asked(monkeypatch, tmp_path):
    updates = {}
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.update({name: value}))
    use_compilation_cache("none")
    assert updates == {}
    use_compilation_cache(str(tmp_path), cache_every_compile=True)  # as the bench asks for it
    assert updates == {"jax_compilation_cache_dir": str(tmp_path), "jax_persistent_cache_min_compile_time_secs": 0.0}


def test_distributed_settings_come_from_flags_then_jax_variables(monkeypatch):
    from minimind_jax.runtime import distributed_settings

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert distributed_settings() == {}  # left to JAX's cluster detection
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert distributed_settings() == {"coordinator_address": "host0:1234", "num_processes": 4, "process_id": 3}
    assert distributed_settings("10.0.0.1:8476", 2, 0) == {
        "coordinator_address": "10.0.0.1:8476",
        "num_processes": 2,
        "process_id": 0,
    }


@pytest.mark.parametrize(
    "flags, environ, message",
    [
        (dict(num_processes=2, process_id=2), {}, "--process_id 2 is out of range for --num_processes 2"),
        (dict(process_id=4), {"JAX_NUM_PROCESSES": "4"}, "--process_id 4 is out of range for JAX_NUM_PROCESSES=4"),
        (dict(coordinator_address="host0"), {}, "--coordinator_address host0: expected host:port"),
        (dict(coordinator_address="host0:99999"), {}, "expected host:port"),
        ({}, {"JAX_PROCESS_ID": "one"}, "JAX_PROCESS_ID=one: must be an integer >= 0"),
        ({}, {"JAX_NUM_PROCESSES": "0"}, "JAX_NUM_PROCESSES=0: must be an integer >= 1"),
    ],
)
def test_bad_distributed_settings_are_one_line_errors(monkeypatch, flags, environ, message):
    from minimind_jax.errors import UserError
    from minimind_jax.runtime import distributed_settings

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=re.escape(message)):
        distributed_settings(**flags)


def test_distributed_is_initialized_with_the_settings_and_gloo_on_cpu(monkeypatch):
    from minimind_jax import runtime
    from minimind_jax.errors import UserError

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    updates, calls = {}, []
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.update({name: value}))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **settings: calls.append(settings))
    runtime.maybe_initialize_distributed()  # one process, no cluster: nothing to join
    runtime.maybe_initialize_distributed(num_processes=1)
    assert calls == [] and updates == {}
    runtime.maybe_initialize_distributed("127.0.0.1:1234", 2, 1)
    assert calls == [{"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}]
    assert updates == {"jax_cpu_collectives_implementation": "gloo"}
    monkeypatch.setenv("SLURM_NTASKS", "2")  # a cluster jax.distributed detects by itself
    runtime.maybe_initialize_distributed()
    assert calls[-1] == {}

    def undetected(**settings):  # what JAX raises when neither the flags nor the cluster name a coordinator
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", undetected)
    with pytest.raises(UserError, match="coordinator_address should be defined. Give --coordinator_address host:port"):
        runtime.maybe_initialize_distributed(num_processes=2, process_id=1)
