"""Hostile input: each case is a clear error before training, or a warning where carrying on is right."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyModule, make_loader, make_module, make_trainer
from torch import nn

from lightning_prune import PatternLock, Pruning
from lightning_prune.schedules import Iterative, OneShot


def fit_raises(module: TinyModule, cb: Pruning, match: str) -> None:
    """``fit`` raises ``ValueError`` matching ``match`` and leaves every parameter as it was."""
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=match):
        make_trainer([cb]).fit(module, make_loader(module))
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the model was modified"


def all_zero_where_pruned(module: nn.Module, cb: Pruning) -> bool:
    params = dict(module.named_parameters())
    return all(bool((params[fqn][~mask] == 0).all()) for fqn, mask in cb.masks.items())


class TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 12)
        self.body = nn.Linear(12, 12)
        self.head = nn.Linear(12, 12, bias=False)
        self.head.weight = self.embed.weight  # tied, as in language models

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))[:, :3]


def test_weight_tied_to_another_module_is_refused_naming_both():
    module = TinyModule(TiedNet(), (12,))
    fit_raises(
        module,
        Pruning(0.5, "unstructured", schedule=OneShot(0)),
        r"'net.head.weight' is shared with \['net.embed.weight'\]",
    )


def test_tied_weight_can_be_excluded():
    module = TinyModule(TiedNet(), (12,))
    cb = Pruning(0.5, "unstructured", "magnitude", schedule=OneShot(0), exclude=r"net\.head")
    make_trainer([cb], max_steps=2).fit(module, make_loader(module))
    assert list(cb.masks) == ["net.body.weight"]
    assert bool((module.net.embed.weight != 0).all()), "the embedding is untouched"


def test_weight_shared_by_two_target_layers_is_pruned_once():
    net = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    net[2].weight = net[0].weight
    module = TinyModule(net, (12,))
    cb = Pruning(0.5, "unstructured", "magnitude", schedule=OneShot(0))
    make_trainer([cb], max_steps=3).fit(module, make_loader(module))
    assert list(cb.masks) == ["net.0.weight", "net.4.weight"]
    assert all_zero_where_pruned(module, cb) and bool((net[2].weight == net[0].weight).all())


@pytest.mark.parametrize("criterion", ["gradient", "snip", "snip_momentum"])
def test_frozen_weight_with_a_gradient_criterion_is_refused(criterion):
    module = make_module()
    module.net[2].weight.requires_grad_(False)
    fit_raises(module, Pruning(0.5, "unstructured", criterion, schedule=OneShot(0)), r"'net.2.weight' is frozen")


def test_frozen_weight_prunes_by_magnitude_and_stays_zero():
    module = make_module()
    module.net[2].weight.requires_grad_(False)
    cb = Pruning(0.5, "unstructured", "magnitude", schedule=Iterative(start_step=0, end_step=6, frequency=3))
    make_trainer([cb], max_steps=10).fit(module, make_loader(module))
    assert cb.sparsity() == pytest.approx(0.5, abs=0.01)
    assert bool((~cb.masks["net.2.weight"]).any()) and all_zero_where_pruned(module, cb)


def test_zero_size_weight_is_skipped_with_a_warning():
    module = make_module()
    module.empty = nn.Linear(0, 4)  # never called; holds a (4, 0) weight
    cb = Pruning(0.5, "unstructured", "magnitude", schedule=OneShot(0))
    with pytest.warns(UserWarning, match=r"'empty.weight' has shape \(4, 0\): no elements"):
        make_trainer([cb], max_steps=2).fit(module, make_loader(module))
    assert "empty.weight" not in cb.masks and cb.sparsity() == pytest.approx(0.5, abs=0.01)


class LlamaRMSNorm(nn.Module):
    """Named like transformers' norm: a 1-D scale that is no torch norm class."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class Scale(LlamaRMSNorm):
    """A 1-D weight in a class not named like a norm."""


