"""Sharded parameters (``DTensor``, as FSDP2 ``fully_shard`` and tensor parallelism make them), seen from one rank.

Every rank holds a box of each sharded weight: its local shard, at an offset in the full weight. The engine
keeps masks, multipliers and running scores for that box only and works on ``to_local()`` views; anything
that needs the whole weight (counts, selection) is an explicit collective that every rank calls.

A box held by several ranks (a ``Replicate`` mesh dimension, or a plain tensor that tensor parallelism left
out of its plan) is *counted* by one of them only, its owner, so that no weight counts twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "CHECKPOINT_PREFIX",
    "Box",
    "all_reduce_ints",
    "box_of",
    "crop",
    "every_box",
    "is_dtensor",
    "local",
    "mark",
    "marked",
    "placed",
    "put",
    "ravel",
    "sharded_group",
    "template_like",
    "walk",
]

try:  # torch.distributed.tensor exists on every platform with distributed support
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - builds without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (a sharded or replicated tensor over a device mesh)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The shard of ``t`` on this rank, as a plain tensor sharing its storage (``t`` itself if it is not a DTensor).

    Example:
        >>> local(torch.ones(2)).shape
        torch.Size([2])
    """
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Box:
    """Where this rank's shard of a weight sits in the full weight.

    Attributes:
        shape: the full weight's shape.
        local_shape: the shard's shape (any size may be 0: an empty shard).
        offset: the shard's first index along each dimension.
        owner: this rank counts the box (the first of the ranks that hold the same box).
        split: the dimensions of the weight that are split across ranks.

    Example:
        >>> Box((26, 5), (13, 5), (13, 0), True, (0,)).stop(0)
        26
    """

    shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    offset: tuple[int, ...]
    owner: bool
    split: tuple[int, ...]

    def stop(self, dim: int) -> int:
        """The index one past the shard's last along ``dim``."""
        return self.offset[dim] + self.local_shape[dim]

    def describe(self) -> str:
        """The shard as slices, e.g. ``[13:26, 0:5]``, for error messages."""
        return "[" + ", ".join(f"{a}:{a + n}" for a, n in zip(self.offset, self.local_shape)) + "]"

    def units(self, pattern: Any) -> tuple[tuple[int, ...], tuple[int, ...], bool] | None:
        """Where this shard's units of ``pattern`` sit (see ``Pattern.shard_units``); None if it cuts one."""
        return pattern.shard_units(self.shape, self.offset, self.local_shape)

    def crop(self, whole: Tensor) -> Tensor:
        """The part of a tensor shaped like the whole weight that this shard covers."""
        return crop(whole, self.offset, self.local_shape)


def crop(whole: Tensor, offset: Sequence[int], shape: Sequence[int]) -> Tensor:
    """The box of ``whole`` at ``offset`` of ``shape`` (a view).

    Example:
        >>> crop(torch.arange(6).reshape(2, 3), (0, 1), (2, 2))
        tensor([[1, 2],
                [4, 5]])
    """
    return whole[tuple(slice(a, a + n) for a, n in zip(offset, shape))]


