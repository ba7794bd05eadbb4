"""Turn masks into real gains: baked-in zeros, physically slimmed models, compact checkpoints, 2:4 kernels.

- :func:`make_permanent`: the masks multiplied into the weights; a plain module, original names, no hooks.
- :func:`slim`: channels whose every producer outputs exactly zero (or whose every consumer ignores them)
  are removed for real, with everything coupled to them, using Torch-Pruning's dependency graph.
- :func:`save_sparse` / :func:`load_sparse`: safetensors with a packed bitmask plus the kept values.
- :func:`to_semi_structured`: 2:4-masked Linear weights as torch's semi-structured sparse tensors (CUDA).
- :func:`consolidate_checkpoint`: one plain file from a sharded (ModelParallelStrategy) checkpoint directory.
"""

from lightning_prune.export.consolidate import consolidate_checkpoint
from lightning_prune.export.kernels import to_semi_structured
from lightning_prune.export.permanent import make_permanent
from lightning_prune.export.slim import describe_ffn_width, slim
from lightning_prune.export.sparse import load_sparse, save_sparse

__all__ = [
    "consolidate_checkpoint",
    "describe_ffn_width",
    "load_sparse",
    "make_permanent",
    "save_sparse",
    "slim",
    "to_semi_structured",
]
