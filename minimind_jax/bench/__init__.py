"""Benchmarks against PyTorch MiniMind: our step and the PyTorch side in its own process."""
