"""`python main.py bench --objective grpo`: one whole GRPO update of ours against MiniMind's own train_grpo.py,
side by side, turns alternating.

Both sides start from the same weights (the preset, randomly initialised), roll out the same prompts (the
first --batch_size chats of the bench corpus, rendered as the era's RLAIFDataset renders them) --num_generations
times each, up to --max_gen_len tokens, with the era's sampling, score them with MiniMind's rule rewards (the
reward model scores 0 on both sides) and take one AdamW update:
- ours, in this process: RolloutBatches (our jitted KV-cache sampler, then the policy's log-probs where the loss
  reads them) and the one sharded step with the era's policy loss, as `main.py grpo` runs them;
- MiniMind's, in a process of its own (bench/minimind_rl.py, --torch_python): its grpo_train_epoch on one
  batch, with its own rollout (v3's TorchRolloutEngine, 2510's HF generate), on CPU in fp32.

Each update is timed whole and in parts: the rollout (sampling), the log-probs (v3's rollout engine computes
them apart; 2510's are inside its update) and the rest (rewards, the policy and reference forwards, backward,
optimizer). Figures are medians over the timed turns, after --warmup turns (ours compile in the first).
Random weights rarely emit eos, so both sides' completions run to about --max_gen_len: the same work.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

from minimind_jax.errors import UserError

RL_OBJECTIVES = ("grpo",)
PARTS = ("seconds", "rollout_s", "log_probs_s", "update_s")
PAUSE_S = 0.5


class OurSide:
    name = "ours (main.py grpo's step)"

    def __init__(self, args, config, tokenizer_path: str, prompts: list[str], num_turns: int):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from minimind_jax.data.tokenizer import load_tokenizer
        from minimind_jax.model.transformer import MiniMind
        from minimind_jax.rl.algorithms import PolicyLoss
        from minimind_jax.rl.data import PromptRecord
        from minimind_jax.rl.rollout import (
            PromptBatches,
            RewardSettings,
            RolloutBatches,
            SamplerRollout,
            make_old_log_probs,
            trainer_layout,
        )
        from minimind_jax.training import sharding
        from minimind_jax.training.optimizer import annealing_lr_schedule, make_optimizer
        from minimind_jax.training.step import init_train_state, make_train_step

        self.jax = jax
        mesh = sharding.make_mesh(args.mesh)
        rows = len(prompts) * args.num_generations
        if rows % sharding.batch_size_per_step(mesh):
            raise UserError(f"{rows} rows (--batch_size × --num_generations) do not split over the mesh "
                            f"{dict(mesh.shape)}: give --mesh")  # fmt: skip
        model = MiniMind(config, rngs=nnx.Rngs(args.seed))
        self.objective = PolicyLoss("cispo" if config.is_v3 else "reinforce", 0.1 if config.is_v3 else 0.02)
        optimizer = make_optimizer(annealing_lr_schedule(args.learning_rate, 10**9), 1.0)
        self.graphdef, self.params, self.opt_state, param_shardings, opt_shardings = init_train_state(
            model, optimizer, mesh, self.objective
        )
        self.initial_params = jax.device_get(self.params)
        self.reference = {"reference": jax.tree.map(jnp.copy, self.params)}
        self.step_fn = make_train_step(self.graphdef, optimizer, mesh, objective=self.objective,
                                       frozen_graphdefs={"reference": self.graphdef}, loss_norm="minimind",
                                       param_shardings=param_shardings, opt_shardings=opt_shardings)  # fmt: skip
        tokenizer = load_tokenizer(tokenizer_path)
        records = [PromptRecord(line=i + 1, text=text) for i, text in enumerate(prompts)]
        self.rollouts = RolloutBatches(
            PromptBatches(records, len(records), args.seed, epochs=num_turns, shuffle=False),
            SamplerRollout(self.graphdef, config.arch, args.max_gen_len, tokenizer.eos_id), tokenizer=tokenizer,
            arch=config.arch, num_generations=args.num_generations, max_seq_len=args.max_seq_len,
            max_gen_len=args.max_gen_len, thinking_ratio=0.0, rewards=RewardSettings(config.arch, reasoning=True),
            old_log_probs=make_old_log_probs(self.graphdef) if self.objective.reads_old_log_probs else None,
            layout=trainer_layout("grpo", config.arch),
            sharding=sharding.batch_sharding(mesh),
        )  # fmt: skip
        self.turn = 0

    def step(self) -> dict[str, Any]:
        started = time.perf_counter()
        batch, stats = self.rollouts.next_batch(self.params, seed=self.turn)
        key = self.jax.random.key_data(self.jax.random.key(self.turn))
        self.params, self.opt_state, metrics = self.step_fn(self.params, self.opt_state, [batch], key, self.reference)
        loss = float(metrics["loss"])  # waits for the update
        seconds = time.perf_counter() - started
        self.turn += 1
        return {"seconds": seconds, "rollout_s": stats["rollout_s"], "log_probs_s": stats["log_probs_s"],
                "update_s": seconds - stats["rollout_s"] - stats["log_probs_s"],
                "avg_response_len": stats["avg_response_len"], "loss": loss}  # fmt: skip

    def close(self) -> None:
        pass


class MiniMindSide:
    name = "MiniMind's train_grpo.py (own process)"

    def __init__(self, args, config, initial_params, tokenizer_path: str, prompts: list[str], workdir: pathlib.Path):
        import numpy as np

        from minimind_jax.bench.train_step import minimind_config_fields, torch_process_env
        from minimind_jax.weights.mapping import state_dict_from_params

        state = state_dict_from_params(initial_params, config)
        np.savez(workdir / "init.npz", **{key: np.asarray(value, np.float32) for key, value in state.items()})
        spec = {
            "arch": config.arch, "minimind_dir": str(pathlib.Path(args.minimind_dir).resolve()),
            "minimind_config": minimind_config_fields(config), "tokenizer_path": str(tokenizer_path),
            "prompts": prompts, "num_generations": args.num_generations, "max_seq_len": args.max_seq_len,
            "max_gen_len": args.max_gen_len, "beta": 0.1 if config.is_v3 else 0.02, "loss_type": "cispo",
            "learning_rate": args.learning_rate, "seed": args.seed,
        }  # fmt: skip
        (workdir / "spec.json").write_text(json.dumps(spec))
        self.log_path = workdir / "stderr.log"
        command = [args.torch_python, "-m", "minimind_jax.bench.minimind_rl", str(workdir / "spec.json")]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                            env=torch_process_env(), text=True)  # fmt: skip
        self.info = self._receive()["ready"]

    def _receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"{self.name} exited with status {self.process.returncode}: {tail[0]}")
        return json.loads(line)

    def step(self) -> dict[str, Any]:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        timing = self._receive()
        timing["update_s"] = timing["seconds"] - timing["rollout_s"] - (timing["log_probs_s"] or 0.0)
        return timing

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


def medians(records: list[dict]) -> dict[str, float | None]:
    keys = [*PARTS, "avg_response_len"]
    return {k: statistics.median(r[k] for r in records) if records[0].get(k) is not None else None for k in keys}


def format_table(result: dict) -> str:
    setup = result["setup"]
    lines = [
        f"GRPO update, {setup['preset']} ({setup['arch']}), {setup['prompts']} prompts × G {setup['num_generations']}, "
        f"max_gen_len {setup['max_gen_len']}, {setup['device']}; medians of {setup['steps']} turns after "
        f"{setup['warmup']} warm-up",
        f"{'side':<42} {'update s':>9} {'rollout s':>10} {'log-probs s':>12} {'rest s':>8} {'reply len':>10}",
    ]
    fmt = lambda value: "-" if value is None else f"{value:.2f}"
    for side in result["sides"]:
        m = side["median"]
        lines.append(f"{side['name']:<42} {fmt(m['seconds']):>9} {fmt(m['rollout_s']):>10} "
                     f"{fmt(m['log_probs_s']):>12} {fmt(m['update_s']):>8} {fmt(m['avg_response_len']):>10}")  # fmt: skip
    if "speedup" in result:
        lines.append(f"speedup over MiniMind: whole update {result['speedup']['update']:.2f}x, rollout "
                     f"{result['speedup']['rollout']:.2f}x")  # fmt: skip
    return "\n".join(lines)


def run(args) -> int:
    """The RL bench (the bench's --objective grpo)."""
    import tempfile

    import jax

    from minimind_jax.bench.train_step import bench_data, minimind_checkout_arch
    from minimind_jax.data.records import read_jsonl
    from minimind_jax.data.tokenizer import load_tokenizer
    from minimind_jax.model.config import default_dtype, load_preset
    from minimind_jax.rl.data import PromptRecord, render_prompt

    if args.num_generations < 1 or args.max_gen_len < 1 or args.steps < 1 or args.warmup < 0:
        raise UserError("--num_generations, --max_gen_len and --steps must be at least 1, --warmup at least 0")
    if not args.no_torch and not args.minimind_dir:
        raise UserError("--objective grpo times MiniMind's own trainer: give --minimind_dir (or --no_torch)")
    if not args.no_torch and shutil.which(args.torch_python) is None:
        raise UserError(f"--torch_python {args.torch_python}: not an executable")
    platform = jax.devices()[0].platform
    config = load_preset(args.preset, dtype=args.dtype or default_dtype(platform))
    if args.minimind_dir and minimind_checkout_arch(args.minimind_dir) != config.arch:
        raise UserError(f"--minimind_dir {args.minimind_dir} is not a checkout of {config.arch}'s era")
    data_path, tokenizer_path, _ = bench_data(args)
    tokenizer = load_tokenizer(tokenizer_path)
    chats = [record for _, (_, record) in zip(range(args.batch_size), read_jsonl(data_path, kind="sft"))]
    import numpy as np

    prompts = [render_prompt(PromptRecord(i, messages=tuple(chat["conversations"])), tokenizer, config.arch,
                             np.random.default_rng(i), thinking_ratio=0.9) for i, chat in enumerate(chats)]  # fmt: skip
    progress = lambda message: print(message, file=sys.stderr, flush=True)
    turns = args.warmup + args.steps
    ours = OurSide(args, config, str(tokenizer_path), prompts, turns)
    sides = [ours]
    with tempfile.TemporaryDirectory(prefix="bench_rl_") as workdir:
        try:
            if not args.no_torch:
                sides.append(MiniMindSide(args, config, ours.initial_params, tokenizer_path, prompts,
                                          pathlib.Path(workdir)))  # fmt: skip
            records = {side.name: [] for side in sides}
            for turn in range(turns):
                for side in sides:
                    time.sleep(PAUSE_S)  # the other side's idle threads stop spinning before this one's turn
                    record = side.step()
                    progress(f"turn {turn + 1}/{turns} {side.name}: {record['seconds']:.2f} s (rollout "
                             f"{record['rollout_s']:.2f} s)")  # fmt: skip
                    if turn >= args.warmup:
                        records[side.name].append(record)
        finally:
            for side in sides:
                side.close()
    result = {
        "setup": {"preset": args.preset, "arch": config.arch, "prompts": len(prompts),
                  "num_generations": args.num_generations, "max_gen_len": args.max_gen_len, "steps": args.steps,
                  "warmup": args.warmup, "device": f"{jax.device_count()} × {jax.devices()[0].device_kind}"},
        "sides": [{"name": name, "median": medians(rs), "turns": rs} for name, rs in records.items()],
    }  # fmt: skip
    if len(sides) == 2:
        mine, theirs = (side["median"] for side in result["sides"])
        result["speedup"] = {"update": theirs["seconds"] / mine["seconds"],
                             "rollout": theirs["rollout_s"] / mine["rollout_s"]}  # fmt: skip
    print(json.dumps(result) if args.json else format_table(result))
    return 0
