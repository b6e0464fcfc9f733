"""An RL run, assembled from the same parts as every other run (training/run.py): the weights, the one
sharded step with an RL objective, and the run loop with its hooks. What RL adds: each micro-batch is
rolled out with the current weights (rl/rollout.py), scored (rl/rewards.py) and turned into advantages
(rl/algorithms.py) before the step; MiniMind's RL schedule (CosineAnnealingLR, one step per update); and
MiniMind's RL metrics and log line.

`train(TrainConfig)` is what `main.py grpo` calls.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from minimind_jax.data.tokenizer import check_fits, load_tokenizer
from minimind_jax.errors import UserError
from minimind_jax.inference.generation import check_room
from minimind_jax.model.config import ModelConfig, default_dtype, train_step_settings
from minimind_jax.model.params import model_from_params, params_of
from minimind_jax.model.transformer import MiniMind
from minimind_jax.rl.actor_critic import ActorCritic, Critic, load_critic
from minimind_jax.rl.agent import AgentRollouts, load_agent_prompts, load_agent_replay
from minimind_jax.rl.algorithms import PolicyLoss, SequencePPOLoss, SPOTracker, TokenPPOLoss
from minimind_jax.rl.data import load_prompts, load_replay
from minimind_jax.rl.ppo import PPOEpochs
from minimind_jax.rl.rewards import RewardModel, load_reward_fn
from minimind_jax.rl.rollout import (
    PromptBatches,
    ReplayRollout,
    RewardSettings,
    RolloutBatches,
    SamplerRollout,
    make_old_log_probs,
    trainer_layout,
)
from minimind_jax.training import sharding
from minimind_jax.training.accumulation import update_plan
from minimind_jax.training.config import TrainConfig
from minimind_jax.training.hooks import Checkpointer, Preemption
from minimind_jax.training.loop import RunState, Trainer
from minimind_jax.training.metrics import (
    MetricLogger,
    MetricsWriter,
    TooManySkips,
    drop_metrics_after,
)
from minimind_jax.training.optimizer import annealing_lr, annealing_lr_schedule, make_optimizer
from minimind_jax.training.perf import model_flops_per_token, total_peak_flops
from minimind_jax.training.run import (
    build_model,
    keep_earlier_run,
    move_earlier_run_aside,
    resume,
    run_job,
    run_meta,
    save_due,
    write_summary,
)
from minimind_jax.training.run_lock import RunLock
from minimind_jax.training.step import init_train_state, make_train_step
from minimind_jax.training.wandb_log import WandbRun
from minimind_jax.weights import save_pth
from minimind_jax.weights.orbax import TrainCheckpoints


def schedule_length(cfg: TrainConfig, arch: str, batches_per_epoch: int) -> int:
    """CosineAnnealingLR's T_max: 2510 (iters // acc) · epochs; v3 ceil(iters / acc) · epochs, and for v3's
    PPO, whose optimizer steps are per minibatch, ceil(iters · epochs · ppo_update_iters · minibatches / acc)."""
    acc = cfg.accumulation_steps
    if arch == "minimind2":
        return batches_per_epoch // acc * cfg.epochs
    if cfg.mode == "ppo":
        minibatches = math.ceil(cfg.batch_size / cfg.mini_batch_size)
        return math.ceil(batches_per_epoch * cfg.epochs * cfg.ppo_update_iters * minibatches / acc)
    return math.ceil(batches_per_epoch / acc) * cfg.epochs


class RLMetricLogger(MetricLogger):
    """MetricLogger with each RL trainer's names and log line, as MiniMind logs them. GRPO: reward, kl_ref,
    advantages_std, advantages_mean, policy_loss, avg_response_len, learning_rate (2510 divides policy_loss by
    the accumulation steps and prints no kl_ref); SPO: kl (the masked k3), rho and baseline besides; PPO:
    actor_loss, critic_loss, kl, kl_ref, actor_lr and critic_lr. Throughput counts the rollout's rows."""

    def __init__(self, cfg, *, schedule_updates: int, **kwargs):
        super().__init__(cfg, tokens_per_micro_batch=0, **kwargs)
        self.schedule_updates = schedule_updates

    def learning_rate(self, update: int) -> float:
        return float(annealing_lr(self.cfg.learning_rate, self.schedule_updates, update, np))

    def update_tokens(self, update: int, host_metrics: dict) -> int:
        return host_metrics["rollout_tokens"] * self.plan.sizes[update - 1]

    def finish_record(self, record: dict) -> None:
        if self.cfg.mode == "ppo" and self.cfg.arch == "minimind3":  # PPOEpochs' averages over the minibatches
            steps = record.pop("optimizer_steps")
            record.pop("halt")
            record["lr"] = record["actor_lr"] = self.learning_rate(steps)
            record["critic_lr"] = float(annealing_lr(self.cfg.critic_learning_rate, self.schedule_updates, steps, np))
            return
        if self.cfg.mode == "ppo":  # the objective's means are MiniMind's names already
            record["actor_lr"] = record["lr"]
            record["critic_lr"] = float(annealing_lr(self.cfg.critic_learning_rate, self.schedule_updates,
                                                     record["update"], np))  # fmt: skip
            return
        v3 = self.cfg.arch == "minimind3"
        record["policy_loss"] = record["last_micro_loss"] / (1 if v3 else self.cfg.accumulation_steps)
        tokens = max(record.pop("completion_tokens"), 1e-12)
        kl_ref, k3 = record.pop("kl_ref_sum") / tokens, record.pop("k3_sum") / tokens
        record["kl" if self.cfg.mode == "spo" else "kl_ref"] = k3 if self.cfg.mode == "spo" else kl_ref
        record["learning_rate"] = record["lr"]

    def log_line(self, record: dict, step_in_epoch: int, eta_min: float) -> str:
        where = f"({step_in_epoch + 1}/{self.steps_per_epoch})"
        if self.cfg.mode == "ppo" and self.cfg.arch == "minimind3":
            return (f"Epoch:[{record['epoch']}/{self.cfg.epochs}]{where}, Reward: {record['reward']:.4f}, KL_ref: "
                    f"{record['kl_ref']:.4f}, Approx KL: {record['approx_kl']:.4f}, ClipFrac: {record['clipfrac']:.4f}, "
                    f"Critic Loss: {record['critic_loss']:.4f}, Avg Response Len: {record['avg_response_len']:.2f}, "
                    f"Actor LR: {record['actor_lr']:.8f}, Critic LR: {record['critic_lr']:.8f}, tokens/s: "
                    f"{record['tokens_per_s']:,.0f}")  # fmt: skip
        if self.cfg.mode == "ppo":
            return (f"Epoch: {record['epoch']}, Step: {step_in_epoch + 1}/{self.steps_per_epoch}, Actor Loss: "
                    f"{record['actor_loss']:.6f}, Critic Loss: {record['critic_loss']:.6f}, Reward: "
                    f"{record['reward']:.6f}, KL: {record['kl']:.6f}, KL_ref: {record['kl_ref']:.6f}, Avg Response "
                    f"Len: {record['avg_response_len']:.2f}, Actor LR: {record['actor_lr']:.2e}, Critic LR: "
                    f"{record['critic_lr']:.2e}, tokens/s: {record['tokens_per_s']:,.0f}")  # fmt: skip
        if self.cfg.mode == "agent":
            return (f"Epoch:[{record['epoch']}/{self.cfg.epochs}]{where}, Reward:{record['reward']:.4f}, KL:"
                    f"{record['kl_ref']:.4f}, GrpStd:{record['group_reward_std']:.4f}, AdvStd:"
                    f"{record['advantages_std']:.4f}, Loss:{record['policy_loss']:.4f}, AvgLen:"
                    f"{record['avg_response_len']:.2f}, AdvMean:{record['advantages_mean']:.4f}, LR:{record['lr']:.8f}, "
                    f"tokens/s:{record['tokens_per_s']:,.0f}")  # fmt: skip
        if self.cfg.mode == "spo":
            return (f"Epoch: {record['epoch']}, Step: {step_in_epoch + 1}/{self.steps_per_epoch}, Actor Loss: "
                    f"{record['policy_loss']:.6f}, Reward: {record['reward']:.6f}, Baseline: {record['baseline']:.4f}, "
                    f"KL: {record['kl']:.4f}, Rho: {record['rho']:.4f}, Avg Response Len: "
                    f"{record['avg_response_len']:.2f}, LR: {record['lr']:.2e}, tokens/s: {record['tokens_per_s']:,.0f}")  # fmt: skip
        if self.cfg.arch == "minimind2":
            return (f"Epoch: {record['epoch']}, Step: {step_in_epoch + 1}/{self.steps_per_epoch}, Actor Loss: "
                    f"{record['policy_loss']:.6f}, Reward: {record['reward']:.6f}, Avg Response Len: "
                    f"{record['avg_response_len']:.2f}, LR: {record['lr']:.2e}, tokens/s: {record['tokens_per_s']:,.0f}")  # fmt: skip
        return (f"Epoch:[{record['epoch']}/{self.cfg.epochs}]{where}, Reward: {record['reward']:.4f}, KL_ref: "
                f"{record['kl_ref']:.4f}, Adv Std: {record['advantages_std']:.4f}, Adv Mean: "
                f"{record['advantages_mean']:.4f}, Actor Loss: {record['policy_loss']:.4f}, Avg Response Len: "
                f"{record['avg_response_len']:.2f}, Learning Rate: {record['lr']:.8f}, tokens/s: "
                f"{record['tokens_per_s']:,.0f}")  # fmt: skip


