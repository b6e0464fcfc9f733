"""The sharded train step: parity with MiniMind's step, mesh invariance, accumulation and loss normalization,
and the default (fast-path) step against MiniMind's literal one."""

import jax
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import minimind_jax
from minimind_jax.bench.torch_reference import MiniMindTorch, batch_from_v3, reference_train_loop, sft_step
from minimind_jax.bench.torch_reference import make_optimizer as torch_adamw
from minimind_jax.model import transformer
from minimind_jax.model.config import LITERAL_STEP, ModelConfig, fast_path_settings, train_step_settings
from minimind_jax.model.transformer import MiniMind
from minimind_jax.training.objectives import NextTokenLoss
from minimind_jax.training.optimizer import make_optimizer, minimind_lr
from minimind_jax.training.sharding import batch_sharding, make_mesh
from minimind_jax.training.step import init_train_state, make_train_step
from minimind_jax.weights import model_from_params
from minimind_jax.weights.mapping import params_from_state_dict, state_dict_from_params
from tests.conftest import require_shared
from tests.support.models import random_torch_model, tiny_config, torch_batch
from tests.support.parity import assert_near_truth, assert_scalar_near_truth, float64_twin, state_of

RNG = jax.random.key_data(jax.random.key(0))


def as_batch(inputs, targets, loss_mask, segment_ids=None):
    b, t = np.shape(inputs)
    return {
        "inputs": np.asarray(inputs, np.int32),
        "targets": np.asarray(targets, np.int32),
        "loss_mask": np.asarray(loss_mask, np.float32),
        "segment_ids": np.ones((b, t), np.int32) if segment_ids is None else np.asarray(segment_ids, np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
    }


def run_steps(
    model, micro_batch_lists, lr, *, mesh_spec=None, devices=None, loss_norm="tokens", schedule=None, every_step=False
):
    """Runs one update per entry of `micro_batch_lists`; returns (per-update metrics, final params), or the
    params after every update with every_step=True."""
    devices = devices or jax.devices()[:1]
    mesh = make_mesh(mesh_spec, devices)
    optimizer = make_optimizer(schedule or lr, grad_clip=1.0)
    graphdef, params, opt_state, param_shardings, opt_shardings = init_train_state(model, optimizer, mesh)
    step = make_train_step(
        graphdef,
        optimizer,
        mesh,
        accumulation_steps=len(micro_batch_lists[0]),
        loss_norm=loss_norm,
        param_shardings=param_shardings,
        opt_shardings=opt_shardings,
    )
    history, snapshots = [], []
    for micro_batches in micro_batch_lists:
        placed = [jax.device_put(b, batch_sharding(mesh)) for b in micro_batches]
        params, opt_state, metrics = step(params, opt_state, placed, RNG)
        history.append(jax.device_get(metrics))
        snapshots.append(jax.device_get(params))
    return history, snapshots if every_step else snapshots[-1]


def state_dict_of(params, config):
    return state_dict_from_params(params, config)


def jax_copy_of(reference: MiniMindTorch, config):
    return model_from_params(
        config, params_from_state_dict({k: v.detach().numpy() for k, v in reference.state_dict().items()}, config)
    )


def torch_grad_norm(model: MiniMindTorch, inputs, targets, loss_mask):
    """The global norm, in float64, of the reference's gradient of the SFT loss (the gradient is discarded)."""
    model.train()
    out = model(torch.as_tensor(inputs))
    ce = torch.nn.functional.cross_entropy(
        out.logits.flatten(0, 1), torch.as_tensor(targets).flatten(), reduction="none"
    )
    mask = torch.as_tensor(loss_mask).float().flatten()
    ((ce * mask).sum() / mask.sum() + out.aux_loss).backward()
    norm = float(sum((p.grad.double() ** 2).sum() for p in model.parameters())) ** 0.5
    model.zero_grad(set_to_none=True)
    return norm


def torch_runs(reference: MiniMindTorch, updates, lr=1e-3):
    """The fp32 reference and its float64 twin (the truth) through the same (inputs, targets, loss_mask) updates.

    Per update: (fp32 metrics, float64 metrics, fp32 weights, float64 weights); the fp32 grad_norm is the
    float64 norm of the fp32 gradient, so it does not carry torch's fp32 summation of the norm.
    """
    truth = float64_twin(reference)
    optimizer, truth_optimizer = torch_adamw(reference, lr), torch_adamw(truth, lr)
    runs = []
    for args in updates:
        exact_norm = torch_grad_norm(reference, *args)
        fp32 = {**sft_step(reference, optimizer, *args, lr=lr), "grad_norm": exact_norm}
        exact = sft_step(truth, truth_optimizer, *args, lr=lr)
        runs.append((fp32, exact, state_of(reference), state_of(truth)))
    return runs


def assert_update_near_truth(metrics, params, config, torch_run, label):
    """Our loss, aux loss, gradient norm and weights after an update, against torch_runs' entry for it."""
    fp32, exact, fp32_weights, exact_weights = torch_run
    for key in ("loss", "aux_loss", "grad_norm"):
        assert_scalar_near_truth(f"{label} {key}", metrics[key], float(fp32[key]), float(exact[key]))
    assert_near_truth(state_dict_of(params, config), fp32_weights, exact_weights, label=label)


def test_optimizer_steps_are_torch_adamw():
    """Clipping + AdamW on fixed gradients: after each of 4 steps the parameters are no farther from
    torch.optim.AdamW in float64 than torch's own fp32 AdamW is, and at least 97% of them are bit-equal to the
    fp32 one, whose order of operations the step follows (measured 97.8-99.5%; optax's order gave 33-65%)."""
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(64, 32)).astype(np.float32)
    grads = [rng.normal(scale=0.05, size=weights.shape).astype(np.float32) for _ in range(4)]
    optimizer = make_optimizer(1e-3, grad_clip=1.0)
    params, state = {"w": jax.numpy.asarray(weights)}, optimizer.init({"w": weights})
    torch_runs = {}
    for dtype in (torch.float64, torch.float32):
        parameter = torch.nn.Parameter(torch.from_numpy(weights).to(dtype))
        adamw = torch.optim.AdamW([parameter], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, foreach=False)
        torch_runs[dtype] = (parameter, adamw)
    for grad in grads:
        for parameter, adamw in torch_runs.values():
            parameter.grad = torch.from_numpy(grad).to(parameter.dtype)
            torch.nn.utils.clip_grad_norm_([parameter], 1.0)
            adamw.step()
        updates, state = optimizer.update({"w": jax.numpy.asarray(grad)}, state, params)
        params = optax.apply_updates(params, updates)
        ours, fp32 = np.asarray(params["w"]), torch_runs[torch.float32][0].detach().numpy()
        exact = torch_runs[torch.float64][0].detach().numpy()
        assert np.abs(ours - exact).max() <= np.abs(fp32 - exact).max()
        assert (ours == fp32).mean() >= 0.97


