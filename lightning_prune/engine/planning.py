"""From scores to masks, as plain functions of tensors: what an event computes, and what a pattern can reach.

- :func:`pruned_first`: scores with ``-inf`` over pruned weights (or units), so that they sort first and masks
  stay monotone;
- :func:`plan`: the element masks of the units that reach a sparsity, globally, per layer or by LAMP scores;
- :func:`lamp_scores`: layer-adaptive scores that one global ranking can compare across layers;
- :func:`check_reachable`: whether a pattern can bring a set of weights to a target at all.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_prune.engine.zeroing import all_kept
from lightning_prune.patterns import Coupled, Pattern, UnitGroup
from lightning_prune.selection import SCOPES, UnitShard, _gather_many, select
from lightning_prune.sharding import Box

__all__ = ["TRAINING_SCOPES", "check_coupled", "check_reachable", "lamp_scores", "plan", "plan_coupled", "pruned_first"]

_FLOAT32_MAX = torch.finfo(torch.float32).max
# Scopes of pruning while training: one ranking across layers, each layer alone, or one ranking of LAMP scores.
TRAINING_SCOPES = (*SCOPES, "lamp")


def lamp_scores(scores: Tensor, values: Tensor | None = None) -> Tensor:
    """LAMP scores of one layer's scores: comparable across layers, so that one global ranking allocates sparsity.

    Layer-adaptive magnitude-based pruning (Lee, Park, Mo, Ahn, Shin 2021, "Layer-adaptive sparsity for the
    magnitude-based pruning", arXiv:2010.07611): a unit of score ``s`` gets

        lamp(s) = s^2 / sum of t^2 over the layer's kept units t with t >= s

    so every layer's highest unit scores 1 and a layer's scores do not change when all of them are scaled.
    Pruning the lowest LAMP scores globally keeps the largest units of every layer; the paper ranks weight
    magnitudes, and here any criterion's non-negative scores (negative ones count as 0). Tied units share a score.

    Args:
        scores: the layer's unit scores, ``-inf`` where pruned (kept so).
        values: the finite scores of the whole layer when ``scores`` is one shard of it (default: ``scores``'s own).

    Example:
        >>> lamp_scores(torch.tensor([1.0, 2.0, float("-inf"), 3.0]))
        tensor([0.0714, 0.3077,   -inf, 1.0000])
    """
    kept = torch.isfinite(scores)
    own = scores[kept].double().clamp_min(0).square()
    if not own.numel():
        return scores.clone()
    if values is None:  # the whole layer: one sort places every unit, tied units at their run's first place
        squares, order = own.sort()
        first = torch.ones_like(squares, dtype=torch.bool)
        first[1:] = squares[1:] != squares[:-1]
        at = torch.empty_like(order)
        at[order] = torch.nonzero(first).squeeze(1)[first.cumsum(0) - 1]
    else:  # a shard: each unit's first place among the whole layer's values
        squares = values.double().clamp_min(0).square().sort().values.to(scores.device)
        at = torch.searchsorted(squares, own)
    suffix = squares.flip(0).cumsum(0).flip(0)  # suffix[j]: the sum of squares[j:]
    lamp = (own / suffix[at]).nan_to_num_(nan=0.0)  # 0/0: every kept unit of the layer scores 0
    out = scores.clone()
    out[kept] = lamp.float()
    return out


def _lamp(units: list[Tensor], shards: list[UnitShard] | None, cuts: list[slice | None], group: Any) -> list[Tensor]:
    """:func:`lamp_scores` of every target; sharded, each layer's finite scores are gathered from their owners."""
    if shards is None or group is None:
        return [lamp_scores(u) for u in units]
    own = tuple(
        u[torch.isfinite(u)] if s.owner and cut is None else u.new_empty(0) for u, s, cut in zip(units, shards, cuts)
    )
    every = _gather_many(own, group)
    return [
        lamp_scores(u) if cut is not None else lamp_scores(u, torch.cat([parts[i] for parts in every]))
        for i, (u, cut) in enumerate(zip(units, cuts))
    ]


def pruned_first(
    scores: list[Tensor],
    masks: Sequence[Tensor],
    pattern: Pattern | Sequence[Pattern],
    per_unit: bool,
    multipliers: Sequence[Tensor] = (),
    unit_views: Sequence[tuple[int, ...] | None] = (),
) -> list[Tensor]:
    """``scores`` made finite where kept and ``-inf`` where pruned, in place.

    Args:
        scores: one float32 tensor per target, per weight (or per unit with ``per_unit``).
        masks: the targets' bool masks (True = kept).
        pattern: whose units ``per_unit`` scores are for (or one pattern per target).
        per_unit: the scores are per unit: a unit with any pruned weight gets ``-inf``.
        multipliers: the engine's 0/1 multipliers of the masks, if any (faster than the bool masks).
        unit_views: the view each multiplier broadcasts over, or None for a per-weight multiplier.

    Example:
        >>> pruned_first([torch.tensor([1.0, float("nan"), 3.0])], [torch.tensor([True, True, False])],
        ...              pattern=None, per_unit=False, multipliers=[torch.tensor([1.0, 1.0, 0.0])], unit_views=[None])
        [tensor([1., 0., -inf])]
    """
    # Arithmetic on 0/1 factors: masked_fill_ with a scattered mask is ~30x slower on CPU.
    for i, (score, mask) in enumerate(zip(scores, masks)):
        score.nan_to_num_(nan=0.0, posinf=_FLOAT32_MAX, neginf=-math.inf)  # kept scores become finite
        if per_unit:
            if all_kept(mask):
                continue
            own = pattern if isinstance(pattern, Pattern) else pattern[i]
            kept, view = own.unit_scores(mask.float()).floor_(), None  # 1: unit wholly kept, else 0
        elif multipliers:
            kept, view = multipliers[i], unit_views[i]
            if view is not None and not score.is_contiguous():
                kept, view = kept.expand(view).reshape(score.shape), None
        else:
            continue
        (score if view is None else score.view(view)).div_(kept)  # kept: same; pruned: ±inf or NaN
        score.nan_to_num_(nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
    return scores


def plan(
    scores: list[Tensor],
    shapes: Sequence[tuple[int, ...]],
    pattern: Pattern,
    per_unit: bool,
    sparsity: float,
    scope: str = "global",
    min_sparsity: float = 0.0,
    max_sparsity: float = 1.0,
    boxes: Sequence[Box] | None = None,
    group: Any = None,
) -> list[Tensor]:
    """Element masks (True = pruned) of the pattern's units that reach ``sparsity``, pruned ones first.

    Args:
        scores: from :func:`pruned_first`, per weight, or per unit with ``per_unit``.
        shapes: the targets' shapes.
        pattern: the units.
        per_unit: ``scores`` are per unit already.
        sparsity: the fraction of zeros to reach over all targets (``"global"``, ``"lamp"``) or in each
            (``"local"``).
        scope: ``"global"``, ``"local"`` or ``"lamp"`` (global, on :func:`lamp_scores`).
        min_sparsity: global scope: the least sparsity of any target.
        max_sparsity: global scope: the most sparsity of any target.
        boxes: sharded (with ``group``): where each of ``scores`` (this rank's shard) sits in its target;
            ``shapes`` are then the shards' shapes. Units cut by a shard (channels) are summed over ranks.
        group: the process group the shards are spread over.

    Example:
        >>> from lightning_prune.patterns import parse_pattern
        >>> plan([torch.tensor([[1.0, 5.0], [2.0, 6.0]])], [(2, 2)], parse_pattern("2x1"), False, 0.5)
        [tensor([[ True, False],
                [ True, False]])]
    """
    like = [torch.empty(shape, device="meta") for shape in shapes]
    units = scores if per_unit else [pattern.unit_scores(s) for s in scores]
    sizes = [pattern.unit_sizes(tuple(shape)) for shape in shapes]
    shards: list[UnitShard] | None = None
    cuts: list[slice | None] = [None] * len(scores)
    if boxes is None or group is None:
        numels = [math.prod(shape) for shape in shapes]
    else:
        numels, shards, cuts = [math.prod(b.shape) for b in boxes], [], []
        for i, box in enumerate(boxes):
            shard, whole = _shard_units(pattern, box, units[i], sizes[i], group)
            if whole is not None:  # the units' scores over all ranks, and their sizes in the whole weight
                units[i], sizes[i] = whole[0], pattern.unit_sizes(box.shape)
            shards.append(shard)
            cuts.append(None if whole is None else whole[1])
    if scope == "lamp":
        units, scope = _lamp(units, shards, cuts, group), "global"
    picks = select(units, sizes, numels, sparsity, scope, min_sparsity, max_sparsity, group, shards)
    # A unit holding a pruned weight is always taken whole, even where the budget's rounding would stop
    # just before it: masks stay monotone and made of whole units.
    out = []
    for pick, u, s, w, cut in zip(picks, units, scores, like, cuts):
        pruned = pick | (u == -math.inf)
        out.append(pattern.expand(pruned if cut is None else pruned[cut], s if not per_unit else w))
    return out


def _shard_units(
    pattern: Pattern, box: Box, units: Tensor, size: int | Tensor, group: Any
) -> tuple[UnitShard, tuple[Tensor, slice] | None]:
    """Where a shard's units sit; for units cut by the shard, their whole scores and the shard's slice of them.

    Cut units (a channel across the split dimension) are scored by the mean over the whole channel: each
    rank's partial sums (``mean * elements``) are all-reduced, replicas adding nothing. Every rank then holds
    all of them and rank 0 counts them.
    """
    found = box.units(pattern)
    assert found is not None, "shards that cut units are refused at bind"
    grid, offset, partial = found
    if not partial:
        return UnitShard(box.owner, tuple(grid), tuple(offset)), None
    assert isinstance(size, int) and units.dim() == 1, "only channels are summed across shards"
    whole = torch.zeros(grid, dtype=torch.float32, device=units.device)
    if box.owner and units.numel() and size:
        whole[offset[0] : offset[0] + units.numel()] = units.float() * size
    dist.all_reduce(whole, group=group)
    whole_size = pattern.unit_sizes(box.shape)
    assert isinstance(whole_size, int)
    whole.div_(whole_size)
    return UnitShard(dist.get_rank(group) == 0, tuple(grid), (0,)), (whole, slice(offset[0], offset[0] + units.numel()))


def check_reachable(
    pattern: Pattern,
    shapes: Mapping[str, tuple[int, ...]],
    target: float,
    scope: str,
    max_sparsity: float,
) -> None:
    """Raise if ``pattern`` cannot prune ``target`` of weights of ``shapes`` (e.g. layers narrower than M).

    A shortfall of less than 1% of the weights (partial N:M groups) only warns.

    Raises:
        ValueError: naming the pattern, what it can reach and the layers it cannot bring to the target.

    Example:
        >>> from lightning_prune.patterns import parse_pattern
        >>> check_reachable(parse_pattern("2:4"), {"w": (4, 3)}, 0.5, "local", 1.0)
        Traceback (most recent call last):
        ...
        ValueError: pattern '2:4' can prune at most 0.3333 of the targets, below target_sparsity 0.5 (local scope); \
layers it cannot bring to the target: ['w']; exclude them or choose another pattern
    """
    capacity = {}
    for fqn, shape in shapes.items():
        sizes = pattern.unit_sizes(shape)
        units = pattern.unit_scores(torch.empty(shape, device="meta")).numel()
        capacity[fqn] = sizes * units if isinstance(sizes, int) else int(sizes.sum())
    numel = {fqn: math.prod(shape) for fqn, shape in shapes.items()}
    total = sum(numel.values())
    needed = round(target * total)
    short = sorted(f for f in shapes if capacity[f] < round(target * numel[f]))
    if scope == "local":
        reachable = sum(min(capacity[f], round(target * numel[f])) for f in shapes)
    else:
        reachable = sum(min(capacity[f], math.floor(max_sparsity * numel[f])) for f in shapes)
    if reachable >= needed:
        return
    message = (
        f"pattern '{pattern}' can prune at most {reachable / max(total, 1):.4f} of the targets, below "
        f"target_sparsity {target} ({scope} scope); layers it cannot bring to the target: "
        f"{short[:6]}{' ...' if len(short) > 6 else ''}"
    )
    if reachable == 0 or needed - reachable > 0.01 * total:
        raise ValueError(message + "; exclude them or choose another pattern")
    warnings.warn(message + "; pruning goes as far as the pattern allows", stacklevel=4)


def plan_coupled(
    scores: list[Tensor],
    shapes: Sequence[tuple[int, ...]],
    fqns: Sequence[str],
    groups: Sequence[UnitGroup],
    per_unit: bool,
    sparsity: float,
    scope: str = "global",
    min_sparsity: float = 0.0,
    max_sparsity: float = 1.0,
    boxes: Sequence[Box] | None = None,
    group: Any = None,
) -> list[Tensor]:
    """:func:`plan` for a :class:`~lightning_prune.patterns.Coupled` pattern: units spanning several weights.

    Each weight's unit scores (rows or columns of a head or neuron) are combined into the layer's unit
    scores: the mean over all the unit's elements, a shared key/value head counting for each of its query
    heads in proportion. Layers (``groups``) are ranked as single targets are by :func:`plan`; every layer keeps
    at least one unit. A weight's unit is pruned once all the layer units it serves are.

    Sharded (``boxes`` with ``group``), each rank's unit scores are summed into whole ones over all ranks (a
    few per layer), so that every rank takes the same decisions from the same numbers and keeps its slice.

    Args:
        scores: from :func:`pruned_first`, per weight or per member unit, in the order of ``fqns``.
        shapes: the targets' (local) shapes.
        fqns: the targets' names, each a member of one of ``groups``.
        groups: the layers.
        per_unit: ``scores`` are per unit of each target's member pattern already.
        sparsity: the fraction of zeros to reach over all layers (``"global"``, ``"lamp"``) or in each
            (``"local"``).
        scope: ``"global"``, ``"local"`` or ``"lamp"`` (global, on :func:`lamp_scores` of the layer scores).
        min_sparsity: global scope: the least sparsity of any layer.
        max_sparsity: global scope: the most sparsity of any layer (and never all its units).
        boxes: sharded (with ``group``): where each of ``scores`` sits in its target.
        group: the process group the shards are spread over.

    Example:
        >>> from lightning_prune.patterns import Channel, Member
        >>> layer = UnitGroup("mlp", 2, (Member("up", Channel("output")), Member("down", Channel("input"))))
        >>> up, down = torch.tensor([[1.0, 1.0], [5.0, 5.0]]), torch.tensor([[1.0, 5.0], [1.0, 5.0]])
        >>> [m.int().tolist() for m in plan_coupled([up, down], [(2, 2), (2, 2)], ["up", "down"], [layer],
        ...                                         False, 0.5)]
        [[[1, 1], [0, 0]], [[1, 0], [1, 0]]]
    """
    index = {fqn: i for i, fqn in enumerate(fqns)}
    patterns = {m.fqn: m.pattern for g in groups for m in g.members}
    units = [s if per_unit else patterns[f].unit_scores(s) for s, f in zip(scores, fqns)]
    units = [u.float().reshape(-1) for u in units]
    whole_shapes = [
        tuple(shape) if boxes is None or group is None else boxes[i].shape for i, shape in enumerate(shapes)
    ]
    slices: list[slice] = [slice(0, u.numel()) for u in units]
    if boxes is not None and group is not None:
        units, slices = _whole_units(units, [patterns[f] for f in fqns], boxes, group)
    layer_scores, layer_sizes, layer_numels, layer_max = [], [], [], []
    for g in groups:
        total = torch.zeros(g.units, dtype=torch.float32, device=units[index[g.fqns[0]]].device)
        weight = 0.0
        for m in g.members:
            i = index[m.fqn]
            size = m.pattern.unit_sizes(whole_shapes[i]) / m.repeat  # a shared unit counts once in all
            total += units[i].repeat_interleave(m.repeat) * size
            weight += size
        layer_scores.append(total / weight)
        layer_sizes.append(max(round(weight), 1))
        layer_numels.append(sum(math.prod(whole_shapes[index[f]]) for f in g.fqns))
        layer_max.append(min(max_sparsity, (g.units - 1) * layer_sizes[-1] / layer_numels[-1]))  # one unit stays
    if scope == "lamp":  # every rank holds the layers' whole unit scores
        layer_scores, scope = [lamp_scores(s) for s in layer_scores], "global"
    picks = select(layer_scores, layer_sizes, layer_numels, sparsity, scope, min_sparsity, layer_max)
    out: list[Tensor] = [torch.empty(0)] * len(fqns)
    for g, pick, layer in zip(groups, picks, layer_scores):
        pruned = pick | (layer == -math.inf)
        for m in g.members:
            i = index[m.fqn]
            kept = (~pruned).reshape(-1, m.repeat).any(dim=1)
            own = (~kept | (units[i] == -math.inf))[slices[i]]
            like = scores[i] if not per_unit else torch.empty(shapes[i], device="meta")
            out[i] = m.pattern.expand(own.to(scores[i].device), like)
    return out


def _whole_units(
    units: list[Tensor], patterns: Sequence[Pattern], boxes: Sequence[Box], group: Any
) -> tuple[list[Tensor], list[slice]]:
    """Every target's unit scores over the whole weight, summed from all ranks' shards in one all-reduce."""
    wholes, slices, partial_sizes = [], [], []
    for u, pattern, box in zip(units, patterns, boxes):
        found = box.units(pattern)
        assert found is not None, "shards that cut units are refused at bind"
        grid, offset, partial = found
        whole = torch.zeros(math.prod(grid), dtype=torch.float32, device=u.device)
        at = slice(offset[0], offset[0] + u.numel())
        if box.owner and u.numel():
            size = pattern.unit_sizes(box.local_shape) if partial else 1
            whole[at] = u * size
        wholes.append(whole)
        slices.append(at)
        partial_sizes.append(pattern.unit_sizes(box.shape) if partial else 1)
    flat = torch.cat(wholes)
    dist.all_reduce(flat, group=group)
    out = [part / size for part, size in zip(flat.split([w.numel() for w in wholes]), partial_sizes)]
    return out, slices


def check_coupled(pattern: Coupled, groups: Sequence[UnitGroup], target: float, scope: str) -> None:
    """Raise if ``target`` would prune every unit of a layer (one head or neuron must stay in each).

    Example:
        >>> from lightning_prune.patterns import Channel, Head, Member
        >>> check_coupled(Head(), [UnitGroup("attn", 2, (Member("q", Channel("output", 4)),))], 0.9, "local")
        Traceback (most recent call last):
        ...
        ValueError: target_sparsity 0.9 would prune every head of 'attn' (2 heads; local scope): one must stay \
in each layer; use target_sparsity < 0.75, or exclude the layer
    """
    for g in groups:
        if g.units < 2:
            raise ValueError(
                f"'{g.name}' has a single {pattern.noun}, which must stay: pattern '{pattern}' can prune nothing "
                "there; exclude the layer"
            )
    if scope == "local":
        for g in groups:
            if round(target * g.units + 1e-9) >= g.units:  # the nearest whole count of units
                raise ValueError(
                    f"target_sparsity {target} would prune every {pattern.noun} of '{g.name}' ({g.units} "
                    f"{pattern.noun}s; local scope): one must stay in each layer; use target_sparsity < "
                    f"{(g.units - 0.5) / g.units:g}, or exclude the layer"
                )
        return
    units = sum(g.units for g in groups)
    most = sum(g.units - 1 for g in groups) / units
    if target > most + 1e-9:
        raise ValueError(
            f"target_sparsity {target} is above what pattern '{pattern}' can prune while one {pattern.noun} stays in "
            f"each layer ({most:.4f} of {units} {pattern.noun}s); lower it"
        )