def objective_for(cfg: TrainConfig, model_config: ModelConfig) -> PolicyLoss | SequencePPOLoss | TokenPPOLoss:
    if cfg.mode == "ppo" and model_config.is_v3:
        return TokenPPOLoss(cfg.clip_epsilon, cfg.vf_coef, cfg.kl_coef, cfg.cliprange_value, cfg.early_stop_kl)
    if cfg.mode == "ppo":
        return SequencePPOLoss(cfg.clip_epsilon, cfg.vf_coef, cfg.kl_coef, scale=cfg.accumulation_steps)
    if cfg.mode == "spo":
        return PolicyLoss("spo", cfg.beta)
    return PolicyLoss(cfg.loss_type if model_config.is_v3 else "reinforce", cfg.beta, cfg.epsilon, cfg.epsilon_high)


def trained_model(cfg: TrainConfig, policy: MiniMind, schedule_updates: int):
    """(what the step trains, its optimizer). GRPO and SPO: the policy, under AdamW on MiniMind's RL schedule.
    PPO: an ActorCritic whose actor and critic each have their own AdamW, clipping and schedule (MiniMind's
    two optimizers), the critic started from --critic_weight or from the policy with a new value head, and
    2510's old actor a copy of the policy."""
    schedule = lambda lr: annealing_lr_schedule(lr, schedule_updates)
    if cfg.mode != "ppo":
        return policy, make_optimizer(schedule(cfg.learning_rate), cfg.grad_clip)
    copy = lambda model: model_from_params(model.config, jax.tree.map(jnp.copy, params_of(model)))
    critic = load_critic(cfg.critic_weight, policy) if cfg.critic_weight else Critic(copy(policy), nnx.Rngs(cfg.seed))
    model = ActorCritic(policy, critic, None if policy.config.is_v3 else copy(policy))
    optimizer = optax.multi_transform(
        {"actor": make_optimizer(schedule(cfg.learning_rate), cfg.grad_clip),
         "critic": make_optimizer(schedule(cfg.critic_learning_rate), cfg.grad_clip)},
        lambda trained: {name: jax.tree.map(functools.partial(lambda name, _: name, name), part)
                         for name, part in trained.items()},
    )  # fmt: skip
    return model, optimizer


