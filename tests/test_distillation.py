"""Distillation: the dense teacher's KL term with temperature added to the pruned model's loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyModule, make_loader, make_module, make_trainer
from torch import nn

from lightning_prune import Distillation, Pruning
from lightning_prune.callbacks.distillation import distillation_loss
from lightning_prune.schedules import Iterative


def test_loss_is_t_squared_kl_of_the_softened_distributions():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    t = 3.0
    p, q = F.softmax(teacher / t, -1), F.softmax(student / t, -1)
    by_hand = (p * (p.log() - q.log())).sum(-1).mean() * t * t
    assert distillation_loss(student, teacher, t) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(distillation_loss(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)
    # token logits [B, L, V] are averaged over every position
    tokens = distillation_loss(student.reshape(1, 5, 7), teacher.reshape(1, 5, 7), t)
    assert float(tokens) == pytest.approx(float(by_hand), rel=1e-5)


def test_alpha_one_with_the_student_as_teacher_leaves_the_weights_unchanged():
    module = make_module("mlp", "sgd")  # plain SGD step: zero loss gradient, no step
    module.optimizer_name = "sgd"
    teacher = copy.deepcopy(module.net)
    before = copy.deepcopy(module.net.state_dict())
    kd = Distillation(teacher, temperature=2.0, alpha=1.0, module="net")
    make_trainer([kd], max_steps=1).fit(module, make_loader(module))
    for name, value in module.net.state_dict().items():
        assert torch.allclose(value, before[name], atol=1e-7), name


def test_alpha_zero_trains_as_without_it_and_alpha_half_differs():
    def run(callbacks):
        module = make_module("mlp", "adamw")
        make_trainer(callbacks, max_steps=6).fit(module, make_loader(module))
        return module.net.state_dict()

    teacher = make_module("mlp", seed=7).net
    plain = run([])
    zero = run([Distillation(teacher, alpha=0.0, module="net")])
    half = run([Distillation(teacher, alpha=0.5, module="net")])
    assert all(torch.allclose(plain[k], zero[k], atol=1e-6) for k in plain)
    assert not all(torch.allclose(plain[k], half[k], atol=1e-4) for k in plain)


def test_teacher_from_a_checkpoint_file_and_kd_logged(tmp_path):
    dense = make_module("mlp", "adamw")
    path = tmp_path / "dense.pt"
    torch.save({"state_dict": dense.state_dict()}, path)
    module = make_module("mlp", "adamw", seed=3)
    prune = Pruning(0.5, "unstructured", "magnitude", Iterative(start_step=0, end_step=4, frequency=2))
    kd = Distillation(str(path), temperature=4.0, alpha=0.5, module="net")
    trainer = make_trainer([prune, kd], max_steps=8, log_every_n_steps=1)
    trainer.fit(module, make_loader(module))
    assert float(trainer.callback_metrics["distill/kd"]) > 0
    assert all(torch.equal(kd._net.state_dict()[k], v) for k, v in dense.net.state_dict().items())  # type: ignore[union-attr]
    assert "training_step" not in vars(module), "the module's own training_step is back after fit"
    assert prune.sparsity() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("from_file", [False, True], ids=["module", "file"])
def test_whole_lightning_module_teacher_by_default(tmp_path, from_file):
    module = make_module("mlp", "adamw")
    teacher = make_module("mlp", seed=5)
    path = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), path)
    kd = Distillation(path if from_file else teacher)
    trainer = make_trainer([kd], max_steps=3, log_every_n_steps=1)
    trainer.fit(module, make_loader(module))
    assert float(trainer.callback_metrics["distill/kd"]) > 0
    assert torch.equal(kd._net.state_dict()["net.0.weight"], teacher.state_dict()["net.0.weight"])  # type: ignore[union-attr]


class CallsNetDirectly(TinyModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)  # not self(x): the LightningModule's forward is skipped


def test_student_module_not_called_is_an_error_before_any_weight_changes():
    base = make_module("mlp")
    module = CallsNetDirectly(base.net, base.in_shape)
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=r"Distillation\(module='' \(the LightningModule\)\) was not called"):
        make_trainer([Distillation(make_module("mlp", seed=1))], max_steps=3).fit(module, make_loader(module))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert "training_step" not in vars(module)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"teacher": 3}, TypeError, r"teacher=int is not valid; pass an nn.Module or a checkpoint path"),
        ({"teacher": "/no/such.ckpt"}, ValueError, r"teacher='/no/such.ckpt' is not valid: no such checkpoint file"),
        ({"temperature": 0}, ValueError, r"temperature=0 is not valid; choose a number > 0"),
        ({"alpha": 1.5}, ValueError, r"alpha=1.5 is not valid; choose the distillation term's weight in \[0, 1\]"),
    ],
    ids=["teacher-int", "teacher-missing", "temperature", "alpha"],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Distillation(**{"teacher": nn.Linear(2, 2), **kwargs})


def test_unknown_module_is_an_error_at_setup():
    module = make_module("mlp")
    with pytest.raises(ValueError, match=r"module='body' is not valid: the LightningModule has no such submodule"):
        make_trainer([Distillation(nn.Linear(12, 3), module="body")], max_steps=2).fit(module, make_loader(module))
