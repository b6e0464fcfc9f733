"""Orbax checkpoints: model-only checkpoints (what `convert` writes) and training checkpoints.

Model checkpoint, a directory:      config.json + params/ (Orbax StandardSave of the parameter tree)
Training checkpoints, a directory:  {step}/state (params + optimizer state + RNG) and {step}/meta (JSON:
                                    step, epoch, data-iterator state, model and run config), written by an
                                    async CheckpointManager that keeps the last N. Orbax writes each step
                                    to a temporary directory and renames it when complete, so a crash never
                                    leaves a half-written step that restore would pick.
"""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import jax.experimental.multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from minimind_jax.errors import UserError, first_line
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.params import abstract_model, params_of

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def write_config(config: ModelConfig, directory) -> None:
    pathlib.Path(directory, CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1))


def read_config(directory, **overrides) -> ModelConfig:
    path = pathlib.Path(directory, CONFIG_FILE)
    try:
        fields = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{directory}: not a minimind-jax checkpoint (no {CONFIG_FILE})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: corrupt config ({error})") from None
    return ModelConfig.from_dict({**fields, **overrides})


def abstract_params(config: ModelConfig, sharding=None) -> dict:
    """ShapeDtypeStructs of the parameter tree, placed on `sharding` (a pytree or one sharding) or device 0."""
    shapes = params_of(abstract_model(config))
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, sharding)


def save_model_checkpoint(model, directory) -> pathlib.Path:
    directory = pathlib.Path(directory).resolve()
    if directory.exists() and any(directory.iterdir()):
        raise UserError(f"{directory}: exists and is not empty; choose a new output directory")
    directory.mkdir(parents=True, exist_ok=True)
    write_config(model.config, directory)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, params_of(model))
    return directory


def restore_params(directory, sharding=None, **overrides) -> tuple[ModelConfig, dict]:
    """(config, params) from a model checkpoint or from the newest complete step of a training run."""
    directory = pathlib.Path(directory).resolve()
    if (directory / PARAMS_DIR).is_dir():
        config = _checked_config(lambda: read_config(directory, **overrides), directory / CONFIG_FILE)
        try:
            with ocp.StandardCheckpointer() as checkpointer:
                params = checkpointer.restore(directory / PARAMS_DIR, abstract_params(config, sharding))
        except Exception as error:  # Orbax raises many types for damaged files; all mean the same here
            raise UserError(
                f"{directory / PARAMS_DIR}: corrupt or incomplete checkpoint ({first_line(error)})"
            ) from None
        return config, params
    run = TrainCheckpoints(directory, create=False)
    step = run.latest_step()
    if step is None:
        raise UserError(
            f"{directory}: neither a model checkpoint ({PARAMS_DIR}/) nor a training run with a complete step"
        )
    meta = run.restore_meta(step)
    config = _checked_config(
        lambda: ModelConfig.from_dict({**meta["model_config"], **overrides}), f"{directory}/{step}/meta"
    )
    # A run that trains more than the policy (PPO's actor and critic) keeps the policy under one key.
    policy_key = meta.get("policy_params")
    target = abstract_params(config, sharding)
    params = run.restore_state(step, {policy_key: target} if policy_key else target)["params"]
    return config, params[policy_key] if policy_key else params


def _checked_config(make_config, origin) -> ModelConfig:
    try:
        return make_config()
    except (KeyError, TypeError, ValueError) as error:  # unknown or missing fields, values of the wrong type
        raise UserError(f"{origin}: not a valid model config ({first_line(error)})") from None


def complete_steps(directory) -> list[int]:
    """The committed steps of a training run's directory, oldest first (none when it does not exist); only reads."""
    directory = pathlib.Path(directory)
    return sorted(ocp.utils.checkpoint_steps(directory)) if directory.is_dir() else []


class TrainCheckpoints:
    """The training run's CheckpointManager: state (params, optimizer state, RNG) + JSON meta per step."""

    def __init__(self, directory, max_to_keep: int = 3, async_save: bool = True, create: bool = True):
        self.directory = pathlib.Path(directory).resolve()
        if not create and not self.directory.is_dir():
            raise UserError(f"{self.directory}: no such checkpoint directory")
        # A training run (create=True) deletes the half-written steps a killed predecessor left; a reader
        # must not, as it may look at a run that is writing one now.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=create,
            cleanup_tmp_directories=create,
            enable_async_checkpointing=async_save,
        )
        try:
            self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"), options=options)
        except Exception as error:
            raise UserError(f"{self.directory}: cannot open checkpoints ({first_line(error)})") from None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, meta: dict, force: bool = False) -> None:
        """Starts an async save of `state` (a pytree of arrays) and `meta` (JSON-serialisable).

        A failed write (a full disk, a read-only directory) raises UserError here or, for the write in the
        background, at the next `save` or `wait`; the complete checkpoints before it stay as they were.
        """
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=force,
            )
        except ocp.checkpoint_manager.StepAlreadyExistsError:
            raise
        except Exception as error:  # OSError here; tensorstore's ValueError from the background write
            raise UserError(self._write_failure(error)) from None

    def restore_meta(self, step: int) -> dict:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as error:
            raise UserError(f"{self.directory}/{step}/meta: corrupt checkpoint ({first_line(error)})") from None

    def restore_state(self, step: int, params_abstract, opt_state_abstract=None) -> dict:
        """Restores onto the shardings of the abstract trees (ShapeDtypeStructs), so a run can resume on
        another mesh or device count. Without `opt_state_abstract`, only the parameters are read (those of
        params_abstract, a part of the saved ones if it names only some)."""
        target = {"params": params_abstract}
        if opt_state_abstract is None:
            state = ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
            )
        else:
            target.update(opt_state=opt_state_abstract, rng=jax.ShapeDtypeStruct((2,), np.uint32))
            state = ocp.args.StandardRestore(target)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=state))
        except Exception as error:
            raise UserError(
                f"{self.directory}/{step}/state: corrupt or incompatible checkpoint ({first_line(error)})"
            ) from None
        return restored["state"]

    def restore_newest(self, params_abstract, opt_state_abstract) -> tuple[int, dict, dict] | None:
        """(step, meta, state) of the newest step that restores, None without one.

        A newer step that does not restore (its files damaged after it was committed) is moved aside to
        `{step}.damaged`, kept for a look, with a one-line warning, so the run goes on from the step before
        and can later write that step again. When no step restores (e.g. every one was saved with another
        model shape), nothing is moved and the newest step's error is raised.
        """
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.restore_meta(step)
                state = self.restore_state(step, params_abstract, opt_state_abstract)
            except UserError as error:
                failures.append((step, error))
                continue
            for damaged, error in failures:
                aside = self.directory / f"{damaged}.damaged"
                if jax.process_index() == 0:
                    (self.directory / str(damaged)).rename(aside)
                log.warning("%s; moved it to %s, resuming from step %d", error, aside.name, step)
            if failures:
                jax.experimental.multihost_utils.sync_global_devices("checkpoint: damaged steps moved aside")
                self.manager.reload()
            return step, meta, state
        if failures:
            raise failures[0][1]
        return None

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            raise UserError(self._write_failure(error)) from None

    def _write_failure(self, error: Exception) -> str:
        reason = "no space left on device" if "No space left on device" in str(error) else first_line(error)
        complete = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()]
        newest = f"step {max(complete)} is the newest complete checkpoint" if complete else "no checkpoint is complete"
        return f"{self.directory}: writing a checkpoint failed ({reason}); {newest}"

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