# ---- one step against MiniMind's recorded step ----


@pytest.mark.parametrize("era,variant", [(e, v) for e in ("2510", "v3") for v in ("dense", "moe")])
def test_first_step_matches_minimind_golden(era, variant):
    golden = dict(np.load(require_shared("golden", era, f"sft_step_{variant}.npz")))
    weights = require_shared("golden", era, f"{variant}.pth")
    if era == "2510":
        inputs, targets, mask = golden["X"], golden["Y"], golden["loss_mask"]
    else:
        inputs, targets, mask = (
            t.numpy() for t in batch_from_v3(torch.from_numpy(golden["input_ids"]), torch.from_numpy(golden["labels"]))
        )
    model = minimind_jax.load(weights)
    [metrics], params = run_steps(model, [[as_batch(inputs, targets, mask)]], float(golden["lr"]))
    for key in ("loss", "logits_loss", "aux_loss"):
        np.testing.assert_allclose(metrics[key], golden[key], rtol=1e-5, err_msg=key)

    reference = MiniMindTorch(model.config)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in _read(weights).items()}, strict=True)
    exact_norm = torch_grad_norm(reference, inputs, targets, mask)
    # Our pre-clip norm is the float64 norm of MiniMind's gradient to 1e-5. torch's fp32 clip_grad_norm_
    # itself is off by up to ~5e-5 on these tensors, which is what the golden recorded.
    np.testing.assert_allclose(metrics["grad_norm"], exact_norm, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], golden["grad_norm"], rtol=1e-4)
    # MiniMind's recorded step is the fp32 floor here: it and ours are held to the float64 step.
    truth = float64_twin(reference)
    sft_step(
        truth,
        torch_adamw(truth, float(golden["lr"])),
        *torch_batch(as_batch(inputs, targets, mask)),
        lr=float(golden["lr"]),
    )
    after = _read(require_shared("golden", era, f"sft_step_{variant}_after.pth"))
    assert_near_truth(state_dict_of(params, model.config), after, state_of(truth), label=f"{era} {variant}")


