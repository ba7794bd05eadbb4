"""Group lasso: shrink whole blocks (or channels) of weights toward zero with a proximal step.

After each optimizer step inside the pruning window every group ``b`` of a target weight is scaled by
``max(0, 1 - lr * coeff / ||W_b||_2)``, ``lr`` being the learning rate of the weight's param group (the
proximal operator of the group-lasso penalty coeff·Σ_b ‖W_b‖₂; Yuan & Lin, "Model selection and estimation in
regression with grouped variables", JRSS-B 2006). The factor lies in [0, 1]: a weight is never scaled up and
never changes sign, and a group whose norm is below ``lr * coeff`` becomes exactly zero. Groups are the units
of the pattern: NxM blocks (partial blocks at the edges included), whole channels, or single weights for
``"unstructured"`` (where the step is soft thresholding). N:M patterns have no groups to shrink and are refused.

This module has no Lightning in it: :class:`GroupLassoStep` is what :class:`~lightning_prune.Pruner` applies
(``regularization=...``); :class:`GroupLasso` (imported from here, defined with the callbacks) is the same step
as a Lightning callback that can also stand alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_prune.patterns import Pattern, parse_pattern
from lightning_prune.sharding import box_of, is_dtensor, local

if TYPE_CHECKING:
    from lightning_prune.callbacks.group_lasso import GroupLasso

__all__ = ["GroupLasso", "GroupLassoStep", "Regularization", "group_norms"]


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


def check_groups(pattern: Pattern) -> None:
    """Raise ``ValueError`` for a pattern whose units are not whole groups (``N:M``)."""
    if not pattern.whole_units:
        raise ValueError(
            f"GroupLasso cannot shrink pattern '{pattern}': N:M prunes weights inside each group of M rather "
            "than whole groups; use a block ('4x1'), channel or 'unstructured' pattern"
        )


class Regularization:
    """Base class of what a :class:`~lightning_prune.Pruner` applies to its targets inside its pruning window.

    The engine calls :meth:`attach` once with its pattern, :meth:`before_step` before every optimizer step of
    the window and :meth:`after_step` after it.
    """

    def attach(self, owner: object, pattern: Pattern) -> None:
        """Let ``owner`` (a pruner) apply this regularizer to its targets, grouped by ``pattern``."""

    def before_step(self, targets: Mapping[str, Tensor], optimizer: torch.optim.Optimizer | None) -> None:
        """Before an optimizer step of the window (gradients are final)."""

    def after_step(self, targets: Mapping[str, Tensor]) -> None:
        """After that optimizer step."""


class GroupLassoStep(Regularization):
    """Proximal group-lasso step after each optimizer step: W_b ← W_b · max(0, 1 − lr·coeff / ‖W_b‖₂).

    Args:
        coeff: the group-lasso coefficient, ``>= 0`` (0 switches the step off).
        pattern: the groups; a :class:`~lightning_prune.Pruner` replaces it with its own pattern.

    Raises:
        ValueError: a coefficient that is not a finite number >= 0, or an N:M pattern.

    Example:
        >>> step = GroupLassoStep(coeff=0.5, pattern="2x1")
        >>> w = torch.nn.Parameter(torch.tensor([[3.0], [4.0], [0.1], [0.1]]))
        >>> opt = torch.optim.SGD([w], lr=1.0)
        >>> step.before_step({"w": w}, opt); step.after_step({"w": w})
        >>> w.data.flatten()
        tensor([2.7000, 3.6000, 0.0000, 0.0000])
    """

    def __init__(self, coeff: float = 1e-4, pattern: str | Pattern = "4x1") -> None:
        if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not math.isfinite(coeff) or coeff < 0:
            raise ValueError(f"GroupLasso coeff must be a finite number >= 0, got {coeff!r}")
        self.coeff = float(coeff)
        self.pattern = parse_pattern(pattern)
        check_groups(self.pattern)
        self._owner: object | None = None  # the pruner that applies this instance, if any
        self._lrs: list[float] | None = None  # learning rates of the step just taken, None: no step to follow

    def __repr__(self) -> str:
        return f"GroupLasso(coeff={self.coeff!r})"

    def attach(self, owner: object, pattern: Pattern) -> None:
        """Let ``owner`` apply this instance with its ``pattern``; one owner per instance.

        Raises:
            ValueError: already attached to another pruner, or an N:M pattern.
        """
        if self._owner is not None and self._owner is not owner:
            raise ValueError("this GroupLasso is already attached to another Pruning callback; create one per callback")
        check_groups(pattern)
        self.pattern = pattern
        self._owner = owner

    def before_step(self, targets: Mapping[str, Tensor], optimizer: torch.optim.Optimizer | None) -> None:
        """Remember the learning rate each target is about to be stepped with."""
        if optimizer is None:
            raise ValueError("GroupLasso needs the optimizer (its learning rates): pass it to before_optimizer_step")
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the real one
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
        for param, lr in zip(targets.values(), lrs):
            threshold = lr * self.coeff
            if threshold <= 0.0:
                continue
            weight = self._shard(param)
            norms = group_norms(weight, self.pattern)
            factor = (1.0 - threshold / norms).clamp_(min=0.0)  # a zero group: -inf, clamped to 0
            weight.mul_(self.pattern.expand(factor, weight).to(weight.dtype))

    def _shard(self, weight: Tensor) -> Tensor:
        """The local shard of a sharded weight whose shard holds whole groups; else the weight itself.

        A group cut by the shard (a channel across the split dimension) is left to DTensor's own operations,
        which combine the partial norms across ranks.
        """
        if not is_dtensor(weight):
            return weight
        box = box_of(weight, sharded=True)
        found = box.units(self.pattern)
        return local(weight) if found is not None and not found[2] else weight


def __getattr__(name: str) -> Any:
    # The callback form lives with the callbacks (it needs Lightning); importing it from here loads it lazily,
    # so that this module, and the engine that uses it, stay free of Lightning.
    if name == "GroupLasso":
        from lightning_prune.callbacks.group_lasso import GroupLasso

        return GroupLasso
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
