"""Training survives numerical faults and failed saves: a non-finite update is skipped, counted and logged,
too many in a row stop the run with a checkpoint of the last good state, a full disk is a one-line error that
leaves the previous checkpoint intact, and a checkpoint never exists without its update's metrics.

These call `training.run.train` in this process (tiny model, 8 simulated devices); the process-level crash tests
are in test_crash_resume.py.
"""

import contextlib
import json
import os
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import minimind_jax
import minimind_jax.weights
from minimind_jax.errors import UserError
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.transformer import MiniMind
from minimind_jax.training import run
from minimind_jax.training.config import TrainConfig
from minimind_jax.training.run import train
from minimind_jax.weights.orbax import TrainCheckpoints
from tests.support.data import random_chats, write_jsonl
from tests.support.runs import metrics_of, tiny_config

RUN_NAME = "full_sft_32"


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> pathlib.Path:
    return write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", random_chats(120, seed=5))


def train_config(tmp_path, data_path, tokenizer_path, **overrides) -> TrainConfig:
    """Tiny SFT run (tiny_config): hidden 32, a checkpoint after every update."""
    fields = dict(from_weight="none", hidden_size=32, epochs=1, learning_rate=1e-3, log_interval=1, save_interval=1,
                  keep_checkpoints=20, cache_dir=str(tmp_path.parent / "data_cache"))  # fmt: skip
    return tiny_config(tmp_path, data_path, tokenizer_path, **{**fields, **overrides})


def saved_state(cfg: TrainConfig, step: int) -> dict:
    """Everything checkpoint `step` holds (params, optimizer state, RNG) as numpy arrays."""
    path = pathlib.Path(cfg.checkpoint_dir).resolve() / cfg.run_name / str(step) / "state"
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(path)
    return jax.tree.map(np.asarray, restored)


def assert_same_tree(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)  # NaN equals NaN here


class PoisonedBatches:
    """The real batch iterator, except that the data steps in `poisoned` carry a NaN in their loss mask.

    A fault that only some batches hit has to be injected like this: real masks are 0/1, and a NaN in a weight
    reaches every batch (the embedding is tied to lm_head, so one bad row is in every position's logits).
    """

    def __init__(self, batches, poisoned: set[int]):
        self._batches = batches
        self._poisoned = poisoned

    def __getattr__(self, name):
        return getattr(self._batches, name)

    def __len__(self):
        return len(self._batches)

    def __next__(self):
        step = self._batches.step
        batch = next(self._batches)
        if step in self._poisoned:
            batch = dict(batch, loss_mask=batch["loss_mask"].at[0, 0].set(jnp.nan))
        return batch


def poison_steps(monkeypatch, poisoned: set[int]) -> None:
    real = run.make_batches
    monkeypatch.setattr(run, "make_batches", lambda *args, **kwargs: PoisonedBatches(real(*args, **kwargs), poisoned))


def test_non_finite_updates_are_skipped_counted_logged_and_stop_the_run(
    tmp_path, chats, small_tokenizer, monkeypatch, capsys
):
    # Data step 2 (update 3) alone, then data steps 4, 5, 6 (updates 5-7) in a row.
    poison_steps(monkeypatch, {2, 4, 5, 6})
    cfg = train_config(tmp_path, chats, small_tokenizer, max_consecutive_skips=3)
    with pytest.raises(UserError) as error:
        train(cfg)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("3 consecutive non-finite updates (last: update 7); saved the last good state to ")

    records = metrics_of(cfg)
    assert [r["update"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["skipped"] for r in records] == [0, 0, 1, 0, 1, 1, 1]
    assert all(np.isnan(r["grad_norm"]) for r in records if r["skipped"])
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records if not r["skipped"])
    output = capsys.readouterr().out
    for update, step in ((3, 2), (5, 4), (6, 5), (7, 6)):
        assert f"update {update}: non-finite loss or gradient (loss " in output
        assert f"at data batches [{step}]; update skipped" in output

    # A skipped update leaves params and optimizer state as they were; a good one changes them. The run
    # stopped with a checkpoint (update 7) that holds the last good state (update 4).
    states = {step: saved_state(cfg, step) for step in (2, 3, 4, 7)}
    assert_same_tree(states[3]["params"], states[2]["params"])
    assert_same_tree(states[3]["opt_state"], states[2]["opt_state"])
    assert not np.array_equal(states[4]["params"]["embed_tokens"], states[3]["params"]["embed_tokens"])
    assert_same_tree(states[7]["params"], states[4]["params"])
    assert_same_tree(states[7]["opt_state"], states[4]["opt_state"])
    meta = TrainCheckpoints(pathlib.Path(cfg.checkpoint_dir) / RUN_NAME, create=False).restore_meta(7)
    assert meta["data_state"]["next_step"] == 7  # resuming goes on after the bad batches

    # The run directory loads as a model (newest step), and the exported .pth is that same state.
    from_run = minimind_jax.load(pathlib.Path(cfg.checkpoint_dir) / RUN_NAME)
    from_pth = minimind_jax.load(pathlib.Path(cfg.save_dir) / f"{RUN_NAME}.pth")
    np.testing.assert_array_equal(
        np.asarray(from_run.embed_tokens[...], np.float16), np.asarray(from_pth.embed_tokens[...])
    )


