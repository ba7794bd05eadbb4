"""The ``Pruning`` callback: a :class:`~lightning_prune.Pruner` driven by Lightning's Trainer."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_prune.callbacks.masked import FromEngine, MaskedWeights
from lightning_prune.criteria import Criterion
from lightning_prune.engine import Event, Pruner, owning_optimizer
from lightning_prune.patterns import Pattern
from lightning_prune.regularization import Regularization
from lightning_prune.schedules import Schedule

__all__ = ["Pruning"]


class Pruning(MaskedWeights):
    """Prune a model while it trains (SPEC.md): pattern, criterion, schedule and scope in one callback.

    The algorithm is :class:`~lightning_prune.Pruner`'s (``cb.pruner``); this callback binds it to the
    LightningModule when training starts (after ``configure_model`` and any checkpoint restore), calls it
    around every optimizer step (``trainer.global_step`` is the step), logs ``prune/sparsity`` and
    ``prune/target`` at every event and carries its state through checkpoints, so that
    ``trainer.fit(ckpt_path=...)`` resumes mid-schedule. A second ``fit`` with the same callback keeps its masks.

    Args:
        target_sparsity: final fraction of zeros over all targets, in [0, 1).
        pattern: ``"unstructured"``/``"1x1"``, ``"NxM"`` (e.g. ``"4x1"``), ``"channelx1"``, ``"1xchannel"``,
            ``"N:M"`` (e.g. ``"2:4"``) or a :class:`~lightning_prune.patterns.Pattern`.
        criterion: ``"magnitude"``, ``"gradient"``, ``"snip"``, ``"snip_momentum"`` or a
            :class:`~lightning_prune.criteria.Criterion`.
        schedule: :class:`~lightning_prune.schedules.OneShot` or :class:`~lightning_prune.schedules.Iterative`;
            ``None`` prunes iteratively over the whole run: events every ``max(1, total // 20)`` steps from 0
            to the last step, ``total = trainer.estimated_stepping_batches``, exp decay.
        scope: ``"global"`` (one ranking across targets, budget in elements), ``"local"`` (each layer), or
            ``"lamp"``: one ranking of layer-adaptive LAMP scores (Lee et al. 2021, arXiv:2010.07611), which
            keep every layer's largest weights and do not depend on a layer's scale
            (``lightning_prune.engine.planning.lamp_scores``).
        op_types: module class names whose ``weight`` is pruned.
        include: regexes; only modules whose full name matches one are pruned.
        exclude: regexes; modules whose full name matches one are not pruned.
        min_sparsity_per_layer: global scope: the least sparsity of any layer at the end (scaled down
            proportionally at earlier events).
        max_sparsity_per_layer: global scope: the most sparsity of any layer.
        log_per_layer: also log ``prune/sparsity/<name>`` for every target at each event.
        regularization: a :class:`~lightning_prune.regularization.GroupLasso`, applied to the targets' groups
            of ``pattern`` after every optimizer step inside the pruning window.
        feedback: dynamic pruning with feedback (Lin et al. 2020, arXiv:2006.07253): inside the window the
            optimizer steps the dense weights with the pruned model's gradient and every event chooses the
            masks afresh, so pruned weights can come back; from the last event on, masks are final. See
            :class:`~lightning_prune.Pruner`.
        verbose: print the per-layer sparsity table at the end of training.

    Raises:
        ValueError: an argument out of range or unknown (the message names it, shows it and lists choices).
        TypeError: an argument of the wrong type.

    Example:
        >>> from lightning_prune.schedules import Iterative
        >>> cb = Pruning(0.8, pattern="4x1", criterion="snip_momentum",
        ...              schedule=Iterative(start_step=0, end_step=1000, frequency=100))
        >>> trainer = pl.Trainer(callbacks=[cb], max_steps=2000)  # doctest: +SKIP
    """

    def __init__(
        self,
        target_sparsity: float,
        pattern: str | Pattern = "4x1",
        criterion: str | Criterion = "snip_momentum",
        schedule: Schedule | None = None,
        scope: str = "global",
        op_types: str | Sequence[str] = ("Linear", "Conv1d", "Conv2d"),
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        min_sparsity_per_layer: float = 0.0,
        max_sparsity_per_layer: float = 0.98,
        log_per_layer: bool = False,
        regularization: Regularization | None = None,
        feedback: bool = False,
        verbose: bool = True,
    ) -> None:
        settings = {
            "pattern": pattern,
            "criterion": criterion,
            "schedule": schedule,
            "scope": scope,
            "op_types": op_types,
            "include": include,
            "exclude": exclude,
            "min_sparsity_per_layer": min_sparsity_per_layer,
            "max_sparsity_per_layer": max_sparsity_per_layer,
            "regularization": regularization,
            "feedback": feedback,
        }
        super().__init__(self._engine(target_sparsity, settings), verbose)
        self.log_per_layer = log_per_layer
        self._owner: torch.optim.Optimizer | None = None  # with several optimizers, the one holding the targets

    def _engine(self, target_sparsity: float, settings: dict[str, Any]) -> Pruner:
        return Pruner(None, target_sparsity, **settings)

    # The settings, read through from the engine.
    target_sparsity = FromEngine()
    pattern = FromEngine()
    criterion = FromEngine()
    schedule = FromEngine()
    scope = FromEngine()
    min_sparsity_per_layer = FromEngine()
    max_sparsity_per_layer = FromEngine()
    regularization = FromEngine()
    feedback = FromEngine()

    # ------------------------------------------------------------------ the engine's settings
    @property
    def pruner(self) -> Pruner:
        """The engine that runs the algorithm."""
        assert isinstance(self.engine, Pruner)
        return self.engine

    def config(self) -> dict[str, Any]:
        """The settings that define this pruning run, as stored in checkpoints."""
        return self.pruner.config()

    def scheduled_sparsity(self, step: int) -> float:
        """Sparsity the schedule asks for once optimizer step ``step`` is taken (0.0 before the first event).

        Example:
            >>> from lightning_prune.schedules import Iterative
            >>> cb = Pruning(0.8, schedule=Iterative(start_step=10, end_step=30, frequency=10, decay="linear"))
            >>> [round(cb.scheduled_sparsity(s), 3) for s in (0, 10, 25, 30)]
            [0.0, 0.267, 0.533, 0.8]
        """
        return self.pruner.scheduled_sparsity(step)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Validate targets early where the layers exist; warn about a target of 0."""
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.pruner.target_sparsity == 0.0:
            rank_zero_warn("target_sparsity=0: nothing will be pruned (the callback only reports)")

    def _bind(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: Mapping[str, Any] | None) -> None:
        total = None
        if self.pruner.resolved_schedule is None:
            estimate = trainer.estimated_stepping_batches
            if not math.isfinite(estimate) or estimate < 1:
                raise ValueError(
                    f"schedule=None prunes over the whole run, but Lightning cannot tell its length "
                    f"(estimated_stepping_batches = {estimate}; the train dataloader may have no length, e.g. an "
                    "IterableDataset): set Trainer(max_steps=N), or pass schedule=Iterative(start_step, end_step, "
                    "frequency)"
                )
            total = int(estimate)
        # fp16: a step with non-finite gradients is one the GradScaler skips; scores and masks wait for it.
        self.pruner.skip_nonfinite = str(trainer.precision).startswith("16")
        self.pruner.bind(pl_module, state, total_steps=total, step=trainer.global_step)
        self._owner = owning_optimizer(list(getattr(trainer, "optimizers", []) or []), self.pruner.targets)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Scores inside the window, pruning at events, gradients of pruned weights zeroed."""
        if self._owner is not None and getattr(optimizer, "optimizer", optimizer) is not self._owner:
            return  # another optimizer's step: it holds none of the targets
        event = self.pruner.before_optimizer_step(trainer.global_step, optimizer)
        if event is not None:
            self._log_event(trainer, event)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn if training ended before the schedule did; print the table; stop the criterion's hooks."""
        schedule = self.pruner.resolved_schedule
        if self.pruner.masks and schedule is not None and not self.pruner.finished:
            rank_zero_warn(
                f"training ended at step {trainer.global_step}, before the pruning schedule's last event at step "
                f"{schedule.end}: sparsity reached {self.sparsity():.4f} of target {self.pruner.target_sparsity}"
            )
        self.pruner.close()
        super().on_train_end(trainer, pl_module)

    # ------------------------------------------------------------------ helpers
    def _identity(self) -> dict[str, Any]:
        config = self.pruner.config()
        config.pop("targets", None)
        config["schedule"] = repr(self.pruner.schedule)  # as given: a resolved default is not known yet
        return {**super()._identity(), **config}

    def _log_event(self, trainer: pl.Trainer, event: Event) -> None:
        # Written to the loggers directly: `pl_module.log` only reaches them on `log_every_n_steps` steps,
        # and an event between two of those would be lost.
        if not trainer.is_global_zero or not trainer.loggers:
            return
        metrics = {"prune/sparsity": self.pruner.sparsity(), "prune/target": event.scheduled}
        if self.log_per_layer:
            metrics.update({f"prune/sparsity/{fqn}": value for fqn, value in self.pruner.layer_sparsity().items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
