"""The fast path (loss-position CE, attention implementations) against the exact path, and the bench's
plumbing on a tiny model: same weights and batches on both sides, figures present, errors in one line."""
import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import main
from minimind_jax import bench
from minimind_jax.config import ModelConfig
from minimind_jax.errors import UserError
from minimind_jax.loss import chunked_masked_ce_sums, masked_ce_sums
from minimind_jax.model import MiniMind
from tests.conftest import SHARED

TINY_PRESET = "arch: minimind2\nhidden_size: 64\nnum_hidden_layers: 2\n"


def ce_problem(batch=3, seq=37, dim=16, vocab=50, loss_fraction=0.3, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((batch, seq, dim)), jnp.float32),
            jnp.asarray(rng.standard_normal((vocab, dim)), jnp.float32),
            jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32),
            jnp.asarray(rng.random((batch, seq)) < loss_fraction, jnp.float32))


def full_ce_sums(hidden, embed, targets, mask):
    return masked_ce_sums(jnp.einsum("btd,vd->btv", hidden, embed), targets, mask)


@pytest.mark.parametrize("loss_fraction", [0.0, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("chunk_size", [8, 16, 111, 500])
def test_chunked_ce_matches_full_logits(loss_fraction, chunk_size):
    hidden, embed, targets, mask = ce_problem(loss_fraction=loss_fraction)
    chunked = jax.jit(lambda h, e: chunked_masked_ce_sums(h, e, targets, mask, chunk_size))
    expected, got = full_ce_sums(hidden, embed, targets, mask), chunked(hidden, embed)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
    assert float(got[1]) == float(expected[1]) == float(mask.sum())
    expected_grads = jax.grad(lambda h, e: full_ce_sums(h, e, targets, mask)[0], argnums=(0, 1))(hidden, embed)
    got_grads = jax.jit(jax.grad(lambda h, e: chunked(h, e)[0], argnums=(0, 1)))(hidden, embed)
    for g, e in zip(got_grads, expected_grads):
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_chunked_ce_uses_mask_weights_and_bf16_hidden():
    hidden, embed, targets, mask = ce_problem()
    weights = mask * jnp.linspace(0.5, 2.0, mask.size).reshape(mask.shape)
    expected = full_ce_sums(hidden.astype(jnp.bfloat16).astype(jnp.float32), embed.astype(jnp.bfloat16).astype(
        jnp.float32), targets, weights)
    got = chunked_masked_ce_sums(hidden.astype(jnp.bfloat16), embed, targets, weights, 16)
    np.testing.assert_allclose(got[0], expected[0], rtol=2e-3)
    np.testing.assert_allclose(got[1], weights.sum(), rtol=1e-6)


def test_chunked_ce_inside_shard_map_matches_full_logits():
    """As the train step uses it: rows split over devices, the embedding replicated, sums psum'd."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    hidden, embed, targets, mask = ce_problem(batch=jax.device_count())

    def loss_and_grads(ce_sums):
        def local(h, e, t, m):
            return jax.value_and_grad(lambda h, e: jax.lax.psum(ce_sums(h, e, t, m), "data"), argnums=(0, 1))(h, e)
        return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P(), P("data"), P("data")),
                                     out_specs=(P(), (P("data"), P()))))

    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    args = (put(hidden, P("data")), put(embed, P()), put(targets, P("data")), put(mask, P("data")))
    expected = loss_and_grads(lambda h, e, t, m: full_ce_sums(h, e, t, m)[0])(*args)
    got = loss_and_grads(lambda h, e, t, m: chunked_masked_ce_sums(h, e, t, m, 8)[0])(*args)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
    for g, e in zip(got[1], expected[1]):
        np.testing.assert_allclose(g, e, atol=1e-5)


def attention_loss_and_grads(arch: str, attention_impl: str, **config_fields):
    """Logits and parameter gradients of a 2-layer model on packed rows (segments, a padded tail) that also
    carry a padding mask, so every part of the attention bias is exercised."""
    config = ModelConfig(arch=arch, hidden_size=64, num_hidden_layers=2, vocab_size=300, attention_impl=attention_impl,
                         **config_fields)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 300, (2, 29))
    segments = np.ones((2, 29), np.int32)
    segments[1, 10:], segments[1, 25:] = 2, 0
    positions = np.stack([np.arange(29), np.r_[np.arange(10), np.arange(15), np.arange(4)]]).astype(np.int32)
    padding = np.ones((2, 29), np.int32)
    padding[0, :3] = 0
    graphdef, params = nnx.split(MiniMind(config, rngs=nnx.Rngs(0)), nnx.Param)

    def loss(params):
        logits = nnx.merge(graphdef, params).forward(ids, padding, segment_ids_BT=segments, positions_BT=positions).logits
        return (logits ** 2).mean(), logits
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


@pytest.fixture(scope="module")
def exact_attention():
    return {arch: attention_loss_and_grads(arch, "xla") for arch in ("minimind2", "minimind3")}


@pytest.mark.parametrize("impl, fields", [("causal_blocks", {}), ("causal_blocks", {"remat": "dots"}),
                                           ("dot_product_attention", {}), ("xla", {"scan_layers": False})])
@pytest.mark.parametrize("arch", ["minimind2", "minimind3"])
def test_attention_impls_and_unrolled_layers_match_the_exact_path(impl, fields, arch, exact_attention, monkeypatch):
    import minimind_jax.model as model_module

    monkeypatch.setattr(model_module, "CAUSAL_BLOCK", 8)  # several blocks, the last one short
    expected_logits, expected_grads = exact_attention[arch]
    logits, grads = attention_loss_and_grads(arch, impl, **fields)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_cudnn_attention_needs_half_precision():
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        ModelConfig(attention_impl="cudnn")
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        ModelConfig(attention_impl="flash")
    assert ModelConfig(attention_impl="cudnn", dtype="bfloat16").attention_impl == "cudnn"


def test_ablation_variants_cover_each_switch_once():
    args = argparse.Namespace(packing=False, loss_chunk_size=None, attention_impl="xla", remat="none",
                              unroll_layers=False, ablation=True, dtype=None)
    variants = bench.variants_for(args, "cpu")
    settings = [v.__class__(**{**vars(v), "name": ""}) for v in variants]
    assert len(set(settings)) == len(settings), "a variant is measured twice"
    assert variants[0] == bench.Variant("", False, None, "xla", "none")
    assert {v.attention_impl for v in variants} == {"xla", "causal_blocks"}
    for packing in (False, True):  # every switch but packing on MiniMind's padded rows, then with packing too
        assert any(v.packing == packing and v.loss_chunk_size and v.attention_impl != "xla" and v.unroll_layers
                   for v in variants)
    assert bench.variants_for(argparse.Namespace(**{**vars(args), "ablation": False}), "cpu") == variants[:1]
    gpu = bench.variants_for(argparse.Namespace(**{**vars(args), "dtype": "bfloat16"}), "gpu")
    assert "cudnn" in {v.attention_impl for v in gpu}
    assert not gpu[-1].unroll_layers  # the combined row keeps lax.scan on accelerators


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_data")


@pytest.fixture
def tiny_preset(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_PRESET)
    return path


def run_bench(capsys, *flags):
    assert main.main(["bench", *flags]) == 0
    return capsys.readouterr().out


def test_bench_runs_both_sides_on_the_same_batches(capsys, data_dir, tiny_preset, monkeypatch):
    """Tiny model, 8 simulated devices: the JSON has every figure, no step recompiles, and our padded step
    and MiniMind's torch step, from the same weights on the same batches, log the same losses."""
    if not (SHARED / "minimind" / "2510").exists():  # no MiniMind tokenizer: the bench trains one
        monkeypatch.setitem(bench.SHARED_TOKENIZERS, "minimind2", data_dir / "absent")
    out = run_bench(capsys, "--preset", str(tiny_preset), "--batch_size", "8", "--max_seq_len", "128", "--steps", "2",
                    "--warmup", "1", "--num_records", "80", "--data_dir", str(data_dir), "--loss_chunk_size", "64",
                    "--json")
    result = json.loads(out)
    for key in ("tokens_per_s", "loss_tokens_per_s", "torch_tokens_per_s", "compile_s", "peak_memory_bytes", "mfu",
                "speedup", "loss_tokens_speedup"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert 0 <= result["data_wait_fraction"] < 1
    assert result["recompilations"] == 0
    ours, torch_row = result["rows"]
    assert ours["settings"]["loss_chunk_size"] == 64 and torch_row["name"].startswith("pytorch")
    assert result["setup"]["devices"] == jax.device_count() and result["setup"]["seq_len"] == 127
    assert 0 < result["setup"]["padded_loss_fraction"] < result["setup"]["packed_loss_fraction"] < 1
    np.testing.assert_allclose(ours["losses"], torch_row["losses"], rtol=1e-4)
    assert ours["memory_bytes"] > 0
    assert bench.format_table(result).count("\n") > 5


def test_bench_table_without_torch_reports_variants_that_cannot_run(capsys, data_dir, tiny_preset, monkeypatch):
    asked = bench.variants_for
    unsupported = bench.Variant("cudnn attention in float32", attention_impl="cudnn")
    monkeypatch.setattr(bench, "variants_for", lambda args, platform: asked(args, platform) + [unsupported])
    out = run_bench(capsys, "--preset", str(tiny_preset), "--batch_size", "8", "--max_seq_len", "64", "--steps", "1",
                    "--warmup", "0", "--num_records", "80", "--data_dir", str(data_dir), "--no_torch", "--packing",
                    "--attention_impl", "causal_blocks")
    assert "ours: packed, full logits, causal_blocks attention" in out
    assert "pytorch" not in out and "tokens/s" in out
    assert "cudnn attention in float32: could not run here (ValueError: attention_impl=cudnn needs dtype" in out


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "3"], "--batch_size 3 is not divisible"),
    (["--num_records", "0"], "--num_records must be at least 1"),
    (["--preset", "no-such-preset"], "--preset no-such-preset"),
    (["--loss_chunk_size", "0"], "--loss_chunk_size must be at least 1"),
])
def test_bench_bad_flags_are_one_line_errors(flags, message, capsys, data_dir):
    assert main.main(["bench", "--data_dir", str(data_dir), "--steps", "1", *flags]) == 1
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
