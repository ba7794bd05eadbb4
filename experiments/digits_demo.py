"""Demo: a small CNN on scikit-learn's bundled digits, dense and pruned to 90% with the same budget.

Run with `make demo` (or `python experiments/digits_demo.py --help`). Nothing is downloaded: the 1,797 8x8
digits ship inside scikit-learn. Prints dense and pruned test accuracy and the per-layer sparsity table.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_prune import Pruning, format_report
from lightning_prune.schedules import Iterative


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Stratified 80/20 split of the digits, pixels scaled to [0, 1], shaped [N, 1, 8, 8]."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(range(len(y)), test_size=0.2, stratify=y, random_state=seed)
    train = TensorDataset(x[train_idx], y[train_idx])
    test = TensorDataset(x[test_idx], y[test_idx])
    g = torch.Generator().manual_seed(seed)
    return DataLoader(train, batch_size=batch_size, shuffle=True, generator=g), DataLoader(test, batch_size=256)


class DigitsCNN(pl.LightningModule):
    """Three conv blocks with BatchNorm and a linear head; about 24k parameters."""

    def __init__(self, lr: float = 3e-3, max_steps: int = 1000) -> None:
        super().__init__()
        self.save_hyperparameters()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(1, 16), block(16, 32), nn.MaxPool2d(2), block(32, 64))
        self.head = nn.Linear(64, 10)
        self.accuracy = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.accuracy.update(self(x), y)
        self.log("test/acc", self.accuracy)

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr, total_steps=self.hparams.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def train(
    epochs: int, pruning: Pruning | None, seed: int, extra_callbacks: list[pl.Callback] | None = None
) -> tuple[DigitsCNN, float, float]:
    """Train and test one model; returns it, test accuracy and seconds."""
    pl.seed_everything(seed, verbose=False)
    train_loader, test_loader = digits_loaders(seed=seed)
    steps = epochs * len(train_loader)
    model = DigitsCNN(max_steps=steps)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=([pruning] if pruning else []) + (extra_callbacks or []),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    trainer.fit(model, train_loader)
    seconds = time.perf_counter() - start
    accuracy = trainer.test(model, test_loader, verbose=False)[0]["test/acc"]
    return model, accuracy, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--criterion", default="snip_momentum")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    steps = args.epochs * len(digits_loaders()[0])
    # Prune during the first 60% of training, then fine-tune the sparse model for the rest.
    schedule = Iterative(start_step=0, end_step=int(0.6 * steps), frequency=max(1, steps // 50), decay="exp")
    pruning = Pruning(args.sparsity, pattern=args.pattern, criterion=args.criterion, schedule=schedule)

    _, dense_acc, dense_s = train(args.epochs, None, args.seed)
    model, pruned_acc, pruned_s = train(args.epochs, pruning, args.seed)

    print(f"\nscikit-learn digits, {args.epochs} epochs ({steps} steps), seed {args.seed}")
    print(f"pattern {args.pattern}, criterion {args.criterion}, target sparsity {args.sparsity}")
    print(f"  dense  accuracy {dense_acc:.4f}  ({dense_s:.1f} s)")
    print(f"  pruned accuracy {pruned_acc:.4f}  ({pruned_s:.1f} s)  delta {100 * (pruned_acc - dense_acc):+.2f} points")
    print("\nper-layer sparsity of the pruned model:")
    print(format_report(pruning.report(model)))


if __name__ == "__main__":
    main()
