"""Compiling a jitted step ahead of its first call: how long it took, whether JAX's persistent compilation
cache held it, and the device memory XLA plans for it."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class CompileWatch:
    """Counts XLA compiles and persistent-cache hits since the last reset (JAX's monitoring events)."""

    def __init__(self):
        self.reset()
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def reset(self) -> None:
        self.compiles, self.cache_hits = 0, 0

    def _on_duration(self, event: str, duration: float, **_) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.compiles += 1

    def _on_event(self, event: str, **_) -> None:
        if event == CACHE_HIT_EVENT:
            self.cache_hits += 1

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)


@dataclasses.dataclass
class CompiledStep:
    executable: Any  # jax.stages.Compiled: called as the jitted function would be, with the same arguments
    seconds: float  # trace, lower and compile (or load from the persistent cache)
    cache: str  # "hit", "miss", or "off" when the persistent compilation cache is not in use
    memory_bytes: int | None  # XLA's plan per device: arguments + outputs + temporaries, less donated buffers

    def describe(self) -> str:
        memory = "" if self.memory_bytes is None else f"; XLA plans {self.memory_bytes / 2**30:,.2f} GiB per device"
        return f"compiled in {self.seconds:.1f} s (cache {self.cache}){memory}"


def compile_ahead(jitted, *args) -> CompiledStep:
    """jitted.lower(*args).compile(), timed, with the persistent cache's answer and XLA's memory plan."""
    watch = CompileWatch()
    start = time.perf_counter()
    try:
        executable = jitted.lower(*args).compile()
    finally:
        watch.close()
    seconds = time.perf_counter() - start
    cache_on = bool(jax.config.jax_compilation_cache_dir) and jax.config.jax_enable_compilation_cache
    cache = ("hit" if watch.cache_hits else "miss") if cache_on else "off"
    return CompiledStep(executable, seconds, cache, planned_memory_bytes(executable))


def planned_memory_bytes(executable) -> int | None:
    """XLA's plan for a compiled executable, per device: arguments + outputs + temporaries, less donated buffers."""
    stats = executable.memory_analysis()
    if stats is None:  # not every backend reports it
        return None
    return (
        stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes
    )


def peak_device_memory_bytes() -> int | None:
    """The peak memory in use on this process's first device so far, where the backend reports it (GPU, TPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")
