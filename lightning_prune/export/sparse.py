"""Compact checkpoints: masked weights stored as a packed bitmask plus their kept values (safetensors)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["load_sparse", "save_sparse"]


_META_KEY = "lightning_prune.sparse"


def save_sparse(
    state_dict_or_model: Mapping[str, Tensor] | nn.Module, path: str | Path, masks: Mapping[str, Tensor]
) -> dict[str, int]:
    """Write a compact safetensors file: masked weights as a packed bitmask plus their kept values.

    Unmasked tensors are stored dense. :func:`load_sparse` restores an identical dense state_dict.

    Args:
        state_dict_or_model: a state_dict or a module (its ``state_dict()``).
        path: the ``.safetensors`` file to write.
        masks: parameter name → bool mask (True = kept); values outside the mask are dropped.

    Returns:
        ``{"bytes": file size, "dense_bytes": size of the dense tensors}``.

    Example:
        >>> import tempfile, os
        >>> sd = {"w": torch.tensor([[1.0, 0.0], [0.0, 2.0]])}
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> _ = save_sparse(sd, path, {"w": sd["w"] != 0})
        >>> torch.equal(load_sparse(path)["w"], sd["w"])
        True
    """
    from safetensors.torch import save_file

    state = state_dict_or_model.state_dict() if isinstance(state_dict_or_model, nn.Module) else state_dict_or_model
    missing = sorted(set(masks) - set(state))
    if missing:
        raise ValueError(f"masks name tensors the state_dict does not have: {missing[:5]}")
    tensors: dict[str, Tensor] = {}
    layout: dict[str, Any] = {}
    dense_bytes = 0
    for name, value in state.items():
        value = value.detach().cpu().contiguous()
        dense_bytes += value.numel() * value.element_size()
        if name in masks:
            mask = masks[name].detach().cpu().bool()
            if tuple(mask.shape) != tuple(value.shape):
                raise ValueError(f"mask for '{name}' has shape {tuple(mask.shape)}, the tensor {tuple(value.shape)}")
            tensors[f"{name}::values"] = value[mask].contiguous()
            tensors[f"{name}::bits"] = _pack(mask.flatten())
            layout[name] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
        else:
            tensors[name] = value
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(layout)})
    return {"bytes": Path(path).stat().st_size, "dense_bytes": dense_bytes}


def load_sparse(path: str | Path) -> dict[str, Tensor]:
    """The dense state_dict of a file written by :func:`save_sparse` (pruned entries are zero)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        layout = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
        stored = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    state: dict[str, Tensor] = {}
    for key, value in stored.items():
        if "::" not in key:
            state[key] = value
    for name, info in layout.items():
        shape = tuple(info["shape"])
        mask = _unpack(stored[f"{name}::bits"], math.prod(shape)).reshape(shape)
        values = stored[f"{name}::values"]
        dense = torch.zeros(shape, dtype=getattr(torch, info["dtype"]))
        dense[mask] = values
        state[name] = dense
    return state


def _pack(bits: Tensor) -> Tensor:
    padded = torch.zeros(math.ceil(bits.numel() / 8) * 8, dtype=torch.uint8)
    padded[: bits.numel()] = bits.to(torch.uint8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (padded.reshape(-1, 8) * weights).sum(1, dtype=torch.uint8)


def _unpack(packed: Tensor, n: int) -> Tensor:
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
    return ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:n].bool()
