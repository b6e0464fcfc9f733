"""The objective interface of the one sharded step: which parameters train, frozen models, batch fields."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from minimind_jax.bench.torch_reference import reference_train_loop
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.transformer import MiniMind
from minimind_jax.training.loss import masked_ce_sums
from minimind_jax.training.objectives import LossSums, NextTokenLoss
from minimind_jax.training.optimizer import make_optimizer, minimind_lr
from minimind_jax.training.sharding import batch_sharding, make_mesh
from minimind_jax.training.step import init_train_state, make_train_step
from minimind_jax.weights import model_from_params, params_of
from minimind_jax.weights.mapping import params_from_state_dict, state_dict_from_params
from tests.support.models import random_torch_model, tiny_config, torch_batch
from tests.support.parity import assert_near_truth, float64_twin, state_of

RNG = jax.random.key_data(jax.random.key(0))


@dataclasses.dataclass(frozen=True)
class AttentionOnly(NextTokenLoss):
    def trainable(self, path):
        return "self_attn" in path


@dataclasses.dataclass(frozen=True)
class WithTeacherLoss(NextTokenLoss):
    """The policy's loss, and as a metric the frozen teacher's loss on the same rows."""

    frozen_models = ("teacher",)

    def loss_sums(self, model, batch, frozen, *, rng, batch_axes):
        sums = super().loss_sums(model, batch, frozen, rng=rng, batch_axes=batch_axes)
        logits = (
            frozen["teacher"]
            .forward(batch["inputs"], segment_ids_BT=batch["segment_ids"], positions_BT=batch["positions"])
            .logits
        )
        teacher_ce, _ = masked_ce_sums(logits, batch["targets"], batch["loss_mask"])
        return LossSums(sums.loss, sums.aux_loss, {"teacher_loss": teacher_ce})


def random_batches(vocab_size, count, batch=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        ids = rng.integers(3, vocab_size, (batch, length + 1))
        batches.append(
            {
                "inputs": ids[:, :-1].astype(np.int32),
                "targets": ids[:, 1:].astype(np.int32),
                "loss_mask": (rng.random((batch, length)) < 0.6).astype(np.float32),
                "segment_ids": np.ones((batch, length), np.int32),
                "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
            }
        )
    return batches


def train(model, objective, batches, lr, mesh_spec=None, devices=None, frozen=None, schedule=None):
    """One update per batch; returns (params after, opt_state after, per-update metrics)."""
    mesh = make_mesh(mesh_spec, devices or jax.devices()[:1])
    optimizer = make_optimizer(schedule or lr, grad_clip=1.0)
    graphdef, params, opt_state, param_shardings, opt_shardings = init_train_state(model, optimizer, mesh, objective)
    frozen = frozen or {}
    step = make_train_step(
        graphdef,
        optimizer,
        mesh,
        objective=objective,
        frozen_graphdefs={name: nnx.graphdef(m) for name, m in frozen.items()},
        param_shardings=param_shardings,
        opt_shardings=opt_shardings,
    )
    frozen_params = {name: params_of(m) for name, m in frozen.items()}
    history = []
    for batch in batches:
        params, opt_state, metrics = step(
            params, opt_state, [jax.device_put(batch, batch_sharding(mesh))], RNG, frozen_params
        )
        history.append(jax.device_get(metrics))
    return jax.device_get(params), opt_state, history


def test_only_the_trainable_parameters_move_as_torch_moves_them_with_the_rest_frozen():
    """An objective that trains the attention alone, against MiniMind's torch loop with every other
    parameter's requires_grad off (AdamW then skips them, decay included)."""
    config = tiny_config("minimind2", False)
    reference = random_torch_model(config, seed=3)
    initial = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}
    model = model_from_params(config, params_from_state_dict(initial, config))
    batches = random_batches(config.vocab_size, 2)
    schedule = lambda update: minimind_lr("minimind2", update + 1, 2, 1e-3)
    params, opt_state, _ = train(model, AttentionOnly(), batches, 1e-3, schedule=schedule)

    truth = float64_twin(reference)
    for torch_model in (reference, truth):
        for name, parameter in torch_model.named_parameters():
            parameter.requires_grad_("self_attn" in name)
        reference_train_loop(
            torch_model,
            [torch_batch(b) for b in batches],
            arch="minimind2",
            lr=1e-3,
            total_steps=2,
            accumulation_steps=1,
            grad_clip=1.0,
        )
    ours = state_dict_from_params(params, config)
    for name, value in ours.items():
        if "self_attn" not in name:
            np.testing.assert_array_equal(value, initial[name], err_msg=name)
    assert any(not np.array_equal(ours[name], initial[name]) for name in ours if "self_attn" in name)
    assert_near_truth(ours, state_of(reference), state_of(truth))
    # Adam's two moments for the trainable parameters, none for the fixed ones.
    moments = sum(leaf.size for leaf in jax.tree.leaves(opt_state) if leaf.ndim)
    assert moments == 2 * sum(value.size for name, value in initial.items() if "self_attn" in name)