def _read(path):
    from minimind_jax.weights.pth import read_state_dict

    return read_state_dict(path)


# ---- against our torch reference, on any machine ----


def random_batches(config, count, batch=4, length=16, seed=0, empty_row=False):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        ids = rng.integers(3, config.vocab_size, (batch, length + 1))
        mask = (rng.random((batch, length)) < 0.6).astype(np.float32)
        if empty_row:
            mask[-1] = 0
        batches.append(as_batch(ids[:, :-1], ids[:, 1:], mask))
    return batches


@pytest.mark.parametrize("arch,use_moe", [("minimind2", False), ("minimind2", True), ("minimind3", True)])
def test_steps_match_the_torch_reference(arch, use_moe):
    config = tiny_config(arch, use_moe)
    reference = random_torch_model(config, seed=7)
    model = jax_copy_of(reference, config)
    batches = random_batches(config, 2)
    history, params_after = run_steps(model, [[b] for b in batches], 1e-3, every_step=True)
    runs = torch_runs(reference, [torch_batch(b) for b in batches])
    for step, (metrics, params, run) in enumerate(zip(history, params_after, runs)):
        assert_update_near_truth(metrics, params, config, run, f"step {step}")


def test_minimind_loss_norm_with_accumulation_matches_minimind_v3():
    """v3 steps every `acc` micro-batches; loss_norm=minimind divides each micro-batch's mean by acc."""
    config = tiny_config("minimind3", False)
    reference = random_torch_model(config, seed=8)
    model = jax_copy_of(reference, config)
    batches = random_batches(config, 4, seed=1)
    schedule = lambda update: minimind_lr("minimind3", (update + 1) * 2, 4, 1e-3)
    history, params = run_steps(model, [batches[:2], batches[2:]], 1e-3, loss_norm="minimind", schedule=schedule)
    truth = float64_twin(reference)
    loop = dict(arch="minimind3", lr=1e-3, total_steps=4, accumulation_steps=2, grad_clip=1.0)
    expected = reference_train_loop(reference, [torch_batch(b) for b in batches], **loop)
    exact = reference_train_loop(truth, [torch_batch(b) for b in batches], **loop)
    ours = np.concatenate([h["micro_losses"] for h in history])
    for step, values in enumerate(zip(ours, expected["loss"], exact["loss"])):
        assert_scalar_near_truth(f"micro-step {step} loss", *values)
    assert_near_truth(state_dict_of(params, config), state_of(reference), state_of(truth))


def test_token_weighted_accumulation_equals_one_big_batch():
    config = tiny_config("minimind2", False)
    a, b = random_batches(config, 2, seed=2)
    reference = random_torch_model(config, seed=9)
    [accumulated], params_acc = run_steps(jax_copy_of(reference, config), [[a, b]], 1e-3)
    joined = {k: np.concatenate([a[k], b[k]]) for k in a}
    [single], params_one = run_steps(jax_copy_of(reference, config), [[joined]], 1e-3)
    np.testing.assert_allclose(accumulated["loss"], single["loss"], rtol=1e-6)
    np.testing.assert_allclose(accumulated["grad_norm"], single["grad_norm"], rtol=1e-5)
    assert accumulated["loss_tokens"] == a["loss_mask"].sum() + b["loss_mask"].sum()
    [run] = torch_runs(reference, [torch_batch(joined)])
    assert_update_near_truth(accumulated, params_acc, config, run, "accumulated")
    assert_update_near_truth(single, params_one, config, run, "one batch")


def test_a_batch_without_loss_tokens_gives_zero_loss_and_zero_gradient():
    config = tiny_config("minimind2", False)
    batch = random_batches(config, 1)[0]
    batch["loss_mask"][:] = 0
    [metrics], params = run_steps(jax_copy_of(random_torch_model(config, seed=10), config), [[batch]], 1e-3)
    assert metrics["loss"] == 0 and metrics["grad_norm"] == 0 and metrics["skipped"] == 0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


