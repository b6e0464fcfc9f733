"""Continuous batching: requests decode together in the slots of one fixed-size KV cache, and a new request
joins at the next step instead of waiting for the batch in flight.

Each slot holds one request's cache rows, its own length (its next position) and its own sampling. An engine
step runs one chunk of at most `prefill_chunk` prompt tokens of one request still reading its prompt (the one
with the least left to read), then one decode step of every slot that is generating. While some slot
generates, long prompts get at most half the engine's time: their chunk runs only once the decode steps since
the last one took as long as it did, so a long prompt neither holds up a newcomer's first token by more than a
chunk nor slows the replies in flight by more than half; a short prompt is read at once. A request that ends
(eos, max_tokens, its client gone) frees its slot at once. A prompt chunk that fails fails its own request
alone; a decode step that fails fails the rows it was generating, and the engine goes on. Memory is the
cache, allocated once: `slots` × `context` positions; what a burst's steps used besides goes back to the OS
once no request is left.

A decode step reads only the part of the cache in use: the first slots up to the highest busy one (a new
request takes the lowest free slot), their number rounded up to a power of two, and their first positions up
to the longest row's, rounded up to a power-of-two multiple of the chunk. So a step costs what the rows hold,
not what the cache could hold, and the engine compiles one program per such shape.

Programs compile on a thread of their own, ahead of need where the engine can tell (the base window's at
start, a prompt's chunks and first decode shape when it is admitted, the next window before a row reaches
it), and the engine goes on with what is ready meanwhile: a prompt chunk whose program is not compiled yet
waits its turn, and a row that would need a new decode program joins the others once it is ready. So a long
prompt's new shapes do not stall the replies in flight.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimind_jax.inference.generation import Sampling, choose_tokens
from minimind_jax.model.transformer import KVCache, MiniMind, split_for_decoding
from minimind_jax.runtime import release_freed_memory

TOP_K = 50  # MiniMind's generate()
PREFILL_CHUNK = 256
SHORT_PROMPT = 64  # a prompt with at most this much left to read is read even while prefill owes decode time

# At exit, no compile starts and the one in progress ends first: the process aborts if XLA is torn down under a
# thread that is compiling. Queued compiles never hold up the exit.
_COMPILING, _EXITING = threading.Lock(), threading.Event()


@atexit.register
def _let_the_compile_in_progress_end() -> None:
    _EXITING.set()
    with _COMPILING:
        pass


def cache_bytes_per_position(model: MiniMind) -> int:
    """The KV cache's bytes for one position of one slot (keys and values of every layer)."""
    config = model.config
    itemsize = jnp.dtype(config.dtype).itemsize
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize


