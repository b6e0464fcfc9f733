"""The MiniMind transformer: its config, the Flax NNX modules and the parameter tree."""
