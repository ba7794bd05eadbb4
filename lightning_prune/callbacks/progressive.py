"""``ProgressivePruning``: a :class:`~lightning_prune.ProgressivePruner` driven by Lightning's Trainer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_prune.callbacks.masked import FromEngine
from lightning_prune.callbacks.pruning import Pruning
from lightning_prune.criteria import Criterion
from lightning_prune.engine import PROGRESSIVE_TYPES, ProgressivePruner
from lightning_prune.patterns import Pattern
from lightning_prune.regularization import Regularization
from lightning_prune.schedules import Schedule

__all__ = ["PROGRESSIVE_TYPES", "ProgressivePruning"]


class ProgressivePruning(Pruning):
    """Structured pruning whose blocks are removed gradually, weight by weight, between events (SPEC.md (d)).

    Between two structured events, ``progressive_steps - 1`` interval masks, evenly spaced, each take a
    further share of the weights that the next event's structured mask would drop, lowest-scored weights
    first; every structured event, and the end, leaves masks that fit the pattern exactly, at the scheduled
    sparsity. The algorithm is :class:`~lightning_prune.ProgressivePruner`'s.

    Args:
        progressive_steps: interval masks per gap between events, counting the event that completes them
            (``4``: three interval masks, then the event). Each gap needs at least this many steps.
        progressive_type: ``"scores"``: interval masks pick weights by score (the only type built; the
            ``"linear"`` slice-by-slice variant is refused with an explicit error).

    The other arguments are those of :class:`Pruning`.

    Raises:
        ValueError: an unstructured pattern, a schedule with fewer than two events, events closer than
            ``progressive_steps`` steps, ``progressive_steps < 1`` or an unknown ``progressive_type``; also
            everything :class:`Pruning` refuses.

    Example:
        >>> from lightning_prune.schedules import Iterative
        >>> cb = ProgressivePruning(0.8, pattern="4x1", progressive_steps=4,
        ...                         schedule=Iterative(start_step=0, end_step=400, frequency=100))
        >>> cb.progressive_steps
        4
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
        progressive_steps: int = 4,
        progressive_type: str = "scores",
        verbose: bool = True,
    ) -> None:
        self._progressive: dict[str, Any] = {
            "progressive_steps": progressive_steps,
            "progressive_type": progressive_type,
        }
        super().__init__(
            target_sparsity,
            pattern=pattern,
            criterion=criterion,
            schedule=schedule,
            scope=scope,
            op_types=op_types,
            include=include,
            exclude=exclude,
            min_sparsity_per_layer=min_sparsity_per_layer,
            max_sparsity_per_layer=max_sparsity_per_layer,
            log_per_layer=log_per_layer,
            regularization=regularization,
            verbose=verbose,
        )

    progressive_steps = FromEngine()
    progressive_type = FromEngine()

    def _engine(self, target_sparsity: float, settings: dict[str, Any]) -> ProgressivePruner:
        return ProgressivePruner(None, target_sparsity, **self._progressive, **settings)
