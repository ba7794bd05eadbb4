"""Property tests (hypothesis): random shapes, patterns, targets and scopes through the selection path."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lightning_prune.patterns import NM, Block, Channel, Unstructured
from lightning_prune.selection import select

PATTERNS = [Unstructured(), Block(4, 1), Block(1, 4), Block(2, 2), Channel("input"), Channel("output"), NM(2, 4)]


def unit_count(pattern, shape) -> int:
    sizes = pattern.unit_sizes(shape)
    return max(1, int(sizes) if isinstance(sizes, int) else int(sizes.max()))


def prunable(pattern, weight) -> int:
    """Elements the pattern can prune in ``weight`` at most (N:M: N per group, floor(N*r/M) in a partial one)."""
    sizes = pattern.unit_sizes(tuple(weight.shape))
    units = pattern.unit_scores(weight.abs()).numel()
    return sizes * units if isinstance(sizes, int) else int(sizes.sum())


def prune_once(pattern, weights, masks, sparsity, scope):
    """One event as the callback does it: -inf for pruned entries, select, expand, intersect."""
    scores = []
    for w, m in zip(weights, masks):
        s = w.abs().clone()
        s[~m] = -math.inf
        scores.append(s)
    units = [pattern.unit_scores(s) for s in scores]
    picks = select(
        units,
        [pattern.unit_sizes(tuple(s.shape)) for s in scores],
        [s.numel() for s in scores],
        sparsity,
        scope,
        max_sparsity=1.0,
    )
    return [m & ~pattern.expand(p | (u == -math.inf), s) for m, p, u, s in zip(masks, picks, units, scores)]


shapes = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 12), st.integers(1, 20)),
        st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 3), st.integers(1, 3)),
    ),
    min_size=1,
    max_size=4,
)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    shapes=shapes,
    pattern_index=st.integers(0, len(PATTERNS) - 1),
    targets=st.lists(st.floats(0.0, 0.95), min_size=1, max_size=3),
    scope=st.sampled_from(["global", "local"]),
    seed=st.integers(0, 10_000),
)
def test_masks_are_exact_structured_monotone_and_deterministic(shapes, pattern_index, targets, scope, seed):
    pattern = PATTERNS[pattern_index]
    if isinstance(pattern, NM):
        targets = [min(t, 0.5) for t in targets]
    targets = sorted(targets)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(shape, generator=g) for shape in shapes]
    masks = [torch.ones(shape, dtype=torch.bool) for shape in shapes]
    total = sum(w.numel() for w in weights)
    # reachable budgets only (a layer narrower than M holds no N:M group); the callback refuses the rest
    if scope == "global":
        assume(targets[-1] * total <= sum(prunable(pattern, w) for w in weights) - 1)
    else:
        assume(all(targets[-1] * w.numel() <= prunable(pattern, w) - 1 for w in weights))
    for target in targets:
        new = prune_once(pattern, weights, masks, target, scope)
        again = prune_once(pattern, weights, masks, target, scope)
        assert all(torch.equal(a, b) for a, b in zip(new, again)), "deterministic"
        assert all(not (n & ~m).any() for n, m in zip(new, masks)), "monotone"
        assert all(pattern.conforms(n) for n in new), "whole units"
        masks = new
        pruned = sum(int((~m).sum()) for m in masks)
        unit = max(unit_count(pattern, tuple(w.shape)) for w in weights)
        if scope == "global":
            assert abs(pruned - round(target * total)) <= unit, (pruned, target * total, unit)
        else:
            slack = sum(unit_count(pattern, tuple(w.shape)) for w in weights)
            assert abs(pruned - sum(round(target * w.numel()) for w in weights)) <= slack
