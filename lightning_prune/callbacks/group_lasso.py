"""``GroupLasso``: the group-lasso proximal step as a Lightning callback, or as a pruner's regularization."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_prune.patterns import Pattern, parse_pattern
from lightning_prune.regularization import GroupLassoStep
from lightning_prune.targets import compile_patterns, parse_op_types, resolve_targets

__all__ = ["GroupLasso"]


class GroupLasso(GroupLassoStep, Callback):
    """Proximal group-lasso step after each optimizer step: W_b ← W_b · max(0, 1 − lr·coeff / ‖W_b‖₂).

    Pass it to :class:`~lightning_prune.Pruning` or :class:`~lightning_prune.Pruner`
    (``regularization=GroupLasso(coeff=1e-4)``), which apply it to their own targets, with their own pattern,
    inside their pruning window; or use it alone as a callback, with the arguments below. Under a pruner the
    targeting arguments must stay unset (they come from the pruner): setting them there is an error rather
    than being ignored. The step itself is :class:`~lightning_prune.regularization.GroupLassoStep`.

    Args:
        coeff: the group-lasso coefficient, ``>= 0`` (0 switches the step off).
        pattern: groups (standalone only; default ``"4x1"``): an ``"NxM"`` block, ``"channelx1"``,
            ``"1xchannel"`` or ``"unstructured"``. N:M patterns are refused.
        op_types: module class names whose ``weight`` is shrunk (standalone only).
        include: regexes; only modules whose full name matches one (standalone only).
        exclude: regexes; modules whose full name matches one are skipped (standalone only).
        start_step: first optimizer step shrunk (standalone only; default 0).
        end_step: last optimizer step shrunk, inclusive (standalone only; default: to the end of training).

    Raises:
        ValueError: a coefficient that is not a finite number >= 0, an N:M pattern, a bad step range.

    Example:
        >>> lasso = GroupLasso(coeff=1e-4)
        >>> lasso.coeff
        0.0001
        >>> from lightning_prune import Pruning
        >>> cb = Pruning(0.8, pattern="4x1", regularization=lasso)  # shrinks Pruning's 4x1 blocks
    """

    def __init__(
        self,
        coeff: float = 1e-4,
        pattern: str | Pattern | None = None,
        op_types: str | Sequence[str] | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        start_step: int | None = None,
        end_step: int | None = None,
    ) -> None:
        super().__init__(coeff, pattern if pattern is not None else "4x1")
        given = {
            "pattern": pattern,
            "op_types": op_types,
            "include": include,
            "exclude": exclude,
            "start_step": start_step,
            "end_step": end_step,
        }
        self._given: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
        self.op_types = parse_op_types(("Linear", "Conv1d", "Conv2d") if op_types is None else op_types, "GroupLasso ")
        compile_patterns("include", include)
        compile_patterns("exclude", exclude)
        self.include, self.exclude = include, exclude
        for name, value in (("start_step", start_step), ("end_step", end_step)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"GroupLasso {name} must be an int >= 0 or None, got {value!r}")
        if start_step is not None and end_step is not None and start_step > end_step:
            raise ValueError(f"GroupLasso start_step ({start_step}) must be <= end_step ({end_step})")
        self.start_step = start_step or 0
        self.end_step = end_step
        self._targets: dict[str, torch.nn.Parameter] = {}

    def attach(self, owner: object, pattern: Pattern) -> None:
        """Let ``owner`` (a pruner) apply this instance with its ``pattern``; its own targeting must be unset."""
        clashing = sorted(self._given)
        if "pattern" in self._given and str(parse_pattern(self._given["pattern"])) == str(pattern):
            clashing.remove("pattern")  # the same pattern twice is no conflict
        if clashing:
            raise ValueError(
                f"GroupLasso under Pruning takes its targets, pattern and window from Pruning; remove "
                f"{', '.join(clashing)} from GroupLasso(...) or set them on Pruning"
            )
        super().attach(owner, pattern)

    # ------------------------------------------------------------------ standalone callback
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve targets (standalone use)."""
        if self._owner is not None:
            raise ValueError(
                "this GroupLasso is applied by Pruning(regularization=...); do not also pass it in callbacks"
            )
        if stage == "fit" and not is_overridden("configure_model", pl_module):
            self._resolve(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Point at the module's current parameters (``configure_model`` may have built them after setup)."""
        self._resolve(pl_module)

    def _resolve(self, pl_module: torch.nn.Module) -> None:
        self._targets = resolve_targets(pl_module, self.op_types, self.include, self.exclude)
        for fqn, param in self._targets.items():
            self.pattern.check(fqn, param.shape)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Inside the window, remember the learning rates of the coming step."""
        step = trainer.global_step
        if step >= self.start_step and (self.end_step is None or step <= self.end_step):
            self.before_step(self._targets, optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After a step inside the window, shrink the groups."""
        self.after_step(self._targets)
