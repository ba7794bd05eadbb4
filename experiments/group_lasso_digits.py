"""Group lasso on the digits demo: block norms, exactly-zero blocks and accuracy, with and without it.

Every run prunes the demo CNN to the same sparsity with the same pattern, criterion and schedule; only the
group-lasso coefficient differs (0 = off). Reported per coefficient, as the mean over seeds:

- block-norm sum: sum over all groups of the pattern (all targets) of ||W_b||_2, at the end of the pruning
  window (where the proximal step stops) and at the end of training;
- zero blocks: share of groups that are exactly zero, all of them and among the groups the masks keep;
- test accuracy.

The model and data are the demo's (``make demo``): the ResNet-style CNN of ``experiments.models`` on the
digits of ``experiments.data``.

Usage: python experiments/group_lasso_digits.py [--coeffs 0 0.02 0.1] [--seeds 0 1] [--steps 920]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.data import DigitsData
from experiments.models import Classifier, ResNetSmall
from lightning_prune import Pruning
from lightning_prune.patterns import parse_pattern
from lightning_prune.regularization import GroupLasso, group_norms
from lightning_prune.schedules import Iterative


def block_stats(pruning: Pruning, module: torch.nn.Module) -> dict[str, float]:
    """Block-norm sum and shares of exactly-zero blocks, over all of the pruning callback's targets."""
    pattern = parse_pattern(str(pruning.pattern))
    norms, kept = [], []
    for name, mask in pruning.masks.items():
        norms.append(group_norms(module.get_parameter(name), pattern).flatten())
        kept.append(group_norms(mask.float(), pattern).flatten() > 0)
    norm, keep = torch.cat(norms), torch.cat(kept)
    return {
        "norm_sum": float(norm.sum()),
        "zero_share": float((norm == 0).float().mean()),
        "zero_share_kept": float((norm[keep] == 0).float().mean()),
    }


class SnapshotAtWindowEnd(pl.Callback):
    """Block statistics right after the last step of the pruning window."""

    def __init__(self, pruning: Pruning, end_step: int) -> None:
        self.pruning, self.end_step = pruning, end_step
        self.stats: dict[str, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step - 1 == self.end_step:
            self.stats = block_stats(self.pruning, pl_module)


def train(steps: int, pruning: Pruning, seed: int, snapshot: pl.Callback) -> tuple[torch.nn.Module, float]:
    """The demo's CNN trained for ``steps`` under ``pruning``; returns it and its test accuracy."""
    pl.seed_everything(seed, verbose=False)
    data = DigitsData(batch_size=64, seed=seed)
    model = Classifier(ResNetSmall(in_channels=1, num_classes=10), num_classes=10)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        callbacks=[pruning, snapshot],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, datamodule=data)
    return model, float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coeffs", type=float, nargs="+", default=[0.0, 0.02, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=920)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--pattern", default="4x1")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    steps = args.steps
    end = int(0.6 * steps)
    rows = []
    for coeff in args.coeffs:
        runs = []
        for seed in args.seeds:
            schedule = Iterative(start_step=0, end_step=end, frequency=max(1, steps // 50))
            lasso = GroupLasso(coeff)
            pruning = Pruning(args.sparsity, args.pattern, schedule=schedule, regularization=lasso, verbose=False)
            snapshot = SnapshotAtWindowEnd(pruning, end)
            model, accuracy = train(steps, pruning, seed, snapshot)
            final = block_stats(pruning, model)
            runs.append({"acc": accuracy, **{f"window_{k}": v for k, v in snapshot.stats.items()}, **final})
            print(f"coeff {coeff:g} seed {seed}: {runs[-1]}", flush=True)
        rows.append((coeff, {k: statistics.mean(r[k] for r in runs) for k in runs[0]}))

    print(
        f"\ndigits, the demo's ResNet-style CNN, {steps} steps, pruning window 0..{end}, {args.pattern} at "
        f"{args.sparsity}, snip_momentum; mean over seeds {args.seeds}\n"
    )
    print(
        "| coeff | block-norm sum, window end | zero blocks, window end (all / kept) | block-norm sum, end "
        "| zero blocks, end (all / kept) | test accuracy |"
    )
    print("|---|---|---|---|---|---|")
    for coeff, r in rows:
        print(
            f"| {coeff:g} | {r['window_norm_sum']:.2f} | {r['window_zero_share']:.3f} / "
            f"{r['window_zero_share_kept']:.3f} | {r['norm_sum']:.2f} | {r['zero_share']:.3f} / "
            f"{r['zero_share_kept']:.3f} | {r['acc']:.4f} |"
        )


if __name__ == "__main__":
    main()