def reward_settings(cfg: TrainConfig, arch: str, is_main: bool) -> RewardSettings:
    """--reward_fn, else MiniMind's rewards with --reward_model_path's model when given."""
    if cfg.reward_fn:
        return RewardSettings(arch, reward_fn=load_reward_fn(cfg.reward_fn))
    model = None
    if cfg.reward_model_path:
        if not pathlib.Path(cfg.reward_model_path).is_dir():
            raise UserError(f"--reward_model_path {cfg.reward_model_path}: no such directory")
        model = RewardModel(cfg.reward_model_path, trust_remote_code=bool(cfg.trust_remote_code))
    elif is_main and not cfg.rollouts:
        tqdm.tqdm.write("no --reward_model_path: only MiniMind's rule rewards count (the reward model scores 0)")
    return RewardSettings(arch, reasoning=bool(cfg.reasoning), reward_model=model)


def mean_reward(cfg: TrainConfig, weights: str, data_path: str, seed: int = 0) -> dict[str, float]:
    """The mean reward of the run's rewards over `weights`' completions of every prompt of `data_path` (one pass,
    cfg.num_generations each, the era's sampling): {"reward", "completions"}."""
    platform = jax.devices()[0].platform
    dtype = cfg.dtype or default_dtype(platform)
    step = train_step_settings(cfg.fast_path, platform, dtype, cfg.max_seq_len + cfg.max_gen_len)
    model = build_model(dataclasses.replace(cfg, from_weight=str(weights)), dtype, step)
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    graphdef, params = nnx.split(model, nnx.Param)
    prompts = PromptBatches(load_prompts(data_path), cfg.batch_size, seed, epochs=1, shuffle=False)
    batches = RolloutBatches(prompts, SamplerRollout(graphdef, model.config.arch, cfg.max_gen_len, tokenizer.eos_id),
                             tokenizer=tokenizer, arch=model.config.arch, num_generations=cfg.num_generations,
                             max_seq_len=cfg.max_seq_len, max_gen_len=cfg.max_gen_len,
                             thinking_ratio=cfg.thinking_ratio, rewards=reward_settings(cfg, model.config.arch, False),
                             old_log_probs=None, layout=trainer_layout(cfg.mode, model.config.arch))  # fmt: skip
    total = count = 0.0
    for index in range(len(prompts)):
        _, stats = batches.next_batch(params, seed + index)
        total, count = total + stats["reward"] * stats["completions"], count + stats["completions"]
    return {"reward": total / count, "completions": int(count)}


