"""Process set-up, before and around JAX: malloc settings, the compilation cache, jax.distributed and the
cache directory.

glibc hands every freed block of 32 MB or more (and any large block freed by a worker thread) back to the
OS at once, so each XLA:CPU train step faults its multi-GB working set in again: about 700k page faults and
2 s of kernel time per minimind2-small step at 8 x 512. One malloc arena that keeps what it frees avoids it;
glibc reads the settings only at start, so `keep_freed_memory` restarts the process once. This module
imports nothing heavy at its top (JAX only inside the functions that use it): `main.py` calls it before
anything else.
"""

from __future__ import annotations

import os
import pathlib
import sys

KEEP_FREED_MEMORY_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}
OPT_OUT_ENV = "MINIMIND_JAX_SYSTEM_MALLOC"


def keep_freed_memory() -> None:
    """Restarts this process once with KEEP_FREED_MEMORY_ENV, unless the user set any of those variables
    (then theirs stand) or MINIMIND_JAX_SYSTEM_MALLOC=1."""
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT_ENV) == "1":
        return
    if any(name in os.environ for name in KEEP_FREED_MEMORY_ENV):
        return
    os.environ.update(KEEP_FREED_MEMORY_ENV)
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # the interpreter's own flags included


def current_settings() -> dict[str, str]:
    """The malloc variables (ours and the opt-out) set in this process."""
    return {name: os.environ[name] for name in (*KEEP_FREED_MEMORY_ENV, OPT_OUT_ENV) if name in os.environ}


def use_compilation_cache(directory: str | None, cache_every_compile: bool = False) -> None:
    """JAX's persistent compilation cache, so a resumed or repeated run skips the XLA compiles done before.

    directory: None: $JAX_COMPILATION_CACHE_DIR if set, else {cache}/xla; "none": off.
    cache_every_compile: also the compiles under JAX's 1 s threshold (the bench counts cache hits).
    """
    if directory == "none" or (directory is None and os.environ.get("JAX_COMPILATION_CACHE_DIR")):
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", directory or str(default_cache_dir() / "xla"))
    if cache_every_compile:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def maybe_initialize_distributed() -> None:
    """jax.distributed for multi-process launches (TPU pod slices, SLURM, or explicit coordinator env)."""
    import jax

    multi_process = (
        os.environ.get("JAX_COORDINATOR_ADDRESS")
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    )
    if multi_process and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "minimind_jax"
