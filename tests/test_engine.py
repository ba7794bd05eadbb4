"""The engine without Lightning: a plain loop and Fabric get exactly what the callback gets."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from conftest import InputNorms, make_loader, make_module, make_trainer
from torch import Tensor, nn

from lightning_prune import Pruner, Pruning
from lightning_prune.engine import MaskLock, ProgressivePruner
from lightning_prune.regularization import GroupLassoStep
from lightning_prune.schedules import Iterative, OneShot

SCHEDULE = Iterative(start_step=1, end_step=9, frequency=2)


def plain_loop(module, pruner, steps: int, loader) -> None:
    """What Lightning's automatic optimization does, written out: the README's loop."""
    opt = module.configure_optimizers()
    batches = (batch for _ in range(steps) for batch in loader)  # epochs, as the Trainer runs them
    for step in range(steps):
        x, y = next(batches)
        opt.zero_grad()
        nn.functional.cross_entropy(module(x), y).backward()
        pruner.before_optimizer_step(step, opt)
        opt.step()
        pruner.after_optimizer_step()


@pytest.mark.parametrize(
    ("kind", "pattern", "criterion"),
    [("mlp", "4x1", "snip_momentum"), ("cnn", "2:4", "magnitude"), ("mlp", "unstructured", "snip")],
)
def test_plain_loop_and_trainer_give_bit_identical_masks(kind, pattern, criterion):
    target = 0.5 if ":" in pattern else 0.6
    trained = make_module(kind, "adamw")
    loop_module = copy.deepcopy(trained)
    cb = Pruning(target, pattern, criterion, schedule=SCHEDULE)
    make_trainer([cb], max_steps=12).fit(trained, make_loader(trained))

    pruner = Pruner(loop_module, target, pattern, criterion, schedule=SCHEDULE)
    plain_loop(loop_module, pruner, 12, make_loader(loop_module))
    assert pruner.sparsity() == pytest.approx(target, abs=0.03)
    for name, mask in cb.masks.items():
        assert torch.equal(pruner.masks[name], mask), name
    for (name, a), b in zip(trained.state_dict().items(), loop_module.state_dict().values()):
        assert torch.equal(a, b), name


def test_fabric_loop_gives_the_callbacks_masks():
    from lightning.fabric import Fabric

    module = make_module("mlp", "adamw")
    reference = copy.deepcopy(module)
    cb = Pruning(0.6, "4x1", "snip_momentum", schedule=SCHEDULE)
    make_trainer([cb], max_steps=12).fit(reference, make_loader(reference))

    fabric = Fabric(accelerator="cpu", devices=1)
    pruner = Pruner(module, 0.6, "4x1", "snip_momentum", schedule=SCHEDULE)  # the plain module's names
    model, opt = fabric.setup(module, module.configure_optimizers())
    loader = fabric.setup_dataloaders(make_loader(module), move_to_device=False)
    batches = [batch for _ in range(2) for batch in loader][:12]  # 12 steps over two epochs, as the Trainer
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        fabric.backward(nn.functional.cross_entropy(model(x), y))
        pruner.before_optimizer_step(step, opt)
        opt.step()
        pruner.after_optimizer_step()
    for name, mask in cb.masks.items():
        assert torch.equal(pruner.masks[name], mask), name


@pytest.mark.slow
def test_the_engine_and_the_pieces_import_without_lightning():
    code = (
        "import sys\n"
        "import lightning_prune, lightning_prune.patterns, lightning_prune.criteria, lightning_prune.schedules\n"
        "import lightning_prune.selection, lightning_prune.regularization, lightning_prune.export\n"
        "from lightning_prune import Pruner, ProgressivePruner, MaskLock\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "print(loaded)\n"
        "from lightning_prune import Pruning\n"
        "print('lightning' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.splitlines() == ["[]", "True"], done.stdout + done.stderr


def test_state_dict_resumes_a_plain_loop_exactly():
    def fresh():
        module = make_module("mlp", "adamw")
        return module, Pruner(module, 0.6, "4x1", "snip_momentum", schedule=SCHEDULE)

    straight, straight_pruner = fresh()
    data = list(make_loader(straight))
    run = _Runner(straight, straight_pruner, data)
    run.steps(0, 12)

    first, first_pruner = fresh()
    runner = _Runner(first, first_pruner, data)
    runner.steps(0, 6)  # inside the window
    saved = (copy.deepcopy(first.state_dict()), copy.deepcopy(runner.opt.state_dict()), first_pruner.state_dict())
    assert saved[2]["states"], "running scores are part of the state"

    resumed = make_module("mlp", "adamw", seed=7)  # another init: everything comes from the state
    resumed.load_state_dict(saved[0])
    pruner = Pruner(resumed, 0.6, "4x1", "snip_momentum", schedule=SCHEDULE)
    pruner.load_state_dict(saved[2])
    second = _Runner(resumed, pruner, data)
    second.opt.load_state_dict(saved[1])
    second.steps(6, 12)
    for name, mask in straight_pruner.masks.items():
        assert torch.equal(pruner.masks[name], mask), name
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


class _Runner:
    def __init__(self, module, pruner, data) -> None:
        self.module, self.pruner, self.data = module, pruner, data
        self.opt = module.configure_optimizers()

    def steps(self, start: int, stop: int) -> None:
        for step in range(start, stop):
            x, y = self.data[step % len(self.data)]
            self.opt.zero_grad()
            nn.functional.cross_entropy(self.module(x), y).backward()
            self.pruner.before_optimizer_step(step, self.opt)
            self.opt.step()
            self.pruner.after_optimizer_step()


def test_a_model_is_bound_at_construction_and_masks_exist_at_once():
    module = make_module()
    pruner = Pruner(module, 0.5, "unstructured", "magnitude", schedule=OneShot(0))
    assert set(pruner.masks) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    assert all(bool(m.all()) for m in pruner.masks.values()) and pruner.sparsity() == 0.0
    event = pruner.before_optimizer_step(0, None)
    assert event is not None and event.last and event.scheduled == 0.5
    assert pruner.sparsity() == pytest.approx(0.5, abs=0.01)
    assert pruner.before_optimizer_step(1, None) is None


def test_schedule_none_needs_the_length_of_the_run():
    module = make_module()
    with pytest.raises(ValueError, match=r"schedule=None .* pass total_steps=<optimizer steps>"):
        Pruner(module, 0.5)
    pruner = Pruner(module, 0.5, "unstructured", "magnitude", total_steps=40)
    assert repr(pruner.resolved_schedule) == "Iterative(start_step=0, end_step=39, frequency=2, decay='exp')"


def test_a_pruner_without_a_model_says_so():
    pruner = Pruner(None, 0.5, schedule=OneShot(0))
    assert pruner.masks == {} and pruner.sparsity() == 0.0
    with pytest.raises(RuntimeError, match="no model yet"):
        pruner.before_optimizer_step(0, None)


def test_binding_errors_leave_the_model_and_the_pruner_untouched():
    module = make_module()
    pruner = Pruner(module, 0.5, "unstructured", "magnitude", schedule=OneShot(0))
    pruner.before_optimizer_step(0, None)
    masks = {k: v.clone() for k, v in pruner.masks.items()}
    state = pruner.state_dict()
    other = make_module(seed=3)
    before = copy.deepcopy(other.state_dict())
    wrong = dict(state, masks={k: v[:1] for k, v in state["masks"].items()})
    with pytest.raises(ValueError, match="checkpoint mask for 'net.0.weight' has shape"):
        pruner.bind(other, wrong)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items()), "the model was modified"
    assert all(torch.equal(masks[k], v) for k, v in pruner.masks.items()), "the pruner was modified"
    assert pruner.targets["net.0.weight"] is module.net[0].weight


def test_an_activation_aware_criterion_fits_the_extension_points():
    module = make_module("mlp", "sgd")
    module.lr = 0.0  # weights stay put: the scores can be recomputed by hand
    data = list(make_loader(module))
    criterion = InputNorms()
    pruner = Pruner(module, 0.5, "unstructured", criterion, schedule=OneShot(2), scope="local")
    inputs: dict[str, list[Tensor]] = {}
    spies = [
        module.get_submodule(fqn.rpartition(".")[0]).register_forward_pre_hook(
            lambda m, args, fqn=fqn: inputs.setdefault(fqn, []).append(args[0].detach())
        )
        for fqn in pruner.targets
    ]
    weights = {fqn: p.detach().clone() for fqn, p in pruner.targets.items()}
    runner = _Runner(module, pruner, data)
    runner.steps(0, 2)  # before the window: nothing collected (the states wait for step 2's forward pass)
    assert all(float(s["sq_norms"].sum()) == 0.0 for s in pruner.states.values())
    runner.steps(2, 3)  # step 2's forward pass is the window; its event prunes half of every layer, the last
    for fqn, mask in pruner.masks.items():
        x = inputs[fqn][-1]  # only the window's forward pass counts
        expected = weights[fqn].abs() * x.square().sum(0).sqrt()
        assert torch.equal(~mask.flatten(), _lowest(expected.flatten(), mask.numel() // 2)), fqn
    for spy in spies:
        spy.remove()
    assert not pruner.states, "states freed after the last event"
    assert all(not module.get_submodule(f.rpartition(".")[0])._forward_pre_hooks for f in weights), "hooks removed"


def _lowest(values: Tensor, k: int) -> Tensor:
    out = torch.zeros_like(values, dtype=torch.bool)
    out[torch.sort(values, stable=True).indices[:k]] = True
    return out


def test_group_lasso_runs_under_a_plain_loop():
    module = make_module("mlp", "sgd")
    step = GroupLassoStep(coeff=0.5)
    pruner = Pruner(module, 0.5, "4x1", "magnitude", schedule=Iterative(0, 6, 2), regularization=step)
    norms_before = [float(p.norm()) for p in pruner.targets.values()]
    _Runner(module, pruner, list(make_loader(module))).steps(0, 8)
    assert step.pattern is pruner.pattern
    assert all(float(p.norm()) < before for p, before in zip(pruner.targets.values(), norms_before))
    assert pruner.sparsity() == pytest.approx(0.5, abs=0.05)


def test_progressive_and_lock_engines_under_a_plain_loop():
    module = make_module("mlp", "adamw")
    pruner = ProgressivePruner(module, 0.6, progressive_steps=2, pattern="4x1", schedule=Iterative(0, 8, 4))
    _Runner(module, pruner, list(make_loader(module))).steps(0, 10)
    assert pruner.sparsity() == pytest.approx(0.6, abs=0.05)
    assert all(pruner.pattern.conforms(m) for m in pruner.masks.values())
    lock = MaskLock(module, pattern="4x1")
    assert lock.sparsity() == pytest.approx(pruner.sparsity(), abs=1e-6)
    _Runner(module, lock, list(make_loader(module))).steps(0, 4)
    for name, mask in lock.masks.items():
        assert (module.get_parameter(name).detach()[~mask] == 0).all()
