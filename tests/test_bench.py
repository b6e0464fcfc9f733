"""The fast path (loss-position CE, attention implementations) against the exact path, the default step
against MiniMind's literal one, and the bench's plumbing on a tiny model: same weights and batches on every
side (PyTorch in processes of its own), figures present, errors in one line."""
import argparse
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import main
from minimind_jax.bench import train_step as bench
from minimind_jax.model.config import LITERAL_STEP, ModelConfig, fast_path_settings, train_step_settings
from minimind_jax.errors import UserError
from minimind_jax.training.loss import chunked_masked_ce_sums, masked_ce_sums
from minimind_jax.model.transformer import MiniMind
from minimind_jax.training.sharding import batch_sharding, make_mesh
from minimind_jax.training.step import init_train_state, make_train_step
from minimind_jax.training.optimizer import make_optimizer
from minimind_jax.training.config import TrainConfig
from minimind_jax.training.loop import step_settings
from tests.conftest import REPO_ROOT

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
def test_attention_impls_and_unrolled_layers_match_the_exact_path(impl, fields, arch, exact_attention):
    expected_logits, expected_grads = exact_attention[arch]
    # 8 queries per block: several blocks on 29 positions, the last one short
    logits, grads = attention_loss_and_grads(arch, impl, attention_block_size=8, **fields)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_cudnn_attention_needs_half_precision():
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        ModelConfig(attention_impl="cudnn")
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        ModelConfig(attention_impl="flash")
    assert ModelConfig(attention_impl="cudnn", dtype="bfloat16").attention_impl == "cudnn"


def test_fast_path_settings_per_backend_and_what_the_trainer_takes():
    assert fast_path_settings("cpu", "float32", 511) == {"attention_impl": "causal_blocks", "loss_chunk_size": 512,
                                                         "scan_layers": False}
    assert fast_path_settings("gpu", "bfloat16", 512)["attention_impl"] == "cudnn"
    # cuDNN with a bias needs an even row length (MiniMind 2510's rows are max_seq_len - 1), and half precision
    assert fast_path_settings("gpu", "bfloat16", 511)["attention_impl"] == "causal_blocks"
    assert fast_path_settings("gpu", "float32", 512)["attention_impl"] == "causal_blocks"
    assert fast_path_settings("tpu", "bfloat16", 512)["attention_impl"] == "causal_blocks"
    assert train_step_settings(False, "gpu", "bfloat16", 512) == LITERAL_STEP
    assert train_step_settings(True, "cpu", "float32", 511, scan_layers=True, loss_chunk_size=0) == {
        "attention_impl": "causal_blocks", "loss_chunk_size": None, "scan_layers": True}  # given values win
    assert step_settings(TrainConfig(), "float32") == fast_path_settings(jax.devices()[0].platform, "float32", 511)
    assert step_settings(TrainConfig(fast_path=False, attention_impl="causal_blocks"), "float32") == {
        **LITERAL_STEP, "attention_impl": "causal_blocks"}
    with pytest.raises(UserError, match="--fast_path must be one of 0, 1"):
        TrainConfig(fast_path=2)
    with pytest.raises(UserError, match="--loss_chunk_size must be an integer >= 0"):
        TrainConfig(loss_chunk_size=-1)


def train_step_metrics(config: ModelConfig, settings: dict, batches: list[dict]) -> list[dict]:
    """Loss and gradient norm of consecutive updates of a step built with `settings` (as the trainer builds it)."""
    model = MiniMind(config.replace(attention_impl=settings["attention_impl"], scan_layers=settings["scan_layers"]),
                     rngs=nnx.Rngs(0))
    mesh = make_mesh(None, jax.devices()[:1])
    optimizer = make_optimizer(1e-3)
    graphdef, params, opt_state, param_shardings, opt_shardings = init_train_state(model, optimizer, mesh)
    step = make_train_step(graphdef, optimizer, mesh, loss_chunk_size=settings["loss_chunk_size"],
                           param_shardings=param_shardings, opt_shardings=opt_shardings)
    history = []
    for batch in batches:
        params, opt_state, metrics = step(params, opt_state, [jax.device_put(batch, batch_sharding(mesh))],
                                          jax.random.key_data(jax.random.key(0)))
        history.append({key: float(metrics[key]) for key in ("loss", "grad_norm")})
    return history


@pytest.mark.parametrize("arch, use_moe", [("minimind2", False), ("minimind3", True)])
def test_default_step_matches_minimind_literal_step(arch, use_moe):
    """What `main.py sft` runs by default on this backend against `--fast_path 0`: same losses and gradient
    norms over three updates, on rows longer than one causal block (128) with a padded tail."""
    config = ModelConfig(arch=arch, hidden_size=64, num_hidden_layers=2, vocab_size=300, use_moe=use_moe)
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(3):
        batch = {"inputs": rng.integers(1, 300, (2, 150)).astype(np.int32),
                 "targets": rng.integers(1, 300, (2, 150)).astype(np.int32),
                 "loss_mask": (rng.random((2, 150)) < 0.4).astype(np.float32),
                 "segment_ids": np.ones((2, 150), np.int32),
                 "positions": np.tile(np.arange(150, dtype=np.int32), (2, 1))}
        batch["loss_mask"][1, 120:] = 0
        batches.append(batch)
    default = train_step_settings(True, jax.devices()[0].platform, "float32", 150)
    assert default != LITERAL_STEP
    got, expected = train_step_metrics(config, default, batches), train_step_metrics(config, LITERAL_STEP, batches)
    for ours, literal in zip(got, expected):
        np.testing.assert_allclose(ours["loss"], literal["loss"], rtol=2e-6)
        np.testing.assert_allclose(ours["grad_norm"], literal["grad_norm"], rtol=2e-5)


