"""The public API is what the README says, on every access and with MiniMind's / HF's keyword names."""

import importlib
import pkgutil

import jax
import numpy as np
from flax import nnx

import minimind_jax


def import_every_submodule():
    """Importing a submodule binds it on the package: a public name must not be replaced by a module."""
    for module in pkgutil.walk_packages(minimind_jax.__path__, "minimind_jax."):
        importlib.import_module(module.name)


def test_each_public_name_is_the_same_object_on_every_access(tmp_path):
    first = {name: getattr(minimind_jax, name) for name in minimind_jax.__all__}
    import_every_submodule()
    for name in minimind_jax.__all__:
        again = getattr(minimind_jax, name)
        assert again is first[name], f"minimind_jax.{name} changed from {first[name]!r} to {again!r}"
        assert callable(again), f"minimind_jax.{name} is {again!r}"

    # Each one called as the README calls it, after the submodules were imported.
    assert minimind_jax.load_preset("minimind2-small").hidden_size == 512
    config = minimind_jax.ModelConfig(hidden_size=32, num_hidden_layers=1, vocab_size=64)
    model = minimind_jax.MiniMind(config, rngs=nnx.Rngs(0))
    path = minimind_jax.save_pth(model, tmp_path / "tiny.pth", dtype="float32")
    loaded = minimind_jax.load(path)
    prompt = np.array([[1, 5, 9]], np.int32)
    ids = minimind_jax.generate(loaded, prompt, max_new_tokens=3)
    again = minimind_jax.generate(loaded, prompt, max_new_tokens=3)
    np.testing.assert_array_equal(ids, again)
    assert ids.shape == (1, 6) and (ids[:, :3] == prompt).all()


def test_input_ids_and_attention_mask_by_position_and_by_name():
    config = minimind_jax.ModelConfig(hidden_size=32, num_hidden_layers=1, vocab_size=64)
    model = minimind_jax.MiniMind(config, rngs=nnx.Rngs(0))
    input_ids = jax.random.randint(jax.random.key(0), (2, 7), 3, 64)
    attention_mask = np.ones((2, 7), np.int32)
    attention_mask[1, :3] = 0  # left padding, as generate lays out a batch of prompts
    positional = model(input_ids, attention_mask)
    unmasked = model(input_ids)
    assert not np.allclose(positional[1], unmasked[1]), "the mask changed nothing"
    np.testing.assert_array_equal(model(input_ids, attention_mask=attention_mask), positional)
    np.testing.assert_array_equal(model(input_ids=input_ids, attention_mask=attention_mask), positional)
    np.testing.assert_array_equal(model.forward(input_ids=input_ids, attention_mask=attention_mask).logits, positional)
    np.testing.assert_array_equal(model.forward(input_ids, attention_mask).logits, positional)
