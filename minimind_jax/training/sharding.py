"""Device mesh, parameter sharding rules and batch sharding.

The mesh always has three axes, (data, fsdp, tensor); `--mesh data=2,fsdp=2,tensor=2` sizes them and an
omitted axis has size 1. A mesh smaller than the device count uses the first devices (in one process).
Batches are split over data×fsdp. Parameters follow logical-axis rules: the hidden (embed) dimension is
split over fsdp, heads / MLP width / vocab over tensor. Attention projections split by whole heads, so a
device's query heads read kv heads it holds; a dimension that the axis size does not divide (the kv heads
when tensor does not divide their count, for instance) stays replicated, so every preset runs on every mesh.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from minimind_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axes of each parameter, by its name in the parameter tree (see model.py for the layouts).
# "layers" and "experts" are the stacked axes; they are never split.
LOGICAL_AXES = {
    "embed_tokens": ("vocab", "embed"),
    "q_proj": ("layers", "embed", "heads"),
    "k_proj": ("layers", "embed", "kv_heads"),
    "v_proj": ("layers", "embed", "kv_heads"),
    "o_proj": ("layers", "heads", "embed"),
    "gate_proj": ("layers", "embed", "mlp"),
    "up_proj": ("layers", "embed", "mlp"),
    "down_proj": ("layers", "mlp", "embed"),
    "router": ("layers", "embed", None),
}
RULES = {"embed": "fsdp", "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor"}


def parse_mesh(spec: str | None, num_devices: int) -> dict[str, int]:
    """ "data=2,fsdp=2,tensor=2" -> axis sizes; None puts every device on the data axis. The sizes may
    multiply to fewer devices than num_devices, never to more."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    if not spec:
        sizes["data"] = num_devices
        return sizes
    named = set()
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in sizes or name in named or not value.strip().isdigit() or int(value) < 1:
            raise UserError(
                f"--mesh {spec!r}: expected comma-separated axis=size, each of {', '.join(MESH_AXES)} at most once"
            )
        named.add(name)
        sizes[name] = int(value)
    if math.prod(sizes.values()) > num_devices:
        raise UserError(
            f"--mesh {spec!r} needs {math.prod(sizes.values())} devices, but only {num_devices} are present"
        )
    return sizes


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    """The mesh on the first devices that `spec` asks for (all of them by default)."""
    devices = jax.devices() if devices is None else devices
    sizes = parse_mesh(spec, len(devices))
    used = math.prod(sizes.values())
    if used < len(devices) and jax.process_count() > 1:
        # Each process feeds its own devices' rows; a subset would leave some processes without a device.
        raise UserError(
            f"--mesh {spec!r} uses {used} of the {len(devices)} devices, but with "
            f"{jax.process_count()} processes the mesh must span all {len(devices)}"
        )
    grid = np.asarray(devices[:used]).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def split_batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The batch axes that actually split the batch (size > 1), in mesh order."""
    return tuple(axis for axis in BATCH_AXES if mesh.shape[axis] > 1)


def batch_size_per_step(mesh: Mesh) -> int:
    """How many ways the batch is split: the global batch must be a multiple of this."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _leaf_spec(path, shape, mesh: Mesh, whole_units: dict[str, int]) -> P:
    keys = [str(getattr(p, "key", "")).removeprefix("shared_") for p in path]  # 2510 shared experts as experts
    name = next((k for k in reversed(keys) if k in LOGICAL_AXES), None)
    if name is None:  # norms and other small vectors are replicated
        return P()
    logical = LOGICAL_AXES[name]
    if len(logical) < len(shape):  # stacked experts: [L, E, ...] ("experts" is inserted after "layers")
        logical = logical[:1] + ("experts",) + logical[1:]
    spec = []
    for axis, size in zip(logical, shape):
        mesh_axis = RULES.get(axis)
        splits = mesh.shape[mesh_axis] if mesh_axis else 1
        spec.append(mesh_axis if splits > 1 and whole_units.get(axis, size) % splits == 0 else None)
    return P(*spec)


def tree_shardings(tree, mesh: Mesh, config):
    """A NamedSharding for every leaf of a parameter tree, or of an optimizer state that mirrors one
    (its moments sit under the same parameter names; its scalars are replicated).

    config: the model's ModelConfig; its head counts decide whether the head dimensions split.
    """
    # The [.., H·Hd] and [.., K·Hd] dimensions split only into whole heads. A device's contiguous block of
    # H/tensor query heads then reads kv heads it holds (head h reads h // G): its block of K/tensor when
    # tensor divides K, all K (replicated) otherwise.
    whole_units = {"heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads}
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, _leaf_spec(path, x.shape, mesh, whole_units)), tree
    )
