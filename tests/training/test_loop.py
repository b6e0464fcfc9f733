"""The run loop on its own: a stand-in step, so only the loop's own rules are under test."""

import jax
import numpy as np
import pytest

from minimind_jax.training.loop import RunState, StopRun, Trainer


class CountingBatches:
    """Batch i is the number i; `step` is the index of the next one, as the pipeline's iterator has it."""

    def __init__(self):
        self.step = 0

    def __next__(self):
        self.step += 1
        return self.step - 1


@jax.jit
def add_step(params, opt_state, micro_batches, key, frozen_params):
    """params grows by the micro-batches' sum; the metrics keep the step key and the frozen models."""
    return params + sum(micro_batches), opt_state + 1, {"key": key, "frozen": frozen_params}


def new_state(update=0):
    return RunState(
        update=update, params=0, opt_state=0, rng=jax.random.key_data(jax.random.key(0)), batches=CountingBatches()
    )


def test_each_update_takes_its_micro_batches_and_its_own_step_key():
    trainer = Trainer(add_step, update_sizes=[3] * 4, last_update=4, frozen_params={"teacher": 7})
    keys = []
    trainer.add_hook(lambda state: keys.append(np.asarray(state.metrics["key"])))
    state = new_state()
    assert trainer.train(state)
    assert (state.update, state.params, state.opt_state) == (4, sum(range(12)), 4)
    assert state.data_batches == range(9, 12) and state.metrics["frozen"] == {"teacher": 7}
    assert len({key.tobytes() for key in keys}) == 4
    # A run resumed at update 2 steps with the keys the uninterrupted run used for updates 3 and 4.
    resumed_keys = []
    resumed = Trainer(add_step, update_sizes=[3] * 4, last_update=4)
    resumed.add_hook(lambda state: resumed_keys.append(np.asarray(state.metrics["key"])))
    resumed.train(new_state(update=2))
    np.testing.assert_array_equal(resumed_keys, keys[2:])


def test_the_step_is_compiled_once_ahead_of_the_first_update():
    compiled = []
    trainer = Trainer(add_step, update_sizes=[2] * 3, last_update=3, on_compiled=compiled.append)
    trainer.add_hook(lambda state: compiled.append(state.update))
    trainer.train(new_state())
    report = compiled[0]
    assert compiled[1:] == [1, 2, 3] and list(trainer.compiled.values()) == [report]
    assert report.seconds > 0 and report.cache in ("hit", "miss", "off")
    assert report.describe().startswith(f"compiled in {report.seconds:.1f} s (cache {report.cache})")


def test_micro_batches_of_a_new_shape_compile_again_and_come_from_the_given_source():
    """RL's rollouts change the rows' width between updates: each new shape gets its own program, and the
    micro-batches come from the Trainer's steps function, which sees the current state."""
    compiled, seen_updates = [], []

    def widening_batches(state, size):
        seen_updates.append(state.update)
        return [[np.ones(1 + min(state.update, 2), np.int32) for _ in range(size)]]

    step = jax.jit(lambda params, opt_state, micro_batches, key, frozen: (params + sum(b.sum() for b in micro_batches),
                                                                          opt_state, {}))  # fmt: skip
    trainer = Trainer(step, update_sizes=[1] * 4, last_update=4, on_compiled=compiled.append,
                      steps=widening_batches)  # fmt: skip
    state = new_state()
    trainer.train(state)
    assert seen_updates == [0, 1, 2, 3] and len(compiled) == len(trainer.compiled) == 3  # widths 1, 2, 3
    assert state.params == 1 + 2 + 3 + 3


def test_an_update_of_several_steps_reads_each_steps_metrics_before_the_next():
    """v3 PPO's epochs: one update (one rollout) takes several optimizer steps, each with its own key, and
    decides the next one from the last one's metrics; the hooks run once, after the last."""
    seen_params, keys, hooked = [], [], []

    def steps(state, size):
        for _ in range(3):
            yield [next(state.batches)]
            seen_params.append(state.params)
            keys.append(np.asarray(state.metrics["key"]).tobytes())
            if state.params >= 3:  # stop early, as PPO's early stop does
                return

    trainer = Trainer(add_step, update_sizes=[1] * 2, last_update=2, steps=steps)
    trainer.add_hook(lambda state: hooked.append((state.update, state.params, state.opt_state)))
    trainer.train(new_state())
    assert seen_params == [0, 1, 3, 6] and hooked == [(1, 3, 3), (2, 6, 4)]
    assert len(set(keys)) == 4


def test_updates_take_their_own_number_of_micro_batches_one_compile_per_number():
    """MiniMind's accumulation boundaries give updates of different sizes (training/accumulation.py)."""
    compiled = []
    trainer = Trainer(add_step, update_sizes=[2, 3, 2, 1], last_update=4, on_compiled=compiled.append)
    seen = []
    trainer.add_hook(lambda state: seen.append(state.data_batches))
    state = new_state()
    trainer.train(state)
    assert seen == [range(0, 2), range(2, 5), range(5, 7), range(7, 8)]
    assert state.params == sum(range(8)) and state.batches.step == 8
    assert len(compiled) == 3 and sorted(key[0] for key in trainer.compiled) == [1, 2, 3]


def test_hooks_run_in_order_when_due():
    trainer = Trainer(add_step, update_sizes=[1] * 6, last_update=6)
    calls = []
    trainer.add_hook(lambda state: calls.append(("every", state.update)))
    trainer.add_hook(lambda state: calls.append(("third", state.update)), every=3)
    trainer.add_hook(lambda state: calls.append(("odd", state.update)), every=lambda update: update % 2 == 1)
    trainer.train(new_state())
    assert calls == [
        ("every", 1),
        ("odd", 1),
        ("every", 2),
        ("every", 3),
        ("third", 3),
        ("odd", 3),
        ("every", 4),
        ("every", 5),
        ("odd", 5),
        ("every", 6),
        ("third", 6),
    ]


def test_a_hook_stops_the_run_after_the_update():
    trainer = Trainer(add_step, update_sizes=[2] * 10, last_update=10)
    after_stop = []

    def stop_at_3(state):
        if state.update == 3:
            raise StopRun

    trainer.add_hook(stop_at_3)
    trainer.add_hook(lambda state: after_stop.append(state.update))
    state = new_state()
    assert not trainer.train(state)
    assert state.update == 3 and state.batches.step == 6 and after_stop == [1, 2]


def test_a_run_at_its_last_update_does_nothing():
    trainer = Trainer(add_step, update_sizes=[1] * 2, last_update=2)
    trainer.add_hook(lambda state: pytest.fail("no update ran"))
    state = new_state(update=2)
    assert trainer.train(state) and state.params == 0 and state.batches.step == 0
