"""Lightning callbacks: all coupling to the Trainer and all state live here."""

from lightning_prune.callbacks.masked import MaskedWeights
from lightning_prune.callbacks.pattern_lock import PatternLock
from lightning_prune.callbacks.progressive import ProgressivePruning
from lightning_prune.callbacks.pruning import Pruning

__all__ = ["MaskedWeights", "PatternLock", "ProgressivePruning", "Pruning"]
