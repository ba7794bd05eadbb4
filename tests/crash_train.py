"""Training job for the crash-and-resume test: run it, kill it with SIGKILL mid-window, resume it.

Usage: python tests/crash_train.py OUT_DIR [--kill-at STEP] [--resume [CKPT]] [--target 0.7]

Checkpoints (``ModelCheckpoint``, every 8 optimizer steps, which is one epoch here, plus ``last.ckpt``) go to
``OUT_DIR/ckpt``; at the end the masks and weights go to ``OUT_DIR/final.pt``. ``--kill-at`` sends SIGKILL to
the process itself right after that optimizer step, as a crash would: nothing gets the chance to clean up.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_loader, make_module

from lightning_prune import Pruning
from lightning_prune.schedules import Iterative


class Crash(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--resume", nargs="?", const="last", default=None, help="checkpoint path, or 'last'")
    parser.add_argument("--target", type=float, default=0.7)
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    module = make_module("cnn", optimizer="adamw")
    loader = make_loader(module, n=64, batch_size=8)  # 8 steps per epoch, in a fixed order
    pruning = Pruning(args.target, "4x1", "snip_momentum", schedule=Iterative(start_step=4, end_step=28, frequency=4))
    callbacks: list[pl.Callback] = [
        pruning,
        ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=8, save_top_k=-1, save_last=True),
    ]
    if args.kill_at is not None:
        callbacks.append(Crash(args.kill_at))
    trainer = pl.Trainer(
        max_steps=40,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=callbacks,
    )
    trainer.fit(module, loader, ckpt_path=args.resume)
    torch.save(
        {"masks": dict(pruning.masks), "weights": module.state_dict(), "step": trainer.global_step},
        args.out / "final.pt",
    )


if __name__ == "__main__":
    main()
