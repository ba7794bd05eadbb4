"""Which units to prune: exact lowest-score selection, across layers (global) or per layer (local).

Units are taken in ascending order of (score, tensor, position) and the longest prefix whose element count
stays within the budget is pruned, so results are exact and deterministic, and the final sparsity is the
target up to the size of one unit. Global selection never concatenates all scores (DESIGN.md, "count,
don't concatenate"): a random sample brackets the threshold, one pass per tensor counts the units below the
bracket, and only the units inside the small bracket are gathered and ordered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_prune.sharding import all_reduce_ints, ravel

__all__ = ["SCOPES", "UnitShard", "count_pruned", "prune_lowest", "select"]

SCOPES = ("global", "local")
_DIRECT = 1 << 16  # up to this many units, all of them form one bracket (no sample)
_MIN_SAMPLE = 4096
_SORTED = 4096  # candidates few enough to sort when units differ in size


def _sample_size(n_units: int) -> int:
    # Two k-th value searches over the sample cost ~14 ns per sample; the bracket holds ~6n/sqrt(S) units
    # (+-6 sigma of the sample rank), resolved by one more k-th value search and a few passes (~25 ns per
    # unit). The two balance near S = (3n)^(2/3), e.g. 21k samples for 1M units; measured best among 1..24.
    return max(_MIN_SAMPLE, min(1 << 21, round((3 * n_units) ** (2 / 3))))


class UnitShard(NamedTuple):
    """Where one process's unit scores of a tensor sit among all of that tensor's units (under sharding).

    Attributes:
        owner: this process counts these units; other processes holding the same units (replicas) only
            receive the decision.
        grid: the shape of the tensor's unit scores over all processes.
        offset: the position of this process's unit scores in ``grid``.

    Example:
        >>> UnitShard(True, (26, 5), (13, 0)).offset
        (13, 0)
    """

    owner: bool
    grid: tuple[int, ...]
    offset: tuple[int, ...]


def count_pruned(pruned: Tensor, size: int | Tensor) -> int:
    """Elements pruned by a bool unit tensor whose units hold ``size`` elements each."""
    if isinstance(size, int):
        return int(torch.count_nonzero(pruned)) * size
    return int(size.reshape(-1)[pruned.reshape(-1)].sum())


def _total(flat: Tensor, size: int | Tensor) -> int:
    return flat.numel() * size if isinstance(size, int) else int(size.sum())


def _sum(value: int, group: Any) -> int:
    """``value`` summed over the processes of ``group`` (itself without a group)."""
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, group=group)
    return int(t)


def _gather(t: Tensor, group: Any) -> list[Tensor]:
    """Every process's ``t``, in rank order (``[t]`` without a group)."""
    return [part[0].to(t.device) for part in _gather_many((t,), group)]


def _gather_many(tensors: tuple[Tensor, ...], group: Any) -> list[tuple[Tensor, ...]]:
    """Every process's ``tensors``, in rank order, in one collective (``[tensors]`` without a group)."""
    if group is None:
        return [tensors]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, tuple(t.cpu() for t in tensors), group=group)
    return out


def _keys(
    inside: Sequence[Tensor], shapes: Sequence[tuple[int, ...]], shards: Sequence[UnitShard] | None, group: Any
) -> list[Tensor]:
    """A key per candidate that orders all processes' candidates as (tensor, position) in one tensor would.

    Without ``shards`` each process's tensors are distinct ones, ordered by rank: the key is the candidate's
    index in the concatenation of all processes' tensors.
    """
    if shards is None:
        numels = [math.prod(shape) for shape in shapes]
        before = 0
        if group is not None:
            every = torch.cat(_gather(torch.tensor([sum(numels)], dtype=torch.int64), group))
            before = int(every[: dist.get_rank(group)].sum())
        starts = torch.tensor([0, *numels], dtype=torch.int64).cumsum(0)[:-1] + before
        return [i + int(start) for i, start in zip(inside, starts)]
    bases = torch.tensor([0, *(math.prod(s.grid) for s in shards)], dtype=torch.int64).cumsum(0)[:-1]
    local_shapes = [tuple(shape) for shape in shapes]
    return [
        ravel(i, s.offset, shape, s.grid) + int(base) for i, s, shape, base in zip(inside, shards, local_shapes, bases)
    ]


