"""MiniMind's own `generate`, timed in a process of its own: `python -m minimind_jax.bench.minimind_decode SPEC.json`.

The counterpart of generation.benchmark_decode for the bench's --decode: MiniMind's MiniMindForCausalLM from
{spec["minimind_dir"]}/model/model_minimind.py with random weights, in spec["dtype"] on CUDA when there is a GPU,
its `generate` (v3's own loop; 2510's is transformers' GenerationMixin) greedy with eos off, so that every row
gets spec["new_tokens"] tokens after the same random prompts as ours. Prints one JSON line ({"rows": [...],
"info": {...}}) with benchmark_decode's figures per batch size; everything else goes to stderr.
Needs numpy, torch and transformers, never JAX.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import numpy as np
import torch

from minimind_jax.bench.torch_side import checkout_module, protocol_stream

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Greedy tokens that a full forward pass over the output also ranks first: rounding flips a few near-ties in
# bf16 (about 0.97 on random weights), a generate that loses its KV cache agrees on about 0.06.
MIN_GREEDY_AGREEMENT = 0.5


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_kwargs(model_class, new_tokens: int) -> dict:
    """Greedy, eos off. v3's own generate filters top-k / top-p even when greedy: both off, as our greedy path."""
    kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "eos_token_id": None}
    if "generate" in vars(model_class):  # v3's loop
        return {**kwargs, "top_k": 0, "top_p": 1.0, "temperature": 1.0}
    return {**kwargs, "pad_token_id": 0}  # transformers' generate, with the pad id MiniMind's eval passes


def time_generate(model, ids_BP: torch.Tensor, new_tokens: int) -> dict:
    """benchmark_decode's figures for one batch: a warm-up generate, then one timed, and the prompt pass alone."""
    device, (batch, prompt_len) = ids_BP.device, ids_BP.shape
    mask_BP = torch.ones_like(ids_BP)
    kwargs = generate_kwargs(type(model), new_tokens)
    model.generate(ids_BP, attention_mask=mask_BP, **kwargs)  # warm-up: kernels chosen, allocator grown
    synchronize(device)
    start = time.perf_counter()
    out = model.generate(ids_BP, attention_mask=mask_BP, **kwargs)
    synchronize(device)
    generate_s = time.perf_counter() - start
    if out.shape[1] != prompt_len + new_tokens:
        raise RuntimeError(f"generated {out.shape[1] - prompt_len} tokens, expected {new_tokens}")
    agreement = greedy_agreement(model, out, prompt_len)
    if agreement < MIN_GREEDY_AGREEMENT:  # e.g. 2510's model under transformers 5, which drops its KV cache
        raise RuntimeError(
            f"MiniMind's generate does not continue greedily (full-pass argmax agrees on {agreement:.0%} of its "
            f"tokens) with transformers {sys.modules['transformers'].__version__}: its timing would be meaningless"
        )
    with torch.inference_mode():
        model(ids_BP, attention_mask=mask_BP, use_cache=True)
        synchronize(device)
        start = time.perf_counter()
        model(ids_BP, attention_mask=mask_BP, use_cache=True)
        synchronize(device)
        prefill_s = time.perf_counter() - start
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_s": round(prefill_s, 4),
        "generate_s": round(generate_s, 4),
        "tokens_per_s": round(batch * new_tokens / generate_s, 1),
        "decode_tokens_per_s": round(batch * (new_tokens - 1) / max(generate_s - prefill_s, 1e-9), 1),
        "greedy_agreement": agreement,
    }


def greedy_agreement(model, out_BS: torch.Tensor, prompt_len: int) -> float:
    """The fraction of generated tokens that are the argmax of one forward pass over the whole output (no cache)."""
    with torch.inference_mode():
        logits_BNV = model(out_BS[:, :-1]).logits[:, prompt_len - 1 :]
    return (logits_BNV.argmax(-1) == out_BS[:, prompt_len:]).float().mean().item()


def run(spec: dict) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = checkout_module(spec["minimind_dir"], "model_minimind")
    torch.manual_seed(spec["seed"])
    config = module.MiniMindConfig(**spec["minimind_config"])
    model = module.MiniMindForCausalLM(config).to(device=device, dtype=DTYPES[spec["dtype"]]).eval()
    rows = []
    for batch in spec["batch_sizes"]:  # the prompts benchmark_decode draws
        ids = np.random.default_rng(spec["seed"]).integers(3, config.vocab_size, (batch, spec["prompt_len"]))
        rows.append(time_generate(model, torch.from_numpy(ids).to(device), spec["new_tokens"]))
    info = {
        "torch": torch.__version__,
        "transformers": sys.modules["transformers"].__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": spec["dtype"],
        "model_class": f"{type(model).__module__}.{type(model).__name__}",
        "pid": os.getpid(),
    }
    return {"rows": rows, "info": info}


def main(spec_path: str) -> None:
    protocol = protocol_stream()
    protocol.write(json.dumps(run(json.loads(pathlib.Path(spec_path).read_text()))) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
