"""The continuous-batching engine on its own: requests that join at different moments, prompts read in several
chunks, slots reused, each reply greedy `generate`'s; a request whose receiver fails, or whose prompt fails,
loses its slot alone; a failed step fails its rows and the engine goes on; a long prompt's new shapes compile
while the others generate; a burst's memory goes back when it is over."""

import threading
import time

import numpy as np
from flax import nnx

from minimind_jax.inference.continuous import SlotEngine
from minimind_jax.inference.generation import generate
from minimind_jax.inference.server import Finish, Job
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.transformer import MiniMind

EOS = 2
NEW_TOKENS = 20


def engine_and_model():
    model = MiniMind(ModelConfig(arch="minimind2", hidden_size=64, num_hidden_layers=2), rngs=nnx.Rngs(5))
    return SlotEngine(model, EOS, slots=4, context=768, finish=Finish), model


def greedy(model, prompt, new_tokens=NEW_TOKENS):
    new = generate(model, np.asarray([prompt]), new_tokens, eos_token_id=EOS)[0, len(prompt) :].tolist()
    return new[: new.index(EOS)] if EOS in new else new


def submit(engine, prompts, results, done, fail_index=None):
    def deliver_for(index):
        tokens = []

        def deliver(event):
            if index == fail_index:
                raise RuntimeError("this client's loop is gone")
            if isinstance(event, Finish):
                results[index] = (tokens, event.reason)
                if len(results) == len(prompts) - (fail_index is not None):
                    done.set()
            else:
                tokens.append(event)

        return deliver

    for index, prompt in enumerate(prompts):
        engine.submit(Job(prompt, NEW_TOKENS, 0.0, 1.0, deliver_for(index)))
        time.sleep(0.05 * index)  # later requests join a decode in flight


def wait_until_free(engine):
    deadline = time.monotonic() + 10  # the engine frees a slot just after its job's last event
    while any(job is not None for job in engine.jobs) and time.monotonic() < deadline:
        time.sleep(0.01)
    return all(job is None for job in engine.jobs)


def test_one_program_per_step_shape_however_many_steps_ran():
    """The cache a step returns has the shapes it was given, so later steps of one shape reuse its program
    instead of compiling again on the engine's thread."""
    model = MiniMind(ModelConfig(arch="minimind2", hidden_size=64, num_hidden_layers=2), rngs=nnx.Rngs(5))
    engine = SlotEngine(model, EOS, slots=1, context=128, prefill_chunk=64, finish=Finish)
    for prompt in ([5, 6, 7], [8, 9, 10, 11]):  # one slot, one window: one decode shape
        results, done = {}, threading.Event()
        submit(engine, [prompt], results, done)
        assert done.wait(600) and results[0] == (greedy(model, prompt), "length")
    assert engine._decode._cache_size() == 1


def test_requests_joining_apart_get_generates_replies():
    """6 requests on 4 slots: prompts of 300 and 600 tokens take 2 and 3 chunks of 256, the others one padded
    piece; slots are freed and taken again."""
    engine, model = engine_and_model()
    rng = np.random.default_rng(0)
    prompts = [[int(x) for x in rng.integers(3, 6000, n)] for n in (5, 300, 17, 600, 40, 9)]
    results, done = {}, threading.Event()
    submit(engine, prompts, results, done)
    assert done.wait(600)
    for index, prompt in enumerate(prompts):
        tokens, reason = results[index]
        assert tokens == greedy(model, prompt), index
        assert reason == ("length" if len(tokens) == NEW_TOKENS else "stop")


def test_a_request_whose_receiver_fails_loses_its_slot_alone():
    engine, model = engine_and_model()
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    results, done = {}, threading.Event()
    submit(engine, prompts, results, done, fail_index=1)
    assert done.wait(600)
    assert set(results) == {0, 2}
    for index in (0, 2):
        assert results[index][0] == greedy(model, prompts[index])
    assert wait_until_free(engine)


