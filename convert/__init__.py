"""`python -m convert IN OUT` from the repository root: MiniMind .pth <-> minimind-jax checkpoint.

The conversion code is `minimind_jax.weights` and `minimind_jax.convert_cli`; installed, the same command is
`minimind-jax convert IN OUT`.
"""
