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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FFN",
    "NM",
    "Block",
    "Channel",
    "Coupled",
    "Head",
    "Member",
    "Pattern",
    "UnitGroup",
    "Unstructured",
    "as_matrix",
    "from_matrix",
    "parse_pattern",
]

_PATTERN_CHOICES = (
    "use 'NxM' (e.g. '4x1'), 'channelx1', '1xchannel', 'N:M' (e.g. '2:4'), 'unstructured', 'head' (attention heads) "
    "or 'ffn' (FFN neurons)"
)


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
    kernel position; an output channel is a Linear row or a whole convolution filter. With ``width > 1`` a
    unit is ``width`` consecutive channels (an attention head's rows or columns, for :class:`Head`).

    Args:
        kind: ``"input"`` or ``"output"``.
        width: channels per unit.

    Example:
        >>> Channel("output").unit_scores(torch.ones(8, 3, 3, 3)).shape
        torch.Size([8])
        >>> Channel("input", width=4).unit_scores(torch.ones(2, 8)).shape
        torch.Size([2])
    """

    linear = True

    def __init__(self, kind: str, width: int = 1) -> None:
        if kind not in ("input", "output"):
            raise ValueError(f"Channel kind must be 'input' or 'output', got {kind!r}")
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"Channel width must be a positive int, got {width!r}")
        self.kind = kind
        self.width = width
        self._dim = 1 if kind == "input" else 0
        self.unit_rows = None if kind == "input" else width
        self.output_units = kind == "output" and width == 1

    def check(self, fqn: str, shape: torch.Size | tuple[int, ...]) -> None:
        """Also: the channels split into whole units of ``width``."""
        super().check(fqn, shape)
        if shape[self._dim] % self.width:
            raise ValueError(
                f"'{fqn}' has {shape[self._dim]} {self.kind} channels, not a multiple of the unit width {self.width}"
            )

    def unit_scores(self, scores: Tensor) -> Tensor:
        """Mean score of each channel (of each ``width`` channels)."""
        if self.width == 1:
            dims = [d for d in range(scores.dim()) if d != self._dim]
            return scores.mean(dim=dims)
        return scores.movedim(self._dim, 0).reshape(scores.shape[self._dim] // self.width, -1).mean(dim=1)

    def unit_sizes(self, shape: torch.Size | tuple[int, ...]) -> int:
        """Elements in one unit."""
        return math.prod(shape) // shape[self._dim] * self.width

    def unit_view(self, shape: torch.Size | tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """The weight itself, the unit's channels split as (units, width); a unit spans every other dimension.

        Example:
            >>> Channel("output").unit_view((8, 3, 3, 3))
            ((8, 3, 3, 3), (1, 2, 3))
            >>> Channel("input", width=4).unit_view((2, 8))
            ((2, 2, 4), (0, 2))
        """
        if self.width == 1:
            return tuple(shape), tuple(d for d in range(len(shape)) if d != self._dim)
        d = self._dim
        view = (*shape[:d], shape[d] // self.width, self.width, *shape[d + 1 :])
        return tuple(view), tuple(i for i in range(len(view)) if i != d)

    def shard_units(
        self, shape: tuple[int, ...], offset: tuple[int, ...], local_shape: tuple[int, ...]
    ) -> tuple[tuple[int, ...], tuple[int, ...], bool] | None:
        """A shard holds its slice of channels; cut along any other dimension, its channel scores are partial.

        Units of ``width`` channels must not straddle the shard's edge.
        """
        d = self._dim
        if not _aligned(offset[d], local_shape[d], shape[d], self.width):
            return None
        partial = any(n != full for i, (n, full) in enumerate(zip(local_shape, shape)) if i != d)
        return (shape[d] // self.width,), (offset[d] // self.width,), partial

    def expand(self, pruned_units: Tensor, scores: Tensor) -> Tensor:
        """Broadcast each unit decision over its channels."""
        view = [1] * scores.dim()
        view[self._dim] = -1
        if self.width > 1:
            pruned_units = pruned_units.repeat_interleave(self.width)
        return pruned_units.reshape(view).expand(scores.shape)

    def __repr__(self) -> str:
        name = "channelx1" if self.kind == "input" else "1xchannel"
        return name if self.width == 1 else f"{name}[{self.width}]"


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


@dataclass(frozen=True)
class Member:
    """One weight of a :class:`UnitGroup`: its name, its own units, and which group units they belong to.

    Attributes:
        fqn: the weight's parameter name.
        pattern: the weight's own units (rows or columns of a head or neuron).
        repeat: group unit ``u`` is this weight's unit ``u // repeat`` (a key/value head serves ``repeat`` query
            heads); the weight's unit is pruned once all its group units are.

    Example:
        >>> Member("attn.k.weight", Channel("output", 16), repeat=4).repeat
        4
    """

    fqn: str
    pattern: Channel
    repeat: int = 1


@dataclass(frozen=True)
class UnitGroup:
    """One layer of a :class:`Coupled` pattern: ``units`` units, each spanning rows/columns of its members.

    Example:
        >>> g = UnitGroup("mlp", 4, (Member("mlp.fc1.weight", Channel("output")),))
        >>> g.fqns
        ['mlp.fc1.weight']
    """

    name: str
    units: int
    members: tuple[Member, ...]

    @property
    def fqns(self) -> list[str]:
        """The members' weight names."""
        return [m.fqn for m in self.members]


