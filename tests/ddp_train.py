"""DDP job for the distributed tests: two CPU processes (gloo), mask hashes gathered after every step.

Usage: python tests/ddp_train.py OUT_DIR [--strategy ddp] [--pattern 4x1] [--criterion snip_momentum]

Plain ``ddp`` re-launches this script for the second rank, so it runs as a script, not inside pytest. Rank
zero writes ``OUT_DIR/hashes.json`` (every rank's mask hash after each step, and the final sparsity); the
logger writes ``OUT_DIR/csv``.
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
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).parent))
from conftest import InputNorms, make_loader, make_module

from lightning_prune import Pruning
from lightning_prune.schedules import Iterative


class MaskHashes(pl.Callback):
    """After each step, every rank's mask hash, gathered; rank zero writes them to a file."""

    def __init__(self, pruning: Pruning, path: Path) -> None:
        self.pruning, self.path = pruning, path
        self.rows: list[list[str]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        digest = hashlib.sha256()
        for name, mask in sorted(self.pruning.masks.items()):
            digest.update(name.encode())
            digest.update(mask.cpu().numpy().tobytes())
        gathered: list[str] = [""] * trainer.world_size
        dist.all_gather_object(gathered, digest.hexdigest())
        self.rows.append(gathered)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path.write_text(json.dumps({"rows": self.rows, "sparsity": self.pruning.sparsity()}))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning leaves the gloo group to the interpreter's exit, where its threads are sometimes torn down
        # while still joinable ("terminate called without an active exception", SIGABRT in about one spawned
        # run in five here, after training is over). Closing it in step on both ranks avoids that race.
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def fit(out: Path, strategy: str, pattern: str, criterion: str) -> tuple[float, Pruning]:
    """Train 8 steps on two processes; returns the target sparsity and the callback."""
    module = make_module("mlp", "adamw")
    target = 0.5 if ":" in pattern else 0.7
    chosen = InputNorms() if criterion == "input_norms" else criterion  # a state summed across ranks
    cb = Pruning(target, pattern, chosen, schedule=Iterative(start_step=0, end_step=6, frequency=2))
    trainer = pl.Trainer(
        max_steps=8,
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        callbacks=[cb, MaskHashes(cb, out / "hashes.json")],
        logger=CSVLogger(out, name="csv", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    torch.manual_seed(0)
    trainer.fit(module, make_loader(module))
    return target, cb


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--pattern", default="4x1")
    parser.add_argument("--criterion", default="snip_momentum")
    args = parser.parse_args()
    fit(args.out, args.strategy, args.pattern, args.criterion)
