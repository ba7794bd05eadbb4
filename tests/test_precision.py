"""Mixed and reduced precision: finite scores, untouched masks on skipped steps, bf16 weights."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_loader, make_module, make_trainer

from lightning_prune import Pruning
from lightning_prune.schedules import Iterative


class Spy(pl.Callback):
    """Runs after Pruning: records masks and running scores each step."""

    def __init__(self, cb: Pruning) -> None:
        self.cb = cb
        self.masks: dict[int, dict[str, torch.Tensor]] = {}
        self.scores: dict[int, list[torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        self.masks[step] = {k: v.clone() for k, v in self.cb.masks.items()}
        if self.cb.pruner.states:
            self.scores[step] = [s["score"].clone() for s in self.cb.pruner.states.values()]


@pytest.mark.parametrize("precision", ["bf16-mixed"])
def test_mixed_precision_scores_finite_and_exact(precision):
    module = make_module("mlp", "adamw")
    cb = Pruning(0.6, pattern="4x1", schedule=Iterative(start_step=0, end_step=8, frequency=2))
    spy = Spy(cb)
    make_trainer([cb, spy], max_steps=10, precision=precision).fit(module, make_loader(module))
    for scores in spy.scores.values():
        for s in scores:
            assert not torch.isnan(s).any() and not torch.isposinf(s).any()
    assert cb.sparsity() == pytest.approx(0.6, abs=0.02)
    for name, mask in cb.masks.items():
        assert (module.get_parameter(name).detach()[~mask] == 0).all()


def test_a_skipped_fp16_step_leaves_scores_and_masks_untouched():
    # Lightning turns 16-mixed into bf16-mixed on CPU, so the hooks are driven by hand under a 16-mixed trainer,
    # the way Lightning calls them after GradScaler.unscale_.
    torch.manual_seed(0)
    module = make_module("mlp", "adamw")
    trainer = SimpleNamespace(
        global_step=0, precision="16-mixed", is_global_zero=True, loggers=[], estimated_stepping_batches=10
    )
    cb = Pruning(0.6, pattern="4x1", schedule=Iterative(start_step=0, end_step=8, frequency=2))
    cb.setup(trainer, module, "fit")
    cb.on_train_start(trainer, module)
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    history = {}
    for step in range(10):
        trainer.global_step = step
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        poisoned = step == 4  # an event step whose gradients overflowed: the scaler skips it
        if poisoned:
            module.net[0].weight.grad[0, 0] = float("inf")
        cb.on_before_optimizer_step(trainer, module, opt)
        scores = [s["score"].clone() for s in cb.pruner.states.values()]
        history[step] = ({k: v.clone() for k, v in cb.masks.items()}, scores)
        if not poisoned:
            opt.step()
        cb.on_train_batch_end(trainer, module, None, None, 0)
    (masks3, scores3), (masks4, scores4), (masks5, _) = history[3], history[4], history[5]
    assert all(torch.equal(a, b) for a, b in zip(scores3, scores4)), "scores untouched"
    assert all(torch.equal(masks3[n], masks4[n]) for n in masks3), "masks untouched"
    assert any(not torch.equal(masks4[n], masks5[n]) for n in masks4), "the event happens at the next finite step"
    assert cb.sparsity() == pytest.approx(0.6, abs=0.02)


def test_pure_bf16_weights_prune():
    module = make_module("cnn", "adamw")
    cb = Pruning(0.7, pattern="2x2", schedule=Iterative(start_step=0, end_step=6, frequency=2))
    make_trainer([cb], max_steps=8, precision="bf16-true").fit(module, make_loader(module))
    assert cb.sparsity() == pytest.approx(0.7, abs=0.02)
    for name, mask in cb.masks.items():
        w = module.get_parameter(name)
        assert w.dtype == torch.bfloat16 and (w.detach()[~mask] == 0).all()
