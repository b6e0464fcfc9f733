"""The Hugging Face format: transformers loads our export as Llama / Qwen2-MoE / Qwen3 / Qwen3-MoE and computes
our logits (fp32, 1e-4) and greedy tokens; hf -> ours -> hf is bit-equal; what transformers cannot express, and bad
directories, are refused in one line; the exported tokenizer renders MiniMind's chat template. Without transformers
only the tests that compare with it skip."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="safetensors is not installed (the hf extra)")
torch = pytest.importorskip("torch")

import minimind_jax  # noqa: E402
from minimind_jax.data.tokenizer import load_tokenizer  # noqa: E402
from minimind_jax.errors import UserError  # noqa: E402
from minimind_jax.model.params import model_from_params, params_of  # noqa: E402
from minimind_jax.weights.hf import TOKENIZER_FILES, WEIGHTS_FILE, save_hf  # noqa: E402
from minimind_jax.weights.mapping import params_from_state_dict  # noqa: E402
from tests.conftest import REPO_ROOT, require_shared  # noqa: E402
from tests.support.models import random_torch_model, tiny  # noqa: E402

ARCHITECTURES = {
    "minimind2-small": "LlamaForCausalLM",
    "minimind2-moe": "Qwen2MoeForCausalLM",
    "minimind3": "Qwen3ForCausalLM",
    "minimind3-moe": "Qwen3MoeForCausalLM",
}


def random_model(config, seed=0):
    """Our model with the torch reference's random weights, norms included."""
    state_dict = {k: v.numpy() for k, v in random_torch_model(config, seed=seed).state_dict().items()}
    return model_from_params(config, params_from_state_dict(state_dict, config))


def transformers_module():
    """transformers, or a skip saying it is absent (the tests that need no transformers still run)."""
    return pytest.importorskip("transformers", reason="transformers is not installed (the test extra has it)")


def transformers_model(directory):
    auto_model = transformers_module().AutoModelForCausalLM
    return auto_model.from_pretrained(directory, dtype=torch.float32).eval()


def directory_contents(directory) -> dict:
    """Every tensor (dtype and bytes) of the safetensors file and every other file's bytes."""
    directory = pathlib.Path(directory)
    tensors = safetensors_numpy.load_file(str(directory / WEIGHTS_FILE))
    files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != WEIGHTS_FILE}
    return {"tensors": {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in tensors.items()}, "files": files}


# Beyond the presets' layouts: v3's YaRN (transformers' yarn; 2510's is refused), and 2510 MoE with two
# shared experts (one Qwen2-MoE shared expert twice as wide) and top-1 routing (no renormalisation).
VARIANTS = {
    "minimind3-moe-yarn": ("minimind3-moe", {"inference_rope_scaling": True}),
    "minimind2-moe-2shared-top1": ("minimind2-moe", {"n_shared_experts": 2, "num_experts_per_tok": 1}),
}


