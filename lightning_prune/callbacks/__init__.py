"""Lightning callbacks: thin adapters that drive the engines of :mod:`lightning_prune.engine` from a Trainer."""

from lightning_prune.callbacks.distillation import Distillation
from lightning_prune.callbacks.group_lasso import GroupLasso
from lightning_prune.callbacks.masked import MaskedWeights
from lightning_prune.callbacks.oneshot import OneShotPruning
from lightning_prune.callbacks.pattern_lock import PatternLock
from lightning_prune.callbacks.progressive import ProgressivePruning
from lightning_prune.callbacks.pruning import Pruning
from lightning_prune.callbacks.rewind import Rewind

__all__ = [
    "Distillation",
    "GroupLasso",
    "MaskedWeights",
    "OneShotPruning",
    "PatternLock",
    "ProgressivePruning",
    "Pruning",
    "Rewind",
]
