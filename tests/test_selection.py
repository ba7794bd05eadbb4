import pytest
import torch

import lightning_prune.selection as selection
from lightning_prune.selection import count_pruned, prune_lowest, select


def brute_force(scores, sizes, budget):
    """Reference: concatenate, stable-sort, take the longest prefix within the budget."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    unit_sizes = torch.cat(
        [torch.full((s.numel(),), z) if isinstance(z, int) else z.reshape(-1) for s, z in zip(scores, sizes)]
    )
    order = torch.sort(flat, stable=True).indices
    taken = torch.zeros(flat.numel(), dtype=torch.bool)
    taken[order[unit_sizes[order].cumsum(0) <= budget]] = True
    return [t.reshape(s.shape) for t, s in zip(taken.split([s.numel() for s in scores]), scores)]


def random_problem(seed):
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, 6, (1,), generator=g))
    scores = [
        torch.randint(0, 25, (int(torch.randint(1, 400, (1,), generator=g)),), generator=g).float() for _ in range(k)
    ]
    sizes = [
        int(torch.randint(1, 5, (1,), generator=g)) if i % 2 else torch.randint(0, 5, s.shape, generator=g)
        for i, s in enumerate(scores)
    ]
    total = sum(s.numel() * z if isinstance(z, int) else int(z.sum()) for s, z in zip(scores, sizes))
    return scores, sizes, int(torch.randint(0, total + 1, (1,), generator=g))


def small_sample(monkeypatch, sample):
    """Force the sampled-bracket path with a tiny sample (or the direct path with a huge threshold)."""
    monkeypatch.setattr(selection, "_DIRECT", sample)
    monkeypatch.setattr(selection, "_MIN_SAMPLE", sample)
    monkeypatch.setattr(selection, "_SORTED", 8)  # and the median-halving path for units of mixed sizes


@pytest.mark.parametrize("uniform", [False, True], ids=["mixed-sizes", "equal-sizes"])
@pytest.mark.parametrize("sample", [1 << 20, 32], ids=["direct", "bracketed"])
@pytest.mark.parametrize("seed", range(40))
def test_exact_against_brute_force(seed, sample, uniform, monkeypatch):
    small_sample(monkeypatch, sample)
    scores, sizes, budget = random_problem(seed)
    if uniform:  # units of one size resolve the bracket by a k-th value search instead of a sort
        sizes = [3] * len(scores)
        budget = budget % (3 * sum(s.numel() for s in scores) + 1)
        scores = [torch.where(s < 3, -float("inf"), s) for s in scores]  # already-pruned units, tied at -inf
    for nearest in (False, True):
        got = prune_lowest(scores, sizes, budget, nearest=nearest)
        want = brute_force(scores, sizes, budget)
        if nearest:  # the prefix nearest the budget is the floor's, or one unit more
            extra = sum(int(g.sum()) - int(w.sum()) for g, w in zip(got, want))
            assert extra in (0, 1)
            assert all(torch.equal(g & w, w) for g, w in zip(got, want)), "nearest extends the floor's prefix"
            got_elems = sum(count_pruned(g, z) for g, z in zip(got, sizes))
            want_elems = sum(count_pruned(w, z) for w, z in zip(want, sizes))
            assert abs(got_elems - budget) <= abs(want_elems - budget)
            continue
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_nearest_is_closer_or_equal():
    scores = [torch.rand(50)]
    floor = prune_lowest(scores, [4], 99)
    near = prune_lowest(scores, [4], 99, nearest=True)
    assert count_pruned(floor[0], 4) == 96 and count_pruned(near[0], 4) == 100
    tie = prune_lowest(scores, [4], 98, nearest=True)
    assert count_pruned(tie[0], 4) == 96, "a tie takes the smaller count"


@pytest.mark.parametrize("budget", [4000, 2000], ids=["floor-fits", "floor-exceeds-budget"])
def test_bracket_with_already_pruned_units(monkeypatch, budget):
    small_sample(monkeypatch, 64)
    s = torch.rand(5000)
    s[:3000] = -float("inf")
    mask = prune_lowest([s], [1], budget)[0]
    assert mask[: min(3000, budget)].all() and mask.sum() == budget
    assert torch.equal(mask, brute_force([s], [1], budget)[0])


def test_local_scope_each_layer():
    scores = [torch.rand(100), torch.rand(40) + 5]
    picks = select(scores, [1, 1], [100, 40], 0.25, "local")
    assert [int(p.sum()) for p in picks] == [25, 10]


def test_global_scope_ranks_across_layers():
    scores = [torch.rand(100), torch.rand(100) + 5]
    picks = select(scores, [1, 1], [100, 100], 0.5, "global", max_sparsity=1.0)
    assert int(picks[0].sum()) == 100 and int(picks[1].sum()) == 0


def test_global_respects_max_and_min_per_layer():
    scores = [torch.rand(100), torch.rand(100) + 5, torch.rand(100) + 10]
    picks = select(scores, [1, 1, 1], [100] * 3, 0.5, "global", min_sparsity=0.1, max_sparsity=0.8)
    counts = [int(p.sum()) for p in picks]
    assert counts[0] == 80, "capped at max"
    assert counts[2] == 10, "raised to min"
    assert sum(counts) == 150, "budget met exactly"


def test_unknown_scope():
    with pytest.raises(ValueError, match="scope 'layer' is not valid; choose one of 'global', 'local'"):
        select([torch.rand(3)], [1], [3], 0.5, "layer")


def test_nan_never_pruned():
    s = torch.tensor([float("nan"), 1.0, 2.0])
    assert prune_lowest([s], [1], 3)[0].tolist() == [False, True, True]
