"""Training: the run config, objectives, the sharded step, optimizer, the run loop and its hooks,
checkpoints and metrics."""
