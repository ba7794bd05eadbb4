"""DDP job for the one-shot callback test: two CPU processes (gloo) prune at fit start, then fine-tune.

Usage: python tests/oneshot_ddp.py OUT_DIR [--method sparsegpt] [--steps 3]

Plain ``ddp`` re-launches this script for the second rank. Each rank hashes its masks and weights right after
pruning and at the end; rank zero writes them all to ``OUT_DIR/ranks.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_loader, make_module

from lightning_prune import OneShotPruning


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Hashes(pl.Callback):
    def __init__(self, pruner: OneShotPruning) -> None:
        self.pruner = pruner
        self.rows: list[dict[str, Any]] = []

    def record(self, pl_module: pl.LightningModule, when: str) -> None:
        weights = {n: p for n, p in pl_module.named_parameters() if n in self.pruner.masks}
        self.rows.append(
            {
                "when": when,
                "masks": digest(dict(self.pruner.masks)),
                "weights": digest(weights),
                "sparsity": self.pruner.sparsity(),
                "zeros": all(bool((w[~self.pruner.masks[n]] == 0).all()) for n, w in weights.items()),
            }
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record(pl_module, "pruned")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record(pl_module, "end")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = make_module("mlp", "adamw")
    pruner = OneShotPruning(method=args.method, target_sparsity=0.5, calibration_batches=2, verbose=False)
    hashes = Hashes(pruner)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=args.steps,
        callbacks=[pruner, hashes],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, make_loader(module, n=64, batch_size=8))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, hashes.rows)
    if trainer.is_global_zero:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "ranks.json").write_text(json.dumps(gathered))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
