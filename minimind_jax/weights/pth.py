"""Reading and writing MiniMind `.pth` files. torch is imported here and nowhere on the training path."""

from __future__ import annotations

import io
import pathlib
import pickle
import zipfile
from collections import OrderedDict

import numpy as np

from minimind_jax.errors import UserError, first_line

DTYPES = ("float16", "float32", "bfloat16")


def read_state_dict(path) -> dict[str, np.ndarray]:
    """A MiniMind weights file (plain state dict, or a resume dict's `model`) as numpy arrays.

    Loaded with `weights_only=True`: a pickle that would run code is refused, never executed.
    """
    import torch

    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # A pickle naming a function or class (what a code payload does), in a zip .pth or a legacy one.
        if not zipfile.is_zipfile(path) and "GLOBAL" not in str(error):
            raise UserError(f"{path}: not a .pth file (truncated or corrupt?)") from None
        raise UserError(
            f"{path}: refused to load: it holds objects other than tensors ({_unsafe_detail(error)}); "
            f"only plain state dicts are read (weights_only=True)"
        ) from None
    except Exception as error:  # torch raises many types for damaged files (a text file: KeyError)
        raise UserError(f"{path}: not a readable .pth file (truncated or corrupt?): {first_line(error)}") from None
    if isinstance(loaded, dict) and "model" in loaded and isinstance(loaded["model"], dict):
        loaded = loaded["model"]  # MiniMind's resume checkpoint {model, optimizer, epoch, step, ...}
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"{path}: not a state dict of tensors (got {type(loaded).__name__})")
    # DDP-wrapped or torch.compile'd models prefix their keys; MiniMind strips these when loading too.
    return {
        _strip_prefix(k): v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
        for k, v in loaded.items()
    }


def _unsafe_detail(error: Exception) -> str:
    """The line of torch's weights_only refusal that names the offending global."""
    lines = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line]
    return (lines[0] if lines else "unsupported pickle content")[:200]


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def write_state_dict(state_dict: OrderedDict[str, np.ndarray], path, dtype: str = "float16") -> pathlib.Path:
    """torch.save of {key: tensor} in `dtype`, MiniMind's exact format; written atomically, so a failed write
    (a full disk) leaves the previous file as it was."""
    import torch

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    tensors = OrderedDict((k, torch.from_numpy(np.array(v, copy=True)).to(torch_dtype)) for k, v in state_dict.items())
    path = pathlib.Path(path)
    serialized = io.BytesIO()  # torch's own file writer reports a full disk as an opaque RuntimeError
    torch.save(tensors, serialized)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(serialized.getbuffer())
        tmp.replace(path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write ({(error.strerror or str(error)).lower()})") from None
    return path
