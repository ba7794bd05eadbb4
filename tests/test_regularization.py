"""GroupLasso: the proximal step, its bounds, and how it is configured."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_loader, make_module, make_trainer
from hydra.utils import instantiate

from lightning_prune import Pruning
from lightning_prune.patterns import as_matrix, from_matrix, parse_pattern
from lightning_prune.regularization import GroupLasso, group_norms
from lightning_prune.schedules import Iterative


def reference(weight, pattern, threshold):
    """Group by group, in plain Python: the matrix view cut into blocks/channels/elements."""
    m = as_matrix(weight.clone())
    rows, cols = m.shape
    if pattern == "unstructured":
        r, c = 1, 1
    elif pattern == "channelx1":  # whole input channels: every kernel position of one channel
        out = weight.clone()
        for ch in range(weight.shape[1]):
            g = out[:, ch]
            out[:, ch] = g * max(0.0, 1 - threshold / float(g.norm())) if g.norm() > 0 else g * 0
        return out
    elif pattern == "1xchannel":
        r, c = 1, cols
    else:
        r, c = map(int, pattern.split("x"))
    for i in range(0, rows, r):
        for j in range(0, cols, c):
            g = m[i : i + r, j : j + c]
            norm = float(g.norm())
            g.mul_(max(0.0, 1 - threshold / norm) if norm > 0 else 0.0)
    return from_matrix(m, weight.shape)


def shrink(weight, pattern, lr, coeff):
    p = torch.nn.Parameter(weight.clone())
    p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD([p], lr=lr)
    lasso = GroupLasso(coeff)
    lasso.attach(object(), parse_pattern(pattern))
    lasso.before_step({"w": p}, opt)
    lasso.after_step({"w": p})
    return p.detach()


@pytest.mark.parametrize("shape", [(8, 12), (7, 10), (6, 5, 3, 3)])
@pytest.mark.parametrize("pattern", ["unstructured", "4x1", "2x2", "1x4", "channelx1", "1xchannel"])
def test_matches_the_group_by_group_formula(pattern, shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[0], *[1] * (len(shape) - 1))  # some weak rows
    lr, coeff = 0.5, 0.8
    assert torch.allclose(shrink(w, pattern, lr, coeff), reference(w, pattern, lr * coeff), atol=1e-6)


@pytest.mark.parametrize("pattern", ["unstructured", "4x1", "channelx1"])
@pytest.mark.parametrize("threshold", [1e-4, 0.3, 3.0, 1e6])
def test_never_scales_up_never_flips_sign(pattern, threshold):
    torch.manual_seed(1)
    w = torch.randn(16, 24) * 10 ** torch.empty(16, 1).uniform_(-4, 2)
    out = shrink(w, pattern, 1.0, threshold)
    assert (out.abs() <= w.abs()).all()
    assert (out * w >= 0).all()
    norms = group_norms(w, parse_pattern(pattern))
    dead = group_norms(out, parse_pattern(pattern)) == 0
    assert torch.equal(dead, norms <= threshold), "exactly the groups under lr*coeff become zero"


def test_learning_rate_comes_from_each_param_group():
    a = torch.nn.Parameter(torch.ones(4, 4))
    b = torch.nn.Parameter(torch.ones(4, 4))
    for p in (a, b):
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD([{"params": [a], "lr": 0.0}, {"params": [b], "lr": 1.0}], lr=0.3)
    lasso = GroupLasso(0.5)
    lasso.attach(object(), parse_pattern("4x1"))
    lasso.before_step({"a": a, "b": b}, opt)
    lasso.after_step({"a": a, "b": b})
    assert torch.equal(a.detach(), torch.ones(4, 4)), "lr 0: untouched"
    assert torch.allclose(b.detach(), torch.full((4, 4), 1 - 0.5 / 2)), "block norm 2, factor 1 - 0.5/2"


def block_stats(module, masks):
    norms = [group_norms(module.get_parameter(n).detach(), parse_pattern("4x1")) for n in masks]
    return sum(float(n.sum()) for n in norms), sum(int((n == 0).sum()) for n in norms)


def prune(coeff, **lasso):
    module = make_module("mlp", "sgd")
    cb = Pruning(
        0.5,
        pattern="4x1",
        schedule=Iterative(start_step=0, end_step=16, frequency=4),
        regularization=GroupLasso(coeff, **lasso),
    )
    make_trainer([cb], max_steps=20).fit(module, make_loader(module))
    return module, cb


def test_under_pruning_the_coefficient_shrinks_blocks_and_zeros_stay():
    dense_module, dense_cb = prune(0.0)
    lasso_module, lasso_cb = prune(0.5)
    norm0, zero0 = block_stats(dense_module, dense_cb.masks)
    norm1, zero1 = block_stats(lasso_module, lasso_cb.masks)
    assert norm1 < norm0
    assert zero1 >= zero0
    for name, mask in lasso_cb.masks.items():
        assert (lasso_module.get_parameter(name).detach()[~mask] == 0).all()
    assert lasso_cb.sparsity() == pytest.approx(0.5, abs=0.02)


def test_standalone_window():
    def run(max_steps, **window):
        module = make_module("mlp", "sgd")
        lasso = GroupLasso(1e6, pattern="4x1", include=r"net\.0", **window)
        make_trainer([lasso], max_steps=max_steps).fit(module, make_loader(module))
        return module.get_parameter("net.0.weight").detach()

    assert (run(4, start_step=4) != 0).any(), "no step before start_step"
    assert (run(6, start_step=4) == 0).all(), "a huge coefficient zeroes every block inside the window"
    assert (run(8, start_step=0, end_step=2) != 0).any(), "weights regrow after end_step"


def test_hydra_instantiation_keeps_the_coefficient():
    cb = instantiate(
        {
            "_target_": "lightning_prune.Pruning",
            "target_sparsity": 0.5,
            "regularization": {"_target_": "lightning_prune.regularization.GroupLasso", "coeff": 0.025},
        }
    )
    assert cb.regularization.coeff == 0.025
    assert cb.config()["regularization"] == "GroupLasso(coeff=0.025)"


@pytest.mark.parametrize("coeff", [-1.0, math.nan, math.inf, "1e-4", True, None])
def test_bad_coefficient(coeff):
    with pytest.raises(ValueError, match="coeff"):
        GroupLasso(coeff)  # type: ignore[arg-type]


def test_nm_pattern_refused():
    with pytest.raises(ValueError, match="N:M"):
        GroupLasso(pattern="2:4")
    with pytest.raises(ValueError, match="N:M"):
        Pruning(0.5, pattern="2:4", regularization=GroupLasso())


def test_targeting_arguments_under_pruning_are_refused_not_dropped():
    with pytest.raises(ValueError, match="op_types, start_step"):
        Pruning(0.5, regularization=GroupLasso(op_types="Linear", start_step=3))
    with pytest.raises(ValueError, match="pattern"):
        Pruning(0.5, pattern="4x1", regularization=GroupLasso(pattern="2x2"))
    Pruning(0.5, pattern="4x1", regularization=GroupLasso(pattern="4x1"))  # the same pattern is fine


def test_one_instance_one_owner():
    lasso = GroupLasso()
    Pruning(0.5, regularization=lasso)
    with pytest.raises(ValueError, match="already attached"):
        Pruning(0.5, regularization=lasso)


def test_also_in_callbacks_is_an_error():
    lasso = GroupLasso()
    cb = Pruning(0.5, regularization=lasso, schedule=Iterative(start_step=0, end_step=4, frequency=2))
    module = make_module("mlp")
    with pytest.raises(ValueError, match="do not also pass it"):
        make_trainer([cb, lasso], max_steps=4).fit(module, make_loader(module))


def test_regularization_must_be_group_lasso():
    with pytest.raises(TypeError, match="GroupLasso"):
        Pruning(0.5, regularization="group_lasso")  # type: ignore[arg-type]


@pytest.mark.parametrize("op_types", [[], "", [3]])
def test_group_lasso_rejects_empty_or_bad_op_types(op_types):
    with pytest.raises(ValueError, match="GroupLasso op_types must be a non-empty list of module class names"):
        GroupLasso(1e-3, op_types=op_types)
