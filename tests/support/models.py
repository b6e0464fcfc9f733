"""Tiny model configs, the torch reference with random weights, and batches in the reference's form."""

import torch

from minimind_jax.bench.torch_reference import MiniMindTorch
from minimind_jax.model.config import ModelConfig, load_preset


def tiny(preset: str) -> ModelConfig:
    """The preset's layout (era, heads/kv, MoE) at a width and depth that test in seconds."""
    fields = load_preset(preset).to_dict()
    fields.update(
        hidden_size=64, num_hidden_layers=2, head_dim=None, intermediate_size=None, moe_intermediate_size=None
    )
    return ModelConfig(**fields)


def tiny_config(arch, use_moe):
    return ModelConfig(arch=arch, hidden_size=64, num_hidden_layers=2, use_moe=use_moe, vocab_size=512)


def random_torch_model(config, seed=0) -> MiniMindTorch:
    """Reference model with every parameter random, norms included (as the goldens are made)."""
    torch.manual_seed(seed)
    model = MiniMindTorch(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * (0.3 if "norm" in name else 0.1) + (1.0 if "norm" in name else 0.0))
    return model.eval()


def torch_batch(batch):
    return (
        torch.from_numpy(batch["inputs"]).long(),
        torch.from_numpy(batch["targets"]).long(),
        torch.from_numpy(batch["loss_mask"]),
    )
