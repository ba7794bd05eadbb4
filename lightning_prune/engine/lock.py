"""``MaskLock``: the zeros already in the weights stay exactly zero while every other weight trains."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.engine.masks import MaskKeeper, all_kept
from lightning_prune.patterns import Pattern, parse_pattern
from lightning_prune.sharding import local

__all__ = ["MaskLock"]


class MaskLock(MaskKeeper):
    """Lock the zeros of the targeted weights: masks are taken from them when bound, and never change.

    A weight that is nonzero is never masked. A state from :meth:`state_dict` of a ``MaskLock`` restores its
    masks; any other state (e.g. a pruning run's) is ignored and the weights' zeros are locked.

    Args:
        model: the sparse model, or None to :meth:`bind` one later.
        pattern: if given (e.g. ``"2:4"``, ``"4x1"``), the zeros of every target must form whole units of it;
            binding raises otherwise, naming the layer. ``None`` locks any zeros.
        op_types: module class names whose ``weight`` is locked.
        include: regexes; only modules whose full name matches one are locked.
        exclude: regexes; modules whose full name matches one are not locked.

    Raises:
        ValueError: zeros that do not fit ``pattern`` (when bound); bad arguments.

    Example:
        >>> net = nn.Linear(4, 2)
        >>> with torch.no_grad(): net.weight[0, :2] = 0.0
        >>> lock = MaskLock(net)
        >>> lock.sparsity()
        0.25
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        pattern: str | Pattern | None = None,
        op_types: str | Sequence[str] = ("Linear", "Conv1d", "Conv2d"),
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
    ) -> None:
        self.pattern = None if pattern is None else parse_pattern(pattern)
        super().__init__(op_types, include, exclude)
        if model is not None:
            self.bind(model)

    @property
    def pattern_name(self) -> str:
        """The pattern's name for reports, or ``"locked"``."""
        return str(self.pattern) if self.pattern is not None else "locked"

    def config(self) -> dict[str, Any]:
        """The settings stored in checkpoints."""
        return {"kind": "pattern_lock", "pattern": str(self.pattern) if self.pattern else None, **super().config()}

    def _check_target(self, fqn: str, param: nn.Parameter) -> None:
        pattern = self._pattern_for(fqn)
        if pattern is not None:
            pattern.check(fqn, param.shape)

    def _check_config(self, saved: Mapping[str, Any], targets: Mapping[str, nn.Parameter]) -> None:
        if saved.get("kind") == "pattern_lock":
            super()._check_config(saved, targets)

    def _adopt(self, model: nn.Module, state: Mapping[str, Any] | None, carried: bool) -> None:
        """Masks from this lock's own state, else from the weights' zeros (after any restore)."""
        if state is not None and state.get("config", {}).get("kind") == "pattern_lock":
            masks = self._checked_masks(state["masks"])
        else:
            masks = {fqn: local(p.detach()) != 0 for fqn, p in self._targets.items()}
        if self.pattern is not None:
            for fqn, mask in masks.items():
                pattern = self._pattern_for(fqn)
                assert pattern is not None
                if not pattern.conforms(mask):
                    raise ValueError(
                        f"PatternLock(pattern='{self.pattern}'): the zeros of '{fqn}' do not form whole "
                        f"'{self.pattern}' units ({self._stray_zeros(mask, pattern)} zeros outside them); lock them "
                        "with pattern=None, or prune this layer with that pattern first"
                    )
        if all(all_kept(m) for m in masks.values()):
            warnings.warn(
                "PatternLock found no zeros in the targeted weights, so nothing is locked; load the sparse "
                "weights before training",
                stacklevel=4,
            )
        self._masks = masks

    def _unit_pattern(self) -> Pattern | None:
        return self.pattern

    def _stray_zeros(self, mask: Tensor, pattern: Pattern) -> int:
        """Zeros that no whole unit of ``pattern`` covers."""
        pruned = ~mask
        scores = torch.where(pruned, 0.0, 1.0)
        whole = pattern.unit_scores(scores) == 0  # units whose elements are all zero
        return int((pruned & ~pattern.expand(whole, scores)).sum())