def bench_args(**changes):
    fields = dict(packing=False, loss_chunk_size=None, attention_impl=None, remat="none", scan_layers=None,
                  fast_path=1, ablation=False)
    return argparse.Namespace(**{**fields, **changes})


def test_bench_rows_default_literal_and_ablation():
    variants = bench.variants_for(bench_args(), "cpu", "float32", 511)
    assert [v.name for v in variants] == ["default (main.py sft)", "--fast_path 0 (MiniMind's literal)"]
    assert bench.settings_of(variants[0]) == (False, 512, "causal_blocks", "none", False)
    assert bench.settings_of(variants[1]) == (False, None, "xla", "none", True)
    assert bench.variants_for(bench_args(fast_path=0), "cpu", "float32", 511) == variants[1:]
    asked = bench.variants_for(bench_args(packing=True, loss_chunk_size=0), "cpu", "float32", 511)[0]
    assert (asked.name, bench.settings_of(asked)) == ("", (True, None, "causal_blocks", "none", False))

    ablation = bench.variants_for(bench_args(ablation=True), "cpu", "float32", 511)
    settings = [bench.settings_of(v) for v in ablation]
    assert len(set(settings)) == len(settings), "a variant is measured twice"
    assert ablation[:2] == variants and {v.attention_impl for v in ablation} == {"xla", "causal_blocks"}
    assert any(v.packing and v.loss_chunk_size and v.attention_impl != "xla" and not v.scan_layers for v in ablation)
    gpu = bench.variants_for(bench_args(ablation=True), "gpu", "bfloat16", 512)
    assert gpu[0].attention_impl == "cudnn" and gpu[0].scan_layers  # accelerators keep lax.scan


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


