"""minimind-jax: MiniMind in JAX/Flax NNX.

Public API (stable): `load`, `save_pth`, `save_hf`, `generate`, `ModelConfig`, `MiniMind`, `load_preset`.
Submodules are imported on first use so that light tools (the CLI's --help, `convert`) start quickly.
"""

import importlib

_EXPORTS = {
    "ModelConfig": "minimind_jax.model.config",
    "load_preset": "minimind_jax.model.config",
    "MiniMind": "minimind_jax.model.transformer",
    "load": "minimind_jax.weights",
    "save_pth": "minimind_jax.weights",
    "save_hf": "minimind_jax.weights.hf",
    "generate": "minimind_jax.inference.generation",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'minimind_jax' has no attribute {name!r}")
