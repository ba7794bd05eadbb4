"""Per-unit scores and multipliers: the memory-lean forms must behave exactly like per-weight ones."""

from __future__ import annotations

import pytest
import torch
from conftest import make_loader, make_module, make_trainer

from lightning_prune import Pruning
from lightning_prune.engine import masks as masked
from lightning_prune.engine import scores
from lightning_prune.patterns import parse_pattern
from lightning_prune.schedules import Iterative


def fit(pattern: str, kind: str, max_steps: int = 12) -> Pruning:
    target = 0.5 if ":" in pattern else 0.6
    cb = Pruning(target, pattern=pattern, criterion="snip_momentum", schedule=Iterative(2, 14, 3))
    module = make_module(kind, "adamw")
    make_trainer([cb], max_steps=max_steps).fit(module, make_loader(module))
    return cb


@pytest.mark.parametrize(("kind", "pattern"), [("mlp", "4x1"), ("cnn", "2x3"), ("cnn", "unstructured"), ("mlp", "2:4")])
def test_scoring_in_row_slices_matches_whole_tensors(monkeypatch, kind, pattern):
    whole = fit(pattern, kind)
    monkeypatch.setattr(scores, "_SLICE_ELEMENTS", 10)  # every weight split into many row slices
    sliced = fit(pattern, kind)
    assert whole.pruner.states and sliced.pruner.states
    for name, state in whole.pruner.states.items():
        a, b = state["score"], sliced.pruner.states[name]["score"]
        assert torch.equal(a == -torch.inf, b == -torch.inf)
        torch.testing.assert_close(a[a > -torch.inf], b[b > -torch.inf], rtol=1e-6, atol=0.0)
    for name, mask in whole.masks.items():
        assert torch.equal(sliced.masks[name], mask), name


def test_whole_unit_masks_get_per_unit_multipliers():
    cb = fit("4x1", "mlp", max_steps=20)
    module_params = dict(cb.pruner.targets)
    views = dict(zip(cb.masks, cb.pruner._unit_views))
    # Linear(12, 16) tiles into 4x1 blocks; Linear(16, 10) and Linear(10, 3) have partial blocks.
    assert [views[n] is not None for n in cb.masks] == [True, False, False]
    for (name, mask), mult, view in zip(cb.masks.items(), cb.pruner._multipliers, cb.pruner._unit_views):
        weight = module_params[name]
        assert (weight[~mask] == 0).all(), name
        if view is not None:
            assert mult.numel() * 4 == mask.numel()
            assert torch.equal(mult.expand(view).reshape(mask.shape).bool(), mask)
        else:
            assert torch.equal(mult.bool(), mask)


def test_partly_pruned_units_fall_back_to_per_weight_multipliers():
    pattern = parse_pattern("4x1")
    param = torch.randn(8, 3)
    mask = torch.ones(8, 3, dtype=torch.bool)
    mask[:4, 1] = False
    view, mult = masked.unit_multiplier(pattern, param, mask)
    assert view == (2, 4, 3) and mult is not None and mult.shape == (2, 1, 3)
    mask[5, 2] = False  # a block cut partially, as progressive pruning does between events
    assert masked.unit_multiplier(pattern, param, mask) == (None, None)
    channels_last = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    assert masked.unit_multiplier(pattern, channels_last, torch.ones(8, 4, 3, 3, dtype=torch.bool)) == (None, None)


def test_multiply_broadcasts_over_contiguous_and_strided_tensors():
    view = (2, 4, 6)
    mult = (torch.rand(2, 1, 6) > 0.5).float()
    expected_factor = mult.expand(view).reshape(8, 6)
    plain = torch.randn(8, 6)
    strided = torch.randn(6, 8).t()  # not contiguous: multiplied through a materialized factor
    per_weight = torch.randn(8, 6)
    per_weight_mult = (torch.rand(8, 6) > 0.5).float()
    before = [t.clone() for t in (plain, strided, per_weight)]
    masked.multiply([plain, strided, per_weight], [mult, mult, per_weight_mult], [view, view, None])
    assert torch.equal(plain, before[0] * expected_factor)
    assert torch.equal(strided, before[1] * expected_factor)
    assert torch.equal(per_weight, before[2] * per_weight_mult)


def test_all_kept_reads_bool_masks():
    assert masked.all_kept(torch.ones(3, 4, dtype=torch.bool))
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 1] = False
    assert not masked.all_kept(mask)
    assert not masked.all_kept(mask.t())
    assert masked.all_kept(torch.ones(0, dtype=torch.bool))
