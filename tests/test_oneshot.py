"""One-layer post-training pruning: SparseGPT and Wanda against plain re-implementations of their papers."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_prune.oneshot import sparsegpt_prune, wanda_mask
from lightning_prune.patterns import NM


def _data(rows: int = 16, cols: int = 32, n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and correlated inputs (so that the OBS update has something to compensate)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols) + torch.eye(cols)
    x = torch.randn(n, cols, generator=g) @ mix
    return torch.randn(rows, cols, generator=g), x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 / x.shape[0] * x.T @ x


def _reference_sparsegpt(w: torch.Tensor, h: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, block: int):
    """SparseGPT written as the paper's pseudo-code reads, one column at a time, no lazy batching."""
    w, h = w.clone().double(), h.clone().double()
    cols = w.shape[1]
    h += 0.01 * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    mask = torch.zeros_like(w, dtype=torch.bool)  # True = pruned
    for i in range(cols):
        if nm is None and i % block == 0:
            score = w[:, i : i + block] ** 2 / torch.diagonal(u)[i : i + block] ** 2
            k = int(score.numel() * sparsity)
            mask[:, i : i + block] = score <= torch.sort(score.flatten()).values[k]
        if nm is not None and i % nm[1] == 0:
            score = w[:, i : i + nm[1]] ** 2 / torch.diagonal(u)[i : i + nm[1]] ** 2
            mask[:, i : i + nm[1]].scatter_(1, torch.topk(score, nm[0], 1, largest=False).indices, True)
        err = torch.where(mask[:, i], w[:, i], 0.0) / u[i, i]
        w[:, i:] -= err[:, None] * u[i, i:][None, :]
        w[:, i] = torch.where(mask[:, i], 0.0, w[:, i])
    return w.float(), ~mask


@pytest.mark.parametrize(
    ("sparsity", "pattern", "block"),
    [(0.5, "unstructured", 8), (0.7, "unstructured", 32), (0.5, "2:4", 8), (0.5, "4:8", 16)],
)
def test_sparsegpt_equals_the_column_by_column_algorithm(sparsity, pattern, block):
    w, x = _data()
    nm = None if pattern == "unstructured" else tuple(int(v) for v in pattern.split(":"))
    new, kept = sparsegpt_prune(w, _hessian(x), sparsity, pattern, block_size=block)
    ref_new, ref_kept = _reference_sparsegpt(w, _hessian(x), sparsity, nm, block)
    assert torch.equal(kept, ref_kept)
    assert torch.allclose(new, ref_new, atol=1e-4)
    assert not new[~kept].any()
    assert not torch.equal(new[kept], w[kept])  # the kept weights were updated
    if nm is not None:
        assert NM(*nm).conforms(kept)
        assert int((~kept).sum()) == w.numel() * nm[0] // nm[1]
    else:  # per block the reference's `<=` rule: the count is exact up to ties
        assert abs(int((~kept).sum()) - round(sparsity * w.numel())) <= w.shape[1] // block


def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude():
    w, x = _data(rows=32, cols=64, n=1024)
    h = _hessian(x)

    def error(new: torch.Tensor) -> float:
        return float((x @ (w - new).T).square().sum() / (x @ w.T).square().sum())

    sgpt, _ = sparsegpt_prune(w, h, 0.5)
    wanda = w * wanda_mask(w, x.square().sum(0), 0.5)
    magnitude = w * (w.abs() > w.abs().median(dim=1, keepdim=True).values)
    assert error(sgpt) < error(wanda) < error(magnitude)


def test_sparsegpt_dead_columns_and_convolutions():
    w, x = _data(rows=8, cols=36)
    x[:, 5] = 0.0  # an input that never fires: its weights go to zero, the rest is pruned as usual
    conv = w.reshape(8, 3, 3, 4).permute(0, 3, 1, 2)  # [Cout, Cin, kh, kw] whose matrix view is w
    new, kept = sparsegpt_prune(conv, _hessian(x), 0.5, block_size=12)
    assert new.shape == conv.shape and kept.shape == conv.shape
    flat_new, flat_kept = sparsegpt_prune(w, _hessian(x), 0.5, block_size=12)
    assert torch.equal(new.permute(0, 2, 3, 1).reshape(8, 36), flat_new)
    assert not flat_new[:, 5].any()
    assert torch.equal(kept.permute(0, 2, 3, 1).reshape(8, 36), flat_kept)


def test_wanda_prunes_exactly_per_row_by_weight_times_input_norm():
    w, x = _data(rows=12, cols=40)
    norms = x.square().sum(0)
    kept = wanda_mask(w, norms, 0.3)
    assert ((~kept).sum(dim=1) == math.floor(40 * 0.3)).all()  # exactly floor(cols * s) in every row
    score = w.abs() * norms.sqrt()
    for row in range(12):
        order = torch.argsort(score[row], stable=True)
        assert set(order[:12].tolist()) == set((~kept[row]).nonzero().flatten().tolist())
    two_four = wanda_mask(w, norms, 0.5, "2:4")
    assert NM(2, 4).conforms(two_four) and int((~two_four).sum()) == w.numel() // 2
    groups = score.reshape(12, 10, 4)
    lowest = torch.topk(groups, 2, dim=2, largest=False).indices
    assert torch.equal((~two_four).reshape(12, 10, 4).gather(2, lowest), torch.ones(12, 10, 2, dtype=torch.bool))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda w, h, n: wanda_mask(w, n, 1.0), ValueError, r"sparsity must be a number in \[0, 1\), got 1.0"),
        (lambda w, h, n: wanda_mask(w, n, 0.5, "4x1"), ValueError, "pattern '4x1' is not valid here"),
        (lambda w, h, n: wanda_mask(w, n, 0.6, "2:4"), ValueError, "prunes exactly 2/4 of the weights; sparsity 0.6"),
        (lambda w, h, n: wanda_mask(w, n[:-1], 0.5), ValueError, "input_sq_norms has 31 entries"),
        (lambda w, h, n: sparsegpt_prune(w, h[:-1], 0.5), ValueError, r"hessian has shape \(31, 32\)"),
        (lambda w, h, n: sparsegpt_prune(w, h, 0.5, "2:4", block_size=6), ValueError, "block_size"),
        (lambda w, h, n: sparsegpt_prune(w, h, 0.5, damp=-1.0), ValueError, "damp must be a number >= 0"),
        (lambda w, h, n: sparsegpt_prune(w, h * math.nan, 0.5), RuntimeError, "non-finite"),
        (lambda w, h, n: sparsegpt_prune(w, -h, 0.5, damp=0.0), RuntimeError, "not positive definite"),
    ],
)
def test_bad_input_is_refused_with_the_weight_untouched(call, error, match):
    w, x = _data()
    before = w.clone()
    with pytest.raises(error, match=match):
        call(w, _hessian(x), x.square().sum(0))
    assert torch.equal(w, before)
