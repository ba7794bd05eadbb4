"""How weights group into units that are pruned together.

A pattern does two things: it reduces an element-wise score tensor (shaped like the weight) to one score per
unit, and it expands a per-unit decision back to an element mask. Scores of weights that are already pruned
arrive as ``-inf``, so units holding them sort first and masks stay monotone.

Layouts (DESIGN.md): a Linear weight is ``[out, in]``; a convolution weight ``[out, in, *kernel]`` is viewed
as the matrix ``[out, prod(kernel) * in]`` with the input channel innermost, so ``NxM`` blocks and ``N:M``
groups run along input channels, as sparse kernels expect.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = [
    "NM",
    "Block",
    "Channel",
    "Pattern",
    "Unstructured",
    "as_matrix",
    "from_matrix",
    "parse_pattern",
]

_PATTERN_CHOICES = "use 'NxM' (e.g. '4x1'), 'channelx1', '1xchannel', 'N:M' (e.g. '2:4') or 'unstructured'"


def as_matrix(t: Tensor) -> Tensor:
    """View ``[out, in, *kernel]`` as ``[out, prod(kernel) * in]`` with the input channel innermost."""
    if t.dim() <= 2:
        return t
    return t.permute(0, *range(2, t.dim()), 1).reshape(t.shape[0], -1)


def from_matrix(m: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`as_matrix` for a weight of ``shape``."""
    if len(shape) <= 2:
        return m.reshape(shape)
    out, cin, *kernel = shape
    nd = len(shape)
    return m.reshape(out, *kernel, cin).permute(0, nd - 1, *range(1, nd - 1))


