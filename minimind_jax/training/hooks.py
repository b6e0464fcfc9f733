"""The hooks of a training run (Trainer.add_hook): checkpoints with the `.pth`, preemption, and eval."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import jax
import jax.experimental.multihost_utils
import numpy as np
import tqdm
from flax import nnx

from minimind_jax.training.evaluation import evaluate
from minimind_jax.training.loop import RunState, StopRun
from minimind_jax.training.metrics import MetricLogger
from minimind_jax.weights.orbax import TrainCheckpoints


class Checkpointer:
    """Saves the train state as an Orbax checkpoint and the model as MiniMind's `.pth` (process 0 writes it,
    with `export(model)`: save_pth, or save_lora for adapters).

    A checkpoint is written only after its update's metrics (so a resumed run never lacks them) and once per
    update (SIGTERM or the end can follow a periodic save of the same update).
    """

    def __init__(
        self,
        checkpoints: TrainCheckpoints,
        logger: MetricLogger,
        graphdef: nnx.GraphDef,
        export: Callable[[nnx.Module], object],
        run_meta: dict,
        resumed_update: int,
        is_main: bool,
    ):
        self.checkpoints, self.logger, self.graphdef = checkpoints, logger, graphdef
        self.export, self.run_meta, self.is_main = export, run_meta, is_main
        self.checkpointed = resumed_update or None  # the update of the newest checkpoint, None before one

    def __call__(self, state: RunState) -> None:
        self.save(state)

    def save(self, state: RunState, wait: bool = False) -> None:
        self.logger.flush()
        if state.update != self.checkpointed:
            host_rng = np.asarray(jax.device_get(state.rng))
            self.checkpoints.save(
                state.update,
                {"params": state.params, "opt_state": state.opt_state, "rng": host_rng},
                {
                    **self.run_meta,
                    "update": state.update,
                    "epoch": state.batches.epoch,
                    "data_state": state.batches.get_state(),
                },
                force=True,
            )
            self.checkpointed = state.update
        params = state.params
        if jax.process_count() > 1:  # the arrays span processes: all of them gather, process 0 writes
            params = jax.experimental.multihost_utils.process_allgather(params, tiled=True)
        if self.is_main:
            self.export(nnx.merge(self.graphdef, params))
        if wait:
            self.checkpoints.wait()


class Preemption:
    """SIGTERM (a preempted TPU or spot VM) or SIGINT (Ctrl-C): checkpoint at the next update boundary and stop
    the run. A second Ctrl-C interrupts at once; the newest checkpoint stays whole (Orbax writes a step under a
    temporary name and renames it when complete).

    With several processes joined by jax.distributed, all must save the same update: JAX's preemption service
    (jax.distributed starts it; it takes over SIGTERM) tells every process of a notice any one got, and names
    an update that all of them reach. Ctrl-C in one of them is passed to it as SIGTERM.
    """

    def __init__(self, checkpointer: Checkpointer):
        self.checkpointer = checkpointer
        self.requested = False
        self.signal_name = "SIGTERM"
        self.shared = jax.process_count() > 1 and jax.distributed.is_initialized()
        self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._on_sigint)}
        if not self.shared:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self.requested = True

    def _on_sigint(self, signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.signal_name = "SIGINT"
        if self.checkpointer.is_main:
            tqdm.tqdm.write("SIGINT: saving after this update (Ctrl-C again stops at once, without it)")
        if self.shared:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.requested = True

    def __call__(self, state: RunState) -> None:
        if self.shared:  # every process asks after every update
            self.requested = jax.experimental.multihost_utils.reached_preemption_sync_point(state.update)
        if self.requested:
            self.checkpointer.save(state, wait=True)
            if self.checkpointer.is_main:
                tqdm.tqdm.write(
                    f"{self.signal_name}: saved update {state.update} to {self.checkpointer.checkpoints.directory}; "
                    "resume with --from_resume 1"
                )
            raise StopRun

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Evaluation:
    """The masked loss of held-out data (training/evaluation.py) with the run's parameters; `result` keeps it."""

    def __init__(self, loss_sums, make_batches, label: str, is_main: bool):
        self.loss_sums, self.make_batches, self.label, self.is_main = loss_sums, make_batches, label, is_main
        self.result = None

    def __call__(self, state: RunState) -> None:
        self.result = evaluate(self.loss_sums, state.params, self.make_batches())
        if self.is_main:
            tqdm.tqdm.write(
                f"eval {self.label}: masked loss {self.result['loss']:.4f} (perplexity "
                f"{self.result['perplexity']:.2f}, {self.result['loss_tokens']:.0f} tokens)"
            )