class SlotEngine:
    """Decodes the submitted jobs (server.Job) with continuous batching, on a thread of its own."""

    def __init__(self, model: MiniMind, eos_id: int, *, slots: int, context: int,
                 prefill_chunk: int = PREFILL_CHUNK, finish: Callable[[str, str | None], Any]):  # fmt: skip
        """finish(reason, error): the event that ends a job ("stop", "length", "error")."""
        if context % prefill_chunk:
            raise ValueError(f"context {context} is not a multiple of the prefill chunk {prefill_chunk}")
        self.eos_id, self.slots, self.context, self.chunk, self.finish = eos_id, slots, context, prefill_chunk, finish
        self.graphdef, self.params, self.layer_weights = split_for_decoding(model)
        self.config = config = model.config
        self.cache = KVCache.empty(config, slots, context, jnp.dtype(config.dtype))
        self.jobs: list[Any] = [None] * slots
        self.lengths = np.zeros(slots, np.int32)  # each slot's next position
        self.tokens = np.zeros(slots, np.int32)  # each generating slot's last token
        self.prompt_read = np.zeros(slots, np.int64)  # prompt tokens in the cache, while a slot prefills
        self.new_tokens = np.zeros(slots, np.int64)
        self.prefilling: collections.deque[int] = collections.deque()
        self.prefill_debt_s = 0.0  # prefill time not yet matched by decode time (see _serve_forever)
        self.key = jax.random.key(0)
        self.steps = 0  # decode steps so far
        self._waiting: collections.deque = collections.deque()
        self._wakeup = threading.Condition()
        # A prompt chunk is read by one program and written into the cache (donated) in place by a second: in
        # one program XLA copied the whole cache, as nothing ordered the chunk's reads before its writes.
        self._prefill = jax.jit(self._prefill_chunk, static_argnames=("window",))
        self._put_chunk = jax.jit(self._write_chunk, donate_argnums=(0,))
        self._decode = jax.jit(self._decode_step, donate_argnums=(2,), static_argnames=("rows", "window"))
        self._first = jax.jit(lambda logits_1V, sampling, key: choose_tokens(
            logits_1V, jnp.zeros_like(logits_1V, bool), sampling, key, True))  # fmt: skip
        self._programs: dict[tuple, concurrent.futures.Future] = {}  # compiled or compiling, by shape
        self._to_compile: queue.SimpleQueue = queue.SimpleQueue()
        # A daemon thread: a compile still queued never holds up the process's exit
        threading.Thread(target=self._compile_forever, name="slot-engine-compile", daemon=True).start()
        self._last_decoded: list[int] = []
        # The shapes of short requests, compiled from the start
        for rows in (1 << i for i in range(slots.bit_length())):
            self._prepare_decode(rows, self.chunk)
        for width in (16 << i for i in range(max(prefill_chunk // 16, 1).bit_length())):
            self._prepare_prefill(min(width, prefill_chunk), self.chunk)
        first_sampling = _specs(Sampling.per_row([0.0], [TOP_K], [1.0], [1.0]))
        logits = jax.ShapeDtypeStruct((1, config.vocab_size), jnp.float32)
        self._program(("first",), lambda: self._first.lower(logits, first_sampling, _specs(self.key)))
        threading.Thread(target=self._serve_forever, name="slot-engine", daemon=True).start()

    def submit(self, job) -> None:
        with self._wakeup:
            self._waiting.append(job)
            self._wakeup.notify()

    # -- traced -----------------------------------------------------------------------------------------

    def _prefill_chunk(self, params, layer_weights, cache: KVCache, slot, ids_1C, start, num_real, *, window: int):
        """One chunk of a prompt in slot `slot` from position `start` (the chunk ends within the first `window`
        positions); returns (its keys and values, the logits [1, V] after the chunk's last real token)."""
        model: MiniMind = nnx.merge(self.graphdef, params)
        take = lambda x: jax.lax.dynamic_slice(x, (slot, 0, 0, 0), (1, window, *x.shape[2:]))
        out = model.forward(ids_1C, cache=cache.map(take)._replace(length=start), layer_weights=layer_weights,
                            return_logits=False)  # fmt: skip
        last_hidden_1D = jax.lax.dynamic_index_in_dim(out.hidden_states[0], num_real - 1, keepdims=True)
        return out.new_kv, model.logits(last_hidden_1D)

    def _decode_step(self, params, layer_weights, cache: KVCache, tokens_B, lengths_B, sampling: Sampling, key, *,
                     rows: int, window: int):  # fmt: skip
        """One token for each of the first `rows` slots, each at its own position (at `context`: the slot
        writes nothing), attending over the first `window` positions; returns (the cache, the chosen tokens
        [rows]). The new positions are written into the cache (donated) in place, before the reads."""
        model: MiniMind = nnx.merge(self.graphdef, params)
        out = model.forward(tokens_B[:, None], cache=cache._replace(length=lengths_B), layer_weights=layer_weights,
                            attention_window=window)  # fmt: skip
        logits_BV = out.logits[:, 0]
        # (the engine keeps each slot's length itself: the cache's stays as it came, so its shape does too)
        cache = out.cache._replace(length=cache.length)
        return cache, choose_tokens(logits_BV, jnp.zeros_like(logits_BV, bool), sampling, key, True)

    @staticmethod
    def _write_chunk(cache: KVCache, new_kv, slot, start) -> KVCache:
        """The cache with a prompt chunk's keys and values written into slot `slot` from position `start`."""
        return cache.with_new(new_kv, lambda whole, new: jax.lax.dynamic_update_slice(whole, new, (slot, start, 0, 0)))

    def _window(self, positions: int) -> int:
        """The smallest window holding `positions` positions: the chunk times a power of two, at most the cache."""
        window = self.chunk
        while window < positions:
            window *= 2
        return min(window, self.context)

    # -- programs, compiled ahead -------------------------------------------------------------------------

    def _program(self, key: tuple, lower) -> concurrent.futures.Future:
        """The future of a program's compilation (`lower()` gives it lowered), queued if it was not."""
        if key not in self._programs:
            self._programs[key] = concurrent.futures.Future()
            self._to_compile.put((self._programs[key], lower))
        return self._programs[key]

    def _compile_forever(self) -> None:
        while True:
            compiled, lower = self._to_compile.get()
            with _COMPILING:
                if _EXITING.is_set():
                    return
                try:
                    lower().compile()  # into the jitted function's cache
                    compiled.set_result(None)
                except Exception as error:  # the engine's own call compiles it again, and fails its request
                    compiled.set_exception(error)

    def _prepare_prefill(self, width: int, window: int) -> concurrent.futures.Future:
        """The future of a chunk's program; its write's is queued first (one thread compiles them in order)."""
        i32 = jax.ShapeDtypeStruct((), jnp.int32)
        ids = jax.ShapeDtypeStruct((1, width), jnp.int32)
        self._program(("write_prefill", width), lambda: self._put_chunk.lower(
            _specs(self.cache), self._new_kv_specs(1, width), i32, i32))  # fmt: skip
        return self._program(("prefill", width, window), lambda: self._prefill.lower(
            _specs(self.params), _specs(self.layer_weights), _specs(self.cache), i32, ids, i32, i32,
            window=window))  # fmt: skip

    def _prepare_decode(self, rows: int, window: int) -> concurrent.futures.Future:
        vector = jax.ShapeDtypeStruct((rows,), jnp.int32)
        sampling = _specs(Sampling.per_row(np.zeros(rows), [TOP_K] * rows, np.ones(rows), np.ones(rows)))
        return self._program(("decode", rows, window), lambda: self._decode.lower(
            _specs(self.params), _specs(self.layer_weights), _specs(self.cache), vector, vector, sampling,
            _specs(self.key), rows=rows, window=window))  # fmt: skip

    def _new_kv_specs(self, rows: int, positions: int):
        """The shapes of a step's new keys and values: ([rows, positions, KV, Hd] per layer,) × 2."""
        layer = jax.ShapeDtypeStruct((rows, positions, *self.cache.layer_k_BSKHd[0].shape[2:]),
                                     self.cache.layer_k_BSKHd[0].dtype)  # fmt: skip
        return ((layer,) * self.config.num_hidden_layers,) * 2

    def _chunk_shape(self, prompt_length: int, start: int) -> tuple[int, int]:
        """(width, window) of a prompt's chunk from `start`: a prompt's last piece is padded to a power of two
        (from 16), not to a whole chunk."""
        piece = min(prompt_length - start, self.chunk)
        width = min(self.chunk, 1 << max(piece - 1, 15).bit_length())
        return width, self._window(start + width)

    def _prefill_shape(self, slot: int) -> tuple[int, int]:
        return self._chunk_shape(len(self.jobs[slot].prompt_ids), int(self.prompt_read[slot]))

    def _decode_shape(self, highest_slot: int, longest: int) -> tuple[int, int]:
        """(rows, window) of a decode step: a power of two past the highest busy slot, and the window of the
        longest row's next position."""
        return min(1 << highest_slot.bit_length(), self.slots), self._window(longest + 1)

    def _step_shape(self, generating: list[int]) -> tuple[int, int]:
        return self._decode_shape(max(generating), int(self.lengths[generating].max()))

    def _prepare_prompt(self, slot: int) -> None:
        """Compiles ahead what a newly admitted prompt will need: its chunks, and its first decode step."""
        length = len(self.jobs[slot].prompt_ids)
        for start in range(0, length, self.chunk):
            self._prepare_prefill(*self._chunk_shape(length, start))
        generating = self._generating()
        longest = max([length, *self.lengths[generating]])
        self._prepare_decode(*self._decode_shape(max([slot, *generating]), int(longest)))

    def progress(self) -> dict:
        """What /health reports: decode steps so far and the requests in slots now."""
        return {"decode_steps": self.steps, "busy_slots": sum(job is not None for job in self.jobs)}

    # -- the loop ---------------------------------------------------------------------------------------

    def _serve_forever(self) -> None:
        busy_since_release = False
        while True:
            with self._wakeup:
                idle = not self._waiting and all(job is None for job in self.jobs)
                if not (idle and busy_since_release):
                    self._wakeup.wait_for(lambda: self._waiting or any(job is not None for job in self.jobs))
                    self._admit()
            if idle and busy_since_release:  # a burst is over: its working memory goes back (outside the lock)
                release_freed_memory()
                busy_since_release = False
                continue
            busy_since_release = True
            generating = bool(self._generating())
            if self.prefilling:
                slot = self._next_prefill(generating)
                started = time.perf_counter()
                if slot is not None:
                    try:
                        self._prefill_next(slot)
                    except Exception as error:  # one prompt's chunk: its request alone fails
                        self._fail([slot], error)
                    self.prefill_debt_s += time.perf_counter() - started
            if generating:
                started = time.perf_counter()
                try:
                    self._decode_all()
                except Exception as error:  # the step was its rows': they fail, the server goes on
                    self._fail(self._last_decoded, error)
                self.prefill_debt_s = max(self.prefill_debt_s - (time.perf_counter() - started), 0.0)

    def _fail(self, slots: list[int], error: Exception) -> None:
        """Ends the jobs of `slots` with an error. A step that failed after taking the cache (it is donated)
        lost every slot's rows: the cache is made again, the requests still reading their prompt read them
        again from the start, and those already generating fail too."""
        traceback.print_exc(file=sys.stderr)
        failed = set(slots)
        if any(leaf.is_deleted() for leaf in jax.tree.leaves(self.cache)):
            self.cache = KVCache.empty(self.config, self.slots, self.context, jnp.dtype(self.config.dtype))
            failed |= set(self._generating())
            self.prompt_read[list(self.prefilling)] = 0
        for slot in sorted(failed):
            if self.jobs[slot] is not None and self._deliver(
                slot, self.finish("error", f"{type(error).__name__}: {error}")
            ):
                self._free(slot)

    def _admit(self) -> None:
        """Waiting jobs into free slots (called holding the lock)."""
        while self._waiting and None in self.jobs:
            job = self._waiting.popleft()
            if job.cancelled:
                continue
            slot = self.jobs.index(None)
            self.jobs[slot], self.prompt_read[slot], self.new_tokens[slot] = job, 0, 0
            self.prefilling.append(slot)
            self._prepare_prompt(slot)

    def _generating(self) -> list[int]:
        """The slots whose request has read its prompt and is generating."""
        return [slot for slot, job in enumerate(self.jobs) if job is not None and slot not in self.prefilling]

    def _free(self, slot: int) -> None:
        self.jobs[slot] = None
        if slot in self.prefilling:
            self.prefilling.remove(slot)

    def _split_key(self):
        self.key, key = jax.random.split(self.key)
        return key

    def _next_prefill(self, generating: bool) -> int | None:
        """The prompt to read a chunk of now, taken out of `prefilling`, or None: of those whose next chunk's
        program is compiled, the one with the least left to read (a newcomer's question before a long
        document's next chunk). While rows generate, only once the prefill debt is paid, or for a prompt whose
        rest is short; with none generating, it waits briefly for a compile."""
        left = lambda slot: len(self.jobs[slot].prompt_ids) - int(self.prompt_read[slot])
        compiling = {slot: self._prepare_prefill(*self._prefill_shape(slot)) for slot in self.prefilling}
        ready = [slot for slot, program in compiling.items() if program.done()]
        if generating:
            ready = [slot for slot in ready if self.prefill_debt_s <= 0 or left(slot) <= SHORT_PROMPT]
        elif not ready:
            concurrent.futures.wait(compiling.values(), timeout=0.05, return_when=concurrent.futures.FIRST_COMPLETED)
        if not ready:
            return None
        slot = min(ready, key=left)
        self.prefilling.remove(slot)
        return slot

    def _prefill_next(self, slot: int) -> None:
        """Reads the next chunk of the prompt in `slot` (taken out of `prefilling`)."""
        job = self.jobs[slot]
        if job.cancelled:
            self._free(slot)
            return
        start = int(self.prompt_read[slot])
        piece = job.prompt_ids[start : start + self.chunk]
        width, window = self._prefill_shape(slot)
        ids = np.zeros((1, width), np.int32)
        ids[0, : len(piece)] = piece
        new_kv, logits_1V = self._prefill(self.params, self.layer_weights, self.cache, jnp.int32(slot), ids,
                                          jnp.int32(start), jnp.int32(len(piece)), window=window)  # fmt: skip
        self.cache = self._put_chunk(self.cache, new_kv, jnp.int32(slot), jnp.int32(start))
        self.prompt_read[slot] = start + len(piece)
        if self.prompt_read[slot] < len(job.prompt_ids):
            # Done before the engine goes on: queued chunks would hold up whatever comes next, and the time
            # a chunk takes is what the decode steps pay back
            jax.block_until_ready(self.cache)
            self.prefilling.append(slot)
            return
        sampling = Sampling.per_row([job.temperature], [TOP_K], [job.top_p], [1.0])
        token = int(self._first(logits_1V, sampling, self._split_key())[0])
        self.lengths[slot] = len(job.prompt_ids)
        self._emit(slot, token)

    def _decode_all(self) -> None:
        generating = self._generating()
        shape = self._step_shape(generating)
        if not self._prepare_decode(*shape).done():
            # Rows that joined since the last step wait for the program that takes them; the others go on
            earlier = [slot for slot in generating if slot in self._last_decoded]
            if earlier and self._prepare_decode(*self._step_shape(earlier)).done():
                generating, shape = earlier, self._step_shape(earlier)
            else:
                concurrent.futures.wait([self._prepare_decode(*shape)])
        rows, window = shape
        if int(self.lengths[generating].max()) + 1 + self.chunk // 4 > window and window < self.context:
            self._prepare_decode(rows, window * 2)  # the longest row nears the window's end
        self._last_decoded = generating
        jobs = [self.jobs[slot] for slot in generating]
        temperature, top_p = np.zeros(rows, np.float32), np.ones(rows, np.float32)
        temperature[generating] = [job.temperature for job in jobs]
        top_p[generating] = [job.top_p for job in jobs]
        sampling = Sampling.per_row(temperature, [TOP_K] * rows, top_p, np.ones(rows, np.float32))
        positions = np.full(rows, self.context, np.int32)  # past the cache: the other slots write nothing
        positions[generating] = self.lengths[generating]
        self.cache, tokens = self._decode(self.params, self.layer_weights, self.cache, self.tokens[:rows], positions,
                                          sampling, self._split_key(), rows=rows, window=window)  # fmt: skip
        tokens = np.asarray(tokens)
        self.steps += 1
        for slot in generating:
            self.lengths[slot] += 1
            self._emit(slot, int(tokens[slot]))

    def _emit(self, slot: int, token: int) -> None:
        """Delivers a slot's new token, or ends its job (eos, max_tokens, gone) and frees the slot."""
        job = self.jobs[slot]
        if job.cancelled or token == self.eos_id:
            self._end(slot, "stop")
            return
        if not self._deliver(slot, token):
            return
        self.new_tokens[slot] += 1
        self.tokens[slot] = token
        if self.new_tokens[slot] == job.max_tokens:
            self._end(slot, "length")

    def _deliver(self, slot: int, event) -> bool:
        """Hands a slot's job an event; a job that cannot take it (its client's loop is gone) loses its slot,
        and only its own."""
        try:
            self.jobs[slot].deliver(event)
            return True
        except Exception:  # whatever the receiving side raises, the other slots go on
            self._free(slot)
            return False

    def _end(self, slot: int, reason: str) -> None:
        if self._deliver(slot, self.finish(reason, None)):
            self._free(slot)


def _specs(tree):
    """The shapes and dtypes of a pytree's arrays, to compile a program for them ahead."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