@dataclasses.dataclass
class RLRun:
    """An RL run's parts, before checkpoints and hooks: what `train` and the bench (bench/rl_update.py) run."""

    objective: Any
    plan: Any  # training/accumulation.UpdatePlan: an update per rollout (per micro-batch group)
    schedule_updates: int  # the optimizer steps of MiniMind's LR schedule
    graphdef: nnx.GraphDef
    params: Any
    opt_state: Any
    param_shardings: Any
    opt_shardings: Any
    frozen_params: dict
    step_fn: Callable
    batches: Any  # RolloutBatches, AgentRollouts or PPOEpochs: the data state checkpoints keep
    steps: Callable  # Trainer's steps: rolls each update's micro-batches out with the current weights
    token_ppo: bool


def assemble(cfg: TrainConfig, model: MiniMind, records: list, tokenizer, mesh, rewards: RewardSettings) -> RLRun:
    """The run's objective, trained model, optimizer, sharded step and rollout data for the policy `model`."""
    model_config = model.config
    rows = cfg.batch_size * cfg.num_generations
    split = sharding.batch_size_per_step(mesh)
    if rows % split:
        per_prompt = f" × --num_generations {cfg.num_generations} = {rows}" if cfg.num_generations > 1 else ""
        raise UserError(f"--batch_size {cfg.batch_size}{per_prompt} rows are not divisible by the data-parallel "
                        f"size {split} (mesh {dict(mesh.shape)})")  # fmt: skip
    token_ppo = cfg.mode == "ppo" and cfg.arch == "minimind3"
    if token_ppo and cfg.mini_batch_size % split:
        raise UserError(f"--mini_batch_size {cfg.mini_batch_size} rows are not divisible by the data-parallel size "
                        f"{split} (mesh {dict(mesh.shape)})")  # fmt: skip
    prompts = PromptBatches(records, cfg.batch_size, cfg.seed, cfg.epochs, shuffle=cfg.shuffle and not cfg.rollouts)
    acc = cfg.accumulation_steps
    # An update is a rollout; v3's PPO accumulates its minibatches within each rollout (rl/ppo.py)
    plan = update_plan(model_config.arch, len(prompts), cfg.epochs, 1 if token_ppo else acc)
    if len(plan) < 1:
        raise UserError(f"{cfg.rollouts or cfg.data_path}: {len(prompts)} batches are fewer than "
                        f"--accumulation_steps {acc} needs for one update")  # fmt: skip
    schedule_updates = schedule_length(cfg, model_config.arch, len(prompts))
    objective = objective_for(cfg, model_config)
    policy_graphdef = nnx.graphdef(model)
    trained, optimizer = trained_model(cfg, model, max(schedule_updates, 1))
    critic_graphdef = nnx.graphdef(trained.critic) if cfg.mode == "ppo" else None
    graphdef, params, opt_state, param_shardings, opt_shardings = init_train_state(trained, optimizer, mesh, objective)
    del trained
    policy = (lambda params: params["actor"]) if cfg.mode == "ppo" else (lambda params: params)
    reference_params = jax.tree.map(jnp.copy, policy(params))  # the policy as it starts
    # v3's PPO reads the reference once per rollout (rl/ppo.py), the others in the step
    frozen_params = {} if token_ppo else {"reference": reference_params}
    step_fn = make_train_step(graphdef, optimizer, mesh, objective=objective,
                              frozen_graphdefs={name: policy_graphdef for name in frozen_params}, accumulation_steps=acc,
                              loss_norm=cfg.loss_norm, param_shardings=param_shardings, opt_shardings=opt_shardings)  # fmt: skip
    if cfg.mode == "agent":
        batches = AgentRollouts(prompts, policy_graphdef, tokenizer=tokenizer, replay=cfg.rollouts,
                                num_generations=cfg.num_generations, max_gen_len=cfg.max_gen_len,
                                max_total_len=cfg.max_total_len, thinking_ratio=cfg.thinking_ratio,
                                reward_model=rewards.reward_model, reward_fn=rewards.reward_fn,
                                sharding=sharding.batch_sharding(mesh))  # fmt: skip
    else:
        source = ReplayRollout() if cfg.rollouts else SamplerRollout(policy_graphdef, model_config.arch, cfg.max_gen_len,
                                                                     tokenizer.eos_id)  # fmt: skip
        batches = RolloutBatches(prompts, source, tokenizer=tokenizer, arch=model_config.arch,
                                 num_generations=cfg.num_generations, max_seq_len=cfg.max_seq_len,
                                 max_gen_len=cfg.max_gen_len, thinking_ratio=cfg.thinking_ratio, rewards=rewards,
                                 old_log_probs=make_old_log_probs(policy_graphdef) if objective.reads_old_log_probs else None,
                                 layout=trainer_layout(cfg.mode, model_config.arch),
                                 tracker=SPOTracker() if cfg.mode == "spo" else None,
                                 sharding=sharding.batch_sharding(mesh))  # fmt: skip
        if token_ppo:
            batches = PPOEpochs(batches, policy_graphdef=policy_graphdef, critic_graphdef=critic_graphdef,
                                reference_params=reference_params, ppo_update_iters=cfg.ppo_update_iters,
                                mini_batch_size=cfg.mini_batch_size, accumulation_steps=acc, gamma=cfg.gamma,
                                lam=cfg.lam, seed=cfg.seed, shuffle=bool(cfg.shuffle),
                                sharding=sharding.batch_sharding(mesh))  # fmt: skip

    def old_actor_due(micro_step: int) -> bool:
        """2510's PPO makes the old actor the actor after micro-step s (1-based in its epoch) when (s + 1) % freq
        is 0."""
        return cfg.mode == "ppo" and (((micro_step - 1) % len(prompts) + 1) + 1) % cfg.update_old_actor_freq == 0

    def rollout_micro_batches(state: RunState, size: int) -> list:
        """The update's micro-batches, each rolled out with the weights of this update; the statistics are the
        last one's, as MiniMind logs its last micro-step. PPO: the old actor's log-probs come from the old actor
        at each micro-step (the actor itself once it was refreshed since the last optimizer step)."""
        done = plan.previous_micro_step(state.update + 1)
        if done and old_actor_due(done):  # refreshed after the last update's optimizer step
            state.params = {**state.params, "old_actor": jax.tree.map(jnp.copy, state.params["actor"])}
        micro_batches, refreshed = [], False
        for index in range(size):
            seed = int(np.random.SeedSequence([cfg.seed, state.batches.step]).generate_state(1)[0])
            old = state.params["actor" if refreshed else "old_actor"] if cfg.mode == "ppo" else None
            batch, state.host_metrics = state.batches.next_batch(policy(state.params), seed, old_params=old)
            micro_batches.append(batch)
            refreshed |= index < size - 1 and old_actor_due(done + index + 1)
        if refreshed:  # the actor has not moved since the update began: the old actor is it from here on
            state.params = {**state.params, "old_actor": jax.tree.map(jnp.copy, state.params["actor"])}
        return micro_batches

    steps = batches.steps if token_ppo else lambda state, size: [rollout_micro_batches(state, size)]
    return RLRun(
        objective,
        plan,
        schedule_updates,
        graphdef,
        params,
        opt_state,
        param_shardings,
        opt_shardings,
        frozen_params,
        step_fn,
        batches,
        steps,
        token_ppo,
    )


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs the whole RL job; returns a summary (final reward, paths)."""
    return run_job(cfg, _train)


def _train(cfg: TrainConfig, is_main: bool, lock: RunLock) -> dict[str, Any]:
    earlier = keep_earlier_run(cfg, is_main)
    mesh = sharding.make_mesh(cfg.mesh)
    platform = jax.devices()[0].platform
    dtype = cfg.dtype or default_dtype(platform)
    step = train_step_settings(cfg.fast_path, platform, dtype, cfg.max_seq_len + cfg.max_gen_len,
                               attention_impl=cfg.attention_impl, scan_layers=cfg.scan_layers)  # fmt: skip
    model = build_model(cfg, dtype, step)
    model_config = model.config
    check_room(model_config, cfg.max_seq_len, cfg.max_gen_len)
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    check_fits(tokenizer, model_config.arch, model_config.vocab_size)
    if cfg.rollouts:
        records = (load_agent_replay if cfg.mode == "agent" else load_replay)(
            cfg.rollouts, num_generations=cfg.num_generations, max_gen_len=cfg.max_gen_len,
            vocab_size=model_config.vocab_size, eos_id=tokenizer.eos_id)  # fmt: skip
    else:
        records = (load_agent_prompts if cfg.mode == "agent" else load_prompts)(cfg.data_path, strict=cfg.strict)
    rewards = reward_settings(cfg, model_config.arch, is_main)
    run = assemble(cfg, model, records, tokenizer, mesh, rewards)
    del model
    plan, prompts, objective = run.plan, run.batches, run.objective

    lock.take()
    move_earlier_run_aside(earlier, is_main)
    checkpoints = TrainCheckpoints(cfg.run_checkpoint_dir, max_to_keep=cfg.keep_checkpoints)
    state = RunState(update=0, params=run.params, opt_state=run.opt_state,
                     rng=jax.random.key_data(jax.random.key(cfg.seed)), batches=run.batches)  # fmt: skip
    resumed_meta = resume(cfg, checkpoints, state, run.param_shardings, run.opt_shardings, is_main)
    wandb_id = resumed_meta.get("wandb_id")
    if is_main:
        drop_metrics_after(cfg.log_dir / "metrics.jsonl", state.update)
    wandb_run = WandbRun(cfg, resume_id=wandb_id) if cfg.use_wandb and is_main else None
    wandb_id = wandb_run.id if wandb_run is not None else wandb_id
    last_update = len(plan) if cfg.max_steps is None else min(len(plan), cfg.max_steps)
    peak_flops, peak_source = total_peak_flops(dtype)
    logger = RLMetricLogger(cfg, schedule_updates=run.schedule_updates, steps_per_epoch=len(prompts), plan=plan,
                            last_update=last_update, start_update=state.update,
                            flops_per_token=model_flops_per_token(model_config), peak_flops=peak_flops,
                            writer=MetricsWriter(cfg.log_dir, is_main, wandb_run), is_main=is_main)  # fmt: skip
    meta = run_meta(cfg, model_config, wandb_id, **({"policy_params": "actor"} if cfg.mode == "ppo" else {}))
    pth_path = pathlib.Path(cfg.save_dir) / f"{cfg.run_name}.pth"
    export = lambda model: save_pth(model.actor if cfg.mode == "ppo" else model, pth_path)  # MiniMind saves the actor
    checkpointer = Checkpointer(checkpoints, logger, run.graphdef, export, meta, state.update, is_main)
    preemption = Preemption(checkpointer)

    trainer = Trainer(run.step_fn, update_sizes=plan.sizes, last_update=last_update, frozen_params=run.frozen_params,
                      on_compiled=logger.step_compiled, steps=run.steps)  # fmt: skip
    trainer.add_hook(logger)
    trainer.add_hook(checkpointer, every=save_due(plan, cfg.save_interval, last_update))
    trainer.add_hook(preemption)
    if is_main:
        source_line = f"replaying {cfg.rollouts}" if cfg.rollouts else f"sampling from {cfg.data_path}"
        tqdm.tqdm.write(
            f"{cfg.mode} ({objective.variant}): {model_config.arch} hidden {model_config.hidden_size} × "
            f"{model_config.num_hidden_layers} layers, mesh {dict(mesh.shape)}, compute {dtype} (weights and "
            f"optimizer float32); {source_line}: {len(records)} prompts, {cfg.batch_size} × {cfg.num_generations} "
            f"completions per batch, {len(prompts)} batches/epoch, {len(plan)} "
            + (
                f"rollouts, each {cfg.ppo_update_iters} epochs of minibatches of {cfg.mini_batch_size}"
                if run.token_ppo
                else "updates"
            )
        )
    try:
        finished = trainer.train(state)
        logger.flush()
    except (TooManySkips, UserError) as error:  # a bad reward mid-run: the updates before it are kept
        if state.update == 0:
            raise
        checkpointer.save(state, wait=True)
        raise UserError(f"{error}; saved update {state.update} to {checkpoints.directory}") from None
    finally:
        preemption.restore()
        logger.close()
    if not finished:
        return {"preempted": True, "update": state.update}
    checkpointer.save(state, wait=True)
    checkpoints.close()
    summary = {
        "updates": state.update,
        **logger.summary(),
        "final_reward": logger.history[-1]["reward"] if logger.history else None,
        "weights": str(pth_path),
        "checkpoints": str(checkpoints.directory),
        "peak_flops": peak_flops,
        "peak_flops_source": peak_source,
    }
    return write_summary(cfg, summary, logger.history, is_main)
