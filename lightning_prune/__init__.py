"""lightning_prune: Lightning callbacks that prune a model while it trains.

Example:
    >>> from lightning_prune import Pruning
    >>> from lightning_prune.schedules import Iterative
    >>> cb = Pruning(target_sparsity=0.8, pattern="4x1", criterion="snip_momentum",
    ...              schedule=Iterative(start_step=0, end_step=1000, frequency=100, decay="exp"))
    >>> cb.pattern
    4x1
"""

from lightning_prune.callbacks import PatternLock, ProgressivePruning, Pruning
from lightning_prune.report import SparsityRow, format_report, sparsity_report

__all__ = ["PatternLock", "ProgressivePruning", "Pruning", "SparsityRow", "format_report", "sparsity_report"]
__version__ = "0.1.0"
