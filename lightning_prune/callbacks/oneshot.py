"""``OneShotPruning``: prune once from calibration batches when ``fit`` starts, then keep the zeros locked."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from lightning_prune.callbacks.masked import MaskedWeights
from lightning_prune.engine import MaskLock
from lightning_prune.oneshot import check_arguments, prune_oneshot, target_modules
from lightning_prune.patterns import Pattern, parse_pattern
from lightning_prune.report import format_report
from lightning_prune.retrain_free import check_retrain_free
from lightning_prune.selection import SCOPES

__all__ = ["OneShotPruning"]


class OneShotPruning(MaskedWeights):
    """Prune a trained model once, from calibration data, at the start of ``fit``; fine-tune with the zeros locked.

    When ``fit`` starts (after ``configure_model`` and any checkpoint restore, before the first step) the model
    is pruned by :func:`~lightning_prune.oneshot.prune_oneshot` from the first ``calibration_batches``
    training batches, or from ``dataloader`` if given: SparseGPT (Frantar & Alistarh 2023, arXiv:2301.00774),
    Wanda (Sun et al. 2024, arXiv:2306.11695) or magnitude. Each batch runs through the LightningModule by
    ``prune_oneshot``'s default (``module(**batch)`` for a mapping, ``module(batch[0])`` for a tuple or list,
    else ``module(batch)``) unless ``forward`` says otherwise. From then on the masks stay locked like
    :class:`PatternLock`'s: the pruned weights stay exactly zero while the others train.

    The masks are in the callback's checkpoint state: a run resumed with ``fit(ckpt_path=...)`` restores them
    and does not prune again; nor does a second ``fit`` with the same callback. With ``max_steps=0`` the
    model is pruned and not trained, so ``trainer.validate``/``trainer.test`` report the pruned model.
    Under DDP each rank reads its share of the batches and the statistics are summed over ranks, so every
    rank ends with the same masks and weights.

    Args:
        method: ``"sparsegpt"``, ``"wanda"``, ``"magnitude"`` or ``"retrain_free"`` (whole heads or FFN
            neurons, Kwon et al. 2022, arXiv:2204.09656).
        target_sparsity: fraction pruned in every target, in [0, 1); with ``"N:M"`` it must be N/M; with
            ``"retrain_free"`` the fraction of the heads' (neurons') FLOPs or parameters.
        pattern: ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``); ``"head"`` or ``"ffn"`` for ``"retrain_free"``.
        calibration_batches: how many training batches (per rank) calibrate, when ``dataloader`` is None.
        dataloader: calibration batches (any iterable) to use instead of the training batches; all of them.
        op_types: module class names whose ``weight`` is pruned (``Linear``, ``Conv2d``).
        include: regexes; only modules whose full name matches one are pruned.
        exclude: regexes; modules whose full name matches one are not pruned (e.g. ``"llm.lm_head"``).
        blocks: regexes naming the modules processed one after another (default: a transformer's layers).
        forward: ``forward(module, batch)`` runs the LightningModule on a batch.
        block_size: SparseGPT's columns per block.
        damp: SparseGPT's dampening, a fraction of the mean Hessian diagonal (and the re-fit's).
        budget: ``"retrain_free"``: ``"flops"`` or ``"params"``.
        scope: ``"retrain_free"``: ``"global"`` or ``"local"``.
        loss: ``"retrain_free"``: ``loss(module, batch)``, the scalar whose gradients score the units; default
            the module's ``training_step`` (its logging muted).
        verbose: print the per-layer sparsity after pruning and at the end of training.

    Raises:
        ValueError: bad arguments (here), targets that cannot be pruned (at ``setup``), no training batches
            to calibrate from, or a sharded model (``ModelParallelStrategy``); all before any weight changes.
        RuntimeError: a condition found in the data, naming the layer; the weights are restored.

    Example:
        >>> cb = OneShotPruning(method="sparsegpt", target_sparsity=0.5, pattern="2:4", calibration_batches=64)
        >>> cb.method, cb.pattern
        ('sparsegpt', 2:4)
        >>> trainer = pl.Trainer(max_steps=0, callbacks=[cb])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=data); trainer.test(model, datamodule=data)  # doctest: +SKIP
    """

    def __init__(
        self,
        method: str = "sparsegpt",
        target_sparsity: float = 0.5,
        pattern: str | Pattern = "unstructured",
        calibration_batches: int = 64,
        dataloader: Iterable[Any] | None = None,
        op_types: str | Sequence[str] = ("Linear", "Conv2d"),
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        blocks: str | Sequence[str] | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        block_size: int = 128,
        damp: float = 0.01,
        budget: str = "flops",
        scope: str = "global",
        loss: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        verbose: bool = True,
    ) -> None:
        check_arguments(method, target_sparsity, pattern, forward, block_size, damp)
        if method == "retrain_free":
            check_retrain_free(pattern, budget)
        if scope not in SCOPES:
            raise ValueError(f"scope {scope!r} is not valid; choose one of {', '.join(map(repr, SCOPES))}")
        if loss is not None and not callable(loss):
            raise TypeError(f"loss must be a callable loss(module, batch), got {type(loss).__name__}")
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"calibration_batches must be a positive int, got {calibration_batches!r}")
        if dataloader is not None and not isinstance(dataloader, Iterable):
            raise TypeError(f"dataloader must be an iterable of batches, got {type(dataloader).__name__}")
        self.method, self.target_sparsity = method, float(target_sparsity)
        self.pattern = parse_pattern(pattern)
        self.budget, self.scope, self.loss = budget, scope, loss
        self.calibration_batches, self.dataloader = calibration_batches, dataloader
        self.blocks, self.forward = blocks, forward
        self.block_size, self.damp = block_size, damp
        # the lock checks that an N:M layer's width fits (at setup) and that its zeros form whole groups
        super().__init__(MaskLock(None, self.pattern, op_types, include, exclude), verbose)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Validate the targets now if the model's layers exist (else when fit starts), before any training."""
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and not is_overridden("configure_model", pl_module):
            target_modules(pl_module, self.engine.check(pl_module))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prune from the calibration batches (unless a checkpoint or an earlier fit has masks), then lock."""
        self._check_unclaimed(trainer, pl_module)
        state, self._pending = self._pending, None
        if state is None and self.engine.masks:  # a second fit: the masks of the first
            state = self.engine.state_dict()
        if state is None:
            masks = self._prune(trainer, pl_module)
            state = {"masks": masks, "config": {**self.engine.config(), "targets": list(masks)}}
            self._bind(trainer, pl_module, state)
            if self.verbose:
                rank_zero_info(f"OneShotPruning ({self.method}): per-layer sparsity\n" + format_report(self.report()))
            self._log(trainer)
        else:
            self._pending = state
            super().on_train_start(trainer, pl_module)  # restores (a sharded checkpoint too) and binds

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing to do: the masks were bound when ``fit`` started."""

    # ------------------------------------------------------------------ helpers
    def _identity(self) -> dict[str, Any]:
        return {
            **super()._identity(),
            "method": self.method,
            "target_sparsity": self.target_sparsity,
            "pattern": str(self.pattern),
            "blocks": self.blocks,
        }

    def _batches(self, trainer: pl.Trainer) -> list[Any]:
        """The calibration batches on the module's device: ``dataloader``'s, or the first training batches."""
        if self.dataloader is not None:
            source: Iterable[Any] = self.dataloader
            count = None
        else:
            trainer.fit_loop.setup_data()  # the train dataloader, as training will use it (DDP sampler too)
            loaders = trainer.train_dataloader
            if loaders is None:
                raise ValueError(
                    "OneShotPruning calibrates from the training batches, but this fit has none (no "
                    "train_dataloader, or limit_train_batches=0): pass dataloader=<calibration batches>"
                )
            if not isinstance(loaders, Iterable) or isinstance(loaders, Mapping | Sequence):
                raise ValueError(
                    f"OneShotPruning cannot take calibration batches from a {type(loaders).__name__} of train "
                    "dataloaders: pass dataloader=<one iterable of batches>"
                )
            source = loaders
            count = self.calibration_batches
        batches = list(itertools.islice(source, count))
        return [trainer.strategy.batch_to_device(batch) for batch in batches]

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        target_modules(pl_module, self.engine.check(pl_module))  # before the batches are read
        return prune_oneshot(
            pl_module,
            self._batches(trainer),
            method=self.method,
            target_sparsity=self.target_sparsity,
            pattern=self.pattern,
            op_types=self.op_types,
            include=self.include,
            exclude=self.exclude,
            blocks=self.blocks,
            forward=self.forward,
            block_size=self.block_size,
            damp=self.damp,
            budget=self.budget,
            scope=self.scope,
            loss=self.loss or _quiet_training_step,
        )

    def _log(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"prune/sparsity": self.sparsity()}, step=trainer.global_step)


def _quiet_training_step(module: nn.Module, batch: Any) -> torch.Tensor:
    """The module's ``training_step`` loss, its ``self.log`` calls muted (no loop collects them here)."""
    step = getattr(module, "training_step", None)
    if not callable(step):
        out = module(**batch) if isinstance(batch, Mapping) else module(batch)
        return out.loss if hasattr(out, "loss") else out
    saved = {name: module.__dict__.get(name) for name in ("log", "log_dict")}
    for name in saved:
        module.__dict__[name] = lambda *args, **kwargs: None
    try:
        out = step(batch, 0)
    finally:
        for name, value in saved.items():
            if value is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value
    return out["loss"] if isinstance(out, Mapping) else out