# ---- the same numbers on any mesh ----

MESHES = [(None, 1), ("data=8", 8), ("fsdp=8", 8), ("data=2,fsdp=2,tensor=2", 8)]


def torch_update(micro_batches, packed):
    """One update's batch for the torch reference: token-weighted accumulation is one big batch, and a packed
    row (segments of 10 and 6 tokens) is two rows, the second right-padded with masked positions."""
    joined = {k: np.concatenate([b[k] for b in micro_batches]) for k in micro_batches[0]}
    if packed:
        first = {k: v[:, :10] for k, v in joined.items()}
        second = {k: np.pad(v[:, 10:], ((0, 0), (0, 4))) for k, v in joined.items()}
        joined = {k: np.concatenate([first[k], second[k]]) for k in joined}
    return torch_batch(joined)


@pytest.mark.parametrize(
    "arch,use_moe,accumulation,packed",
    [
        ("minimind2", False, 2, True),
        ("minimind3", True, 1, False),
    ],
)
def test_mesh_invariance(arch, use_moe, accumulation, packed):
    config = tiny_config(arch, use_moe)
    reference = random_torch_model(config, seed=11)
    batches = random_batches(config, 3 * accumulation, batch=8, seed=3)
    if packed:  # two segments per row, positions restarting, as the packer lays them out
        for batch in batches:
            batch["segment_ids"][:, 10:] = 2
            batch["positions"][:, 10:] -= 10
    steps = [batches[i : i + accumulation] for i in range(0, len(batches), accumulation)]
    results = [
        run_steps(
            jax_copy_of(reference, config), steps, 1e-3, mesh_spec=spec, devices=jax.devices()[:count], every_step=True
        )
        for spec, count in MESHES
    ]
    runs = torch_runs(reference, [torch_update(micro_batches, packed) for micro_batches in steps])
    # Each mesh sums in its own order; each is held to the float64 truth like the single device.
    for (history, params_after), (spec, _) in zip(results, MESHES):
        for step, (metrics, params, run) in enumerate(zip(history, params_after, runs)):
            assert_update_near_truth(metrics, params, config, run, f"{spec} step {step}")


# ---- the default step against MiniMind's literal one ----


def train_step_metrics(config: ModelConfig, settings: dict, batches: list[dict], mesh_spec=None) -> list[dict]:
    """Loss and gradient norm of consecutive updates of a step built with `settings` (as the trainer builds it),
    on one device or on the mesh `mesh_spec` asks for."""
    model = MiniMind(
        config.replace(attention_impl=settings["attention_impl"], scan_layers=settings["scan_layers"]), rngs=nnx.Rngs(0)
    )
    mesh = make_mesh(mesh_spec, jax.devices() if mesh_spec else jax.devices()[:1])
    optimizer = make_optimizer(1e-3)
    graphdef, params, opt_state, param_shardings, opt_shardings = init_train_state(model, optimizer, mesh)
    step = make_train_step(
        graphdef,
        optimizer,
        mesh,
        objective=NextTokenLoss(settings["loss_chunk_size"]),
        param_shardings=param_shardings,
        opt_shardings=opt_shardings,
    )
    history = []
    for batch in batches:
        params, opt_state, metrics = step(
            params, opt_state, [jax.device_put(batch, batch_sharding(mesh))], jax.random.key_data(jax.random.key(0))
        )
        history.append({key: float(metrics[key]) for key in ("loss", "grad_norm")})
    return history


def long_row_batches(num_updates: int, batch: int, packed: bool = False) -> list[dict]:
    """Rows of 150 positions (longer than one causal block, 128) with a padded tail; packed: a second segment
    from position 90 on, positions restarting."""
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(num_updates):
        rows = {
            "inputs": rng.integers(1, 300, (batch, 150)).astype(np.int32),
            "targets": rng.integers(1, 300, (batch, 150)).astype(np.int32),
            "loss_mask": (rng.random((batch, 150)) < 0.4).astype(np.float32),
            "segment_ids": np.ones((batch, 150), np.int32),
            "positions": np.tile(np.arange(150, dtype=np.int32), (batch, 1)),
        }
        rows["loss_mask"][1, 120:] = 0
        if packed:
            rows["segment_ids"][:, 90:] = 2
            rows["positions"][:, 90:] -= 90
        batches.append(rows)
    return batches


