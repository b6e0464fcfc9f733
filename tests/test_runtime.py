"""Process set-up: the malloc that keeps freed memory (one restart), and the compilation cache as asked."""

import jax

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
