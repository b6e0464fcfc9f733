"""`python main.py bench`: the train-step benchmark (bench/train_step.py), or with `--objective grpo` one whole
RL update (bench/rl_update.py); both take the same flags."""

from __future__ import annotations

from minimind_jax.bench import rl_update, train_step

add_arguments = train_step.add_arguments


def run(args) -> int:
    return (rl_update.run if args.objective in rl_update.RL_OBJECTIVES else train_step.run)(args)