class Pattern(ABC):
    """Base class: a pattern reduces element scores to unit scores and expands unit decisions back.

    A pattern declares what it is in a few attributes, so that no caller has to ask for its class:

    - ``max_sparsity``: the most it can prune (``N:M`` reaches N/M).
    - ``linear``: units hold several weights and a unit's score is a fixed weighted mean of theirs (so
      running scores can be kept per unit: the mean of a running sum is the running sum of the means).
    - ``unit_rows``: every unit lies within one aligned group of that many rows along dim 0, so row slices of
      a weight that start at multiples of it hold whole units; None where a unit spans all rows.
    - ``structured``: units hold more than one weight (False for unstructured).
    - ``whole_units``: pruning a unit zeroes all of it (False for ``N:M``, which zeroes N of its M).
    - ``output_units``: a unit is a whole output channel, so the bias and the norm entries that read it can
      be kept at zero with it (``1xchannel``).
    """

    max_sparsity: float = 1.0
    linear: bool = False
    unit_rows: int | None = 1
    structured: bool = True
    whole_units: bool = True
    output_units: bool = False

    def check(self, fqn: str, shape: torch.Size | tuple[int, ...]) -> None:
        """Raise ``ValueError`` if this pattern cannot apply to a weight of ``shape``."""
        if len(shape) < 2:
            raise ValueError(
                f"pattern '{self}' needs a weight with at least 2 dimensions; '{fqn}' has shape "
                f"{tuple(shape)}; exclude it or use pattern='unstructured'"
            )

    @abstractmethod
    def unit_scores(self, scores: Tensor) -> Tensor:
        """Reduce ``scores`` (shaped like the weight) to one score per unit."""

    @abstractmethod
    def unit_sizes(self, shape: torch.Size | tuple[int, ...]) -> int | Tensor:
        """Elements pruned with each unit: an int when all units are equal, else a tensor like the units."""

    @abstractmethod
    def expand(self, pruned_units: Tensor, scores: Tensor) -> Tensor:
        """Turn a bool tensor over units (True = prune) into a bool tensor over elements (True = prune)."""

    def unit_view(self, shape: torch.Size | tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """A view of a contiguous weight of ``shape`` in which every unit is a box, or None if there is none.

        Returns ``(view_shape, unit_dims)``: each unit's elements differ only along ``unit_dims`` of the view,
        so a per-unit 0/1 tensor (size 1 along ``unit_dims``) broadcasts over the weight: far fewer bytes than
        a per-weight mask, and faster to multiply. None for patterns without whole-box units (unstructured,
        N:M) and where units are cut at the edges (partial blocks).
        """
        return None

    def shard_units(
        self, shape: tuple[int, ...], offset: tuple[int, ...], local_shape: tuple[int, ...]
    ) -> tuple[tuple[int, ...], tuple[int, ...], bool] | None:
        """Where the units of a shard (a box of a weight of ``shape``) sit among the weight's units.

        Returns ``(grid, unit_offset, partial)``: the shape of the whole weight's unit scores, the position of
        the shard's unit scores in it, and whether those are partial (a unit runs past the shard along a
        dimension that is summed over, as a channel does; partial sums then need adding up across shards).
        None if a unit straddles the shard's edge in a way sums cannot mend (e.g. a 4x1 block cut at row 13).

        Example:
            >>> Unstructured().shard_units((26, 5), (13, 0), (13, 5))
            ((26, 5), (13, 0), False)
        """
        return tuple(shape), tuple(offset), False

    def conforms(self, mask: Tensor) -> bool:
        """Whether a keep-mask (True = kept) is made of whole units of this pattern."""
        pruned = ~mask
        scores = torch.where(pruned, -1.0, 0.0)
        units = self.unit_scores(scores) < 0
        return bool(torch.equal(self.expand(units, scores), pruned))


def _matrix_box(
    shape: tuple[int, ...], offset: tuple[int, ...], local_shape: tuple[int, ...]
) -> tuple[int, int, int, int] | None:
    """``(row, rows, col, cols)`` of a shard in the :func:`as_matrix` view; None if it is no box there."""
    if len(shape) == 2:
        return offset[0], local_shape[0], offset[1], local_shape[1]
    if tuple(local_shape[1:]) != tuple(shape[1:]):  # a convolution cut along input channels or kernel
        return None
    return offset[0], local_shape[0], 0, math.prod(shape[1:])


def _aligned(start: int, length: int, end: int, unit: int) -> bool:
    """Whether ``[start, start + length)`` of ``[0, end)`` holds whole units of ``unit`` (edge units cut)."""
    return length == 0 or (start % unit == 0 and (length % unit == 0 or start + length == end))


class Unstructured(Pattern):
    """Every weight is its own unit (alias ``"1x1"``).

    Example:
        >>> Unstructured().unit_sizes((3, 4))
        1
    """

    structured = False

    def check(self, fqn: str, shape: torch.Size | tuple[int, ...]) -> None:
        """Any shape works."""

    def unit_scores(self, scores: Tensor) -> Tensor:
        """Scores are already per unit."""
        return scores

    def unit_sizes(self, shape: torch.Size | tuple[int, ...]) -> int:
        """One element per unit."""
        return 1

    def expand(self, pruned_units: Tensor, scores: Tensor) -> Tensor:
        """Units are elements."""
        return pruned_units

    def __repr__(self) -> str:
        return "unstructured"


class Block(Pattern):
    """``rows x cols`` blocks of the weight matrix: ``rows`` output rows by ``cols`` input columns.

    A block that runs past the edge of a layer is a partial block, scored by its mean and pruned as a unit.

    Args:
        rows: block height along the output dimension.
        cols: block width along the input dimension.

    Example:
        >>> p = Block(4, 1)
        >>> p.unit_scores(torch.ones(8, 3)).shape
        torch.Size([2, 3])
    """

    linear = True

    def __init__(self, rows: int, cols: int) -> None:
        for name, value in (("rows", rows), ("cols", cols)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Block {name} must be a positive int, got {value!r}")
        self.rows = rows
        self.cols = cols
        self.unit_rows = rows

    def _padded(self, m: Tensor, value: float) -> Tensor:
        r, c = m.shape
        pad_r, pad_c = -r % self.rows, -c % self.cols
        if pad_r or pad_c:
            m = torch.nn.functional.pad(m, (0, pad_c, 0, pad_r), value=value)
        return m.reshape(m.shape[0] // self.rows, self.rows, m.shape[1] // self.cols, self.cols)

    def unit_scores(self, scores: Tensor) -> Tensor:
        """Mean score of each block (partial blocks: mean over their existing elements)."""
        m = as_matrix(scores)
        total = self._padded(m, 0.0).sum(dim=(1, 3))
        sizes = self.unit_sizes(tuple(scores.shape))
        return total.div_(sizes if isinstance(sizes, int) else sizes.to(total.device, total.dtype))

    def unit_sizes(self, shape: torch.Size | tuple[int, ...]) -> int | Tensor:
        """``rows * cols``, smaller for partial blocks at the edges."""
        r = shape[0]
        c = math.prod(shape[1:])
        if r % self.rows == 0 and c % self.cols == 0:
            return self.rows * self.cols
        row_sizes = torch.full((math.ceil(r / self.rows),), self.rows, dtype=torch.int64)
        col_sizes = torch.full((math.ceil(c / self.cols),), self.cols, dtype=torch.int64)
        if r % self.rows:
            row_sizes[-1] = r % self.rows
        if c % self.cols:
            col_sizes[-1] = c % self.cols
        return row_sizes[:, None] * col_sizes[None, :]

    def unit_view(self, shape: torch.Size | tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """Blocks as boxes: rows split as (blocks, rows); columns as (blocks, cols) when they tile exactly.

        Example:
            >>> Block(4, 1).unit_view((8, 3))
            ((2, 4, 3), (1,))
        """
        out, cin, *kernel = shape
        if out % self.rows:
            return None
        rows = (out // self.rows, self.rows)
        if self.cols == 1:  # each column is its own block, whatever the column order of the matrix view
            return (*rows, cin * math.prod(kernel)), (1,)
        if cin % self.cols:
            return None  # blocks would straddle kernel positions or be cut at the edge
        return (*rows, cin // self.cols, self.cols, *kernel), (1, 3)

    def shard_units(
        self, shape: tuple[int, ...], offset: tuple[int, ...], local_shape: tuple[int, ...]
    ) -> tuple[tuple[int, ...], tuple[int, ...], bool] | None:
        """Blocks stay whole in a shard whose rows and columns start and end on block edges."""
        box = _matrix_box(shape, offset, local_shape)
        rows, cols = shape[0], math.prod(shape[1:])
        if box is None or not (_aligned(box[0], box[1], rows, self.rows) and _aligned(box[2], box[3], cols, self.cols)):
            return None
        grid = (math.ceil(rows / self.rows), math.ceil(cols / self.cols))
        return grid, (box[0] // self.rows, box[2] // self.cols), False

    def expand(self, pruned_units: Tensor, scores: Tensor) -> Tensor:
        """Repeat each block decision over its elements, cropping partial blocks."""
        m = as_matrix(scores)
        r, c = pruned_units.shape
        full = pruned_units[:, None, :, None].expand(r, self.rows, c, self.cols).reshape(r * self.rows, -1)
        return from_matrix(full[: m.shape[0], : m.shape[1]], scores.shape)

    def __repr__(self) -> str:
        return f"{self.rows}x{self.cols}"


class Channel(Pattern):
    """Whole channels: ``kind="input"`` (``channelx1``) or ``kind="output"`` (``1xchannel``).

    An input channel is a Linear column, or for a convolution input channel ``c`` in every filter and every
    kernel position; an output channel is a Linear row or a whole convolution filter.

    Args:
        kind: ``"input"`` or ``"output"``.

    Example:
        >>> Channel("output").unit_scores(torch.ones(8, 3, 3, 3)).shape
        torch.Size([8])
    """

    linear = True

    def __init__(self, kind: str) -> None:
        if kind not in ("input", "output"):
            raise ValueError(f"Channel kind must be 'input' or 'output', got {kind!r}")
        self.kind = kind
        self._dim = 1 if kind == "input" else 0
        self.unit_rows = None if kind == "input" else 1
        self.output_units = kind == "output"

    def unit_scores(self, scores: Tensor) -> Tensor:
        """Mean score of each channel."""
        dims = [d for d in range(scores.dim()) if d != self._dim]
        return scores.mean(dim=dims)

    def unit_sizes(self, shape: torch.Size | tuple[int, ...]) -> int:
        """Elements in one channel."""
        return math.prod(shape) // shape[self._dim]

    def unit_view(self, shape: torch.Size | tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """The weight itself; a channel spans every dimension but its own.

        Example:
            >>> Channel("output").unit_view((8, 3, 3, 3))
            ((8, 3, 3, 3), (1, 2, 3))
        """
        return tuple(shape), tuple(d for d in range(len(shape)) if d != self._dim)

    def shard_units(
        self, shape: tuple[int, ...], offset: tuple[int, ...], local_shape: tuple[int, ...]
    ) -> tuple[tuple[int, ...], tuple[int, ...], bool] | None:
        """A shard holds its slice of channels; cut along any other dimension, its channel scores are partial."""
        partial = any(n != full for d, (n, full) in enumerate(zip(local_shape, shape)) if d != self._dim)
        return (shape[self._dim],), (offset[self._dim],), partial

    def expand(self, pruned_units: Tensor, scores: Tensor) -> Tensor:
        """Broadcast each channel decision over the channel."""
        view = [1] * scores.dim()
        view[self._dim] = -1
        return pruned_units.reshape(view).expand(scores.shape)

    def __repr__(self) -> str:
        return "channelx1" if self.kind == "input" else "1xchannel"


class NM(Pattern):
    """``n`` of every ``m`` consecutive weights along the input dimension are pruned (e.g. 2:4).

    A unit is one group of ``m``; pruning it zeroes its ``n`` lowest-scored weights, so the pattern reaches
    sparsity ``n/m`` when every group is pruned. A last, partial group of ``r < m`` weights (input width not a
    multiple of ``m``) prunes ``floor(n * r / m)`` of them: the same proportion, never above ``n/m``.

    Args:
        n: weights pruned per group.
        m: group length, ``n < m``.

    Example:
        >>> NM(2, 4).max_sparsity
        0.5
    """

    whole_units = False

    def __init__(self, n: int, m: int) -> None:
        for name, value in (("n", n), ("m", m)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"N:M {name} must be a positive int, got {value!r}")
        if n >= m:
            raise ValueError(f"pattern '{n}:{m}' is not valid: N must be smaller than M (N={n}, M={m})")
        self.n = n
        self.m = m
        self.max_sparsity = n / m

    def _groups(self, scores: Tensor) -> tuple[Tensor, Tensor, int]:
        """Sorted lowest ``n`` scores and their positions per group, and the partial group's prune count."""
        m = as_matrix(scores)
        c = m.shape[1]
        pad = -c % self.m
        if pad:
            m = torch.nn.functional.pad(m, (0, pad), value=math.inf)
        values, index = torch.topk(m.reshape(m.shape[0], -1, self.m), self.n, dim=-1, largest=False)
        last = self.n * (self.m - pad) // self.m
        return values, index, last

    def unit_scores(self, scores: Tensor) -> Tensor:
        """Mean of the ``n`` lowest scores of each group."""
        values, _, last = self._groups(scores)
        out = values.mean(dim=-1)
        if last != self.n:
            out[:, -1] = values[:, -1, :last].mean(dim=-1) if last else -math.inf
        return out

    def unit_sizes(self, shape: torch.Size | tuple[int, ...]) -> int | Tensor:
        """``n`` per group; the partial group's own count where the width is not a multiple of ``m``."""
        c = math.prod(shape[1:])
        if c % self.m == 0:
            return self.n
        sizes = torch.full((shape[0], math.ceil(c / self.m)), self.n, dtype=torch.int64)
        sizes[:, -1] = self.n * (c % self.m) // self.m
        return sizes

    def shard_units(
        self, shape: tuple[int, ...], offset: tuple[int, ...], local_shape: tuple[int, ...]
    ) -> tuple[tuple[int, ...], tuple[int, ...], bool] | None:
        """Groups stay whole in a shard whose columns start and end on group edges."""
        box = _matrix_box(shape, offset, local_shape)
        cols = math.prod(shape[1:])
        if box is None or not _aligned(box[2], box[3], cols, self.m):
            return None
        return (shape[0], math.ceil(cols / self.m)), (box[0], box[2] // self.m), False

    def expand(self, pruned_units: Tensor, scores: Tensor) -> Tensor:
        """Mark the lowest-scored weights of each pruned group."""
        _, index, last = self._groups(scores)
        slots = pruned_units[..., None].expand(index.shape).clone()
        if last != self.n:
            slots[:, -1, last:] = False
        groups = torch.zeros(*index.shape[:2], self.m, dtype=torch.bool, device=scores.device)
        groups.scatter_(-1, index, slots)
        c = as_matrix(scores).shape[1]
        return from_matrix(groups.reshape(index.shape[0], -1)[:, :c], scores.shape)

    def conforms(self, mask: Tensor) -> bool:
        """Every group is either untouched or has exactly its ``n`` (partial: fewer) weights pruned."""
        pruned = as_matrix(~mask)
        c = pruned.shape[1]
        pad = -c % self.m
        counts = torch.nn.functional.pad(pruned.float(), (0, pad)).reshape(pruned.shape[0], -1, self.m).sum(-1)
        sizes = self.unit_sizes(tuple(mask.shape))
        full = torch.full_like(counts, float(sizes)) if isinstance(sizes, int) else sizes.to(counts)
        return bool(((counts == 0) | (counts == full)).all())

    def __repr__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(pattern: str | Pattern) -> Pattern:
    """Turn a pattern name into a :class:`Pattern`; pattern objects pass through.

    Args:
        pattern: ``"unstructured"`` / ``"1x1"``, ``"NxM"``, ``"channelx1"``, ``"1xchannel"`` or ``"N:M"``.

    Raises:
        ValueError: the string names no pattern.
        TypeError: neither a string nor a :class:`Pattern`.

    Example:
        >>> parse_pattern("2:4")
        2:4
    """
    if isinstance(pattern, Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str or a Pattern, got {type(pattern).__name__} {pattern!r}")
    text = pattern.strip().lower()
    if text in ("unstructured", "1x1"):
        return Unstructured()
    if text == "channelx1":
        return Channel("input")
    if text == "1xchannel":
        return Channel("output")
    if match := re.fullmatch(r"(\d+)x(\d+)", text):
        rows, cols = int(match[1]), int(match[2])
        if rows >= 1 and cols >= 1:
            return Block(rows, cols)
    if match := re.fullmatch(r"(\d+):(\d+)", text):
        n, m = int(match[1]), int(match[2])
        if n >= 1 and n < m:
            return NM(n, m)
        raise ValueError(f"pattern {pattern!r} is not valid: N:M needs 1 <= N < M (got N={n}, M={m})")
    raise ValueError(f"pattern {pattern!r} is not valid; {_PATTERN_CHOICES}")
