"""The baseline users have today: Lightning's ``ModelPruning``, set up as its documentation shows.

``ModelPruning("l1_unstructured", amount=..., use_global_unstructured=True)`` prunes at the end of training
epochs. To compare at the same final sparsity and training budget, ``amount`` is a function of the epoch that
prunes the same share of what remains at each epoch end inside the first ``window`` of the run, so that the
sparsity reaches the target there and the rest of the run fine-tunes, as our iterative schedule does. Only
the weights of Linear and Conv layers (``include``/``exclude`` as for ``Pruning``) are pruned; its default
would also prune biases and norm weights. A run shorter than an epoch has no epoch end to prune at; there
``every_n_steps`` runs ModelPruning's own pruning step (its ``amount`` and lottery-ticket reset) every N
optimizer steps instead, the events a user would get from epochs of N steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from lightning_prune import sparsity_report
from lightning_prune.report import SparsityRow
from lightning_prune.targets import resolve_targets


class LightningModelPruning(ModelPruning):
    """``ModelPruning`` (global L1, unstructured) with the read-only views the experiment job uses.

    Args:
        target_sparsity: sparsity of the Linear/Conv weights at the end of the pruning window.
        window: fraction of the run's optimizer steps within which the epoch-end pruning happens.
        include: regexes over module names, as for ``Pruning`` (the same layers are compared).
        exclude: regexes over module names, as for ``Pruning``.
        lottery_ticket: ModelPruning's ``use_lottery_ticket_hypothesis`` (its default, True): at every event
            the weights left are reset to their values at the start of training.
        every_n_steps: prune every N optimizer steps inside the window instead of at epoch ends (for runs
            shorter than an epoch); None: at epoch ends, as ModelPruning does.

    Example:
        >>> cb = LightningModelPruning(0.9)
        >>> cb.target_sparsity, str(cb.pattern)
        (0.9, 'unstructured')
    """

    pattern = "unstructured"
    criterion = "l1 (ModelPruning)"

    def __init__(
        self,
        target_sparsity: float,
        window: float = 0.6,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        lottery_ticket: bool = True,
        every_n_steps: int | None = None,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a number of steps >= 1 or None, got {every_n_steps!r}")
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity!r}")
        if not 0.0 < window <= 1.0:
            raise ValueError(f"window must be in (0, 1], got {window!r}")
        super().__init__(
            "l1_unstructured",
            amount=self._amount,
            use_global_unstructured=True,
            use_lottery_ticket_hypothesis=lottery_ticket,
            verbose=0,
        )
        self.target_sparsity = target_sparsity
        self.window = window
        self.schedule = f"every epoch end in the first {window:.0%} of the run"
        self.include, self.exclude = include, exclude
        self.every_n_steps = every_n_steps
        if every_n_steps is not None:
            self.schedule = f"every {every_n_steps} steps in the first {window:.0%} of the run"
        self._epochs = 1
        self._model: nn.Module | None = None
        self._names: list[str] = []

    def _amount(self, epoch: int) -> float:
        """Share of the remaining weights to prune at the end of ``epoch``."""
        if epoch >= self._epochs:
            return 0.0
        return 1.0 - (1.0 - self.target_sparsity) ** (1.0 / self._epochs)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Prune only Linear/Conv weights, like the lightning_prune runs it is compared with."""
        targets = resolve_targets(pl_module, ("Linear", "Conv1d", "Conv2d"), self.include, self.exclude)
        self._names = [fqn.rpartition(".")[0] for fqn in targets]
        self._parameters_to_prune = [(pl_module.get_submodule(name), "weight") for name in self._names]
        self._model = pl_module
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Count the events (epoch ends, or every ``every_n_steps``) that fall inside the window."""
        steps_per_epoch = max(1, int(trainer.num_training_batches) // trainer.accumulate_grad_batches)
        window_steps = self.window * trainer.max_steps
        self._epochs = max(1, math.floor(window_steps / (self.every_n_steps or steps_per_epoch)))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """ModelPruning's epoch-end pruning, unless events come every N steps."""
        if self.every_n_steps is None:
            super().on_train_epoch_end(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        """Every ``every_n_steps`` optimizer steps: ModelPruning's own pruning step, as at an epoch end."""
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._run_pruning(step // self.every_n_steps - 1)

    # ------------------------------------------------------------------ views used by experiments/train.py
    @property
    def masks(self) -> Mapping[str, torch.Tensor]:
        """Parameter name → kept entries, read from the reparametrisation or, after it, the zeros."""
        assert self._model is not None
        out = {}
        for name in self._names:
            module = self._model.get_submodule(name)
            mask = getattr(module, "weight_mask", None)
            out[f"{name}.weight"] = (mask != 0) if mask is not None else (module.weight.detach() != 0)
        return out

    def sparsity(self) -> float:
        """Fraction of zeros over the pruned weights."""
        masks = self.masks
        return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(1, sum(m.numel() for m in masks.values()))

    def scheduled_sparsity(self, step: int) -> float:
        """The sparsity reached so far (epoch-end events are not known in steps ahead)."""
        return self.sparsity()

    def report(self, model: nn.Module) -> list[SparsityRow]:
        """Per-layer rows, as ``Pruning.report`` gives them."""
        return sparsity_report(model, dict(self.masks), "unstructured")
