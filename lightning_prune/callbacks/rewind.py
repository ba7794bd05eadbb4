"""``Rewind``: once pruning is done, train on from an earlier point of the learning-rate schedule (and weights)."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_prune.callbacks.masked import MaskedWeights
from lightning_prune.callbacks.pruning import Pruning
from lightning_prune.schedules import default_schedule
from lightning_prune.sharding import is_dtensor

__all__ = ["Rewind", "warped_step"]

# Optimizer hyperparameters that learning-rate schedules move (OneCycleLR also cycles momentum).
_SCHEDULED = ("lr", "momentum", "betas")


def warped_step(step: int, at: int, rewind_to: int, total: int) -> float:
    """The point of the original schedule that optimizer step ``step`` follows once rewound.

    Steps before ``at`` follow the schedule as it is. From ``at`` on, the schedule's course from
    ``rewind_to`` to its end ``total`` is replayed over the ``total - at`` steps that are left, evenly
    stretched or compressed, so that it still ends where it ended (Le & Hua 2021's "scaled learning-rate
    restarting", arXiv:2105.03193; with ``rewind_to = at`` nothing changes):
    ``t(step) = rewind_to + (step - at) * (total - rewind_to) / (total - at)``.

    Example:
        >>> [warped_step(s, at=60, rewind_to=0, total=100) for s in (59, 60, 80, 100)]
        [59.0, 0.0, 50.0, 100.0]
    """
    if step < at or total <= at:
        return float(step)
    return rewind_to + (step - at) * (total - rewind_to) / (total - at)


class Rewind(Callback):
    """After the pruning window, rewind the learning-rate schedule, and optionally the weights, to ``rewind_to``.

    From Renda, Frankle and Carbin 2020, "Comparing Rewinding and Fine-tuning in Neural Network Pruning"
    (arXiv:2003.02389): a network pruned late in training recovers more accuracy when it is retrained with
    the learning rates of an earlier point of its schedule (*learning-rate rewinding*) than with the small
    final ones (fine-tuning), and *weight rewinding* also resets the weights left to their values at that
    point (the lottery-ticket procedure of Frankle et al. 2019 with rewinding to step ``rewind_to``).

    In a run of fixed length (gradual pruning, then fine-tuning in the same ``trainer.fit``) the steps left
    after the last pruning event are fewer than the schedule's course from ``rewind_to``, so that course is
    replayed compressed into them (Le & Hua 2021's *scaled learning-rate restarting*, arXiv:2105.03193):
    optimizer step ``s >= at`` uses the optimizer settings the schedule gives at
    ``rewind_to + (s - at) * (T - rewind_to) / (T - at)`` (:func:`warped_step`; ``T`` = the run's steps),
    linearly interpolated. The run still ends on the schedule's last learning rate.

    It works with any step-wise scheduler (``interval="step"``): the schedule is played once on a copy when
    training starts and recorded, and at each step after ``at`` the recorded settings replace the
    scheduler's for the optimizer step alone (the scheduler's own state is left as it is). Learning rate,
    ``momentum`` and ``betas`` (which OneCycleLR cycles) are rewound. With a constant learning rate there is
    nothing to rewind and only the weights move.

    With ``weights=True`` the module's parameters and floating-point buffers (BatchNorm statistics) are
    copied to CPU at step ``rewind_to`` and written back at ``at``; weights that pruning removed stay zero
    (every mask-holding callback's masks are applied again) and the optimizers' state (moments) is cleared.

    The recorded schedule and the copied weights are in the callback's checkpoint state, so
    ``trainer.fit(ckpt_path=...)`` resumes before or after the rewind.

    Args:
        rewind_to: the optimizer step whose learning rate (and weights) training goes back to: 0 is the
            start of the run (the whole schedule replayed, warm-up included).
        weights: also rewind the weights (the kept ones) to their values at ``rewind_to``.
        at: the first optimizer step trained after rewinding; ``None``: the step after the last pruning event
            of the trainer's :class:`~lightning_prune.Pruning` callback.

    Raises:
        ValueError: ``rewind_to`` or ``at`` out of range (at once, or when training starts, before any step,
            once the run's length is known); ``at=None`` without exactly one ``Pruning`` callback; a scheduler
            stepped per epoch; ``weights=True`` with sharded (DTensor) parameters.

    Example:
        >>> from lightning_prune import Pruning
        >>> from lightning_prune.schedules import Iterative
        >>> prune = Pruning(0.9, "unstructured", "magnitude", Iterative(start_step=0, end_step=600, frequency=30))
        >>> rewind = Rewind(rewind_to=0)  # from step 601 on, replay the whole learning-rate schedule
        >>> trainer = pl.Trainer(callbacks=[prune, rewind], max_steps=1000)  # doctest: +SKIP
    """

    def __init__(self, rewind_to: int = 0, weights: bool = False, at: int | None = None) -> None:
        if isinstance(rewind_to, bool) or not isinstance(rewind_to, int) or rewind_to < 0:
            raise ValueError(f"rewind_to={rewind_to!r} is not valid; choose an optimizer step >= 0")
        if not isinstance(weights, bool):
            raise TypeError(f"weights={weights!r} is not valid; choose True or False")
        if at is not None and (isinstance(at, bool) or not isinstance(at, int) or at < 1):
            raise ValueError(f"at={at!r} is not valid; choose an optimizer step >= 1, or None (after pruning)")
        if at is not None and rewind_to > at:
            raise ValueError(f"rewind_to={rewind_to} is after at={at}; rewinding goes back: choose rewind_to <= at")
        self.rewind_to, self.weights, self.at = rewind_to, weights, at
        self._table: list[list[list[dict[str, Any]]]] | None = None  # per scheduled optimizer, step, group
        self._saved: dict[str, Tensor] | None = None  # weights at rewind_to (CPU), until the rewind
        self._start: int | None = None  # `at` as resolved for this run
        self._total: int | None = None
        self._rewound = False
        self._hooks: list[Any] = []
        self._own: dict[int, list[dict[str, Any]]] = {}  # by optimizer: the scheduler's settings while ours apply

    @property
    def state_key(self) -> str:
        """Identifies this callback's state in checkpoints (its settings)."""
        return self._generate_state_key(rewind_to=self.rewind_to, weights=self.weights, at=self.at)

    @property
    def rewound(self) -> bool:
        """Whether the rewind has happened in this run."""
        return self._rewound

    @property
    def start(self) -> int | None:
        """The first optimizer step after the rewind, once training has started."""
        return self._start

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resolve ``at``, record the schedule (fresh runs), check the weights can be copied."""
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "Rewind replays the learning-rate schedule up to the end of the run, but its length is not known: "
                "set Trainer(max_steps=N)"
            )
        self._total = int(total)
        self._start = self.at if self.at is not None else self._after_pruning(trainer, self._total)
        if not self.rewind_to <= self._start <= self._total:
            raise ValueError(
                f"Rewind(rewind_to={self.rewind_to}) at step {self._start} of a {self._total}-step run: choose "
                f"rewind_to <= at <= {self._total}"
            )
        if self._start >= self._total:
            rank_zero_warn(
                f"Rewind: step {self._start} is the end of the run, so nothing is trained after rewinding (the "
                "pruning schedule ends at the last step?): end it earlier, e.g. Iterative(end_step=0.6 * steps)"
            )
        if self.weights and any(is_dtensor(p) for p in pl_module.parameters()):
            raise ValueError(
                "Rewind(weights=True) keeps a copy of the weights, which is not supported for sharded (DTensor) "
                "parameters; use weights=False (learning-rate rewinding) under ModelParallelStrategy"
            )
        if self._table is None:
            self._table = [self._record(config, trainer.global_step) for config in self._step_schedulers(trainer)]
            if not self._table:
                rank_zero_info("Rewind: the learning rate is not scheduled, so only the weights can be rewound")
        if self.weights and not self._rewound and self._saved is None and trainer.global_step > self.rewind_to:
            raise ValueError(
                f"Rewind(weights=True, rewind_to={self.rewind_to}) needs the weights of step {self.rewind_to}, but "
                f"training starts at step {trainer.global_step} without them (resume from a checkpoint this "
                "callback saved)"
            )
        optimizers = [getattr(o, "optimizer", o) for o in trainer.optimizers]
        self._hooks = [o.register_step_post_hook(self._restore) for o in optimizers]

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        """Copy the weights at ``rewind_to``; write them back at ``at``."""
        step = trainer.global_step
        if self.weights and step == self.rewind_to and self._saved is None and not self._rewound:
            self._saved = {name: t.detach().to("cpu", copy=True) for name, t in self._tensors(pl_module)}
        if step >= (self._start or 0) and not self._rewound:
            self._rewind(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """From ``at`` on, the optimizer steps with the rewound schedule's settings."""
        if not self._rewound or not self._table:
            return
        assert self._start is not None and self._total is not None
        point = warped_step(trainer.global_step, self._start, self.rewind_to, self._total)
        raw = getattr(optimizer, "optimizer", optimizer)
        for table, opt in zip(self._table, self._scheduled_optimizers(trainer)):
            if opt is raw:
                if id(opt) not in self._own:  # a step skipped (fp16 overflow) leaves the scheduler's in _own
                    self._own[id(opt)] = [{k: g[k] for k in _SCHEDULED if k in g} for g in opt.param_groups]
                for group, settings in zip(opt.param_groups, _interpolate(table, point)):
                    group.update(settings)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove the optimizer hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @override
    def state_dict(self) -> dict[str, Any]:
        """The recorded schedule, the copied weights (until used), whether the rewind happened."""
        return {"table": self._table, "saved": self._saved, "rewound": self._rewound}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self._table, self._saved = state_dict.get("table"), state_dict.get("saved")
        self._rewound = bool(state_dict.get("rewound", False))

    # ------------------------------------------------------------------ helpers
    def _after_pruning(self, trainer: pl.Trainer, total: int) -> int:
        pruners = [cb for cb in trainer.callbacks if isinstance(cb, Pruning)]  # type: ignore[attr-defined]
        if len(pruners) != 1:
            raise ValueError(
                f"Rewind(at=None) rewinds after the last event of the trainer's Pruning callback, and the trainer "
                f"has {len(pruners)}: pass at=<the first step to train after rewinding>"
            )
        # schedule=None: the one Pruning derives from the run's length (it may bind after this callback)
        schedule = pruners[0].pruner.resolved_schedule or default_schedule(total)
        return int(schedule.end) + 1

    @staticmethod
    def _step_schedulers(trainer: pl.Trainer) -> list[Any]:
        configs = list(getattr(trainer, "lr_scheduler_configs", []) or [])
        for config in configs:
            if config.interval != "step" or config.frequency != 1:
                raise ValueError(
                    f"Rewind replays learning-rate schedules stepped every optimizer step; this one is stepped "
                    f"every {config.frequency} {config.interval}(s): use interval='step', frequency=1"
                )
        return configs

    def _scheduled_optimizers(self, trainer: pl.Trainer) -> list[torch.optim.Optimizer]:
        return [config.scheduler.optimizer for config in self._step_schedulers(trainer)]

    def _record(self, config: Any, step: int) -> list[list[dict[str, Any]]]:
        """The scheduler's settings at every step from ``step`` to the end, played on a stand-in optimizer."""
        assert self._total is not None
        if step > 0:
            raise ValueError(
                "Rewind records the learning-rate schedule when training starts at step 0; this run starts at "
                f"step {step} without a recorded schedule (resume from a checkpoint this callback saved)"
            )
        real = config.scheduler.optimizer
        stand_in = torch.optim.SGD([{**_settings(g), "params": [torch.zeros(1)]} for g in real.param_groups], lr=0.0)
        scheduler = copy.deepcopy(config.scheduler, memo={id(real): stand_in})
        rows = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": there is no training
            for _ in range(self._total + 1):
                rows.append([{k: g[k] for k in _SCHEDULED if k in g} for g in stand_in.param_groups])
                try:
                    scheduler.step()
                except ValueError:  # e.g. OneCycleLR past its total_steps: the schedule has ended
                    break
        return rows

    def _restore(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        """After the optimizer step, the scheduler's own settings back, before the scheduler steps."""
        for group, own in zip(optimizer.param_groups, self._own.pop(id(optimizer), [])):
            group.update(own)

    @staticmethod
    def _tensors(pl_module: nn.Module) -> list[tuple[str, Tensor]]:
        params = list(pl_module.named_parameters())
        buffers = [(n, b) for n, b in pl_module.named_buffers() if b.is_floating_point()]
        return params + buffers

    @torch.no_grad()
    def _rewind(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.weights:
            assert self._saved is not None, "the weights of rewind_to are copied before the rewind"
            for name, tensor in self._tensors(pl_module):
                if name in self._saved:
                    tensor.copy_(self._saved[name])
            for cb in trainer.callbacks:  # type: ignore[attr-defined]
                if isinstance(cb, MaskedWeights):
                    cb.engine.zero_pruned()
            for opt in trainer.optimizers:
                getattr(opt, "optimizer", opt).state.clear()
            self._saved = None
        self._rewound = True
        what = "learning rate and weights" if self.weights else "learning rate"
        rank_zero_info(f"Rewind: from step {trainer.global_step}, {what} rewound to step {self.rewind_to}")


def _settings(group: Mapping[str, Any]) -> dict[str, Any]:
    """A param group's settings without its parameters."""
    return {k: v for k, v in group.items() if k != "params"}


def _interpolate(table: list[list[dict[str, Any]]], point: float) -> list[dict[str, Any]]:
    """The settings of each group at fractional step ``point`` of a recorded schedule, linearly interpolated."""
    point = min(max(point, 0.0), len(table) - 1.0)
    low = math.floor(point)
    high = min(low + 1, len(table) - 1)
    w = point - low
    out = []
    for a, b in zip(table[low], table[high]):
        group: dict[str, Any] = {}
        for key, value in a.items():
            other = b.get(key, value)
            if isinstance(value, tuple):
                group[key] = tuple((1 - w) * x + w * y for x, y in zip(value, other))
            else:
                group[key] = (1 - w) * value + w * other
        out.append(group)
    return out