def test_non_finite_weights_stop_after_max_consecutive_skips(tmp_path, chats, small_tokenizer):
    model = MiniMind(ModelConfig(hidden_size=32, num_hidden_layers=2), rngs=__import__("flax").nnx.Rngs(0))
    model.norm.weight[...] = model.norm.weight[...].at[3].set(jnp.nan)  # the final norm: every logit sees it
    weights = minimind_jax.save_pth(model, tmp_path / "nan_weights.pth", dtype="float32")
    cfg = train_config(tmp_path, chats, small_tokenizer, from_weight=str(weights), max_consecutive_skips=2)
    with pytest.raises(UserError, match=r"^2 consecutive non-finite updates \(last: update 2\); saved the last good"):
        train(cfg)
    assert [r["skipped"] for r in metrics_of(cfg)] == [1, 1]
    loaded = minimind_jax.load(weights)
    state = saved_state(cfg, 2)
    assert_same_tree(state["params"], jax.tree.map(np.asarray, minimind_jax.weights.params_of(loaded)))


def test_a_checkpoint_is_never_newer_than_the_logged_metrics(tmp_path, chats, small_tokenizer, monkeypatch):
    """Dying right after checkpoint 3 is committed loses nothing: update 3's metrics were written before."""
    real_save = TrainCheckpoints.save

    def save_then_die_at_3(self, step, *args, **kwargs):
        real_save(self, step, *args, **kwargs)
        if step == 3:
            self.wait()
            raise KeyboardInterrupt("killed right after checkpoint 3 was committed")

    monkeypatch.setattr(TrainCheckpoints, "save", save_then_die_at_3)
    cfg = train_config(tmp_path, chats, small_tokenizer, max_steps=6)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert TrainCheckpoints(pathlib.Path(cfg.checkpoint_dir) / RUN_NAME, create=False).latest_step() == 3
    assert [r["update"] for r in metrics_of(cfg)] == [1, 2, 3]


@contextlib.contextmanager
def small_tmpfs(path: pathlib.Path, size: str):
    """A tmpfs of `size` mounted at `path` (needs root); skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, chats, small_tokenizer):
    with small_tmpfs(tmp_path / "disk", "4m") as disk:  # one checkpoint (~2.7 MB) fits, two do not
        cfg = train_config(tmp_path, chats, small_tokenizer, checkpoint_dir=str(disk), save_interval=2, max_steps=10)
        with pytest.raises(UserError) as error:
            train(cfg)
        message = str(error.value)
        assert "\n" not in message
        assert message == (
            f"{disk / RUN_NAME}: writing a checkpoint failed (no space left on device); "
            f"step 2 is the newest complete checkpoint"
        )
        run = TrainCheckpoints(disk / RUN_NAME, create=False)
        assert run.latest_step() == 2
        assert run.restore_meta(2)["update"] == 2
        state = saved_state(cfg, 2)
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state["params"]))


def test_full_disk_while_exporting_a_pth_keeps_the_previous_file(tmp_path):
    from minimind_jax.weights.pth import read_state_dict, write_state_dict

    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        path = write_state_dict({"w": np.ones((100, 100), np.float32)}, disk / "weights.pth")
        with pytest.raises(UserError, match=r"weights.pth: cannot write .*no space left on device"):
            write_state_dict({"w": np.ones((1000, 1000), np.float32)}, path)
        assert sorted(p.name for p in disk.iterdir()) == ["weights.pth"]  # no temporary left behind
        np.testing.assert_array_equal(read_state_dict(path)["w"], np.ones((100, 100), np.float16))


def test_resuming_drops_the_metrics_a_killed_run_logged_after_its_checkpoint(tmp_path):
    from minimind_jax.training.metrics import drop_metrics_after

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"update": u, "loss": float("nan") if u == 2 else 1.0 / u}) for u in range(1, 6)]
    path.write_text("\n".join(lines) + '\n{"update": 6, "lo')  # died in the middle of a line
    drop_metrics_after(path, 3)
    assert path.read_text() == "\n".join(lines[:3]) + "\n"
