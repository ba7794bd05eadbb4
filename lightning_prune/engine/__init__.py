"""The algorithm without Lightning: engines that any training loop drives (plain PyTorch, Fabric, callbacks).

- :class:`Pruner`: scores, events, selection, gradient masking and zero keeping, on a schedule.
- :class:`ProgressivePruner`: as :class:`Pruner`, with unstructured interval masks between events.
- :class:`MaskLock`: the zeros already in the weights stay zero.
"""

from lightning_prune.engine.lock import MaskLock
from lightning_prune.engine.masks import MaskKeeper
from lightning_prune.engine.progressive import PROGRESSIVE_TYPES, ProgressivePruner
from lightning_prune.engine.pruner import Event, Pruner
from lightning_prune.engine.scores import Target
from lightning_prune.engine.zeroing import owning_optimizer

__all__ = [
    "PROGRESSIVE_TYPES",
    "Event",
    "MaskKeeper",
    "MaskLock",
    "ProgressivePruner",
    "Pruner",
    "Target",
    "owning_optimizer",
]
