"""Lightning callbacks: all coupling to the Trainer and all state live here."""

from lightning_prune.callbacks.pruning import Pruning

__all__ = ["Pruning"]
