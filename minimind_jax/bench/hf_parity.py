"""Our logits against transformers' on the Hugging Face export, at full preset sizes (random weights, fp32).

    python -m minimind_jax.bench.hf_parity minimind2-small minimind2-moe minimind3 minimind3-moe

For each preset: the export's transformers architecture, the largest |logit difference| over a [2, T] batch
of random tokens, and whether greedy decoding gives the same tokens. Needs torch and transformers.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import numpy as np
from flax import nnx

from minimind_jax.inference.generation import generate
from minimind_jax.model.config import load_preset, num_params
from minimind_jax.model.params import model_from_params, params_of
from minimind_jax.model.transformer import MiniMind
from minimind_jax.weights.hf import save_hf


def random_norms(model: MiniMind, seed: int) -> MiniMind:
    """The model with its RMSNorm weights drawn around 1 too, so every weight of the export is exercised."""
    rng = np.random.default_rng(seed)

    def draw(path, value):
        if any("norm" in str(getattr(key, "key", "")) for key in path):
            return (1.0 + 0.3 * rng.standard_normal(value.shape)).astype(np.float32)
        return value

    return model_from_params(model.config, jax.tree_util.tree_map_with_path(draw, params_of(model)))


def measure(preset: str, seq_len: int, new_tokens: int, seed: int = 0) -> dict:
    import torch
    import transformers

    config = load_preset(preset)
    model = random_norms(MiniMind(config, rngs=nnx.Rngs(seed)), seed)
    ids_BT = np.random.default_rng(seed).integers(3, config.vocab_size, (2, seq_len))
    ours = np.asarray(model(ids_BT))
    with tempfile.TemporaryDirectory() as directory:
        save_hf(model, f"{directory}/hf", dtype="float32")
        reference = transformers.AutoModelForCausalLM.from_pretrained(f"{directory}/hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids_BT)).logits.numpy()
        greedy_theirs = reference.generate(
            torch.from_numpy(ids_BT[:1, :16]), do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens
        ).numpy()
    greedy_ours = generate(model, ids_BT[:1, :16], max_new_tokens=new_tokens, eos_token_id=None)
    return {
        "preset": preset,
        "architecture": type(reference).__name__,
        "params_M": round(num_params(config) / 1e6, 1),
        "max_abs_logit_diff": float(np.abs(ours - theirs).max()),
        "max_abs_logit": float(np.abs(ours).max()),
        "greedy_equal": bool(np.array_equal(greedy_ours, greedy_theirs)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="+")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=8)
    args = parser.parse_args(argv)
    for preset in args.presets:
        print(measure(preset, args.seq_len, args.new_tokens), flush=True)


if __name__ == "__main__":
    main()
