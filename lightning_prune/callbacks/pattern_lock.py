"""``PatternLock``: fine-tune a sparse model while its zeros stay exactly zero."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_prune.callbacks.masked import MaskedWeights
from lightning_prune.patterns import Pattern, parse_pattern
from lightning_prune.report import format_report

__all__ = ["PatternLock"]


class PatternLock(MaskedWeights):
    """Lock the zeros already in the weights: they stay exactly zero while every other weight trains.

    The use (SPEC.md, "Prune Once for All"): prune on a large data set with :class:`Pruning`, save, load the
    sparse weights into a fresh model and fine-tune it on a downstream task with ``PatternLock``. Masks are
    taken from the weights after any checkpoint is restored, so ``trainer.fit(ckpt_path=...)`` works with a
    checkpoint written by ``PatternLock`` (its masks are restored) or by ``Pruning`` (its weights' zeros are
    locked). A weight that is nonzero is never masked.

    Args:
        pattern: if given (e.g. ``"2:4"``, ``"4x1"``), the zeros of every target must form whole units of it;
            otherwise training stops before the first step with an error naming the layer. ``None`` locks any
            zeros.
        op_types: module class names whose ``weight`` is locked.
        include: regexes; only modules whose full name matches one are locked.
        exclude: regexes; modules whose full name matches one are not locked.

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
    ) -> None:
        self.pattern = None if pattern is None else parse_pattern(pattern)
        super().__init__(op_types, include, exclude)

    def config(self) -> dict[str, Any]:
        """The settings stored in checkpoints."""
        return {"kind": "pattern_lock", "pattern": str(self.pattern) if self.pattern else None}

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take the masks from the weights' zeros (or this callback's checkpoint), after any restore."""
        self._bind(pl_module)
        state, self._pending = self._pending, None
        if state is not None and state.get("config", {}).get("kind") == "pattern_lock":
            masks = self._checked_masks(state["masks"])
        else:
            masks = {fqn: p.detach() != 0 for fqn, p in self._targets.items()}
        if self.pattern is not None:
            for fqn, mask in masks.items():
                if not self.pattern.conforms(mask):
                    raise ValueError(
                        f"PatternLock(pattern='{self.pattern}'): the zeros of '{fqn}' do not form whole "
                        f"'{self.pattern}' units ({self._stray_zeros(mask)} zeros outside them); lock them with "
                        "pattern=None, or prune this layer with that pattern first"
                    )
        self._masks = masks
        if all(bool(m.all()) for m in masks.values()):
            rank_zero_warn(
                "PatternLock found no zeros in the targeted weights, so nothing is locked; load the sparse "
                "weights before fit"
            )
        self._masks_changed()
        rank_zero_info("PatternLock: per-layer sparsity locked\n" + format_report(self.report(pl_module)))

    @override
    def state_dict(self) -> dict[str, Any]:
        """The locked masks."""
        if self._pending is not None:
            return self._pending
        return {"masks": {fqn: m.cpu() for fqn, m in self._masks.items()}, "config": self.config()}

    # ------------------------------------------------------------------ helpers
    def _pattern_name(self) -> str:
        return str(self.pattern) if self.pattern is not None else "locked"

    def _unit_pattern(self) -> Pattern | None:
        return self.pattern

    def _check_target(self, fqn: str, param: torch.nn.Parameter) -> None:
        if self.pattern is not None:
            self.pattern.check(fqn, param.shape)

    def _stray_zeros(self, mask: torch.Tensor) -> int:
        """Zeros that no whole unit of the pattern covers."""
        assert self.pattern is not None
        pruned = ~mask
        scores = torch.where(pruned, 0.0, 1.0)
        whole = self.pattern.unit_scores(scores) == 0  # units whose elements are all zero
        return int((pruned & ~self.pattern.expand(whole, scores)).sum())
