"""MiniMind's own GRPO or PPO update, in a process of its own, for `main.py bench --objective grpo|ppo`:
`python -m minimind_jax.bench.minimind_rl SPEC.json`.

It imports the era's trainer/train_grpo.py or train_ppo.py from spec["minimind_dir"], sets the module globals
its __main__ sets on CPU (args, the policy (PPO: actor, critic and 2510's old actor), tokenizer, optimizers,
schedulers, lm_config; v3's autocast_ctx and its TorchRolloutEngine on the policy), loads the initial weights
(init.npz, the bench's state dict), and then, per "step" line it reads, runs `grpo_train_epoch` or
`ppo_train_epoch` once on spec["prompts"]: MiniMind's own rollout (its sampling), rewards (its rules; the
reward model scores 0 on both sides), log-probs, loss, backward and AdamW step (v3 PPO: its epochs of
minibatches). It prints {"ready": ...} once built, then one JSON line per step: seconds (the whole update),
rollout_s (its generate), log_probs_s (v3: its rollout engine's compute_per_token_logps; 2510 computes its
log-probs in the update, where they are counted) and avg_response_len. Needs torch, transformers and
MiniMind's requirements; never JAX.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import types
from contextlib import nullcontext

import numpy as np
import torch


class Stopwatch:
    """Seconds spent inside the wrapped callables since the last reset."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    directory = os.path.dirname(os.path.abspath(spec_path))
    v3, ppo = spec["arch"] == "minimind3", spec["objective"] == "ppo"
    sys.path.insert(0, spec["minimind_dir"])
    trainer = importlib.import_module("trainer.train_ppo" if ppo else "trainer.train_grpo")
    model_module = importlib.import_module("model.model_minimind")
    from transformers import AutoTokenizer

    torch.manual_seed(spec["seed"])
    config = model_module.MiniMindConfig(**spec["minimind_config"])
    weights = {k: torch.from_numpy(v) for k, v in np.load(os.path.join(directory, "init.npz")).items()}
    model, reference, old_actor = (model_module.MiniMindForCausalLM(config) for _ in range(3))
    for module in (model, reference, old_actor):
        module.load_state_dict(weights, strict=False)
    reference, old_actor = reference.eval().requires_grad_(False), old_actor.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_path"])
    never = 10**9  # no log line and no save inside the timed update
    args = types.SimpleNamespace(
        device="cpu", num_generations=spec["num_generations"], max_seq_len=spec["max_seq_len"],
        max_gen_len=spec["max_gen_len"], beta=spec["beta"], loss_type=spec.get("loss_type"), epsilon=0.2,
        epsilon_high=5.0, reasoning=1, accumulation_steps=1, grad_clip=1.0, log_interval=never, save_interval=never,
        debug_mode=False, debug_interval=never, save_dir=directory, save_weight=spec["objective"], epochs=1,
        debug_log_ratio=False, **spec.get("ppo", {}),
    )  # fmt: skip
    anneal = lambda optimizer, lr: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=never, eta_min=lr / 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["learning_rate"])
    scheduler = anneal(optimizer, spec["learning_rate"])
    trainer.args, trainer.tokenizer, trainer.lm_config = args, tokenizer, config
    trainer.Logger = lambda *a, **k: None  # v3's PPO logs every step; stdout carries this process's replies
    if ppo:
        critic = trainer.CriticModel(config)
        critic.load_state_dict(weights, strict=False)
        critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=args.critic_learning_rate)
        schedulers = (scheduler, anneal(critic_optimizer, args.critic_learning_rate))
        trainer.actor_model, trainer.critic_model = model, critic
        trainer.actor_optimizer, trainer.critic_optimizer = optimizer, critic_optimizer
    else:
        trainer.model, trainer.optimizer, trainer.scheduler = model, optimizer, scheduler
    rollout_watch, log_probs_watch = Stopwatch(), Stopwatch()
    lengths = []
    if v3:
        engines = importlib.import_module("trainer.rollout_engine")
        engines.compute_per_token_logps = log_probs_watch.wrap(engines.compute_per_token_logps)
        trainer.autocast_ctx = nullcontext()
        engine = engines.TorchRolloutEngine(model, tokenizer, device="cpu", autocast_ctx=nullcontext())
        rollout = engine.rollout

        def measured_rollout(*a, **k):
            result = rollout_watch.wrap(rollout)(*a, **k)
            lengths.extend(result.completion_mask.sum(1).tolist())
            return result

        engine.rollout = measured_rollout
        zero_reward = types.SimpleNamespace(get_score=lambda messages, answer: 0.0)
        if ppo:
            update = lambda batch: trainer.ppo_train_epoch(0, [batch], never, engine, reference, *schedulers,
                                                           zero_reward)  # fmt: skip
        else:
            update = lambda batch: trainer.grpo_train_epoch(0, [batch], never, engine, reference, zero_reward)
    else:
        generate = rollout_watch.wrap(model.generate)

        def measured_generate(*a, **k):
            outputs = generate(*a, **k)
            for row in outputs[:, k["input_ids"].shape[1] :].tolist():  # up to the first eos, or all of it
                lengths.append(row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row))
            return outputs

        model.generate = measured_generate
        zero_reward = types.SimpleNamespace(get_score=lambda tokenizer, chat: 0.0)
        if ppo:
            update = lambda batch: trainer.ppo_train_epoch(0, [batch], never, old_actor, reference, *schedulers,
                                                           zero_reward, None)  # fmt: skip
        else:
            update = lambda batch: trainer.grpo_train_epoch(0, [batch], never, reference, zero_reward, None)
    batch = {"prompt": spec["prompts"]}
    print(json.dumps({"ready": {"torch": torch.__version__, "threads": torch.get_num_threads()}}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            continue
        rollout_watch.seconds = log_probs_watch.seconds = 0.0
        lengths.clear()
        started = time.perf_counter()
        update(batch)
        seconds = time.perf_counter() - started
        print(json.dumps({"seconds": seconds, "rollout_s": rollout_watch.seconds - log_probs_watch.seconds,
                          "log_probs_s": log_probs_watch.seconds if v3 else None,
                          "avg_response_len": float(np.mean(lengths)) if lengths else None}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
