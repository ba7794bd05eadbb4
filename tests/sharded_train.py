"""Sharded training job for the tests: a model that shards itself in ``configure_model``, pruned while it trains.

Usage: python tests/sharded_train.py OUT_DIR --mode fsdp|tp|fsdp_tp|ddp|single [--devices 2] [--pattern 4x1]
       [--criterion snip_momentum] [--scope global] [--steps 12] [--every K] [--resume CKPT] [--callback pruning]

Lightning re-launches this script for every rank but the first, so it runs as a script, not inside pytest.
Rank zero writes ``OUT_DIR/result.pt``: the whole masks and weights (gathered from the shards), the sparsity
each rank computed, and the masks' placements. ``--every K`` saves a checkpoint every K steps under
``OUT_DIR/ckpt``; ``--resume`` continues from one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))

from lightning_prune import GroupLasso, PatternLock, ProgressivePruning, Pruning
from lightning_prune.patterns import FFN
from lightning_prune.schedules import Iterative
from lightning_prune.sharding import is_dtensor

IN, HIDDEN, MID, CLASSES = 12, 32, 24, 8
OPTIMIZER = os.environ.get("SHARDED_OPTIMIZER", "adamw")


class Net(pl.LightningModule):
    """Three Linears and a BatchNorm; shards itself as ``mode`` says once the device mesh exists."""

    def __init__(self, mode: str, norm: bool = True, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.lr = 0.01  # AdamW learning rate (--lr)
        torch.manual_seed(0)
        self.mode = mode
        self.net = nn.Sequential(
            nn.Linear(IN, hidden),
            nn.ReLU(),
            nn.Linear(hidden, MID),
            nn.BatchNorm1d(MID) if norm else nn.Identity(),  # per-rank batch statistics: off across world sizes
            nn.ReLU(),
            nn.Linear(MID, CLASSES),
        )

    def configure_model(self) -> None:
        if self.mode in ("ddp", "single"):
            return
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = self.device_mesh
        if self.mode in ("tp", "fsdp_tp"):
            parallelize_module(self.net, mesh["tensor_parallel"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        if self.mode in ("fsdp", "fsdp_tp"):
            for layer in (self.net[0], self.net[2], self.net[5]):
                fully_shard(layer, mesh=mesh["data_parallel"])
            fully_shard(self.net, mesh=mesh["data_parallel"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if OPTIMIZER == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        # torch's foreach Adam cannot mix plain tensors (the layers tensor parallelism leaves out) with DTensors
        foreach = OPTIMIZER != "adamw-loop" and self.mode != "tp"
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1, foreach=foreach)


def loader(data_parallel: int) -> DataLoader:
    """64 samples, 16 per step over all ranks: 4 steps per epoch (checkpoints every 4 steps end an epoch)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, IN, generator=g)
    y = torch.randint(0, CLASSES, (64,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16 // data_parallel)


def whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if is_dtensor(t) else t).detach().cpu().clone()


class Record(pl.Callback):
    """At the end, gathers whole masks and weights (every rank takes part) and rank zero saves them."""

    def __init__(self, pruning: Any, path: Path) -> None:
        self.pruning, self.path = pruning, path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        masks = {fqn: whole(m) for fqn, m in self.pruning.masks.items()}
        placements = {fqn: str(getattr(m, "placements", "plain")) for fqn, m in self.pruning.masks.items()}
        local_bytes = sum((m.to_local() if is_dtensor(m) else m).numel() for m in self.pruning.engine._masks.values())
        weights = {name: whole(p) for name, p in pl_module.named_parameters()}
        sparsity = [0.0] * trainer.world_size
        if dist.is_initialized():
            dist.all_gather_object(sparsity, self.pruning.sparsity())
        else:
            sparsity = [self.pruning.sparsity()]
        if trainer.is_global_zero:
            torch.save(
                {
                    "masks": masks,
                    "weights": weights,
                    "sparsity": sparsity,
                    "placements": placements,
                    "mask_elements_rank0": local_bytes,
                    "layer_sparsity": self.pruning.layer_sparsity(),
                    "step": trainer.global_step,
                },
                self.path,
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if dist.is_initialized():  # close the gloo group in step on every rank (see ddp_train.py)
            dist.barrier()
            dist.destroy_process_group()


def make_callback(kind: str, pattern: Any, criterion: str, scope: str) -> Any:
    target = 0.5 if ":" in pattern else 0.7
    if pattern == "ffn":  # the first two Linears as one FFN: a neuron is a row of net.0 and a column of net.2
        pattern = FFN(layers={"net": {"inputs": ["net.0"], "output": "net.2"}})
    schedule = Iterative(start_step=0, end_step=8, frequency=2)
    if kind == "pruning":
        return Pruning(target, pattern, criterion, schedule=schedule, scope=scope, verbose=False)
    if kind == "feedback":  # dynamic pruning with feedback: masks chosen afresh from dense weights at each event
        return Pruning(target, pattern, criterion, schedule=schedule, scope=scope, verbose=False, feedback=True)
    if kind == "progressive":
        return ProgressivePruning(
            target, pattern, criterion, schedule=schedule, scope=scope, verbose=False, progressive_steps=2
        )
    if kind == "group_lasso":
        return Pruning(
            target,
            pattern,
            criterion,
            schedule=schedule,
            scope=scope,
            verbose=False,
            regularization=GroupLasso(1e-3, pattern),
        )
    if kind == "lock":  # the model starts with zeros to lock (see main)
        return PatternLock(pattern=pattern, verbose=False)
    raise ValueError(kind)


def main() -> None:
    # Lightning's launchers leave ranks with different thread counts here (1 or 2), and a matmul's float sums
    # depend on them: one thread everywhere, so that runs under different strategies can be compared bit for bit.
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--mode", default="fsdp")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--pattern", default="4x1")
    parser.add_argument("--criterion", default="snip_momentum")
    parser.add_argument("--scope", default="global")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--callback", default="pruning")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--no-norm", action="store_true")
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    module = Net(args.mode, norm=not args.no_norm, hidden=args.hidden)
    module.lr = args.lr
    if args.callback == "lock":  # zeros in whole 4x1 blocks, for PatternLock to keep
        with torch.no_grad():
            for layer in (module.net[0], module.net[2]):
                layer.weight.view(-1, 4, layer.weight.shape[1])[::2] = 0.0
    tp = args.devices if args.mode == "tp" else (2 if args.mode == "fsdp_tp" else 1)
    if args.mode in ("ddp", "single"):
        strategy: Any = "ddp" if args.mode == "ddp" else "auto"
    else:
        strategy = ModelParallelStrategy(
            data_parallel_size=args.devices // tp, tensor_parallel_size=tp, process_group_backend="gloo"
        )
    cb = make_callback(args.callback, args.pattern, args.criterion, args.scope)
    callbacks: list[pl.Callback] = [cb, Record(cb, args.out / "result.pt")]
    if args.every:
        callbacks.append(
            ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=args.every, save_top_k=-1, save_last=False)
        )
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=bool(args.every),
        enable_progress_bar=False,
        enable_model_summary=False,
        precision=args.precision,
        accumulate_grad_batches=args.accumulate,
    )
    trainer.fit(module, loader(args.devices // tp), ckpt_path=args.resume)


if __name__ == "__main__":
    main()
