"""`python main.py bench --objective grpo|ppo`: one whole RL update of ours against MiniMind's own
train_grpo.py or train_ppo.py, side by side, turns alternating.

Both sides start from the same weights (the preset, randomly initialised), roll out the same prompts (the
first --batch_size chats of the bench corpus, rendered as the era's RLAIFDataset renders them) --num_generations
times each for GRPO (once for PPO), up to --max_gen_len tokens, with the era's sampling, score them with
MiniMind's rule rewards (the reward model scores 0 on both sides) and train on them with the script's defaults
for the era:
- ours, in this process: the run `main.py grpo|ppo` assembles (rl/run.py's assemble: our jitted KV-cache
  sampler, the policy's log-probs where the loss reads them, the one sharded step; v3 PPO's epochs of
  minibatches), one update per turn;
- MiniMind's, in a process of its own (bench/minimind_rl.py, --torch_python): its grpo_train_epoch or
  ppo_train_epoch on one batch, with its own rollout (v3's TorchRolloutEngine, 2510's HF generate), on CPU in
  fp32.

Each update is timed whole and in parts: the rollout (sampling), the log-probs (v3's rollout engine computes
them apart; 2510's are inside its update) and the rest (rewards, the critic and reference forwards, the
forward and backward passes, the optimizers). Figures are medians over the timed turns, after --warmup turns
(ours compile in the first). Random weights rarely emit eos, so both sides' completions run to about
--max_gen_len: the same work.
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

RL_OBJECTIVES = ("grpo", "ppo")
PARTS = ("seconds", "rollout_s", "log_probs_s", "update_s")
PAUSE_S = 0.5
# What MiniMind's train_ppo.py reads from args beyond GRPO's, both eras, given as our run has them
PPO_SETTINGS = (
    "critic_learning_rate",
    "clip_epsilon",
    "vf_coef",
    "kl_coef",
    "update_old_actor_freq",
    "gamma",
    "lam",
    "cliprange_value",
    "ppo_update_iters",
    "early_stop_kl",
    "mini_batch_size",
)


class OurSide:
    def __init__(self, args, config, tokenizer_path: str, prompts: list[str], num_turns: int):
        import jax
        from flax import nnx

        from minimind_jax.data.tokenizer import load_tokenizer
        from minimind_jax.model.transformer import MiniMind
        from minimind_jax.rl.data import PromptRecord
        from minimind_jax.rl.rollout import RewardSettings
        from minimind_jax.rl.run import assemble
        from minimind_jax.training import sharding
        from minimind_jax.training.config import TrainConfig, defaults_for
        from minimind_jax.training.loop import RunState, Trainer

        self.name = f"ours (main.py {args.objective}'s step)"
        self.jax = jax
        self.cfg = TrainConfig(**{
            **defaults_for(args.objective, config.arch), "mode": args.objective, "arch": config.arch,
            "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "use_moe": int(config.use_moe), "num_attention_heads": config.num_attention_heads,
            "batch_size": len(prompts), "epochs": num_turns, "max_seq_len": args.max_seq_len,
            "max_gen_len": args.max_gen_len, "seed": args.seed, "mesh": args.mesh, "loss_norm": "minimind",
            "shuffle": False, "progress": False, "from_weight": "none",
            "thinking_ratio": 0.0, **({"num_generations": args.num_generations} if args.objective == "grpo" else {}),
            **({"learning_rate": args.learning_rate} if args.learning_rate else {}),
        })  # fmt: skip
        model = MiniMind(config, rngs=nnx.Rngs(args.seed))
        records = [PromptRecord(line=i + 1, text=text) for i, text in enumerate(prompts)]
        self.run = assemble(self.cfg, model, records, load_tokenizer(tokenizer_path), sharding.make_mesh(args.mesh),
                            RewardSettings(config.arch, reasoning=True))  # fmt: skip
        policy = self.run.params["actor"] if args.objective == "ppo" else self.run.params
        self.initial_params = jax.device_get(policy)
        self.state = RunState(update=0, params=self.run.params, opt_state=self.run.opt_state,
                              rng=jax.random.key_data(jax.random.key(args.seed)), batches=self.run.batches)  # fmt: skip
        self.trainer = Trainer(self.run.step_fn, update_sizes=self.run.plan.sizes, last_update=0,
                               frozen_params=self.run.frozen_params, steps=self.run.steps)  # fmt: skip

    def step(self) -> dict[str, Any]:
        """One update as `main.py` runs it (v3 PPO: its epochs of minibatches), timed whole and in parts."""
        started = time.perf_counter()
        self.trainer.last_update += 1
        self.trainer.train(self.state)
        loss = float(self.state.metrics["loss"])  # waits for the update
        seconds = time.perf_counter() - started
        stats = self.state.host_metrics
        return {"seconds": seconds, "rollout_s": stats["rollout_s"], "log_probs_s": stats["log_probs_s"],
                "update_s": seconds - stats["rollout_s"] - stats["log_probs_s"],
                "avg_response_len": stats["avg_response_len"], "loss": loss}  # fmt: skip

    def close(self) -> None:
        pass


class MiniMindSide:
    def __init__(self, args, ours: OurSide, config, tokenizer_path: str, prompts: list[str], workdir: pathlib.Path):
        import numpy as np

        from minimind_jax.bench.train_step import minimind_config_fields, torch_process_env
        from minimind_jax.weights.mapping import state_dict_from_params

        self.name = f"MiniMind's train_{args.objective}.py (own process)"
        cfg = ours.cfg
        state = state_dict_from_params(ours.initial_params, config)
        np.savez(workdir / "init.npz", **{key: np.asarray(value, np.float32) for key, value in state.items()})
        spec = {
            "arch": config.arch, "minimind_dir": str(pathlib.Path(args.minimind_dir).resolve()),
            "minimind_config": minimind_config_fields(config), "tokenizer_path": str(tokenizer_path),
            "prompts": prompts, "num_generations": args.num_generations, "max_seq_len": args.max_seq_len,
            "max_gen_len": args.max_gen_len, "beta": cfg.beta, "loss_type": cfg.loss_type,
            "learning_rate": cfg.learning_rate, "seed": args.seed, "objective": args.objective,
            "ppo": {name: getattr(cfg, name) for name in PPO_SETTINGS} if args.objective == "ppo" else {},
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
        f"{setup['objective'].upper()} update, {setup['preset']} ({setup['arch']}), {setup['prompts']} prompts × G "
        f"{setup['num_generations']}, "
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
        raise UserError(f"--objective {args.objective} times MiniMind's own trainer: give --minimind_dir (or "
                        "--no_torch)")  # fmt: skip
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
                sides.append(MiniMindSide(args, ours, config, tokenizer_path, prompts, pathlib.Path(workdir)))
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
        "setup": {"objective": args.objective, "preset": args.preset, "arch": config.arch, "prompts": len(prompts),
                  "num_generations": args.num_generations if args.objective == "grpo" else 1, "max_gen_len": args.max_gen_len, "steps": args.steps,
                  "warmup": args.warmup, "device": f"{jax.device_count()} × {jax.devices()[0].device_kind}"},
        "sides": [{"name": name, "median": medians(rs), "turns": rs} for name, rs in records.items()],
    }  # fmt: skip
    if len(sides) == 2:
        mine, theirs = (side["median"] for side in result["sides"])
        result["speedup"] = {"update": theirs["seconds"] / mine["seconds"],
                             "rollout": theirs["rollout_s"] / mine["rollout_s"]}  # fmt: skip
    print(json.dumps(result) if args.json else format_table(result))
    return 0
