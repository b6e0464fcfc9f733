"""Tensor parallelism on every preset's head layout, and which meshes run on which devices."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from minimind_jax.cli.main import main
from minimind_jax.errors import UserError
from minimind_jax.model.config import PRESETS, load_preset
from minimind_jax.model.transformer import MiniMind
from minimind_jax.training.objectives import NextTokenLoss
from minimind_jax.training.optimizer import make_optimizer
from minimind_jax.training.sharding import batch_sharding, make_mesh, tree_shardings
from minimind_jax.training.step import init_train_state, make_train_step

RNG = jax.random.key_data(jax.random.key(0))


def tiny_preset(name, **changes):
    """The preset's head and expert layout (8 query heads, 2 or 4 kv heads, its experts) at hidden size 64."""
    return load_preset(name, hidden_size=64, num_hidden_layers=1, vocab_size=512, **changes)


def two_batches(config, rows=8, length=16):
    """A padded-style batch, then a packed one (two segments per row, positions restarting)."""
    rng = np.random.default_rng(0)
    batches = []
    for packed in (False, True):
        ids = rng.integers(3, config.vocab_size, (rows, length + 1)).astype(np.int32)
        segment_ids = np.ones((rows, length), np.int32)
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
        if packed:
            segment_ids[:, 10:] = 2
            positions[:, 10:] -= 10
        batches.append(
            {
                "inputs": ids[:, :-1],
                "targets": ids[:, 1:],
                "segment_ids": segment_ids,
                "positions": positions,
                "loss_mask": (rng.random((rows, length)) < 0.6).astype(np.float32),
            }
        )
    return batches


def train(config, batches, mesh, loss_chunk_size=None):
    """One update per batch from the same initial weights; (metrics of each update, final params)."""
    optimizer = make_optimizer(1e-3, grad_clip=1.0)
    graphdef, params, opt_state, param_shardings, opt_shardings = init_train_state(
        MiniMind(config, rngs=nnx.Rngs(3)), optimizer, mesh
    )
    step = make_train_step(
        graphdef,
        optimizer,
        mesh,
        objective=NextTokenLoss(loss_chunk_size),
        param_shardings=param_shardings,
        opt_shardings=opt_shardings,
    )
    history = []
    for batch in batches:
        params, opt_state, metrics = step(params, opt_state, [jax.device_put(batch, batch_sharding(mesh))], RNG)
        history.append(jax.device_get(metrics))
    return history, jax.device_get(params)


# Two presets take the CLI's fast path (query blocks, chunked loss, unrolled layers), the others the einsum path.
FAST_PATH = ("minimind2", "minimind3-moe")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_layout_on_tensor_4_and_8_matches_one_device(preset):
    """tensor=4 on 8 devices (its first 4) and tensor=8: query heads split 2 or 1 per device, kv heads split
    by whole heads where the axis divides them (v3's 4 on tensor=4) and replicated otherwise."""
    fast_path = preset in FAST_PATH
    changes = dict(attention_impl="causal_blocks", scan_layers=False) if fast_path else {}
    config = tiny_preset(preset, **changes)
    chunk = 8 if fast_path else None
    batches = two_batches(config)
    base_history, base_params = train(config, batches, make_mesh("data=1"), chunk)
    # 2510's MoE rounds every expert output to fp16 while training, as MiniMind's buffer does. The sharded
    # down projection sums in another order, which moves some of those roundings by one fp16 ulp (gradients
    # then differ by ~5e-5 relative; 1e-6 without the buffer), so its parameters are held to fp16's unit
    # roundoff rather than to fp32's.
    param_rtol = 2.0**-11 if config.use_moe and not config.is_v3 else 1e-5
    for spec in ("tensor=4", "tensor=8"):
        history, params = train(config, batches, make_mesh(spec), chunk)
        for ours, base in zip(history, base_history):
            for key in ("loss", "logits_loss", "aux_loss", "grad_norm"):
                np.testing.assert_allclose(ours[key], base[key], rtol=1e-5, atol=1e-9, err_msg=f"{spec} {key}")
        base_leaves = dict(jax.tree_util.tree_leaves_with_path(base_params))
        for path, value in jax.tree_util.tree_leaves_with_path(params):
            expected = base_leaves[path]
            assert np.linalg.norm(value - expected) < param_rtol * np.linalg.norm(expected), (
                spec,
                jax.tree_util.keystr(path),
            )


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("tensor", [2, 4, 8])
def test_attention_projections_split_by_whole_heads(preset, tensor):
    config = load_preset(preset)
    params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: MiniMind(config, rngs=nnx.Rngs(0))), nnx.Param))
    attention = tree_shardings(params, make_mesh(f"tensor={tensor}"), config)["layers"]["self_attn"]
    split = lambda heads: "tensor" if heads % tensor == 0 else None
    assert attention["q_proj"].spec == P(None, None, split(config.num_attention_heads))
    assert attention["o_proj"].spec == P(None, split(config.num_attention_heads), None)
    for name in ("k_proj", "v_proj"):
        assert attention[name].spec == P(None, None, split(config.num_key_value_heads)), name


def test_a_mesh_smaller_than_the_device_count_uses_the_first_devices():
    assert make_mesh("data=1").devices.ravel().tolist() == jax.devices()[:1]
    mesh = make_mesh("data=2,tensor=2")
    assert mesh.devices.ravel().tolist() == jax.devices()[:4]
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
    assert make_mesh(None).devices.size == len(jax.devices())


@pytest.mark.parametrize(
    "spec,words",
    [
        ("tensor=16", "needs 16 devices, but only 8 are present"),
        ("data=4,fsdp=4", "needs 16 devices, but only 8 are present"),
        ("tensor=0", "expected comma-separated axis=size"),
        ("model=2", "expected comma-separated axis=size"),
        ("data=2,data=4", "at most once"),
    ],
)
def test_a_mesh_that_cannot_run_is_refused_in_one_line(spec, words):
    with pytest.raises(UserError) as error:
        make_mesh(spec)
    message = str(error.value)
    assert words in message and spec in message and "\n" not in message


def test_several_processes_must_use_every_device(monkeypatch):
    """Each process feeds its own devices' rows, so a mesh on a subset of the devices is refused there."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(UserError, match="uses 4 of the 8 devices, but with 2 processes"):
        make_mesh("data=4")
    assert make_mesh("data=2,tensor=4").devices.size == 8


def test_the_cli_refuses_an_impossible_mesh_before_any_compute(tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text(
        '{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    )
    assert (
        main(
            [
                "sft",
                "--mesh",
                "fsdp=2,tensor=8",
                "--data_path",
                str(data),
                "--save_dir",
                str(tmp_path / "out"),
                "--checkpoint_dir",
                str(tmp_path / "checkpoints"),
                "--from_weight",
                "none",
                "--no_progress",
            ]
        )
        == 1
    )
    out, err = capsys.readouterr()
    assert out == "" and err == "error: --mesh 'fsdp=2,tensor=8' needs 16 devices, but only 8 are present\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "checkpoints").exists()
