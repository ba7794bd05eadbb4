"""Group lasso: shrink whole blocks (or channels) of weights toward zero with a proximal step.

After each optimizer step inside the pruning window every group ``b`` of a target weight is scaled by
``max(0, 1 - lr * coeff / ||W_b||_2)``, ``lr`` being the learning rate of the weight's param group. The
factor lies in [0, 1]: a weight is never scaled up and never changes sign, and a group whose norm is below
``lr * coeff`` becomes exactly zero. Groups are the units of the pattern: NxM blocks (partial blocks at the
edges included), whole channels, or single weights for ``"unstructured"`` (where the step is soft
thresholding). N:M patterns have no groups to shrink and are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_prune.patterns import NM, Pattern, parse_pattern
from lightning_prune.targets import compile_patterns, parse_op_types, resolve_targets

__all__ = ["GroupLasso", "group_norms"]


def group_norms(weight: Tensor, pattern: Pattern) -> Tensor:
    """L2 norm of every group (unit) of ``pattern`` in ``weight``, shaped like the pattern's units.

    Example:
        >>> group_norms(torch.tensor([[3.0], [4.0], [0.0], [0.0]]), parse_pattern("2x1"))
        tensor([[5.],
                [0.]])
    """
    sizes = pattern.unit_sizes(tuple(weight.shape))
    mean_sq = pattern.unit_scores(weight.detach().float().square())
    total = mean_sq * (sizes if isinstance(sizes, int) else sizes.to(mean_sq.device, mean_sq.dtype))
    return total.sqrt()


class GroupLasso(Callback):
    """Proximal group-lasso step after each optimizer step: W_b ← W_b · max(0, 1 − lr·coeff / ‖W_b‖₂).

    Pass it to :class:`~lightning_prune.Pruning` (``regularization=GroupLasso(coeff=1e-4)``), which applies
    it to its own targets, with its own pattern, inside its pruning window; or use it alone as a callback,
    with the arguments below. Under ``Pruning`` the targeting arguments must stay unset (they come from
    ``Pruning``): setting them there is an error rather than being ignored.

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
        if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not math.isfinite(coeff) or coeff < 0:
            raise ValueError(f"GroupLasso coeff must be a finite number >= 0, got {coeff!r}")
        self.coeff = float(coeff)
        self._given: dict[str, Any] = {
            name: value
            for name, value in (
                ("pattern", pattern),
                ("op_types", op_types),
                ("include", include),
                ("exclude", exclude),
                ("start_step", start_step),
                ("end_step", end_step),
            )
            if value is not None
        }
        self.pattern = parse_pattern(pattern if pattern is not None else "4x1")
        _check_groups(self.pattern)
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
        self._owner: object | None = None  # the Pruning callback that applies this instance, if any
        self._lrs: list[float] | None = None  # learning rates of the step just taken, None: no step to follow

    def __repr__(self) -> str:
        return f"GroupLasso(coeff={self.coeff!r})"

    # ------------------------------------------------------------------ use under Pruning
    def attach(self, owner: object, pattern: Pattern) -> None:
        """Let ``owner`` (a :class:`~lightning_prune.Pruning`) apply this instance with its ``pattern``."""
        if self._owner is not None and self._owner is not owner:
            raise ValueError("this GroupLasso is already attached to another Pruning callback; create one per callback")
        clashing = sorted(self._given)
        if "pattern" in self._given and str(parse_pattern(self._given["pattern"])) == str(pattern):
            clashing.remove("pattern")  # the same pattern twice is no conflict
        if clashing:
            raise ValueError(
                f"GroupLasso under Pruning takes its targets, pattern and window from Pruning; remove "
                f"{', '.join(clashing)} from GroupLasso(...) or set them on Pruning"
            )
        _check_groups(pattern)
        self.pattern = pattern
        self._owner = owner

    def before_step(self, targets: Mapping[str, Tensor], optimizer: torch.optim.Optimizer) -> None:
        """Remember the learning rate each target is about to be stepped with."""
        optimizer = getattr(optimizer, "optimizer", optimizer)
        lr_of = {id(p): float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
        missing = [fqn for fqn, p in targets.items() if p.grad is not None and id(p) not in lr_of]
        if missing:
            raise ValueError(
                f"GroupLasso needs each weight's learning rate, but the optimizer's param groups do not hold "
                f"{missing[:3]} (sharded or flattened parameters are not supported)"
            )
        self._lrs = [lr_of.get(id(p), 0.0) for p in targets.values()]

    @torch.no_grad()
    def after_step(self, targets: Mapping[str, Tensor]) -> None:
        """The proximal step on every group of every target, with the remembered learning rates."""
        lrs, self._lrs = self._lrs, None
        if lrs is None or self.coeff == 0.0:
            return
        for weight, lr in zip(targets.values(), lrs):
            threshold = lr * self.coeff
            if threshold <= 0.0:
                continue
            norms = group_norms(weight, self.pattern)
            factor = (1.0 - threshold / norms).clamp_(min=0.0)  # a zero group: -inf, clamped to 0
            weight.mul_(self.pattern.expand(factor, weight).to(weight.dtype))

    # ------------------------------------------------------------------ standalone callback
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve targets (standalone use)."""
        if self._owner is not None:
            raise ValueError(
                "this GroupLasso is applied by Pruning(regularization=...); do not also pass it in callbacks"
            )
        if stage == "fit":
            self._targets = resolve_targets(pl_module, self.op_types, self.include, self.exclude)
            for fqn, param in self._targets.items():
                self.pattern.check(fqn, param.shape)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Point at the module's current parameters."""
        params = dict(pl_module.named_parameters())
        self._targets = {fqn: params[fqn] for fqn in self._targets}

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


def _check_groups(pattern: Pattern) -> None:
    if isinstance(pattern, NM):
        raise ValueError(
            f"GroupLasso cannot shrink pattern '{pattern}': N:M prunes weights inside each group of M rather "
            "than whole groups; use a block ('4x1'), channel or 'unstructured' pattern"
        )
