"""glibc malloc settings for XLA:CPU, applied by restarting the process once (glibc reads them only at start).

glibc hands every freed block of 32 MB or more (and any large block freed by a worker thread) back to the
OS at once, so each XLA:CPU train step faults its multi-GB working set in again: about 700k page faults and
2 s of kernel time per minimind2-small step at 8 x 512. One malloc arena that keeps what it frees avoids it.
This module imports nothing heavy: `main.py` calls it before anything else.
"""
from __future__ import annotations

import os
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
