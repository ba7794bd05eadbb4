"""One plain checkpoint file from a distributed (sharded) checkpoint directory written under ModelParallelStrategy."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_prune.sharding import CHECKPOINT_PREFIX, marked, put, walk

__all__ = ["consolidate_checkpoint"]

_META = "meta.pt"  # what Lightning's ModelParallelStrategy writes beside the shards: everything but weights


def consolidate_checkpoint(path: str | os.PathLike[str], output: str | os.PathLike[str]) -> Path:
    """Turn a distributed checkpoint directory into one file that loads like an unsharded Lightning checkpoint.

    The directory is what ``ModelCheckpoint`` writes under ``ModelParallelStrategy``: one shard per rank and
    ``meta.pt``. Lightning's own ``consolidate_checkpoint`` cannot read it (it expects FSDP1's layout). Here:

    - ``state_dict`` holds the model's whole weights (pruned ones exactly zero) under their own names, so
      that it loads into the plain, unsharded model with ``strict=True``;
    - this library's masks and running scores, which the shards carried, go back into the callback state
      (``checkpoint["callbacks"]``) as whole tensors, so that pruning resumes or the masks can be locked;
    - optimizer states are converted to the plain ``torch.optim`` layout (parameters numbered in the order of
      the optimizer's groups), so that ``Trainer.fit(ckpt_path=output)`` on one device resumes;
    - the file loads with ``torch.load(output, weights_only=True)``.

    Everything is read into memory once: the machine needs room for the whole model and optimizer state.

    Args:
        path: the checkpoint directory.
        output: the file to write.

    Returns:
        ``output`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``path`` is not a distributed checkpoint directory (no ``meta.pt`` or no shards).

    Example:
        >>> from lightning_prune.export import consolidate_checkpoint
        >>> consolidate_checkpoint("ckpt/epoch=0-step=100.ckpt", "pruned.ckpt")  # doctest: +SKIP
        >>> model.load_state_dict(torch.load("pruned.ckpt", weights_only=True)["state_dict"])  # doctest: +SKIP
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    source, target = Path(path), Path(output)
    if not source.is_dir() or not (source / _META).is_file() or not any(source.glob("*.distcp")):
        raise ValueError(
            f"path {str(source)!r} is not a distributed checkpoint directory (one written by ModelCheckpoint under "
            f"ModelParallelStrategy holds *.distcp shards and {_META})"
        )
    with tempfile.TemporaryDirectory() as scratch:
        whole_file = Path(scratch) / "whole.pt"
        dcp_to_torch_save(source, whole_file)
        whole = torch.load(whole_file, map_location="cpu", weights_only=True)
    meta = torch.load(source / _META, map_location="cpu", weights_only=True)
    state_dict: dict[str, Any] = whole.pop("state_dict")
    for state in meta.get("callbacks", {}).values():
        for entry, value in list(walk(state)):  # markers back to the tensors the shards carried
            key = marked(value)
            if key is not None and key in state_dict:
                put(state, entry, state_dict.pop(key))
    for key in [k for k in state_dict if k.startswith(CHECKPOINT_PREFIX)]:  # stray entries of callbacks not in meta
        del state_dict[key]
    checkpoint = {**meta, "state_dict": state_dict}
    optimizers = sorted((k for k in whole if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    if optimizers:
        checkpoint["optimizer_states"] = [_numbered(whole[k]) for k in optimizers]
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target)
    return target


def _numbered(optimizer: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter names (as DCP saves it) in ``torch.optim``'s numbered layout."""
    groups = [dict(group) for group in optimizer.get("param_groups", [])]
    index: dict[Any, int] = {}
    for group in groups:
        group["params"] = [index.setdefault(name, len(index)) for name in group["params"]]
    state = {index[name]: value for name, value in optimizer.get("state", {}).items() if name in index}
    return {"state": state, "param_groups": groups}
