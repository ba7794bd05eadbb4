"""``PatternLock``: fine-tune a sparse model while its zeros stay exactly zero (a :class:`MaskLock` adapter)."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_prune.callbacks.masked import FromEngine, MaskedWeights
from lightning_prune.engine import MaskLock
from lightning_prune.patterns import Pattern

__all__ = ["PatternLock"]


class PatternLock(MaskedWeights):
    """Lock the zeros already in the weights: they stay exactly zero while every other weight trains.

    The use (SPEC.md, "Prune Once for All"): prune on a large data set with :class:`Pruning`, save, load the
    sparse weights into a fresh model and fine-tune it on a downstream task with ``PatternLock``. Masks are
    taken from the weights after any checkpoint is restored, so ``trainer.fit(ckpt_path=...)`` works with a
    checkpoint written by ``PatternLock`` (its masks are restored) or by ``Pruning`` (its weights' zeros are
    locked). A weight that is nonzero is never masked. The algorithm is :class:`~lightning_prune.MaskLock`'s.

    Args:
        pattern: if given (e.g. ``"2:4"``, ``"4x1"``), the zeros of every target must form whole units of it;
            otherwise training stops before the first step with an error naming the layer. ``None`` locks any
            zeros.
        op_types: module class names whose ``weight`` is locked.
        include: regexes; only modules whose full name matches one are locked.
        exclude: regexes; modules whose full name matches one are not locked.
        verbose: print the per-layer sparsity locked when training starts.

    Raises:
        ValueError: at fit start, before any step: zeros that do not fit ``pattern``; also bad arguments.

    Example:
        >>> lock = PatternLock(pattern="2:4")
        >>> lock.pattern
        2:4
        >>> trainer = pl.Trainer(callbacks=[lock])  # doctest: +SKIP
    """

    def __init__(
        self,
        pattern: str | Pattern | None = None,
        op_types: str | Sequence[str] = ("Linear", "Conv1d", "Conv2d"),
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__(MaskLock(None, pattern, op_types, include, exclude), verbose)

    pattern = FromEngine()

    def _identity(self) -> dict[str, object]:
        return {**super()._identity(), "pattern": str(self.pattern) if self.pattern is not None else None}
