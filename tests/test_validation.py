"""One test per bad input: a clear error before the first training step, the model untouched."""

from __future__ import annotations

import pytest
import torch
from conftest import make_loader, make_module, make_trainer

from lightning_prune import Pruning
from lightning_prune.schedules import Iterative


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"pattern": "5x"}, ValueError, r"pattern '5x' is not valid; use 'NxM' \(e.g. '4x1'\)"),
        ({"pattern": "4:2"}, ValueError, "N:M needs 1 <= N < M"),
        ({"pattern": 3}, TypeError, "pattern must be a str or a Pattern"),
        ({"criterion": "l2"}, ValueError, "criterion 'l2' is not valid; choose one of 'magnitude'"),
        ({"scope": "layer"}, ValueError, "scope 'layer' is not valid; choose one of 'global', 'local', 'lamp'"),
        ({"target_sparsity": 1.0}, ValueError, r"target_sparsity must be a number in \[0, 1\), got 1.0"),
        ({"target_sparsity": -0.1}, ValueError, r"target_sparsity must be a number in \[0, 1\), got -0.1"),
        ({"target_sparsity": "0.5"}, ValueError, r"target_sparsity must be a number in \[0, 1\), got '0.5'"),
        ({"target_sparsity": 0.6, "pattern": "2:4"}, ValueError, "above what pattern '2:4' can reach"),
        ({"min_sparsity_per_layer": 0.6, "max_sparsity_per_layer": 0.4}, ValueError, "min_sparsity_per_layer"),
        ({"target_sparsity": 0.99}, ValueError, "infeasible with min_sparsity_per_layer=0.0 and max_sparsity"),
        ({"target_sparsity": 0.1, "min_sparsity_per_layer": 0.2}, ValueError, "infeasible"),
        ({"max_sparsity_per_layer": 1.5}, ValueError, r"max_sparsity_per_layer must be a number in \[0, 1\]"),
        ({"schedule": "iterative"}, TypeError, "schedule must be OneShot, Iterative or None"),
        ({"op_types": []}, ValueError, "op_types must be a non-empty list"),
        ({"include": "net.("}, ValueError, r"include regex 'net.\(' is not valid"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_constructor_rejects(kwargs, error, match):
    args = {"target_sparsity": 0.5, **kwargs}
    with pytest.raises(error, match=match):
        Pruning(**args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start_step": 9, "end_step": 3}, r"start_step \(9\) must be <= end_step \(3\)"),
        ({"start_step": 0, "end_step": 3, "frequency": 0}, "frequency must be an int >= 1, got 0"),
        ({"start_step": 0, "end_step": 3, "decay": "step"}, "decay 'step' is not valid; choose one of 'exp'"),
    ],
)
def test_schedule_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Iterative(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"include": r"encoder\..*"},
            r"include pattern 'encoder\\\\..\*' matches no module.*available: net.0, net.2, net.4",
        ),
        ({"exclude": "head"}, "exclude pattern 'head' matches no module.*available: net.0, net.2, net.4"),
        ({"op_types": ("Conv2d",)}, "no parameter to prune.*op_types=\\['Conv2d'\\]"),
    ],
)
def test_fit_rejects_before_training_with_model_untouched(kwargs, match):
    module = make_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    cb = Pruning(0.5, pattern="unstructured", **kwargs)
    with pytest.raises(ValueError, match=match):
        make_trainer([cb], max_steps=4).fit(module, make_loader(module))
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name])
    assert module.trainer.global_step == 0


def test_pattern_that_cannot_apply_names_the_layer():
    module = make_module()
    cb = Pruning(0.5, pattern="2:4", include=r"net\.narrow")
    module.net.add_module("narrow", torch.nn.Linear(3, 5))  # 3 inputs: one group, partial, prunes 1 of 3
    with pytest.raises(ValueError, match=r"pattern '2:4' can prune at most 0.3333 .* \['net.narrow.weight'\]"):
        make_trainer([cb], max_steps=4).fit(module, make_loader(module))


def test_default_schedule_needs_finite_training():
    module = make_module()
    cb = Pruning(0.5, pattern="unstructured")
    with pytest.raises(ValueError, match="schedule=None prunes over the whole run"):
        make_trainer([cb], max_steps=-1, max_epochs=-1, max_time={"seconds": 5}).fit(module, make_loader(module))


def _fit(net, cb, steps=2):
    import lightning.pytorch as pl
    from conftest import TinyModule, make_loader, make_trainer

    module = TinyModule(net, (net[0].in_features,))
    make_trainer([cb], max_steps=steps).fit(module, make_loader(module))
    assert isinstance(module, pl.LightningModule)
    return module


def test_pattern_that_fits_none_of_the_targets_is_an_error_before_training():
    from torch import nn

    from lightning_prune import Pruning

    net = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 3))  # 1 input: no room for 2 of every 4
    before = net[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"2:4.*at most 0\.0000.*net\.0\.weight"):
        _fit(net, Pruning(0.5, pattern="2:4", include=r"net\.0"))
    assert torch.equal(net[0].weight, before)


def test_small_shortfall_from_partial_groups_warns_and_prunes_what_it_can():
    from torch import nn

    from lightning_prune import Pruning
    from lightning_prune.schedules import OneShot

    net = nn.Sequential(nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 3))
    cb = Pruning(0.5, pattern="2:4", schedule=OneShot(step=0))  # 9 inputs: a last group of 1 that keeps its weight
    with pytest.warns(UserWarning, match="as far as the pattern allows"):
        _fit(net, cb)
    assert 0.49 < cb.sparsity() < 0.5
