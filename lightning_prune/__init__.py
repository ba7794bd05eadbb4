"""lightning_prune: prune a model while it trains, from any loop (``Pruner``) or a Lightning Trainer (callbacks).

Importing the package, ``Pruner`` or the pieces (patterns, criteria, schedules) does not import Lightning; the
callbacks load it when first used.

Example:
    >>> from lightning_prune import Pruning
    >>> from lightning_prune.schedules import Iterative
    >>> cb = Pruning(target_sparsity=0.8, pattern="4x1", criterion="snip_momentum",
    ...              schedule=Iterative(start_step=0, end_step=1000, frequency=100, decay="exp"))
    >>> cb.pattern
    4x1
"""

from typing import TYPE_CHECKING, Any

from lightning_prune.engine import MaskLock, ProgressivePruner, Pruner
from lightning_prune.report import SparsityRow, format_report, sparsity_report

if TYPE_CHECKING:
    from lightning_prune.callbacks import (
        Distillation,
        GroupLasso,
        OneShotPruning,
        PatternLock,
        ProgressivePruning,
        Pruning,
        Rewind,
    )

__all__ = [
    "Distillation",
    "GroupLasso",
    "MaskLock",
    "OneShotPruning",
    "PatternLock",
    "ProgressivePruner",
    "ProgressivePruning",
    "Pruner",
    "Pruning",
    "Rewind",
    "SparsityRow",
    "format_report",
    "sparsity_report",
]
__version__ = "0.1.0"

_CALLBACKS = (
    "Distillation",
    "GroupLasso",
    "OneShotPruning",
    "PatternLock",
    "ProgressivePruning",
    "Pruning",
    "Rewind",
)


def __getattr__(name: str) -> Any:
    # The Lightning callbacks are loaded on first use, so that the engine alone never imports Lightning.
    if name in _CALLBACKS:
        from lightning_prune import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_CALLBACKS])
