"""The bench's PyTorch side, in a process of its own: `python -m minimind_jax.bench.torch_side SPEC.json`.

In the bench's process, XLA's and torch's thread pools disturb each other; here torch has the process to
itself, as MiniMind's train_full_sft.py does. The bench writes the spec, the initial state dict (init.npz) and
the padded batches (batches.npz, stacked [steps, B, T]), then speaks a line protocol: this process prints one
JSON line when the model is built ({"ready": ...}), then one per "step" line it reads (that step's timing), and
exits at the end of its input. Everything else it prints goes to stderr.

spec["model"] picks the model:
- "reference": minimind_jax.torch_reference (MiniMindTorch + sft_step), the project's MiniMind in plain torch;
- "minimind": MiniMind's own MiniMindForCausalLM from {spec["minimind_dir"]}/model/model_minimind.py (needs
  transformers), with its era's train_full_sft loss: 2510 (CE * loss_mask).sum() / loss_mask.sum() + aux_loss,
  v3 the model's own labels loss (-100 ignored) + aux_loss; clip_grad_norm 1.0 and AdamW either way.
Needs numpy, torch and pyyaml (and transformers for MiniMind's model), never JAX.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from minimind_jax.bench.train_step import process_cpu_seconds  # the bench's module level imports no JAX

GRAD_CLIP = 1.0  # train_full_sft.py's --grad_clip


def minimind_model(minimind_dir: str, fields: dict):
    """MiniMind's MiniMindForCausalLM from its checkout, configured with our ModelConfig's MiniMind fields."""
    path = pathlib.Path(minimind_dir, "model", "model_minimind.py")
    spec = importlib.util.spec_from_file_location("model_minimind", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MiniMindForCausalLM(module.MiniMindConfig(**fields))


def minimind_loss(model, arch: str):
    """train_full_sft's forward and loss for the era, on our (inputs, targets, loss_mask) padded rows."""
    if arch == "minimind2":

        def loss_fn(inputs, targets, mask):
            out = model(inputs)
            ce = F.cross_entropy(out.logits.view(-1, out.logits.size(-1)), targets.view(-1), reduction="none")
            return (ce.view(targets.size()) * mask).sum() / mask.sum() + out.aux_loss
    else:  # v3 feeds every id and scores logits[t] against labels[t + 1]; our last position carries no loss

        def loss_fn(inputs, targets, mask):
            shifted = targets[:, :-1].masked_fill(mask[:, :-1] == 0, -100)
            out = model(inputs, labels=torch.cat([torch.full_like(targets[:, :1], -100), shifted], dim=1))
            return out.loss + out.aux_loss

    return loss_fn


class Side:
    """One PyTorch model, its AdamW and the bench's batches, stepped one batch at a time."""

    def __init__(self, spec: dict, directory: pathlib.Path):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.autocast = torch.bfloat16 if spec["dtype"] == "bfloat16" else None
        self.learning_rate = spec["learning_rate"]
        with np.load(directory / "init.npz") as arrays:
            state = {key: torch.from_numpy(value) for key, value in arrays.items()}
        if spec["model"] == "minimind":
            self.model = minimind_model(spec["minimind_dir"], spec["minimind_config"])
            self.loss_fn = minimind_loss(self.model, spec["arch"])
        else:
            from minimind_jax.bench.torch_reference import MiniMindTorch
            from minimind_jax.model.config import ModelConfig

            self.model, self.loss_fn = MiniMindTorch(ModelConfig.from_dict(spec["model_config"])), None
        self.model.load_state_dict(state, strict=True)
        self.model.to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.learning_rate)  # as train_full_sft
        with np.load(directory / "batches.npz") as batches:  # into memory: an npz member is read on each access
            self.batches = dict(batches)
        self.turn = 0

    def ready(self) -> dict:
        return {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(self.device),
            "model_class": f"{type(self.model).__module__}.{type(self.model).__name__}",
            "pid": os.getpid(),
        }

    def train_step(self, inputs, targets, mask) -> torch.Tensor:
        if self.loss_fn is None:  # the project's reference step
            from minimind_jax.bench.torch_reference import sft_step

            return sft_step(
                self.model,
                self.optimizer,
                inputs,
                targets,
                mask,
                self.learning_rate,
                GRAD_CLIP,
                autocast_dtype=self.autocast,
            )["loss"]
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            loss = self.loss_fn(inputs, targets, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def step(self) -> dict:
        start, cpu_start = time.perf_counter(), process_cpu_seconds()
        inputs, targets, mask = (
            torch.from_numpy(self.batches[key][self.turn]).to(self.device) for key in ("inputs", "targets", "loss_mask")
        )
        self.turn += 1
        got_batch = time.perf_counter()
        loss = float(self.train_step(inputs.long(), targets.long(), mask))  # waits for the device
        done = time.perf_counter()
        memory = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return {
            "seconds": done - start,
            "data_wait": got_batch - start,
            "cpu_seconds": process_cpu_seconds() - cpu_start,
            "tokens": inputs.numel(),
            "loss_tokens": float(mask.sum()),
            "loss": loss,
            "memory_bytes": memory,
        }


def main(spec_path: str) -> None:
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints (model code, libraries) go to stderr
    spec_file = pathlib.Path(spec_path)
    side = Side(json.loads(spec_file.read_text()), spec_file.parent)
    protocol.write(json.dumps({"ready": side.ready()}) + "\n")
    for line in sys.stdin:
        if line.strip() != "step":
            break
        protocol.write(json.dumps(side.step()) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