def _bracket(
    flat: Sequence[Tensor], sizes: Sequence[int | Tensor], budget: int, group: Any = None
) -> tuple[Tensor, int, int]:
    """A random sample of unit scores and the sample ranks that bracket the budget's threshold.

    Each tensor is sampled in proportion to its elements, so every sample stands for about the same number of
    elements and the threshold's sample rank is ``budget / total * S``. The bracket is only a guess: the
    caller checks it against exact counts and widens it when it misses.
    """
    totals = [_total(f, z) for f, z in zip(flat, sizes)]
    grand = _sum(sum(totals), group)
    samples = _sample_size(_sum(sum(f.numel() for f in flat), group))
    generator = torch.Generator().manual_seed(0)
    values = []
    for f, total in zip(flat, totals):
        if not f.numel():  # an empty shard (or one another process counts) has nothing to sample
            continue
        k = max(1, round(samples * total / grand))
        index = torch.randint(f.numel(), (k,), generator=generator).to(f.device)
        values.append(f[index].float())
    sample = torch.cat(_gather(torch.cat(values) if values else torch.empty(0), group)).nan_to_num_(nan=math.inf)
    rank = round(budget / grand * sample.numel())
    # The sample rank of the true threshold has a standard deviation of at most sqrt(S)/2: +-6 sigma.
    margin = 3 * math.isqrt(sample.numel()) + 64
    return sample, rank - margin, rank + margin


def _value_at(sample: Tensor, rank: int) -> float:
    """The sample's value of 0-based ``rank`` in ascending order; -inf below it, +inf above (O(S), no sort)."""
    if rank < 0:
        return -math.inf
    if rank >= sample.numel():
        return math.inf
    return float(torch.kthvalue(sample, rank + 1).values)


def _take_sorted(values: Tensor, sizes: Tensor, budget: int, nearest: bool) -> Tensor:
    """The longest (or with ``nearest``, the nearest) prefix of ``values`` in ascending order within ``budget``."""
    order = torch.sort(values, stable=True).indices  # stable: equal values keep their positions' order
    cumulative = sizes[order].cumsum(0)
    count = int(torch.searchsorted(cumulative, budget, right=True))
    if nearest and count < cumulative.numel():
        before = int(cumulative[count - 1]) if count else 0
        count += int(cumulative[count]) - budget < budget - before
    taken = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    taken[order[:count]] = True
    return taken