class Coupled(Pattern):
    """Base class: units that span several weights of a layer (attention heads, FFN neurons), scored as one.

    A unit's score is the mean of its elements' scores over all its weights; a key/value head shared by
    several query heads counts for each of them in proportion (SPEC.md's unit mean, over the whole unit). The
    engine ranks the units of each layer (``local``) or of all layers (``global``) and keeps at least one per
    layer. Each weight's part of a unit is a box (rows or columns), so masks, zero keeping and sharding work
    per weight as for channels.

    Args:
        layers: an explicit layout by layer name, for models whose layout is not recognised (see
            :func:`~lightning_prune.structure.find_attention` and :func:`~lightning_prune.structure.find_ffn`).
    """

    linear = True
    unit_rows = None
    noun = "unit"

    def __init__(self, layers: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        if layers is not None and not isinstance(layers, Mapping):
            raise TypeError(f"layers must be a mapping from layer name to its layout, got {type(layers).__name__}")
        self.layers = layers

    @abstractmethod
    def groups(self, model: torch.nn.Module) -> list[UnitGroup]:
        """The model's layers of this pattern, in module order (empty if none is recognised)."""

    def _per_weight(self) -> TypeError:
        return TypeError(
            f"pattern '{self}' spans several weights; its units are scored per layer by the engine (Pruner), "
            "each weight through its member pattern (UnitGroup.members)"
        )

    def unit_scores(self, scores: Tensor) -> Tensor:
        """Not per weight: see :class:`Member`."""
        raise self._per_weight()

    def unit_sizes(self, shape: torch.Size | tuple[int, ...]) -> int:
        """Not per weight: see :class:`Member`."""
        raise self._per_weight()

    def expand(self, pruned_units: Tensor, scores: Tensor) -> Tensor:
        """Not per weight: see :class:`Member`."""
        raise self._per_weight()


class Head(Coupled):
    """Whole attention heads (``"head"``): a head's rows of Q, K and V and its columns of the output projection.

    With grouped-query attention a key/value head is pruned only when every query head it serves is. Heads
    are found in the common Hugging Face models by name, with counts from their configs
    (:func:`~lightning_prune.structure.find_attention`); pass ``layers`` for others.

    Args:
        layers: ``{attention name: {"q": ..., "k": ..., "v": ..., "o": ..., "num_heads": H,
            "num_kv_heads": K, "head_dim": D}}`` (full Linear names; ``num_kv_heads`` and ``head_dim`` optional).

    Example:
        >>> Head(), Head({"blocks.0.attn": {"q": "blocks.0.attn.wq", "k": "blocks.0.attn.wk",
        ...                                 "v": "blocks.0.attn.wv", "o": "blocks.0.attn.wo", "num_heads": 4}})
        (head, head)
    """

    noun = "head"

    def groups(self, model: torch.nn.Module) -> list[UnitGroup]:
        """One group per attention layer: ``num_heads`` units."""
        from lightning_prune.structure import find_attention

        out = []
        for a in find_attention(model, self.layers):
            rows, cols = Channel("output", a.head_dim), Channel("input", a.head_dim)
            members = (
                Member(f"{a.q}.weight", rows),
                Member(f"{a.k}.weight", rows, a.group_size),
                Member(f"{a.v}.weight", rows, a.group_size),
                Member(f"{a.o}.weight", cols),
            )
            out.append(UnitGroup(a.name, a.num_heads, members))
        return out

    def __repr__(self) -> str:
        return "head"


class FFN(Coupled):
    """Whole FFN neurons (``"ffn"``): a neuron's row of each input projection (gate and up) and its column of down.

    A neuron is scored once over the three matrices and pruned in all of them, so that it outputs exactly zero
    and slimming removes it. FFNs are found by name (:func:`~lightning_prune.structure.find_ffn`); pass
    ``layers`` for others.

    Args:
        layers: ``{ffn name: {"inputs": [Linear names whose rows are neurons], "output": Linear name}}``.

    Example:
        >>> FFN()
        ffn
    """

    noun = "FFN neuron"

    def groups(self, model: torch.nn.Module) -> list[UnitGroup]:
        """One group per FFN: one unit per neuron."""
        from lightning_prune.structure import find_ffn

        out = []
        for f in find_ffn(model, self.layers):
            members = (*(Member(f"{n}.weight", Channel("output")) for n in f.inputs),)
            out.append(UnitGroup(f.name, f.neurons, (*members, Member(f"{f.output}.weight", Channel("input")))))
        return out

    def __repr__(self) -> str:
        return "ffn"


def parse_pattern(pattern: str | Pattern) -> Pattern:
    """Turn a pattern name into a :class:`Pattern`; pattern objects pass through.

    Args:
        pattern: ``"unstructured"`` / ``"1x1"``, ``"NxM"``, ``"channelx1"``, ``"1xchannel"``, ``"N:M"``,
            ``"head"`` or ``"ffn"``.

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
    if text == "head":
        return Head()
    if text == "ffn":
        return FFN()
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
