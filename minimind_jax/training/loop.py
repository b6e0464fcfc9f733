"""The run loop: one sharded step per optimizer update, then the hooks that are due.

Everything the loop changes lives in one `RunState`. What happens around the steps (metrics, checkpoints and
the `.pth`, preemption, eval) is a hook added with `Trainer.add_hook(hook, every=N)`; training/hooks.py has
them and training/run.py assembles a run from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from minimind_jax.training.compilation import CompiledStep, compile_ahead


@dataclasses.dataclass
class RunState:
    """The run as it goes: the train state after `update` updates, and where the data stands."""

    update: int
    params: Any
    opt_state: Any
    rng: jax.Array  # the run's key data; update N's step key folds in N
    batches: Any  # the data.pipeline.BatchIterator, whose position checkpoints keep
    metrics: dict | None = None  # the newest update's metrics, still on the device
    data_batches: range = range(0)  # the data batches of the newest update (for messages)
    host_metrics: dict = dataclasses.field(default_factory=dict)  # what the newest update's data reported (RL)


class StopRun(Exception):
    """Raised by a hook to end the loop after the current update (e.g. SIGTERM)."""


class Trainer:
    def __init__(
        self,
        step_fn: Callable,
        *,
        update_sizes: Sequence[int],
        last_update: int,
        frozen_params=None,
        on_compiled: Callable[[CompiledStep], None] = lambda compiled: None,
        steps: Callable[[RunState, int], Iterable[list]] | None = None,
    ):
        """step_fn: training/step.make_train_step's jitted step, compiled ahead of the first step of each
        number and shape of micro-batches, after which on_compiled(the CompiledStep) runs. update_sizes: the
        micro-batches of each update (training/accumulation.py). frozen_params: the objective's frozen models.
        steps(state, n): the next update's optimizer steps, each a list of micro-batches. By default one step
        of the next n of state.batches. RL rolls them out with state.params, and v3's PPO takes several steps
        per rollout, reading each one's state.metrics before it gives the next."""
        self.step_fn, self.update_sizes, self.last_update = step_fn, update_sizes, last_update
        self.frozen_params = frozen_params or {}
        self.on_compiled = on_compiled
        self.steps = steps or (lambda state, size: [[next(state.batches) for _ in range(size)]])
        self.compiled: dict[tuple, CompiledStep] = {}  # by the micro-batches' number and shapes
        self.hooks: list[tuple[Callable[[RunState], None], Callable[[int], bool]]] = []

    def add_hook(self, hook: Callable[[RunState], None], every: int | Callable[[int], bool] = 1) -> None:
        """hook(state) after every `every`-th update, or after each update for which `every(update)` is true.
        Hooks run in the order they were added."""
        due = every if callable(every) else (lambda update: update % every == 0)
        self.hooks.append((hook, due))

    def train(self, state: RunState) -> bool:
        """Runs updates until the last one; False when a hook stopped the run early."""
        while state.update < self.last_update:
            first, size = state.batches.step, self.update_sizes[state.update]
            update_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.update)
            for index, micro_batches in enumerate(self.steps(state, size)):
                key = jax.random.key_data(update_key if index == 0 else jax.random.fold_in(update_key, index))
                args = (state.params, state.opt_state, micro_batches, key, self.frozen_params)
                shapes = (len(micro_batches), *(jnp.shape(x) for x in jax.tree.leaves(micro_batches)))
                if shapes not in self.compiled:  # RL rows vary in width
                    self.compiled[shapes] = compile_ahead(self.step_fn, *args)
                    self.on_compiled(self.compiled[shapes])
                state.params, state.opt_state, state.metrics = self.compiled[shapes].executable(*args)
            state.update += 1
            state.data_batches = range(first, first + size)
            try:
                for hook, due in self.hooks:
                    if due(state.update):
                        hook(state)
            except StopRun:
                return False
        return True