def test_a_prompt_whose_chunk_fails_fails_alone():
    """A failing prefill ends its own request with an error; the requests beside it get generate's replies."""
    engine, model = engine_and_model()
    real_prefill, poison = engine._prefill, 4321

    def prefill(params, layer_weights, cache, slot, ids, *args, **kwargs):
        if poison in np.asarray(ids):
            raise RuntimeError("this prompt's chunk failed")
        return real_prefill(params, layer_weights, cache, slot, ids, *args, **kwargs)

    engine._prefill = prefill
    prompts = [[5, 6, 7], [8, poison, 10, 11], [12, 13], [14, 15, 16, 17, 18]]
    results, done = {}, threading.Event()
    submit(engine, prompts, results, done)
    assert done.wait(600)
    assert results[1] == ([], "error")
    for index in (0, 2, 3):
        assert results[index] == (greedy(model, prompts[index]), "length"), index
    assert wait_until_free(engine)


def test_a_step_that_lost_the_cache_fails_its_rows_and_the_engine_goes_on():
    """A decode step that fails after its donated cache is gone: the rows it was generating fail, the cache
    is made again, and a prompt still being read then, and requests after, get generate's replies."""
    engine, model = engine_and_model()
    real_decode, failures = engine._decode, []

    def decode(params, layer_weights, cache, *args, **kwargs):
        if not failures and engine.prefilling:  # once, while another prompt is still being read
            failures.append(engine.steps)
            cache.layer_k_BSKHd[0].delete()
            raise RuntimeError("the device failed")
        return real_decode(params, layer_weights, cache, *args, **kwargs)

    engine._decode = decode
    long_prompt = [int(x) for x in np.random.default_rng(1).integers(3, 6000, 700)]  # 3 chunks
    prompts = [[5, 6, 7], long_prompt]
    results, done = {}, threading.Event()
    submit(engine, prompts, results, done)
    assert done.wait(600)
    tokens, reason = results[0]
    assert failures and reason == "error" and tokens == greedy(model, prompts[0])[: len(tokens)]
    assert results[1] == (greedy(model, long_prompt), "length")
    later, later_done = {}, threading.Event()
    submit(engine, [[9, 10, 11]], later, later_done)
    assert later_done.wait(600) and later[0] == (greedy(model, [9, 10, 11]), "length")
    assert wait_until_free(engine)


def test_a_long_prompts_new_shapes_compile_while_the_others_generate():
    """The programs a long prompt needs (larger windows) compile on the side: the reply in flight finishes
    while they are held from finishing, and then the long prompt gets generate's reply too."""
    engine, model = engine_and_model()
    release, real_program = threading.Event(), engine._program

    def held_program(key, lower):
        if key[-1] > engine.chunk:  # a window past the first
            return real_program(key, lambda: (release.wait(), lower())[1])
        return real_program(key, lower)

    short, long_prompt = [5, 6, 7], [int(x) for x in np.random.default_rng(2).integers(3, 6000, 600)]
    results, short_done, long_done = {}, threading.Event(), threading.Event()

    def receiver(name, done):
        tokens = []

        def deliver(event):
            if isinstance(event, Finish):
                results[name] = (tokens, event.reason)
                done.set()
            else:
                tokens.append(event)

        return deliver

    engine.submit(Job(short, 150, 0.0, 1.0, receiver("short", short_done)))  # still generating when the
    engine._program = held_program  # long prompt's second chunk needs a program that is held
    engine.submit(Job(long_prompt, NEW_TOKENS, 0.0, 1.0, receiver("long", long_done)))
    try:
        assert short_done.wait(120), "the reply in flight waited for the long prompt's compiles"
    finally:
        release.set()
    assert long_done.wait(600)
    tokens, reason = results["short"]
    assert tokens == greedy(model, short, 150) and reason == ("length" if len(tokens) == 150 else "stop")
    assert results["long"] == (greedy(model, long_prompt), "length")


def test_the_memory_of_a_burst_goes_back_once_no_request_is_left(monkeypatch):
    """When the last request of a burst ends, the engine hands what its steps freed back to the OS, once."""
    from minimind_jax.inference import continuous

    releases = []
    monkeypatch.setattr(continuous, "release_freed_memory", lambda: releases.append(time.monotonic()))
    engine, model = engine_and_model()
    results, done = {}, threading.Event()
    submit(engine, [[5, 6, 7], [8, 9, 10, 11]], results, done)
    assert done.wait(600) and wait_until_free(engine)
    deadline = time.monotonic() + 10
    while not releases and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert len(releases) == 1
