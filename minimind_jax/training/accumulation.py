"""MiniMind's gradient-accumulation boundaries, per era: how many micro-batches each optimizer update takes, and
at which micro-step it happens (whose learning rate it uses).

MiniMind counts micro-steps from 1 within each epoch (`step`) and sets the learning rate at every one of them
from the run's micro-step `epoch · iters + step` over `epochs · iters`:
- v3 updates when `step % acc == 0` and, at each epoch's end, once more with the epoch's remaining
  micro-batches (fewer than acc);
- 2510 updates when `(step + 1) % acc == 0`, so its first update comes after acc - 1 micro-batches; what
  remains at an epoch's end carries into the next epoch's first update, and what remains at the run's end is
  never applied.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class UpdatePlan:
    sizes: tuple[int, ...]  # micro-batches of each update, in order; they follow one another in the data
    micro_steps: tuple[int, ...]  # the run's 1-based micro-step (over every epoch) at which each update happens
    total_micro_steps: int  # epochs · iters, the length of MiniMind's LR schedule

    def __len__(self) -> int:
        return len(self.sizes)

    def previous_micro_step(self, update: int) -> int:
        """The micro-step of the update before `update` (1-based updates; 0 before the first)."""
        return self.micro_steps[update - 2] if update > 1 else 0


def update_plan(arch: str, iters: int, epochs: int, accumulation_steps: int) -> UpdatePlan:
    """The updates of a run of `epochs` epochs of `iters` micro-batches each, as MiniMind's era makes them."""
    sizes, micro_steps, pending = [], [], 0
    for epoch in range(epochs):
        for step in range(1, iters + 1):
            pending += 1
            boundary = step + (arch != "minimind3")  # 2510 tests step + 1
            if boundary % accumulation_steps == 0:
                sizes.append(pending)
                micro_steps.append(epoch * iters + step)
                pending = 0
        if arch == "minimind3" and pending:  # v3 flushes the epoch's remainder
            sizes.append(pending)
            micro_steps.append((epoch + 1) * iters)
            pending = 0
    return UpdatePlan(tuple(sizes), tuple(micro_steps), epochs * iters)
