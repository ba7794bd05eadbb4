"""Every pattern x criterion x scope through the same checks, on tiny Linear and Conv2d models."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import OPTIMIZERS, make_loader, make_module, make_trainer

from lightning_prune import Pruning
from lightning_prune.criteria import SnipMomentum
from lightning_prune.schedules import Iterative, OneShot

PATTERNS = ["unstructured", "4x1", "1x4", "2x2", "channelx1", "1xchannel", "2:4"]
CRITERIA = ["magnitude", "gradient", "snip", "snip_momentum"]


class Probe(pl.Callback):
    """Records masks and checks zeros after every batch (runs after the pruning callback)."""

    def __init__(self, pruning: Pruning) -> None:
        self.pruning = pruning
        self.history: list[dict[str, torch.Tensor]] = []
        self.violations = 0
        self.grad_violations = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = dict(pl_module.named_parameters())
        for name, mask in self.pruning.masks.items():
            grad = params[name].grad
            self.grad_violations += 0 if grad is None else int((grad[~mask] != 0).sum())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        params = dict(pl_module.named_parameters())
        masks = {k: v.clone() for k, v in self.pruning.masks.items()}
        for name, mask in masks.items():
            self.violations += int((params[name].detach()[~mask] != 0).sum())
        self.history.append(masks)


def unit_size(pattern: str, shape: tuple[int, ...]) -> int:
    if pattern in ("unstructured", "2:4"):
        return 1
    if pattern == "channelx1":
        return math.prod(shape) // shape[1]
    if pattern == "1xchannel":
        return math.prod(shape[1:])
    return 4


def run(pattern, criterion, scope, kind, target, optimizer="sgd", schedule=None, max_steps=20, **trainer_kwargs):
    module = make_module(kind, optimizer)
    cb = Pruning(
        target,
        pattern=pattern,
        criterion=criterion,
        scope=scope,
        schedule=schedule or Iterative(start_step=2, end_step=14, frequency=3, decay="exp"),
        max_sparsity_per_layer=0.98,
    )
    probe = Probe(cb)
    make_trainer([cb, probe], max_steps=max_steps, **trainer_kwargs).fit(module, make_loader(module))
    return module, cb, probe


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("scope", ["global", "local"])
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_contract(pattern, criterion, scope, kind):
    target = 0.5 if pattern == "2:4" else 0.6
    module, cb, probe = run(pattern, criterion, scope, kind, target)
    params = dict(module.named_parameters())
    assert set(cb.masks) == {n for n, p in params.items() if n.endswith("weight")}
    total = sum(m.numel() for m in cb.masks.values())
    # exact sparsity: the nearest count to round(target * n), so within half a unit (plus the rounding of
    # the budget itself) per ranked set
    if scope == "global":
        slack = (max(unit_size(pattern, tuple(params[n].shape)) for n in cb.masks) / 2 + 0.5) / total
    else:
        slack = sum(unit_size(pattern, tuple(params[n].shape)) / 2 + 0.5 for n in cb.masks) / total
    assert abs(cb.sparsity() - target) <= slack + 1e-9
    for name, mask in cb.masks.items():
        assert mask.dtype == torch.bool and mask.shape == params[name].shape
        assert cb.pattern.conforms(mask), f"{name} breaks {pattern}"
        assert (params[name].detach()[~mask] == 0).all(), "pruned weights are exactly zero"
        if scope == "local" and pattern in ("unstructured", "2:4"):
            assert abs((1 - mask.float().mean()) - target) <= 1 / mask.numel()
    assert probe.violations == 0, "zeros kept after every optimizer step"
    assert probe.grad_violations == 0, "the optimizer never sees a gradient for a pruned weight"
    for before, after in zip(probe.history, probe.history[1:]):
        for name in before:
            assert not (after[name] & ~before[name]).any(), "masks are monotone"


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_nm_exactly_n_zeros_per_group(kind):
    module, cb, _ = run("2:4", "snip_momentum", "global", kind, 0.5)
    from lightning_prune.patterns import as_matrix

    for name, mask in cb.masks.items():
        m = as_matrix(mask)
        full = m.shape[1] // 4 * 4
        groups = m[:, :full].reshape(m.shape[0], -1, 4)
        assert ((~groups).sum(-1) == 2).all(), name


@pytest.mark.parametrize(
    ("optimizer", "extra"),
    [
        ("sgd", {}),
        ("adam", {}),
        ("adamw", {}),
        ("adamw", {"accumulate_grad_batches": 3}),
        ("sgd", {"gradient_clip_val": 0.1}),
        ("adam", {"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"}),
    ],
    ids=["sgd-momentum", "adam", "adamw-wd", "accumulation", "clip-norm", "clip-value"],
)
def test_zeros_stay_zero(optimizer, extra):
    module, cb, probe = run("unstructured", "snip_momentum", "global", "mlp", 0.7, optimizer, max_steps=18, **extra)
    assert probe.violations == 0
    assert cb.sparsity() == pytest.approx(0.7, abs=1e-2)


@pytest.mark.parametrize("optimizer", sorted(set(OPTIMIZERS) - {"sgd", "adam", "adamw"}))
def test_zeros_stay_zero_with_every_optimizer(optimizer):
    # Known optimizers keep zeros once first moments are cleared at events; the others (Rprop, Adafactor, a
    # subclass) are re-zeroed after every step. Either way no pruned weight is ever non-zero after a step.
    _, cb, probe = run("4x1", "snip_momentum", "global", "mlp", 0.6, optimizer, max_steps=18)
    assert probe.violations == 0
    assert cb.sparsity() > 0.5


def test_partial_blocks_pruned_not_skipped():
    # 10 rows and 3 inputs do not divide a 4x1 block: partial blocks are units, no layer is left dense
    module, cb, _ = run("4x1", "magnitude", "local", "mlp", 0.6)
    for name, mask in cb.masks.items():
        assert (~mask).any(), f"{name} left dense"


def test_no_scoring_outside_window():
    calls: list[int] = []
    cb = Pruning(0.5, pattern="unstructured", criterion="snip_momentum", schedule=Iterative(5, 9, 2))
    original = cb.criterion.update

    def spy(state, weight, grad, reduce=None):
        calls.append(weight.shape)
        original(state, weight, grad, reduce)

    cb.criterion.update = spy  # type: ignore[method-assign]
    module = make_module()
    make_trainer([cb], max_steps=20).fit(module, make_loader(module))
    assert len(calls) == 5 * 3, "scores only on steps 5..9 (three targets)"
    assert not cb.pruner.states, "running scores freed after the last event"
    assert cb.criterion._buffer is None, "the |W·G| scratch buffer freed after the last event"


def test_snip_at_initialization_prunes_before_first_update():
    module = make_module("mlp", "sgd")
    initial = {n: p.detach().clone() for n, p in module.named_parameters()}
    x, y = next(iter(make_loader(module)))
    reference = make_module("mlp", "sgd")
    loss = torch.nn.functional.cross_entropy(reference(x), y)
    loss.backward()
    cb = Pruning(0.5, pattern="unstructured", criterion="snip", schedule=OneShot(step=0), scope="local")
    make_trainer([cb], max_steps=1).fit(module, make_loader(module))
    for name, mask in cb.masks.items():
        w, g = initial[name], dict(reference.named_parameters())[name].grad
        saliency = (w * g).abs().flatten()
        k = round(0.5 * saliency.numel())
        expected = torch.zeros_like(saliency, dtype=torch.bool)
        expected[torch.sort(saliency, stable=True).indices[:k]] = True
        assert torch.equal(~mask.flatten(), expected), name


def test_default_schedule_spans_training():
    module = make_module()
    cb = Pruning(0.6, pattern="unstructured", criterion="magnitude")
    make_trainer([cb], max_steps=-1, max_epochs=2).fit(module, make_loader(module))  # 16 steps
    assert cb.pruner.resolved_schedule is not None and cb.pruner.resolved_schedule.end == 15
    assert cb.sparsity() == pytest.approx(0.6, abs=1 / 382)


def test_two_callbacks_on_different_layers():
    module = make_module()
    a = Pruning(0.5, pattern="unstructured", criterion="magnitude", include=r"net\.0", schedule=OneShot(2))
    b = Pruning(0.5, pattern="2:4", criterion="magnitude", include=r"net\.2", schedule=OneShot(3))
    make_trainer([a, b], max_steps=5).fit(module, make_loader(module))
    assert list(a.masks) == ["net.0.weight"] and list(b.masks) == ["net.2.weight"]
    assert a.state_key != b.state_key


def test_masks_are_read_only():
    module, cb, _ = run("unstructured", "magnitude", "global", "mlp", 0.5)
    with pytest.raises(TypeError):
        cb.masks["x"] = torch.ones(1)  # type: ignore[index]


@pytest.mark.parametrize("pattern", ["unstructured", "4x1"])
def test_pruned_units_rank_below_live_zeros(pattern):
    # Event 1 prunes 20% by magnitude; then the first 40% of every weight is set to exactly zero, so live units
    # tie with pruned ones at magnitude 0 and come first by position. Pruned units must still rank first:
    # event 2 then lands on its 30% instead of keeping the old zeros on top of new ones.
    module = make_module("mlp", "sgd")
    module.lr = 0.0
    schedule = Iterative(start_step=0, end_step=2, frequency=2, decay="linear")
    cb = Pruning(0.3, pattern=pattern, criterion="magnitude", schedule=schedule)

    class ZeroFront(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 1:
                with torch.no_grad():
                    for name in cb.masks:
                        w = dict(pl_module.named_parameters())[name].view(-1)
                        w[: int(0.4 * w.numel())] = 0.0

    make_trainer([cb, ZeroFront()], max_steps=3).fit(module, make_loader(module))
    total = sum(m.numel() for m in cb.masks.values())
    unit = 1 if pattern == "unstructured" else 4
    assert abs(cb.sparsity() - 0.3) <= (unit / 2 + 0.5) / total


class PerWeightSnipMomentum(SnipMomentum):
    """SnipMomentum that does not declare ``per_unit``: the engine keeps its running scores per weight."""

    per_unit = False


@pytest.mark.parametrize(("kind", "pattern"), [("mlp", "4x1"), ("cnn", "4x1"), ("cnn", "2x3"), ("cnn", "channelx1")])
def test_running_scores_per_unit_prune_as_per_weight_scores(kind, pattern):
    schedule = Iterative(start_step=2, end_step=14, frequency=3)
    per_unit = Pruning(0.6, pattern=pattern, criterion="snip_momentum", schedule=schedule)
    per_weight = Pruning(0.6, pattern=pattern, criterion=PerWeightSnipMomentum(), schedule=schedule)
    for cb in (per_unit, per_weight):
        module = make_module(kind, "adamw")
        make_trainer([cb], max_steps=12).fit(module, make_loader(module))  # stops inside the window
    unit_states, weight_states = per_unit.pruner.states, per_weight.pruner.states
    assert unit_states and weight_states
    for name, mask in per_unit.masks.items():
        unit_scores, weight_scores = unit_states[name]["score"], weight_states[name]["score"]
        assert unit_scores.numel() < weight_scores.numel() == mask.numel(), "kept per unit, not per weight"
        reduced = per_unit.pattern.unit_scores(weight_scores)
        live = reduced > -math.inf
        assert torch.equal(unit_scores > -math.inf, live), "the same units carry -inf (pruned)"
        torch.testing.assert_close(unit_scores[live], reduced[live], rtol=1e-5, atol=1e-7)
    for name, mask in per_weight.masks.items():
        assert torch.equal(per_unit.masks[name], mask), name


def test_element_scores_in_a_checkpoint_are_reduced_to_units():
    schedule = Iterative(start_step=2, end_step=14, frequency=3)
    old = Pruning(0.6, pattern="4x1", criterion=PerWeightSnipMomentum(), schedule=schedule)
    module = make_module("mlp", "adamw")
    make_trainer([old], max_steps=8).fit(module, make_loader(module))
    state = old.state_dict()
    # element-shaped scores under the key of checkpoints written before per-unit scores and named states
    state["scores"] = {fqn: s["score"] for fqn, s in state.pop("states").items()}
    state["config"]["criterion"] = Pruning(0.6, criterion="snip_momentum").criterion.config()
    new = Pruning(0.6, pattern="4x1", criterion="snip_momentum", schedule=schedule)
    new.load_state_dict(state)
    make_trainer([new], max_steps=8).fit(make_module("mlp", "adamw"), make_loader(module))
    for fqn, saved in state["scores"].items():
        assert new.pruner.states[fqn]["score"].shape == new.pattern.unit_scores(saved).shape

    broken = dict(state, scores={fqn: s.flatten()[:5] for fqn, s in state["scores"].items()})
    refused = Pruning(0.6, pattern="4x1", criterion="snip_momentum", schedule=schedule)
    refused.load_state_dict(broken)
    with pytest.raises(ValueError, match=r"checkpoint scores for '.*' have shape \(5,\)"):
        make_trainer([refused], max_steps=9).fit(make_module("mlp", "adamw"), make_loader(module))