def _take_equal(values: Tensor, size: int, budget: int, nearest: bool) -> Tensor:
    """:func:`_take_sorted` for units of one ``size``: a k-th value search, O(n), instead of a sort."""
    count = min(budget // size, values.numel())
    if nearest and count < values.numel():
        count += (count + 1) * size - budget < budget - count * size
    if count == 0:
        return torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if count == values.numel():
        return torch.ones(values.numel(), dtype=torch.bool, device=values.device)
    threshold = torch.kthvalue(values, count).values
    taken = values < threshold
    ties = (values == threshold).nonzero().squeeze(1)  # in position order: the first ones are taken
    taken[ties[: count - int(torch.count_nonzero(taken))]] = True
    return taken


def _take(values: Tensor, sizes: Tensor, budget: int, nearest: bool) -> Tensor:
    """:func:`_take_sorted` in O(n): halve the candidates around their median until few are left to sort."""
    if not values.numel():
        return torch.zeros(0, dtype=torch.bool, device=values.device)
    if int(sizes.min()) == int(sizes.max()):
        return _take_equal(values, int(sizes[0]), budget, nearest)
    taken = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    index = torch.arange(values.numel(), device=values.device)  # the undecided candidates, in position order
    while values.numel() > _SORTED:
        pivot = torch.kthvalue(values, (values.numel() + 1) // 2).values
        lower = values < pivot
        lower_total = int(sizes[lower].sum())
        if lower_total > budget:  # the prefix ends below the pivot
            keep = lower
        else:
            tie = values == pivot
            tie_total = int(sizes[tie].sum())
            taken[index[lower]] = True
            budget -= lower_total
            if tie_total > budget:  # the prefix ends among the ties, where position order decides
                values, sizes, index = values[tie], sizes[tie], index[tie]
                break
            taken[index[tie]] = True
            budget -= tie_total
            keep = values > pivot
        values, sizes, index = values[keep], sizes[keep], index[keep]
    taken[index[_take_sorted(values, sizes, budget, nearest)]] = True
    return taken


def prune_lowest(
    scores: Sequence[Tensor],
    sizes: Sequence[int | Tensor],
    budget: int,
    nearest: bool = False,
    group: Any = None,
    shards: Sequence[UnitShard] | None = None,
) -> list[Tensor]:
    """Prune the lowest-scored units of several tensors, ``budget`` elements in all.

    Units are taken in ascending (score, tensor, position) order: the longest prefix whose element count is
    at most ``budget``, or with ``nearest`` the prefix whose count is nearest to it (ties: the smaller).

    Args:
        scores: unit scores, one tensor per layer (any shapes). NaN scores are never pruned.
        sizes: elements per unit for each tensor: an int, or a tensor shaped like its scores.
        budget: elements to prune.
        nearest: allow overshooting by less than half of the crossing unit.
        group: a ``torch.distributed`` process group whose processes each hold some of the tensors (as under
            sharding); counts are all-reduced and only the small bracket is gathered, so every process gets
            its share of the one selection over all tensors, ordered (score, rank, tensor, position).
        shards: with ``group``: every process passes the same tensors, each its own shard of their units
            (:class:`UnitShard`); the order is then (score, tensor, position in the whole tensor), exactly
            as one process holding the whole tensors would select.

    Returns:
        One bool tensor per input (True = prune), shaped like its scores.

    Example:
        >>> prune_lowest([torch.tensor([3.0, 1.0]), torch.tensor([2.0])], [1, 1], 2)
        [tensor([False,  True]), tensor([True])]
    """
    flat = [s.reshape(-1) for s in scores]
    flat_sizes = [z if isinstance(z, int) else z.reshape(-1).to(f.device) for f, z in zip(flat, sizes)]
    if budget <= 0:
        return [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    owned = [True] * len(flat) if shards is None or group is None else [s.owner for s in shards]
    counted = [f if own else f[:0] for f, own in zip(flat, owned)]  # what this process counts
    counted_sizes = [z if isinstance(z, int) or own else z[:0] for z, own in zip(flat_sizes, owned)]
    if budget >= _sum(sum(_total(f, z) for f, z in zip(counted, counted_sizes)), group):
        return [~torch.isnan(s) for s in scores]
    if _sum(sum(f.numel() for f in counted), group) <= _DIRECT:
        sample, lo_rank, hi_rank = torch.empty(0), -1, 0
    else:
        sample, lo_rank, hi_rank = _bracket(counted, counted_sizes, budget, group)
    # Units scored -inf (already pruned, for the callbacks) come first in the order; while they all fit the
    # budget they count as below the bracket rather than inside it, which would otherwise hold all of them.
    floor_below = True
    while True:
        lo, hi = _value_at(sample, lo_rank), _value_at(sample, hi_rank)
        floor = floor_below and lo == -math.inf
        below, inside, below_count = [], [], 0
        for f, z, own in zip(flat, flat_sizes, owned):  # one pass per tensor while it is in cache
            b = f <= lo if floor else f < lo
            below.append(b)
            below_count += count_pruned(b, z) if own else 0
            inside.append(torch.logical_xor(f <= hi, b).nonzero().squeeze(1))  # lo <= f <= hi, less the floor
        below_count = _sum(below_count, group)
        if below_count > budget:  # the threshold lies under the bracket: widen it downwards
            if floor:
                floor_below = False
            else:
                lo_rank = lo_rank - 4 * (hi_rank - lo_rank) if lo_rank >= 0 else -1
            continue
        inside_sizes = [
            torch.full((i.numel(),), z, dtype=torch.int64, device=i.device) if isinstance(z, int) else z[i]
            for i, z in zip(inside, flat_sizes)
        ]
        inside_total = _sum(sum(int(s.sum()) for s, own in zip(inside_sizes, owned) if own), group)
        if hi != math.inf and below_count + inside_total <= budget:
            hi_rank = hi_rank + 4 * (hi_rank - lo_rank)  # the threshold lies above the bracket
            continue
        break
    # Resolve inside the bracket in (score, tensor, position) order: candidates are ordered by their keys,
    # then stably by value, so that ties keep that order.
    device = flat[0].device if flat else torch.device("cpu")
    if group is None:  # one process: the concatenation is in (tensor, position) order already
        values = torch.cat([f[i].float() for f, i in zip(flat, inside)]) if flat else torch.empty(0)
        taken = _take(values, _cat(inside_sizes, torch.int64).to(device), budget - below_count, nearest)
        for mask, index, take in zip(below, inside, taken.split([i.numel() for i in inside])):
            mask[index[take]] = True
        return [m.reshape(s.shape) for m, s in zip(below, scores)]
    keys = _keys(inside, [s.shape for s in scores], shards, group)
    local_values = _cat([f[i].float() for f, i, own in zip(flat, inside, owned) if own], torch.float32)
    local_sizes = _cat([z for z, own in zip(inside_sizes, owned) if own], torch.int64)
    local_keys = _cat([k for k, own in zip(keys, owned) if own], torch.int64)
    unit_sizes = {z if isinstance(z, int) else None for z in flat_sizes}
    # every process holds the same tensors, all of one unit size: sizes need no sending
    uniform = shards is not None and len(unit_sizes) == 1 and None not in unit_sizes
    sent = (local_values, local_keys) if uniform else (local_values, local_keys, local_sizes)
    parts = _gather_many(sent, group)
    values, all_keys = (torch.cat([p[i] for p in parts]).to(device) for i in (0, 1))
    if uniform:
        all_sizes = torch.full(values.shape, unit_sizes.pop() or 0, dtype=torch.int64, device=device)
    else:
        all_sizes = torch.cat([p[2] for p in parts]).to(device)
    order = torch.argsort(all_keys)
    taken = _take(values[order], all_sizes[order], budget - below_count, nearest)
    taken_keys = all_keys[order][taken]  # ascending
    for mask, index, key in zip(below, inside, keys):
        if not index.numel() or not taken_keys.numel():
            continue
        at = torch.searchsorted(taken_keys, key).clamp_(max=taken_keys.numel() - 1)
        mask[index[taken_keys[at] == key]] = True
    return [m.reshape(s.shape) for m, s in zip(below, scores)]


def _cat(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.cat(tensors) if tensors else torch.empty(0, dtype=dtype)


def _layer_budget(sparsity: float, numel: int) -> int:
    return round(sparsity * numel)


def select(
    scores: Sequence[Tensor],
    sizes: Sequence[int | Tensor],
    numels: Sequence[int],
    sparsity: float,
    scope: str = "global",
    min_sparsity: float = 0.0,
    max_sparsity: float | Sequence[float] = 1.0,
    group: Any = None,
    shards: Sequence[UnitShard] | None = None,
) -> list[Tensor]:
    """Units to prune so that the targets reach ``sparsity``.

    ``local``: each layer prunes ``sparsity`` of its own elements. ``global``: one ranking across layers,
    the budget counted in elements; every layer stays within ``[min_sparsity, max_sparsity]``, enforced by
    fixing violating layers at their bound and re-ranking the rest (exact water-filling). ``max_sparsity`` may
    be one bound per layer.

    With ``group`` and ``shards`` (see :func:`prune_lowest`) every process passes its shards of the same
    layers and ``numels`` counts whole layers; every count is all-reduced, so that all processes take the
    same decisions and together select what one process would.

    Example:
        >>> select([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])], [1, 1], [2, 2], 0.5)
        [tensor([True, True]), tensor([False, False])]
    """
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r} is not valid; choose one of {', '.join(map(repr, SCOPES))}")
    if group is None:
        shards = None
    split = [None] * len(scores) if shards is None else [[shard] for shard in shards]
    if scope == "local":
        return [
            prune_lowest([s], [z], _layer_budget(sparsity, n), True, group, part)[0]
            for s, z, n, part in zip(scores, sizes, numels, split)
        ]
    owned = [True] * len(scores) if shards is None else [shard.owner for shard in shards]

    def counts(picks: dict[int, Tensor]) -> dict[int, int]:
        local = [count_pruned(pick, sizes[i]) if owned[i] else 0 for i, pick in picks.items()]
        return dict(zip(picks, all_reduce_ints(local, group)))

    maxes = [max_sparsity] * len(scores) if isinstance(max_sparsity, (int, float)) else list(max_sparsity)
    budget = _layer_budget(sparsity, sum(numels))
    fixed: dict[int, Tensor] = {}
    spent = 0
    while True:
        pool = [i for i in range(len(scores)) if i not in fixed]
        pool_scores, pool_sizes = [scores[i] for i in pool], [sizes[i] for i in pool]
        pool_shards = None if shards is None else [shards[i] for i in pool]
        picks = dict(zip(pool, prune_lowest(pool_scores, pool_sizes, budget - spent, True, group, pool_shards)))
        violations: dict[int, Tensor] = {}
        for i, pruned in counts(picks).items():
            upper = math.floor(maxes[i] * numels[i] + 1e-9)
            lower = math.ceil(min_sparsity * numels[i] - 1e-9)
            if pruned > upper or pruned < lower:
                bound = upper if pruned > upper else lower
                violations[i] = prune_lowest([scores[i]], [sizes[i]], bound, False, group, split[i])[0]
        if not violations:
            return [fixed[i] if i in fixed else picks[i] for i in range(len(scores))]
        fixed.update(violations)
        spent = sum(counts(fixed).values())