@pytest.mark.parametrize("pattern", ["4x1", "unstructured"])
@pytest.mark.parametrize(
    ("layer", "kind"),
    [
        (nn.LayerNorm(8), "a normalisation layer"),
        (LlamaRMSNorm(8), "a normalisation layer"),
        (Scale(8), "a 1-D weight"),
    ],
    ids=["LayerNorm", "LlamaRMSNorm", "1-D"],
)
def test_norm_layers_and_one_dimensional_weights_are_never_pruned(pattern, layer, kind):
    net = nn.Sequential(nn.Linear(12, 8), layer, nn.Linear(8, 3))
    op = type(layer).__name__
    fit_raises(
        TinyModule(net, (12,)),
        Pruning(0.5, pattern, "magnitude", schedule=OneShot(0), op_types=["Linear", op]),
        rf"'net.1.weight' is the weight of {op}, {kind}: norm layers and 1-D weights are never pruned .* remove "
        rf"'{op}' from op_types or exclude 'net.1'",
    )


def test_target_zero_warns_and_prunes_nothing():
    module = make_module()
    cb = Pruning(0.0, "4x1", schedule=Iterative(start_step=0, end_step=4, frequency=2))
    with pytest.warns(UserWarning, match="target_sparsity=0: nothing will be pruned"):
        make_trainer([cb], max_steps=6).fit(module, make_loader(module))
    assert cb.sparsity() == 0.0


def test_target_099_needs_the_per_layer_cap_raised():
    with pytest.raises(ValueError, match="target_sparsity 0.99 is infeasible"):
        Pruning(0.99, "unstructured")
    module = make_module()
    cb = Pruning(0.99, "unstructured", "magnitude", schedule=OneShot(0), max_sparsity_per_layer=1.0)
    make_trainer([cb], max_steps=2).fit(module, make_loader(module))
    assert cb.sparsity() == pytest.approx(0.99, abs=0.002) and all_zero_where_pruned(module, cb)


def test_frequency_longer_than_the_window_warns_and_still_reaches_the_target():
    with pytest.warns(UserWarning, match="frequency 50 is longer than the window 0..6"):
        schedule = Iterative(start_step=0, end_step=6, frequency=50)
    assert schedule.event_steps() == [0, 6]
    module = make_module()
    cb = Pruning(0.6, "unstructured", "magnitude", schedule=schedule)
    make_trainer([cb], max_steps=8).fit(module, make_loader(module))
    assert cb.sparsity() == pytest.approx(0.6, abs=0.01)


def test_end_step_beyond_training_warns_with_the_sparsity_reached():
    module = make_module()
    cb = Pruning(0.8, "unstructured", "magnitude", schedule=Iterative(start_step=0, end_step=100, frequency=4))
    with pytest.warns(UserWarning, match=r"sparsity reached 0\.\d+ of target 0.8"):
        make_trainer([cb], max_steps=9).fit(module, make_loader(module))
    assert 0.0 < cb.sparsity() < 0.8


def test_lazy_module_not_initialised_is_refused_and_works_once_initialised():
    net = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 3))
    module = TinyModule(net, (12,))
    with pytest.raises(ValueError, match=r"'net.0.weight' belongs to a lazy module \(LazyLinear\)"):
        make_trainer([Pruning(0.5, "unstructured", schedule=OneShot(0))]).fit(module, make_loader(module))
    module(torch.zeros(1, 12))  # one forward pass materialises it
    cb = Pruning(0.5, "unstructured", "magnitude", schedule=OneShot(0))
    make_trainer([cb], max_steps=2).fit(module, make_loader(module))
    assert cb.masks["net.0.weight"].shape == (8, 12) and all_zero_where_pruned(module, cb)


def test_two_callbacks_claiming_one_weight_are_refused():
    module = make_module()
    first = Pruning(0.5, "unstructured", "magnitude", schedule=OneShot(0))
    second = PatternLock(include=r"net\.2")
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=r"Pruning and PatternLock both claim \['net.2.weight'\]"):
        make_trainer([first, second]).fit(module, make_loader(module))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_two_callbacks_with_disjoint_targets_work():
    module = make_module()
    first = Pruning(0.5, "unstructured", "magnitude", schedule=OneShot(0), include=r"net\.0")
    second = Pruning(0.25, "unstructured", "magnitude", schedule=OneShot(1), exclude=r"net\.0")
    make_trainer([first, second], max_steps=3).fit(module, make_loader(module))
    assert list(first.masks) == ["net.0.weight"] and list(second.masks) == ["net.2.weight", "net.4.weight"]
    assert first.sparsity() == pytest.approx(0.5, abs=0.01) and second.sparsity() == pytest.approx(0.25, abs=0.02)