def test_bench_runs_every_side_on_the_same_batches(capsys, data_dir, tiny_preset):
    """Tiny model, 8 simulated devices: the JSON has every figure, no step recompiles, and our default and
    literal steps and the torch reference's step (in its own process), from the same weights on the same
    batches, log the same losses."""
    out = run_bench(capsys, "--preset", str(tiny_preset), "--batch_size", "8", "--max_seq_len", "128", "--steps", "2",
                    "--warmup", "1", "--num_records", "80", "--data_dir", str(data_dir), "--loss_chunk_size", "64",
                    "--json")
    result = json.loads(out)
    for key in ("tokens_per_s", "loss_tokens_per_s", "torch_tokens_per_s", "compile_s", "peak_memory_bytes", "mfu",
                "speedup", "loss_tokens_speedup"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert 0 <= result["data_wait_fraction"] < 1
    assert result["recompilations"] == 0
    ours, literal, torch_row = result["rows"]
    assert ours["settings"] == {"name": "", "packing": False, "loss_chunk_size": 64, "attention_impl": "causal_blocks",
                                "remat": "none", "scan_layers": False}
    assert literal["name"].startswith("ours, --fast_path 0") and literal["settings"]["attention_impl"] == "xla"
    assert result["baseline"] == torch_row["name"] == "PyTorch: project torch reference, own process"
    assert "speedup" in ours and "speedup" in literal and "speedup" not in torch_row
    (process,) = result["setup"]["torch_processes"]
    assert process["pid"] not in (os.getpid(), result["setup"]["pid"]) and process["python"] == sys.executable
    assert result["setup"]["devices"] == jax.device_count() and result["setup"]["seq_len"] == 127
    assert 0 < result["setup"]["padded_loss_fraction"] < result["setup"]["packed_loss_fraction"] < 1
    np.testing.assert_allclose(ours["losses"], torch_row["losses"], rtol=1e-4)
    np.testing.assert_allclose(literal["losses"], torch_row["losses"], rtol=1e-4)
    assert ours["memory_bytes"] > 0
    assert bench.format_table(result).count("\n") > 5


def minimind_checkout(era: str):
    """A MiniMind checkout of the era next to the repository and an interpreter with transformers, or skip."""
    directory = REPO_ROOT.parent / ("minimind-2510" if era == "2510" else "minimind")
    if not (directory / "model" / "model_minimind.py").is_file():
        pytest.skip(f"no MiniMind {era} checkout at {directory}")
    python = os.environ.get("MINIMIND_TORCH_PYTHON", sys.executable)
    if subprocess.run([python, "-c", "import transformers"], capture_output=True).returncode:
        pytest.skip(f"{python} has no transformers (set MINIMIND_TORCH_PYTHON to an interpreter that has)")
    if bench.minimind_checkout_arch(str(directory)) != {"2510": "minimind2", "v3": "minimind3"}[era]:
        pytest.skip(f"{directory} is not MiniMind's {era} code")
    return directory, python


@pytest.mark.parametrize("era, arch", [("2510", "minimind2"), ("v3", "minimind3")])
def test_bench_times_minimind_own_model_from_the_same_weights(era, arch, capsys, data_dir, tmp_path):
    """--minimind_dir: MiniMind's own MiniMindForCausalLM (MoE, so the expert and router mapping is used too)
    with its train_full_sft loss, in its own process, from our initial weights: the same losses as ours."""
    directory, python = minimind_checkout(era)
    preset = tmp_path / "tiny_moe.yaml"
    preset.write_text(f"arch: {arch}\nhidden_size: 64\nnum_hidden_layers: 2\nuse_moe: true\n")
    result = json.loads(run_bench(capsys, "--preset", str(preset), "--batch_size", "8", "--max_seq_len", "64",
                                  "--steps", "1", "--warmup", "1", "--num_records", "80", "--data_dir", str(data_dir),
                                  "--minimind_dir", str(directory), "--torch_python", python, "--json"))
    names = [row["name"] for row in result["rows"]]
    assert names[2:] == ["PyTorch: project torch reference, own process",
                         "PyTorch: MiniMind's model_minimind.py, own process"]
    assert result["baseline"] == names[3]
    assert result["setup"]["torch_processes"][1]["model_class"].endswith("MiniMindForCausalLM")
    for row in result["rows"][:3]:
        np.testing.assert_allclose(row["losses"], result["rows"][3]["losses"], rtol=1e-4)


def test_bench_table_without_torch_reports_variants_that_cannot_run(capsys, data_dir, tiny_preset, monkeypatch):
    asked = bench.variants_for
    unsupported = bench.Variant("cudnn attention in float32", attention_impl="cudnn")
    monkeypatch.setattr(bench, "variants_for", lambda *args: asked(*args) + [unsupported])
    out = run_bench(capsys, "--preset", str(tiny_preset), "--batch_size", "8", "--max_seq_len", "64", "--steps", "1",
                    "--warmup", "0", "--num_records", "80", "--data_dir", str(data_dir), "--no_torch", "--packing",
                    "--fast_path", "0", "--attention_impl", "causal_blocks")
    assert "ours (packed, full logits, causal_blocks, scanned)" in out
    assert "ours, --fast_path 0 (MiniMind's literal) (padded, full logits, xla, scanned)" in out
    assert "PyTorch" not in out and "tokens/s" in out
    assert "cudnn attention in float32 (padded, full logits, cudnn, scanned): could not run here (ValueError: " \
           "attention_impl=cudnn needs dtype" in out


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "3"], "--batch_size 3 is not divisible"),
    (["--num_records", "0"], "--num_records must be at least 1"),
    (["--preset", "no-such-preset"], "--preset no-such-preset"),
    (["--loss_chunk_size", "-1"], "--loss_chunk_size must be at least 0"),
    (["--minimind_dir", "/nonexistent"], "--minimind_dir /nonexistent: no model/model_minimind.py there"),
    (["--torch_python", "/nonexistent/python"], "--torch_python /nonexistent/python: not an executable"),
    (["--minimind_dir", str(REPO_ROOT), "--no_torch"], "--minimind_dir times a PyTorch side"),
])
def test_bench_bad_flags_are_one_line_errors(flags, message, capsys, data_dir):
    assert main.main(["bench", "--data_dir", str(data_dir), "--steps", "1", *flags]) == 1
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error


def fake_minimind_checkout(directory, source: str):
    (directory / "model").mkdir()
    (directory / "model" / "model_minimind.py").write_text(source)
    return directory


def test_bench_refuses_a_minimind_checkout_of_the_other_era(capsys, data_dir, tmp_path):
    v3_code = fake_minimind_checkout(tmp_path, "self.num_experts = kwargs.get('num_experts', 4)\n")
    assert main.main(["bench", "--data_dir", str(data_dir), "--minimind_dir", str(v3_code)]) == 1
    error = capsys.readouterr().err.strip()
    assert "holds MiniMind's minimind3 model code but --preset minimind2-small is minimind2" in error
    assert "\n" not in error


def test_bench_says_why_a_pytorch_process_failed(capsys, data_dir, tiny_preset, tmp_path, monkeypatch):
    """A checkout whose model code cannot be imported (here: it raises): one line with the process's last
    line of stderr, before any of our steps is compiled."""
    broken = fake_minimind_checkout(tmp_path, "n_routed_experts = 4\nraise ImportError('no transformers here')\n")
    monkeypatch.setattr(bench, "JaxSide", None)  # never reached
    assert main.main(["bench", "--preset", str(tiny_preset), "--batch_size", "8", "--max_seq_len", "64",
                      "--num_records", "80", "--data_dir", str(data_dir), "--minimind_dir", str(broken)]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: PyTorch: MiniMind's model_minimind.py, own process")
    assert "exited with status 1: ImportError: no transformers here" in error
