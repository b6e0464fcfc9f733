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

import ctypes
import os
import pathlib
import sys

from minimind_jax.errors import UserError, first_line

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


def release_freed_memory() -> None:
    """Hands what this process has freed back to the OS (glibc's malloc_trim), where keep_freed_memory kept it:
    a server calls it when a burst is over, so its memory returns to the idle level. Elsewhere a no-op."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.malloc_trim(0)


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


DISTRIBUTED_ENV = {  # JAX's variables for what the flags give
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def distributed_settings(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> dict[str, str | int]:
    """The settings of jax.distributed that the flags give, else JAX's environment variables; those neither
    gives are left to JAX's cluster detection. Checked: a bad one is a UserError naming its flag or variable."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    settings, origin = {}, {}
    for name, value in given.items():
        if value is not None:
            settings[name], origin[name] = value, f"--{name} {value}"
        elif os.environ.get(DISTRIBUTED_ENV[name]):
            value = os.environ[DISTRIBUTED_ENV[name]]
            settings[name], origin[name] = value, f"{DISTRIBUTED_ENV[name]}={value}"
    for name in ("num_processes", "process_id"):
        if name in settings:
            value = str(settings[name])
            minimum = 1 if name == "num_processes" else 0
            if not value.isdigit() or int(value) < minimum:
                raise UserError(f"{origin[name]}: must be an integer >= {minimum}")
            settings[name] = int(value)
    if "process_id" in settings and "num_processes" in settings and settings["process_id"] >= settings["num_processes"]:
        raise UserError(f"{origin['process_id']} is out of range for {origin['num_processes']} (ids 0 to N - 1)")
    if "coordinator_address" in settings:
        host, _, port = str(settings["coordinator_address"]).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 2**16:
            raise UserError(f"{origin['coordinator_address']}: expected host:port (process 0's host, a free port)")
    return settings


def cluster_detected() -> bool:
    """A launch of several processes that jax.distributed recognizes by itself: a TPU pod slice, SLURM or
    Open MPI."""
    return (
        int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )


def maybe_initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """jax.distributed for a multi-process launch: with the settings the flags or JAX's variables give
    (`distributed_settings`), or on a cluster JAX detects. Before anything starts JAX's backend.

    On CPU the processes' collectives go through gloo (unless JAX_CPU_COLLECTIVES_IMPLEMENTATION says mpi).
    """
    import jax

    settings = distributed_settings(coordinator_address, num_processes, process_id)
    if settings.get("num_processes") == 1 or jax.distributed.is_initialized():
        return
    if not settings and not cluster_detected():
        return
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**settings)
    except ValueError as error:  # a setting neither given nor detected (JAX names it)
        raise UserError(
            f"jax.distributed: {first_line(error)} Give --coordinator_address host:port --num_processes N "
            "--process_id I (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
        ) from None


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process was started (the command, as the re-exec in keep_freed_memory keeps its
    process); None where /proc does not say."""
    try:
        ticks_after_boot = int(pathlib.Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        uptime = float(pathlib.Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - ticks_after_boot / os.sysconf("SC_CLK_TCK")


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "minimind_jax"
