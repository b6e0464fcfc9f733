"""MiniMind's accumulation boundaries per era (training/accumulation.py) and the learning rate of each update."""

import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax.training.accumulation import update_plan
from minimind_jax.training.optimizer import update_lr_schedule


def test_seven_records_batch_two_accumulation_three_two_epochs():
    """4 micro-batches an epoch, acc 3. v3 updates at step % 3 == 0 and flushes each epoch's remainder: 4 updates,
    at the LRs MiniMind v3's own run logged (lr 1e-3). 2510 updates at (step + 1) % 3 == 0 and carries the
    remainder into the next epoch: 2 updates, the second of 4 micro-batches; the last 2 are never applied."""
    v3 = update_plan("minimind3", iters=4, epochs=2, accumulation_steps=3)
    assert (v3.sizes, v3.micro_steps, v3.total_micro_steps) == ((3, 1, 3, 1), (3, 4, 7, 8), 8)
    lrs = [float(update_lr_schedule("minimind3", 1e-3, v3)(jnp.int32(u))) for u in range(len(v3))]
    np.testing.assert_allclose(lrs, [0.000722, 0.00055, 0.000134, 0.0001], atol=5e-7)
    old = update_plan("minimind2", iters=4, epochs=2, accumulation_steps=3)
    assert (old.sizes, old.micro_steps, old.total_micro_steps) == ((2, 4), (2, 6), 8)


@pytest.mark.parametrize("arch", ["minimind2", "minimind3"])
@pytest.mark.parametrize("iters, epochs, acc", [(8, 2, 4), (10, 3, 4), (5, 2, 1), (2, 3, 8)])
def test_every_update_follows_the_era_rule(arch, iters, epochs, acc):
    """The plan against MiniMind's loops written out: the micro-steps it updates at, and the micro-batches each
    update applies (all of them in v3; in 2510, all but those after its last update)."""
    updates, pending = [], 0
    for epoch in range(epochs):
        for step in range(1, iters + 1):
            pending += 1
            if (arch == "minimind3" and step % acc == 0) or (arch == "minimind2" and (step + 1) % acc == 0):
                updates.append((pending, epoch * iters + step))
                pending = 0
        if arch == "minimind3" and step % acc != 0:
            updates.append((pending, epoch * iters + step))
            pending = 0
    plan = update_plan(arch, iters, epochs, acc)
    assert list(zip(plan.sizes, plan.micro_steps)) == updates
    applied = sum(plan.sizes)
    assert applied == iters * epochs if arch == "minimind3" else applied == (plan.micro_steps or (0,))[-1]
    assert plan.previous_micro_step(1) == 0
    assert all(plan.previous_micro_step(u + 2) == plan.micro_steps[u] for u in range(len(plan) - 1))