@pytest.mark.parametrize("arch, use_moe", [("minimind2", False), ("minimind3", True)])
def test_default_step_matches_minimind_literal_step(arch, use_moe):
    """What `main.py sft` runs by default on this backend against `--fast_path 0`: same losses and gradient
    norms over three updates, on rows longer than one causal block (128) with a padded tail."""
    config = ModelConfig(arch=arch, hidden_size=64, num_hidden_layers=2, vocab_size=300, use_moe=use_moe)
    batches = long_row_batches(3, batch=2)
    default = train_step_settings(True, jax.devices()[0].platform, "float32", 150)
    assert default != LITERAL_STEP
    got, expected = train_step_metrics(config, default, batches), train_step_metrics(config, LITERAL_STEP, batches)
    for ours, literal in zip(got, expected):
        np.testing.assert_allclose(ours["loss"], literal["loss"], rtol=2e-6)
        np.testing.assert_allclose(ours["grad_norm"], literal["grad_norm"], rtol=2e-5)


@pytest.mark.parametrize("arch, use_moe", [("minimind2", False), ("minimind3", True)])
def test_tpu_fast_path_on_a_mesh_matches_minimind_literal_step(arch, use_moe):
    """The TPU default (Splash attention, here in Pallas' interpreter) on a data=2, fsdp=2 mesh, where the
    step leaves the batch's partitioning to XLA and the kernel runs on each device's rows: on packed rows of
    150 positions (padded to 256 inside the kernel), the single-device literal step's losses and gradient norms."""
    config = ModelConfig(arch=arch, hidden_size=64, num_hidden_layers=2, vocab_size=300, use_moe=use_moe)
    batches = long_row_batches(2, batch=4, packed=True)
    tpu = fast_path_settings("tpu", "float32", 150)
    assert tpu["attention_impl"] == "splash"
    got = train_step_metrics(config, tpu, batches, mesh_spec="data=2,fsdp=2")
    for ours, literal in zip(got, train_step_metrics(config, LITERAL_STEP, batches)):
        np.testing.assert_allclose(ours["loss"], literal["loss"], rtol=2e-6)
        np.testing.assert_allclose(ours["grad_norm"], literal["grad_norm"], rtol=2e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_gpu_fast_path_pads_rows_without_changing_the_step(packed, monkeypatch):
    """The GPU default in bfloat16 (cuDNN attention with rows padded at their end: 150 positions to 192), with
    XLA's attention standing in for cuDNN's kernel on this CPU, against the same step on the unpadded rows:
    the same loss and gradient norm, from the same weights and batch."""
    gpu = fast_path_settings("gpu", "bfloat16", 150)
    assert gpu["attention_impl"] == "cudnn"
    pad_rows, padded_calls = transformer.padded_causal_attention, []

    def padded_with_xla(q_BTNHd, k_BTKHd, v_BTKHd, bias_B1TT, multiple, implementation):
        padded_calls.append((q_BTNHd.shape[1], multiple, implementation))
        return pad_rows(q_BTNHd, k_BTKHd, v_BTKHd, bias_B1TT, multiple, implementation="xla")

    monkeypatch.setattr(transformer, "padded_causal_attention", padded_with_xla)
    config = ModelConfig(arch="minimind2", hidden_size=64, num_hidden_layers=2, vocab_size=300, dtype="bfloat16")
    batches = long_row_batches(1, batch=2, packed=packed)
    (padded,) = train_step_metrics(config, gpu, batches)
    assert padded_calls and all(call == (150, 64, "cudnn") for call in padded_calls)
    (unpadded,) = train_step_metrics(config, {**gpu, "attention_impl": "xla"}, batches)
    assert padded["loss"] == unpadded["loss"]  # the forward pass is bit-equal
    # the backward's matmuls over 192 rows instead of 150 sum in another order: measured 4.2e-6 at most
    np.testing.assert_allclose(padded["grad_norm"], unpadded["grad_norm"], rtol=2e-5)