@pytest.mark.parametrize("name", [*ARCHITECTURES, *VARIANTS])
def test_transformers_computes_our_logits_and_greedy_tokens(tmp_path, name):
    preset, changes = VARIANTS.get(name, (name, {}))
    config = tiny(preset).replace(**changes)
    model = random_model(config, seed=1)
    save_hf(model, tmp_path / "hf", dtype="float32")
    reference = transformers_model(tmp_path / "hf")
    assert type(reference).__name__ == ARCHITECTURES[preset]
    assert reference.config.tie_word_embeddings

    ids_BT = np.random.RandomState(0).randint(3, config.vocab_size, (2, 24))
    mask_BT = np.ones_like(ids_BT)
    mask_BT[1, :5] = 0  # row 1 left-padded, as MiniMind batches prompts (positions still count from 0)
    for mask in (None, mask_BT):
        ours = np.asarray(model(ids_BT, attention_mask=mask))
        with torch.no_grad():
            theirs = reference(
                torch.from_numpy(ids_BT), attention_mask=None if mask is None else torch.from_numpy(mask)
            ).logits.numpy()
        real = np.ones_like(ids_BT, bool) if mask is None else mask_BT.astype(bool)
        np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)

    prompt_BT = ids_BT[:1, :8]
    ours = minimind_jax.generate(model, prompt_BT, max_new_tokens=6, eos_token_id=None)
    with torch.no_grad():
        theirs = reference.generate(
            torch.from_numpy(prompt_BT), do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0
        ).numpy()
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("era", ["2510", "v3"])
@pytest.mark.parametrize("layout", ["dense", "moe"])
def test_transformers_on_the_export_of_minimind_weights_gives_minimind_logits(tmp_path, era, layout):
    """MiniMind's own weights and logits (../shared/golden), its .pth through our export into transformers."""
    weights = require_shared("golden", era, f"{layout}.pth")
    golden = np.load(weights.with_suffix(".npz"))
    save_hf(minimind_jax.load(weights), tmp_path / "hf", dtype="float32")
    reference = transformers_model(tmp_path / "hf")
    ids_BT, mask_BT = (torch.from_numpy(golden[k]).long() for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        logits = reference(ids_BT).logits.numpy()
        masked = reference(ids_BT, attention_mask=mask_BT).logits.numpy()
    np.testing.assert_allclose(logits, golden["logits"], atol=1e-4, rtol=0)
    real = golden["attention_mask"].astype(bool)
    np.testing.assert_allclose(masked[real], golden["logits_masked"][real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", [*ARCHITECTURES, *VARIANTS])
def test_hf_to_ours_to_hf_is_bit_equal(tmp_path, name):
    preset, changes = VARIANTS.get(name, (name, {}))
    config = tiny(preset).replace(**changes)
    save_hf(random_model(config, seed=2), tmp_path / "first", dtype="bfloat16")
    again = minimind_jax.load(tmp_path / "first")
    assert again.config == config
    save_hf(again, tmp_path / "second", dtype="bfloat16")
    first, second = directory_contents(tmp_path / "first"), directory_contents(tmp_path / "second")
    assert first == second
    assert set(first["files"]) == {"config.json", "generation_config.json"}
    assert "lm_head.weight" not in first["tensors"] and all(d == "<V2" for d, *_ in first["tensors"].values())
    # MiniMind's eval script's sampling for the era: eval_model.py's top-p 0.85 (2510), eval_llm.py's 0.95 (v3)
    sampling = json.loads((tmp_path / "first" / "generation_config.json").read_text())
    expected_top_p = 0.95 if config.is_v3 else 0.85
    assert (sampling["do_sample"], sampling["temperature"], sampling["top_p"]) == (True, 0.85, expected_top_p)


@pytest.mark.parametrize("preset", ["minimind2-moe", "minimind3-moe"])
def test_what_transformers_saves_of_the_export_loads_back_unchanged(tmp_path, preset):
    """A model fine-tuned in transformers comes back: its save_pretrained (config.json in its own spelling)."""
    config = tiny(preset)
    model = random_model(config, seed=5)
    save_hf(model, tmp_path / "ours", dtype="float32")
    transformers_model(tmp_path / "ours").save_pretrained(tmp_path / "theirs")
    back = minimind_jax.load(tmp_path / "theirs")
    assert back.config == config
    for ours, theirs in zip(jax.tree.leaves(params_of(model)), jax.tree.leaves(params_of(back))):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_sharded_directory_loads_as_the_single_file(tmp_path):
    save_hf(random_model(tiny("minimind3")), tmp_path / "single", dtype="float32")
    tensors = safetensors_numpy.load_file(str(tmp_path / "single" / WEIGHTS_FILE))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_bytes((tmp_path / "single" / "config.json").read_bytes())
    names = sorted(tensors)
    weight_map = {}
    for index, part in enumerate((names[::2], names[1::2])):
        shard = f"model-0000{index + 1}-of-00002.safetensors"
        safetensors_numpy.save_file({k: tensors[k] for k in part}, str(sharded / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    single, split = minimind_jax.load(tmp_path / "single"), minimind_jax.load(sharded)
    for a, b in zip(jax.tree.leaves(params_of(single)), jax.tree.leaves(params_of(split))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_round_trips_through_pth_and_checkpoint(tmp_path):
    config = tiny("minimind3-moe")
    source = tmp_path / "full_sft_64_moe.pth"
    torch.save(random_torch_model(config, seed=3).state_dict(), source)

    def convert(*args):
        done = subprocess.run(
            [sys.executable, "main.py", "convert", *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done

    convert(source, tmp_path / "hf", "--format", "hf", "--dtype", "float32")
    convert(tmp_path / "hf", tmp_path / "back.pth", "--dtype", "float32")  # hf -> .pth
    convert(tmp_path / "hf", tmp_path / "ckpt")  # hf -> our checkpoint
    convert(tmp_path / "ckpt", tmp_path / "hf_again", "--format", "hf", "--dtype", "float32")
    original, back = torch.load(source, weights_only=True), torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(original) == list(back) and all(torch.equal(original[k], back[k]) for k in original)
    assert directory_contents(tmp_path / "hf") == directory_contents(tmp_path / "hf_again")


def test_what_transformers_cannot_express_is_refused(tmp_path):
    no_shared = tiny("minimind2-moe").replace(n_shared_experts=0)
    with pytest.raises(UserError, match="2510 MoE without shared experts cannot be exported") as refused:
        save_hf(random_model(no_shared), tmp_path / "moe")
    assert "\n" not in str(refused.value)
    with pytest.raises(UserError, match="2510's YaRN .* transformers' yarn cannot express"):
        save_hf(random_model(tiny("minimind2-small").replace(inference_rope_scaling=True)), tmp_path / "yarn")
    assert not (tmp_path / "moe").exists() and not (tmp_path / "yarn").exists()


def test_a_gated_shared_expert_is_refused(tmp_path):
    save_hf(random_model(tiny("minimind2-moe")), tmp_path / "hf", dtype="float32")
    weights = tmp_path / "hf" / WEIGHTS_FILE
    tensors = safetensors_numpy.load_file(str(weights))
    gate = "model.layers.1.mlp.shared_expert_gate.weight"
    assert not tensors[gate].any()
    safetensors_numpy.save_file({**tensors, gate: tensors[gate] + 0.5}, str(weights), metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"{weights}: {gate} is not zero"):
        minimind_jax.load(tmp_path / "hf")


def test_bad_directories_are_refused_in_one_line(tmp_path):
    save_hf(random_model(tiny("minimind3")), tmp_path / "good", dtype="float32")
    tensors = safetensors_numpy.load_file(str(tmp_path / "good" / WEIGHTS_FILE))
    config = json.loads((tmp_path / "good" / "config.json").read_text())

    def variant(name, tensors=tensors, **config_changes):
        directory = tmp_path / name
        directory.mkdir()
        safetensors_numpy.save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps({**config, **config_changes}))
        return directory

    key = "model.layers.1.mlp.up_proj.weight"
    cases = {
        variant("missing", {k: v for k, v in tensors.items() if k != key}): f"missing 1 key(s): {key}",
        variant("extra", {**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}): (
            "unexpected 1 key(s): model.layers.0.self_attn.q_proj.bias"
        ),
        variant("shape", {**tensors, key: tensors[key][:-1]}): f"{key} has shape",
        variant("bias", attention_bias=True): "attention_bias is true",
        variant("untied", tie_word_embeddings=False): "tie_word_embeddings is not true",
        variant("linear_rope", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}): (
            'RoPE scaling linear {"factor": 2.0}'
        ),
        variant("llama_type", model_type="mistral"): "model_type 'mistral' is not one MiniMind can load",
    }
    for directory, message in cases.items():
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as refused:
            minimind_jax.load(directory)
        assert "\n" not in str(refused.value)
        where = WEIGHTS_FILE if "key" in message or "shape" in message else "config.json"
        assert str(directory / where) in str(refused.value)

    done = subprocess.run(
        [sys.executable, "main.py", "convert", str(tmp_path / "missing"), str(tmp_path / "x.pth")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing' / WEIGHTS_FILE}: missing 1 key(s): {key} (for a minimind3 model of 2 layers)"
    ]


CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
    ],
    [{"role": "user", "content": "讲个笑话"}, {"role": "assistant", "content": "好的。"}],
]


@pytest.mark.parametrize(("era", "preset"), [("2510", "minimind2-small"), ("v3", "minimind3")])
def test_exported_tokenizer_renders_minimind_chat_template(tmp_path, era, preset):
    tokenizer_dir = require_shared("minimind", era)
    save_hf(random_model(tiny(preset)), tmp_path / "hf", tokenizer_path=tokenizer_dir)
    assert all((tmp_path / "hf" / name).is_file() for name in TOKENIZER_FILES)
    theirs = transformers_module().AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer(tokenizer_dir)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    weather = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    calls = [*CONVERSATIONS, CONVERSATIONS[0]]
    extras = [{}] * len(CONVERSATIONS) + [{"tools": [weather], "open_thinking": True}]  # open_thinking: v3's
    for messages, extra in zip(calls, extras):
        for add_generation_prompt in (False, True):
            settings = {"add_generation_prompt": add_generation_prompt, **extra}
            text = theirs.apply_chat_template(messages, tokenize=False, **settings)
            assert text == ours.apply_chat_template(messages, **settings)
            assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)


def test_other_eras_tokenizer_is_refused(tmp_path):
    tokenizer_dir = require_shared("minimind", "2510")
    with pytest.raises(UserError, match="minimind2 tokenizer but the model is minimind3"):
        save_hf(random_model(tiny("minimind3")), tmp_path / "hf", tokenizer_path=tokenizer_dir)


def test_a_sentencepiece_tokenizer_is_refused(tmp_path, small_tokenizer):
    with pytest.raises(UserError, match="takes a tokenizer directory .* not a SentencePiece model"):
        save_hf(random_model(tiny("minimind3")), tmp_path / "hf", tokenizer_path=small_tokenizer)
    assert not (tmp_path / "hf").exists()
