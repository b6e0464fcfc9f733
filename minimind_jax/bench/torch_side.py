"""The bench's PyTorch side, in a process of its own: `python -m minimind_jax.bench.torch_side SPEC.json`.

In the bench's process, XLA's and torch's thread pools disturb each other; here torch has the process to
itself, as MiniMind's trainers do. The bench writes the spec, the initial state dicts (init.npz; teacher.npz
for distillation; LoRA's adapters as a MiniMind .pth) and the padded batches (batches.npz, stacked
[steps, rows, T]), then speaks a line protocol: this process prints one JSON line when the model is built
({"ready": ...}), then one per "step" line it reads (that step's timing), and exits at the end of its input.
Everything else it prints goes to stderr.

spec["model"] picks the model:
- "reference": minimind_jax.bench.torch_reference's MiniMindTorch, the project's MiniMind in plain torch;
- "minimind": MiniMind's own MiniMindForCausalLM from {spec["minimind_dir"]}/model/model_minimind.py (needs
  transformers), and for LoRA its model/model_lora.py.
spec["torch_compile"] (a torch.compile backend, or null) runs the forward through `torch.compile(model)`, as v3's
trainers do with --use_compile 1; the step's timing then also counts the graphs compiled during it.
spec["objective"] picks the step, as MiniMind's script for the era computes it: train_full_sft, train_lora
(only the adapters train), train_dpo (a frozen reference) or train_distillation (a frozen teacher); eager
mode, clip_grad_norm 1.0 and AdamW in every one.
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

GRAD_CLIP = 1.0  # the --grad_clip of every MiniMind trainer


def checkout_module(minimind_dir: str, name: str):
    """model/{name}.py of a MiniMind checkout, imported from its file."""
    path = pathlib.Path(minimind_dir, "model", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_model(spec: dict, role: str = "") -> torch.nn.Module:
    """MiniMind's MiniMindForCausalLM from its checkout, or the project's reference; role "teacher_": the
    distillation teacher's config."""
    if spec["model"] == "minimind":
        module = checkout_module(spec["minimind_dir"], "model_minimind")
        return module.MiniMindForCausalLM(module.MiniMindConfig(**spec[f"{role}minimind_config"]))
    from minimind_jax.bench.torch_reference import MiniMindTorch
    from minimind_jax.model.config import ModelConfig

    return MiniMindTorch(ModelConfig.from_dict(spec[f"{role}model_config"]))


def lm_loss(model, arch: str, labels_api: bool):
    """train_full_sft's (and train_lora's) forward and loss for the era, on our (inputs, targets, loss_mask)
    padded rows. labels_api: v3's model computes its loss from labels (MiniMind's own model); the reference
    takes the masked mean, the same value."""
    if not labels_api:

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


def token_log_probs(logits, targets):
    return torch.gather(F.log_softmax(logits, dim=2), dim=2, index=targets.unsqueeze(2)).squeeze(-1)


def dpo_loss(model, reference, beta: float, v3: bool):
    """train_dpo's loss: the sides' log-probs summed over the mask (v3; plus the MoE aux loss) or averaged
    (2510), −log σ(β·((πc − πr) − (ρc − ρr))) averaged over pairs."""

    def loss_fn(inputs, targets, mask):
        # Our rows: each pair's chosen, then its rejected; MiniMind's batch: every chosen row, then every rejected.
        x, y, m = (t.view(-1, 2, t.size(-1)).transpose(0, 1).reshape(-1, t.size(-1)) for t in (inputs, targets, mask))
        with torch.no_grad():
            reference_logits = reference(x).logits
        out = model(x)
        reference_lp, policy_lp = (token_log_probs(logits, y) * m for logits in (reference_logits, out.logits))
        reference_lp, policy_lp = reference_lp.sum(1), policy_lp.sum(1)
        if not v3:
            lengths = m.sum(1).clamp_min(1e-8)
            reference_lp, policy_lp = reference_lp / lengths, policy_lp / lengths
        pairs = x.size(0) // 2
        margin = (policy_lp[:pairs] - policy_lp[pairs:]) - (reference_lp[:pairs] - reference_lp[pairs:])
        loss = -F.logsigmoid(beta * margin).mean()
        return loss + out.aux_loss if v3 else loss

    return loss_fn