class Rebuilt(TinyModule):
    """Replaces layers in ``configure_model``, which Lightning calls after the callbacks' ``setup``."""

    def __init__(self, width: int) -> None:
        super().__init__(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)), (12,))
        self.width = width

    def configure_model(self) -> None:
        self.net[0] = nn.Linear(12, self.width)
        self.net[2] = nn.Linear(self.width, 3)


def test_module_replaced_with_another_shape_in_configure_model_prunes_the_new_one():
    module = Rebuilt(width=20)
    cb = Pruning(0.5, "unstructured", "magnitude", schedule=OneShot(0))
    make_trainer([cb], max_steps=2).fit(module, make_loader(module))
    assert cb.masks["net.0.weight"].shape == (20, 12) and all_zero_where_pruned(module, cb)


def test_module_replaced_with_the_same_shape_after_setup_prunes_the_new_parameter():
    module = Rebuilt(width=16)
    cb = Pruning(0.5, "unstructured", "magnitude", schedule=OneShot(0))
    make_trainer([cb], max_steps=2).fit(module, make_loader(module))
    assert cb.pruner.targets["net.0.weight"] is module.net[0].weight
    assert all_zero_where_pruned(module, cb) and cb.sparsity() == pytest.approx(0.5, abs=0.01)


class Manual(pl.LightningModule):
    """Manual optimization, with one optimizer for ``a`` and, optionally, a second one for ``b``."""

    def __init__(self, two_optimizers: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.a = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
        self.b = nn.Linear(12, 3)
        self.two = two_optimizers

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for opt in optimizers:
            opt.zero_grad()
        loss = nn.functional.cross_entropy(self.a(x) + self.b(x), y)
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()

    def configure_optimizers(self) -> Any:
        if not self.two:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return [torch.optim.SGD(self.a.parameters(), lr=0.05), torch.optim.Adam(self.b.parameters(), lr=0.01)]


def test_manual_optimization_prunes_on_the_optimizer_steps():
    module = Manual(two_optimizers=False)
    loader = make_loader(make_module())
    cb = Pruning(0.6, "unstructured", "snip_momentum", schedule=Iterative(start_step=2, end_step=8, frequency=2))
    make_trainer([cb], max_steps=12).fit(module, loader)
    assert cb.sparsity() == pytest.approx(0.6, abs=0.01) and all_zero_where_pruned(module, cb)


def test_two_optimizers_work_when_one_holds_every_target():
    module = Manual(two_optimizers=True)
    loader = make_loader(make_module())
    cb = Pruning(
        0.6,
        "unstructured",
        "snip_momentum",
        schedule=Iterative(start_step=2, end_step=8, frequency=2),
        include=r"a\..*",
    )
    make_trainer([cb], max_steps=12).fit(module, loader)
    assert set(cb.masks) == {"a.0.weight", "a.2.weight"}
    assert cb.sparsity() == pytest.approx(0.6, abs=0.01) and all_zero_where_pruned(module, cb)


def test_two_optimizers_splitting_the_targets_are_refused_before_training():
    module = Manual(two_optimizers=True)
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=r"with 2 optimizers, the weights to prune must all be stepped by exactly one"):
        make_trainer([Pruning(0.5, "unstructured", schedule=OneShot(0))]).fit(module, make_loader(make_module()))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


class Block(nn.Module):
    """A container without a weight of its own, like transformers' ``LlamaMLP``."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 16)
        self.down = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize(
    ("op_types", "match"),
    [
        ("linear", r"op_types 'linear' names no module class; class names are case-sensitive: 'Linear'"),
        (["Block"], r"op_types 'Block' matches modules without a `weight` parameter \(e.g. 'net'\); op_types names"),
        (["Conv2d"], r"no parameter to prune: .* classes in the model that hold a weight: \['Linear'\]"),
    ],
    ids=["miscased", "container", "absent"],
)
def test_op_types_that_match_no_weight_say_why(op_types, match):
    fit_raises(TinyModule(Block(), (12,)), Pruning(0.5, "unstructured", schedule=OneShot(0), op_types=op_types), match)
