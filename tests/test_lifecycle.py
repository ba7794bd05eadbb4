"""The callbacks through a Trainer's whole life: several fits, late-built layers, resumes, bad combinations."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import TinyModule, make_loader, make_module, make_trainer, mlp
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_prune import PatternLock, Pruning
from lightning_prune.criteria import SnipMomentum
from lightning_prune.schedules import Iterative, OneShot


def zeros_kept(module: nn.Module, cb: Pruning) -> bool:
    return all(bool((module.get_parameter(n).detach()[~m] == 0).all()) for n, m in cb.masks.items())


def test_a_second_fit_keeps_the_masks():
    module = make_module("mlp", "adamw")
    cb = Pruning(0.5, "4x1", "magnitude", schedule=OneShot(0))
    make_trainer([cb], max_steps=4).fit(module, make_loader(module))
    first = {k: v.clone() for k, v in cb.masks.items()}
    assert cb.sparsity() == pytest.approx(0.5, abs=0.02)
    make_trainer([cb], max_steps=6).fit(module, make_loader(module))  # a fresh Trainer: steps restart at 0
    assert all(torch.equal(first[k], v) for k, v in cb.masks.items()), "the same masks, not a new pruning"
    assert cb.sparsity() == pytest.approx(0.5, abs=0.02) and zeros_kept(module, cb)


def test_a_second_fit_continues_an_unfinished_schedule():
    module = make_module("mlp", "adamw")
    cb = Pruning(0.6, "unstructured", "snip_momentum", schedule=Iterative(start_step=0, end_step=10, frequency=2))
    with pytest.warns(UserWarning, match="training ended at step 5, before the pruning schedule's last event"):
        make_trainer([cb], max_steps=5).fit(module, make_loader(module))
    halfway = cb.sparsity()
    assert 0.0 < halfway < 0.6 and cb.pruner.last_event == 2
    make_trainer([cb], max_steps=12).fit(module, make_loader(module))
    assert cb.sparsity() == pytest.approx(0.6, abs=0.01) and cb.pruner.finished and zeros_kept(module, cb)


class BuiltLate(TinyModule):
    """Its layers exist only once ``configure_model`` ran, as large and sharded models are written."""

    def __init__(self) -> None:
        super().__init__(nn.Identity(), (12,), optimizer="adamw")

    def configure_model(self) -> None:
        if isinstance(self.net, nn.Identity):
            torch.manual_seed(0)
            self.net = mlp()


@pytest.mark.parametrize("callback", ["pruning", "lock"])
def test_layers_built_in_configure_model_are_pruned(callback):
    module = BuiltLate()
    assert not list(module.parameters())
    cb = Pruning(0.5, "4x1", "magnitude", schedule=OneShot(0)) if callback == "pruning" else PatternLock()
    make_trainer([cb], max_steps=3).fit(module, make_loader(module))
    assert set(cb.masks) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    if callback == "pruning":
        assert cb.sparsity() == pytest.approx(0.5, abs=0.03) and zeros_kept(module, cb)


def test_targets_built_in_configure_model_are_validated_before_any_step():
    module = BuiltLate()
    cb = Pruning(0.5, "4x1", schedule=OneShot(0), include=r"net\.9")
    with pytest.raises(ValueError, match=r"include pattern 'net\\\\.9' matches no module"):
        make_trainer([cb], max_steps=3).fit(module, make_loader(module))
    assert module.trainer.global_step == 0


def _checkpoint(tmp_path, cb: Pruning) -> Any:
    module = make_module("mlp", "adamw")
    trainer = make_trainer([cb], max_steps=6)
    trainer.fit(module, make_loader(module))
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize(
    ("changed", "match"),
    [
        ({"exclude": r"net\.4"}, r"targets: checkpoint \['net.0.weight', 'net.2.weight', 'net.4.weight'\], now"),
        ({"include": r"net\.[02]"}, r"targets: checkpoint .*, now \['net.0.weight', 'net.2.weight'\]"),
        ({"criterion": SnipMomentum(0.9, 1.0)}, r"criterion: checkpoint .*'momentum': 1.0.*now .*'momentum': 0.9"),
        ({"target_sparsity": 0.5}, r"target_sparsity: checkpoint 0.6, now 0.5"),
        ({"pattern": "2x2"}, r"pattern: checkpoint '4x1', now '2x2'"),
    ],
    ids=["exclude", "include", "criterion-coefficients", "target", "pattern"],
)
def test_resuming_under_another_configuration_is_refused_naming_what_differs(tmp_path, changed, match):
    settings: dict[str, Any] = {
        "target_sparsity": 0.6,
        "pattern": "4x1",
        "criterion": "snip_momentum",
        "schedule": Iterative(start_step=0, end_step=10, frequency=2),
    }
    with pytest.warns(UserWarning, match="training ended"):
        path = _checkpoint(tmp_path, Pruning(**settings))
    resumed = make_module("mlp", "adamw")
    refused = r"the checkpoint was written under another pruning configuration \(.*" + match
    with pytest.raises(ValueError, match=refused):
        make_trainer([Pruning(**{**settings, **changed})], max_steps=10).fit(
            resumed, make_loader(resumed), ckpt_path=path
        )
    assert resumed.trainer.global_step == 6, "refused before any step"


@pytest.mark.parametrize("second", ["2:4", "4x1"], ids=["other-pattern", "same-settings"])
def test_two_pruning_callbacks_over_the_same_weights_are_refused_by_name(second):
    module = make_module()
    before = copy.deepcopy(module.state_dict())
    a = Pruning(0.5, "4x1", schedule=OneShot(0))
    b = Pruning(0.5, second, schedule=OneShot(0))
    assert a.state_key != b.state_key, "Lightning accepts both into one Trainer"
    with pytest.raises(ValueError, match=r"Pruning and Pruning both claim \['net.0.weight', 'net.2.weight'"):
        make_trainer([a, b]).fit(module, make_loader(module))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


class Stream(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(16):
            yield torch.randn(12, generator=g), torch.randint(0, 3, (), generator=g)


def test_default_schedule_over_an_iterable_dataset_says_what_to_set():
    module = make_module()
    cb = Pruning(0.5, "unstructured")
    with pytest.raises(ValueError, match=r"cannot tell its length .*IterableDataset.*set Trainer\(max_steps=N\)"):
        make_trainer([cb], max_steps=-1, max_epochs=1).fit(module, DataLoader(Stream(), batch_size=4))
    cb = Pruning(0.5, "unstructured", "magnitude")
    make_trainer([cb], max_steps=4).fit(module, DataLoader(Stream(), batch_size=4))
    assert cb.sparsity() == pytest.approx(0.5, abs=0.01)


class ResumableLoader(DataLoader):
    """A DataLoader that resumes mid-epoch: Lightning saves its ``state_dict`` in checkpoints and restores it.

    (``torchdata.stateful_dataloader.StatefulDataLoader`` does the same for any sampler and workers.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = self._skip = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                self._served = i + 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state["served"]


def test_resume_mid_epoch_is_exact_when_the_data_order_resumes(tmp_path):
    def run(ckpt_path=None, callbacks=()):
        module = make_module("mlp", "adamw", seed=0 if ckpt_path is None else 9)
        cb = Pruning(0.6, "4x1", "snip_momentum", schedule=Iterative(start_step=2, end_step=14, frequency=3))
        loader = ResumableLoader(make_loader(module).dataset, batch_size=8)  # 8 steps per epoch
        make_trainer([cb, *callbacks], max_steps=20, enable_checkpointing=bool(callbacks)).fit(
            module, loader, ckpt_path=ckpt_path
        )
        return module, cb

    torch.use_deterministic_algorithms(True)
    try:
        saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)
        straight, straight_cb = run(callbacks=[saver])
        resumed, resumed_cb = run(ckpt_path=tmp_path / "epoch=1-step=10.ckpt")  # step 10: mid-epoch, mid-window
    finally:
        torch.use_deterministic_algorithms(False)
    for name, mask in straight_cb.masks.items():
        assert torch.equal(resumed_cb.masks[name], mask), name
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
