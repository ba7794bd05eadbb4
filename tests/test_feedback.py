"""Dynamic pruning with feedback (Lin et al. 2020): pruned weights keep training densely and can come back."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_loader, make_module, make_trainer
from torch import nn

from lightning_prune import Pruner, Pruning
from lightning_prune.engine import ProgressivePruner
from lightning_prune.regularization import GroupLassoStep
from lightning_prune.schedules import Iterative

WINDOW = Iterative(start_step=0, end_step=4, frequency=2, decay="linear")


def pushed_weight(feedback: bool) -> tuple[nn.Linear, Pruner, list[list[bool]]]:
    """A 4-weight layer whose second weight, the smallest, is pruned first while the loss keeps pushing it up."""
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.1, 0.2, 0.3]]))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    pruner = Pruner(layer, 0.5, "unstructured", "magnitude", schedule=WINDOW, feedback=feedback)
    x = torch.tensor([[0.0, 10.0, 0.0, 0.0]])
    masks = []
    for step in range(8):
        (-layer(x)).sum().backward()
        pruner.before_optimizer_step(step, opt)
        opt.step()
        opt.zero_grad()
        pruner.after_optimizer_step()
        mask = pruner.masks["weight"]
        assert torch.all(layer.weight.detach()[~mask] == 0), f"step {step}: pruned weights are exactly zero"
        masks.append(mask.flatten().tolist())
    return layer, pruner, masks


def test_a_weight_pruned_too_early_comes_back_with_feedback_and_not_without():
    _, _, plain = pushed_weight(feedback=False)
    layer, pruner, dynamic = pushed_weight(feedback=True)
    assert plain[0] == dynamic[0] == [True, False, True, True]  # the first event prunes the smallest weight
    assert not plain[-1][1], "without feedback a pruned weight stays pruned"
    assert dynamic[-1] == [True, True, False, False], "its dense value grew, so a later event kept it"
    # the optimizer stepped the dense value while it was pruned: 0.1 + 0.1 * 10 per step, 5 steps before the
    # event at step 2 kept it, then it trained as a kept weight
    assert layer.weight[0, 1].item() == pytest.approx(0.1 + 8 * 1.0, abs=1e-4)
    assert pruner.sparsity() == 0.5


def test_after_the_last_event_masks_are_final_and_pruned_weights_get_no_update():
    layer, pruner, masks = pushed_weight(feedback=True)
    assert masks[4:] == [masks[4]] * 4, "no change after the last event (step 4)"
    assert not pruner.state_dict().get("dense"), "the dense copy is dropped once the masks are final"
    layer.weight.grad = torch.ones_like(layer.weight)
    pruner.before_optimizer_step(8, None)
    assert torch.equal(layer.weight.grad, pruner.masks["weight"].float()), "pruned gradients zeroed again"


def _loop(module, pruner, data, start: int, stop: int, opt) -> None:
    for step in range(start, stop):
        x, y = data[step % len(data)]
        opt.zero_grad()
        nn.functional.cross_entropy(module(x), y).backward()
        pruner.before_optimizer_step(step, opt)
        opt.step()
        pruner.after_optimizer_step()


def test_a_plain_loop_resumed_mid_window_matches_an_uninterrupted_run():
    schedule = Iterative(start_step=1, end_step=9, frequency=2)

    def fresh(seed: int = 0, feedback: bool = True):
        module = make_module("mlp", "adamw", seed=seed)
        module.lr = 0.5  # AdamW at 0.05: pruned weights move enough to come back within the window
        return module, Pruner(module, 0.7, "unstructured", "magnitude", schedule=schedule, feedback=feedback)

    straight, straight_pruner = fresh()
    data = list(make_loader(straight))
    _loop(straight, straight_pruner, data, 0, 8, straight.configure_optimizers())  # still inside the window
    plain, plain_pruner = fresh(feedback=False)
    _loop(plain, plain_pruner, data, 0, 8, plain.configure_optimizers())
    assert any(not torch.equal(plain_pruner.masks[n], m) for n, m in straight_pruner.masks.items()), "regrowth"

    first, first_pruner = fresh()
    opt = first.configure_optimizers()
    _loop(first, first_pruner, data, 0, 6, opt)
    state = first_pruner.state_dict()
    assert set(state["dense"]) == set(first_pruner.masks), "the dense weights are part of the state"
    name, mask = next(iter(first_pruner.masks.items()))
    assert state["dense"][name][~mask].abs().sum() > 0, "pruned entries keep their dense values"
    saved = copy.deepcopy((first.state_dict(), opt.state_dict(), state))

    resumed, pruner = fresh(seed=7)  # another init: everything comes from the state
    resumed.load_state_dict(saved[0])
    pruner.load_state_dict(saved[2])
    opt = resumed.configure_optimizers()
    opt.load_state_dict(saved[1])
    _loop(resumed, pruner, data, 6, 8, opt)
    for name, mask in straight_pruner.masks.items():
        assert torch.equal(pruner.masks[name], mask), name
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for name, dense in straight_pruner.state_dict()["dense"].items():
        assert torch.equal(pruner.state_dict()["dense"][name], dense), f"{name}: the pruned weights trained on"


def test_the_callback_resumes_from_a_checkpoint_mid_window(tmp_path):
    def callback(feedback: bool = True) -> Pruning:
        schedule = Iterative(start_step=2, end_step=20, frequency=3)
        return Pruning(0.75, "4x1", "magnitude", schedule=schedule, feedback=feedback, verbose=False)

    def module(seed: int = 0) -> pl.LightningModule:
        out = make_module("mlp", "adamw", seed=seed)
        out.lr = 0.5  # AdamW at 0.05: pruned blocks move enough to come back within the window
        return out

    straight_module = module()
    straight = callback()
    make_trainer([straight], max_steps=13).fit(straight_module, make_loader(straight_module, n=8))
    plain_module = module()
    plain = callback(feedback=False)
    make_trainer([plain], max_steps=13).fit(plain_module, make_loader(plain_module, n=8))
    assert any(not torch.equal(plain.masks[n], m) for n, m in straight.masks.items()), "blocks came back"

    first_module = module()
    first = callback()
    trainer = make_trainer([first], max_steps=9)
    trainer.fit(first_module, make_loader(first_module, n=8))
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)

    resumed_module = module(seed=5)
    resumed = callback()
    make_trainer([resumed], max_steps=13).fit(resumed_module, make_loader(resumed_module, n=8), ckpt_path=path)
    assert resumed.feedback is True
    for name, mask in straight.masks.items():
        assert torch.equal(resumed.masks[name], mask), name
    for (name, a), b in zip(straight_module.state_dict().items(), resumed_module.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    for name, dense in straight.state_dict()["dense"].items():  # still inside the window at step 13
        assert torch.allclose(resumed.state_dict()["dense"][name], dense, atol=1e-6), name


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: Pruner(None, 0.5, "1xchannel", feedback=True), "pattern '1xchannel'"),
        (lambda: Pruner(None, 0.5, "4x1", regularization=GroupLassoStep(1e-4), feedback=True), "regularization"),
        (lambda: ProgressivePruner(None, 0.5, pattern="4x1", feedback=True), "ProgressivePruner"),
    ],
)
def test_settings_feedback_cannot_work_with_are_refused_by_name(make, named):
    with pytest.raises(ValueError, match="feedback=True does not work with") as info:
        make()
    assert named in str(info.value)
    assert "'unstructured'" in str(info.value), "the message lists what works"


def test_feedback_must_be_a_bool():
    with pytest.raises(TypeError, match="feedback must be True or False, got str 'yes'"):
        Pruning(0.5, feedback="yes")  # type: ignore[arg-type]


def test_feedback_with_an_adaptive_optimizer_warns_once_and_with_sgd_not():
    def warned(opt_class: type[torch.optim.Optimizer]) -> list[str]:
        module = make_module("mlp", "sgd")
        pruner = Pruner(module, 0.5, "unstructured", "magnitude", schedule=WINDOW, feedback=True)
        data = list(make_loader(module))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _loop(module, pruner, data, 0, 4, opt_class(module.parameters(), lr=0.01))
        return [str(w.message) for w in caught if "feedback=True" in str(w.message)]

    adaptive = warned(torch.optim.AdamW)
    assert len(adaptive) == 1 and "AdamW" in adaptive[0] and "SGD" in adaptive[0]
    assert warned(torch.optim.SGD) == []