def _local_shape_and_offset(t: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    # The one use of a private torch helper (SHARDING.md): correct for uneven, empty and 2-D placements.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(shape), tuple(offset)


def _splits(placement: Any) -> bool:
    """Whether a placement splits a dimension: ``Shard``, or the ``_StridedShard`` of FSDP over tensor parallel."""
    return not placement.is_replicate() and not placement.is_partial() and getattr(placement, "dim", None) is not None


def box_of(t: Tensor, sharded: bool) -> Box:
    """The box this rank holds of ``t``.

    Args:
        t: a parameter, DTensor or plain.
        sharded: whether the model is sharded at all; a plain tensor then is replicated on every rank and
            owned by rank 0.

    Example:
        >>> box_of(torch.ones(4, 3), sharded=False)
        Box(shape=(4, 3), local_shape=(4, 3), offset=(0, 0), owner=True, split=())
    """
    shape = tuple(t.shape)
    if not is_dtensor(t):
        owner = not sharded or dist.get_rank() == 0
        return Box(shape, shape, (0,) * len(shape), owner, ())
    local_shape, offset = _local_shape_and_offset(t)
    mesh = t.device_mesh  # type: ignore[attr-defined]
    coordinate = mesh.get_coordinate()
    # A mesh smaller than the world is one of several copies (e.g. the data-parallel mesh of a layer that
    # tensor parallelism left out): the copy that holds rank 0 counts.
    owner = coordinate is not None and (mesh.size() == dist.get_world_size() or 0 in mesh.mesh.flatten().tolist())
    split: list[int] = []
    for mesh_dim, placement in enumerate(t.placements):  # type: ignore[attr-defined]
        if _splits(placement):
            dim = placement.dim % len(shape)
            if dim not in split:
                split.append(dim)
        elif owner and coordinate[mesh_dim] != 0:  # Replicate (or Partial): the box repeats along this dim
            owner = False
    return Box(shape, local_shape, offset, owner, tuple(sorted(split)))


def every_box(t: Tensor) -> list[tuple[int, Box]]:
    """The box of ``t`` that each rank of its mesh holds, by global rank, computed here without communicating.

    Example:
        >>> every_box(torch.ones(2, 2))[0][1].local_shape
        (2, 2)
    """
    if not is_dtensor(t):
        return [(0, box_of(t, sharded=False))]
    import itertools

    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    mesh, placements = t.device_mesh, t.placements  # type: ignore[attr-defined]
    ranks = mesh.mesh  # global rank at each coordinate
    shape = tuple(t.shape)
    split = tuple(sorted({p.dim % len(shape) for p in placements if _splits(p)}))
    out = []
    for coordinate in itertools.product(*(range(n) for n in mesh.shape)):
        local_shape, offset = _compute_local_shape_and_global_offset(shape, mesh.shape, list(coordinate), placements)
        owner = all(c == 0 for c, p in zip(coordinate, placements) if not _splits(p))
        out.append((int(ranks[coordinate]), Box(shape, tuple(local_shape), tuple(offset), owner, split)))
    return out


def placed(t: Tensor, like: Tensor, shape: Sequence[int] | None = None) -> Tensor:
    """``t``, a local shard, as a DTensor placed like ``like`` (of global ``shape``, default ``like``'s).

    ``t`` itself when ``like`` is a plain tensor. No communication: every rank passes its own shard.

    Example:
        >>> placed(torch.ones(2), torch.zeros(2)).shape
        torch.Size([2])
    """
    if not is_dtensor(like):
        return t
    shape = tuple(like.shape if shape is None else shape)
    stride = tuple(math.prod(shape[d + 1 :]) for d in range(len(shape)))
    return DTensor.from_local(
        t,
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=torch.Size(shape),
        stride=stride,
    )


def template_like(like: Tensor | None, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """An empty tensor of global ``shape`` placed like ``like`` (standard chunks), to load a saved shard into.

    A plain tensor when ``like`` is not a DTensor (or is None).

    Example:
        >>> template_like(None, (2, 3), torch.bool).shape
        torch.Size([2, 3])
    """
    if like is None or not is_dtensor(like):
        return torch.empty(tuple(shape), dtype=dtype)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, _ = compute_local_shape_and_global_offset(tuple(shape), like.device_mesh, like.placements)  # type: ignore[attr-defined]
    return placed(torch.empty(tuple(local_shape), dtype=dtype, device=local(like).device), like, shape)


# A callback state entry whose tensor lives in a distributed checkpoint's state_dict: a string "dcp:<key>", the
# key starting with CHECKPOINT_PREFIX (callback state itself is written by rank 0 alone).
CHECKPOINT_PREFIX = "lightning_prune."
_MARK = "dcp:"


def mark(key: str) -> str:
    """The marker left in callback state for a tensor saved under ``key`` in the distributed checkpoint."""
    return _MARK + key


def marked(value: object) -> str | None:
    """The distributed-checkpoint key a marker names, or None for any other value.

    Example:
        >>> marked(mark("lightning_prune.a.masks.w")), marked("4x1")
        ('lightning_prune.a.masks.w', None)
    """
    return value[len(_MARK) :] if isinstance(value, str) and value.startswith(_MARK) else None


def walk(state: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every ``(path, value)`` of the tensors and strings nested in ``state``'s mappings."""
    if isinstance(state, Mapping):
        for key, value in state.items():
            yield from walk(value, (*path, str(key)))
    elif isinstance(state, (Tensor, str)):
        yield path, state


def put(state: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set the entry of nested mappings at ``path`` (as :func:`walk` gives it)."""
    for key in path[:-1]:
        state = state[key]
    state[path[-1]] = value


def sharded_group(params: Sequence[Tensor]) -> Any:
    """The process group that selection counts over: all ranks, if any of ``params`` is a DTensor; else None.

    Example:
        >>> sharded_group([torch.ones(2)]) is None
        True
    """
    if any(is_dtensor(p) for p in params) and dist.is_initialized():
        return dist.group.WORLD
    return None


def all_reduce_ints(values: Sequence[int], group: Any, op: str = "sum") -> list[int]:
    """``values`` combined element-wise over ``group`` (themselves without a group): one collective.

    Example:
        >>> all_reduce_ints([1, 2], None)
        [1, 2]
    """
    if group is None or not values:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return [int(v) for v in t]


def ravel(index: Tensor, offset: Sequence[int], local_shape: Sequence[int], shape: Sequence[int]) -> Tensor:
    """Flat positions in the full ``shape`` of flat positions ``index`` in a box at ``offset``.

    Example:
        >>> ravel(torch.tensor([0, 3]), (2, 0), (2, 3), (4, 3))
        tensor([6, 9])
    """
    out = torch.zeros_like(index)
    rest = index.clone()
    for dim in range(len(shape) - 1, -1, -1):
        size = max(int(local_shape[dim]), 1)
        out += (rest % size + int(offset[dim])) * math.prod(int(s) for s in shape[dim + 1 :])
        rest = rest // size
    return out