def test_a_frozen_model_is_read_on_every_device_and_never_trained():
    """A teacher of another size, on a mesh of 4: its loss on the batch is the one it has alone, its
    parameters stay as they were, and the policy trains as it would without it."""
    policy_config = tiny_config("minimind2", False)
    teacher = MiniMind(
        ModelConfig(arch="minimind2", hidden_size=32, num_hidden_layers=1, vocab_size=policy_config.vocab_size),
        rngs=nnx.Rngs(5),
    )
    teacher_before = jax.device_get(params_of(teacher))
    policy_params = jax.device_get(params_of(MiniMind(policy_config, rngs=nnx.Rngs(1))))  # host copies: steps donate
    batches = random_batches(policy_config.vocab_size, 2, seed=4)
    devices = jax.devices()[:4]
    if len(devices) < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")

    with_teacher, _, history = train(
        model_from_params(policy_config, policy_params),
        WithTeacherLoss(),
        batches,
        1e-3,
        "data=4",
        devices,
        frozen={"teacher": teacher},
    )
    alone, _, plain_history = train(
        model_from_params(policy_config, policy_params), NextTokenLoss(), batches, 1e-3, "data=4", devices
    )
    for batch, metrics in zip(batches, history):
        logits = teacher.forward(batch["inputs"]).logits
        ce_sum, count = masked_ce_sums(logits, batch["targets"], batch["loss_mask"])
        np.testing.assert_allclose(metrics["teacher_loss"], ce_sum / count, rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params_of(teacher)), teacher_before)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), with_teacher, alone)
    np.testing.assert_allclose([h["loss"] for h in history], [h["loss"] for h in plain_history], rtol=1e-6)


def test_missing_batch_fields_and_frozen_models_are_named():
    config = tiny_config("minimind2", False)
    model = MiniMind(config, rngs=nnx.Rngs(0))
    mesh = make_mesh(None, jax.devices()[:1])
    optimizer = make_optimizer(1e-3)
    graphdef, params, opt_state, *_ = init_train_state(model, optimizer, mesh)
    with pytest.raises(ValueError, match=r"reads frozen models \('teacher',\), given \(\)"):
        make_train_step(graphdef, optimizer, mesh, objective=WithTeacherLoss())
    step = make_train_step(graphdef, optimizer, mesh)
    batch = random_batches(config.vocab_size, 1)[0]
    del batch["loss_mask"]
    with pytest.raises(ValueError, match=r"NextTokenLoss needs batch fields \['loss_mask'\]"):
        step(params, opt_state, [batch], RNG)


def test_torch_reference_frozen_parameters_get_no_update():
    """The premise of the first test: torch's AdamW leaves a parameter without a gradient exactly as it was."""
    config = tiny_config("minimind2", False)
    reference = random_torch_model(config, seed=3)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    for name, parameter in reference.named_parameters():
        parameter.requires_grad_("self_attn" in name)
    reference_train_loop(
        reference,
        [torch_batch(random_batches(config.vocab_size, 1)[0])],
        arch="minimind2",
        lr=1e-3,
        total_steps=1,
        accumulation_steps=1,
        grad_clip=1.0,
    )
    for name, value in reference.state_dict().items():
        assert torch.equal(value, before[name]) != ("self_attn" in name), name