def distill_loss(model, teacher, alpha: float, temperature: float, v3: bool):
    """train_distillation's loss: α·(CE + aux) + (1 − α)·T²·KL(teacher ‖ student) over the loss positions, the
    teacher's logits cut to the student's vocabulary. 2510's CE ignores targets of id 0; v3 scores logits[:-1]."""

    def loss_fn(inputs, targets, mask):
        out = model(inputs)
        with torch.no_grad():
            teacher_logits = teacher(inputs).logits
        student_logits = out.logits
        if v3:
            student_logits, teacher_logits = (z[..., :-1, :].contiguous() for z in (student_logits, teacher_logits))
            targets, mask = targets[:, :-1].masked_fill(mask[:, :-1] == 0, -100), mask[:, :-1]
        vocab = student_logits.size(-1)
        teacher_logits = teacher_logits[..., :vocab]
        mask_flat = mask.reshape(-1)
        ce = F.cross_entropy(
            student_logits.view(-1, vocab), targets.reshape(-1), ignore_index=-100 if v3 else 0, reduction="none"
        )
        ce = (ce * mask_flat).sum() / (mask_flat.sum() + (1e-8 if v3 else 0)) + out.aux_loss
        kept = mask_flat == 1
        teacher_probs = F.softmax(teacher_logits.view(-1, vocab)[kept] / temperature, dim=-1)
        student_log_probs = F.log_softmax(student_logits.view(-1, vocab)[kept] / temperature, dim=-1)
        kl = F.kl_div(student_log_probs, teacher_probs, reduction="batchmean")
        return alpha * ce + (1 - alpha) * temperature**2 * kl

    return loss_fn


def frozen_copy(spec: dict, role: str, state: dict, device) -> torch.nn.Module:
    model = build_model(spec, role)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)


class Side:
    """One PyTorch model, its AdamW and the bench's batches, stepped one batch at a time as MiniMind's trainer
    for spec["objective"] steps."""

    def __init__(self, spec: dict, directory: pathlib.Path):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.autocast = torch.bfloat16 if spec["dtype"] == "bfloat16" else None
        objective, v3, own = spec["objective"], spec["arch"] == "minimind3", spec["model"] == "minimind"
        with np.load(directory / "init.npz") as arrays:
            state = {key: torch.from_numpy(value) for key, value in arrays.items()}
        self.model = build_model(spec)
        if objective == "lora":  # MiniMind's own apply_lora on its model; the reference's twin on ours
            adapters = torch.load(spec["lora_file"], map_location="cpu", weights_only=True)
            rank = next(value for key, value in adapters.items() if key.endswith(".lora.A.weight")).shape[0]
            if own:
                checkout_module(spec["minimind_dir"], "model_lora").apply_lora(self.model, rank)
            else:
                from minimind_jax.bench.torch_reference import add_lora

                targets = sorted({key.split(".")[-4] for key in adapters})
                add_lora(self.model, rank, tuple(targets))
            state.update({key: value.float() for key, value in adapters.items()})
        self.model.load_state_dict(state, strict=True)
        self.model.to(self.device).train()
        if objective == "lora":  # train_lora freezes everything but the adapters
            for name, param in self.model.named_parameters():
                param.requires_grad = "lora" in name
        self.trainable = [param for param in self.model.parameters() if param.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=spec["learning_rate"])  # as MiniMind's trainers
        self.model_class = f"{type(self.model).__module__}.{type(self.model).__name__}"
        self.compiled = bool(spec.get("torch_compile"))
        if self.compiled:  # after the optimizer, as train_full_sft: the wrapper shares the model's parameters
            self.model = torch.compile(self.model, backend=spec["torch_compile"])
        if objective == "dpo":
            reference = frozen_copy(spec, "", state, self.device)
            self.loss_fn = dpo_loss(self.model, reference, spec["beta"], v3)
        elif objective == "distill":
            with np.load(directory / "teacher.npz") as arrays:
                teacher_state = {key: torch.from_numpy(value) for key, value in arrays.items()}
            teacher = frozen_copy(spec, "teacher_", teacher_state, self.device)
            self.loss_fn = distill_loss(self.model, teacher, spec["alpha"], spec["temperature"], v3)
        else:
            self.loss_fn = lm_loss(self.model, spec["arch"], labels_api=own and v3)
        with np.load(directory / "batches.npz") as batches:  # into memory: an npz member is read on each access
            self.batches = dict(batches)
        self.turn = 0

    def ready(self) -> dict:
        return {
            "torch": torch.__version__,
            "transformers": getattr(sys.modules.get("transformers"), "__version__", None),  # MiniMind's model
            "threads": torch.get_num_threads(),
            "device": str(self.device),
            "model_class": self.model_class,
            "pid": os.getpid(),
        }

    def train_step(self, inputs, targets, mask) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            loss = self.loss_fn(inputs, targets, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def step(self) -> dict:
        graphs_before = compiled_graphs() if self.compiled else 0
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
            "compiles": compiled_graphs() - graphs_before if self.compiled else 0,
        }


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def protocol_stream():
    """A line-buffered copy of stdout for the protocol's JSON lines; stdout itself then goes to stderr, so that
    stray prints (model code, libraries) cannot garble the protocol."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return protocol


def main(spec_path: str) -> None:
    protocol = protocol_stream()
    spec_file = pathlib.Path(spec_path)
    side = Side(json.loads(spec_file.read_text()), spec_file.parent)
    protocol.write(json.dumps({"ready": side.ready()}) + "\n")
    for line in sys.stdin:
        if line.strip() != "step":
            break
        protocol.write(json.dumps(side.step()) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
