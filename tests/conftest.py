"""Tiny models and data shared by the tests: a few layers, a handful of batches."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune.criteria import Criterion, StateSpec


class TinyModule(pl.LightningModule):
    """Wraps a network with a cross-entropy loss and a configurable optimizer."""

    def __init__(self, net: nn.Module, in_shape: tuple[int, ...], optimizer: str = "sgd", lr: float = 0.05) -> None:
        super().__init__()
        self.net = net
        self.in_shape = in_shape
        self.optimizer_name = optimizer
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return OPTIMIZERS[self.optimizer_name](self.parameters(), self.lr)


class MomentumSGD(torch.optim.SGD):
    """A subclass the callback cannot vouch for: it must fall back to re-zeroing weights after each step."""


OPTIMIZERS: dict[str, Callable[[Any, float], torch.optim.Optimizer]] = {
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
    "sgd-nesterov-wd": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True, weight_decay=0.1),
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr / 10),
    "adam-amsgrad-wd": lambda p, lr: torch.optim.Adam(p, lr=lr / 10, amsgrad=True, weight_decay=0.1),
    "adamw": lambda p, lr: torch.optim.AdamW(p, lr=lr / 10, weight_decay=0.1),
    "nadam": lambda p, lr: torch.optim.NAdam(p, lr=lr / 10, weight_decay=0.1, decoupled_weight_decay=True),
    "radam": lambda p, lr: torch.optim.RAdam(p, lr=lr / 10),
    "adamax": lambda p, lr: torch.optim.Adamax(p, lr=lr / 10),
    "rmsprop": lambda p, lr: torch.optim.RMSprop(p, lr=lr / 10, momentum=0.9, centered=True),
    "adagrad": lambda p, lr: torch.optim.Adagrad(p, lr=lr),
    "adadelta": lambda p, lr: torch.optim.Adadelta(p, lr=1.0, weight_decay=0.1),
    "rprop": lambda p, lr: torch.optim.Rprop(p, lr=lr / 10),
    "adafactor": lambda p, lr: torch.optim.Adafactor(p, lr=lr / 10),
    "sgd-subclass": lambda p, lr: MomentumSGD(p, lr=lr, momentum=0.9, weight_decay=0.1),
}


class InputNorms(Criterion):
    """An activation-aware criterion in the style of Wanda (Sun et al. 2024, arXiv:2306.11695):
    score = |W| · ‖X_j‖₂ per input column j, the norms gathered by forward hooks on the targets' modules."""

    states = {"sq_norms": StateSpec("inputs", reduce="sum")}  # noqa: RUF012

    def setup(self, targets: Sequence) -> None:
        self.hooks = [t.module.register_forward_pre_hook(self._collect(t)) for t in targets]

    @staticmethod
    def _collect(target):
        def hook(module: nn.Module, args: tuple) -> None:
            if target.collecting and module.training:
                x = args[0].detach().float()
                target.state["sq_norms"].add_(x.reshape(-1, x.shape[-1]).square().sum(0))

        return hook

    def teardown(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def score(self, state: dict[str, Tensor], weight: Tensor, grad: Tensor | None) -> Tensor:
        return weight.detach().float().abs() * state["sq_norms"].sqrt()


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 3),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (mlp, (12,)),
    "cnn": (cnn, (4, 6, 6)),
}


def make_module(kind: str = "mlp", optimizer: str = "sgd", seed: int = 0) -> TinyModule:
    torch.manual_seed(seed)
    factory, shape = MODELS[kind]
    return TinyModule(factory(), shape, optimizer)


def make_loader(module: TinyModule, n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *module.in_shape, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def make_trainer(callbacks: list[pl.Callback], max_steps: int = 24, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "max_steps": max_steps,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


@pytest.fixture(autouse=True)
def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


@pytest.fixture
def fake_rank() -> Any:
    """Be one rank of a 2-rank world without the other (torch's fake process group: no real communication)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def join(rank: int) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=2)

    yield join
    if dist.is_initialized():
        dist.destroy_process_group()
