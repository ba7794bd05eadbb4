"""Training-step overhead of pruning, as median ratios to a dense copy stepped alternately in one process.

The callback's own hooks are driven by a hand-written loop (the same calls, in the same order, that
Lightning's automatic optimization makes), so a dense and a pruned copy of one model can alternate step by
step and share the machine's drift. Lightning's ModelPruning (global l1_unstructured, 0.8) runs in the same
harness: it is applied at the same event steps through its own `apply_pruning`, and its steady-state cost is
the reparametrisation it adds to every forward pass.

Phases: before the window, non-event steps inside it, event steps, the window mean (mean pruned time over
mean dense time across the window) and after `end_step`.

Usage: python benchmarks/step_overhead.py [--steps 130] [--quick] [--only 'mlp 4x1024, batch 256 lightning_prune:4x1']
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from lightning_prune import Pruning
from lightning_prune.schedules import Iterative


@dataclass
class StubTrainer:
    """The attributes of `Trainer` that the callbacks read."""

    global_step: int = 0
    precision: str = "32-true"
    estimated_stepping_batches: int = 0
    is_global_zero: bool = True
    loggers: list[Any] = field(default_factory=list)


def mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(1024, 10))


def cnn() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 128), nn.MaxPool2d(2), *block(128, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )  # fmt: skip


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp 4x1024, batch 256": (mlp, (256, 1024)),
    "cnn 28x28, batch 256": (cnn, (256, 1, 28, 28)),
}


class Runner:
    """One model copy, its optimizer and an optional pruning method, stepped one optimizer step at a time."""

    def __init__(self, model: nn.Module, method: str, schedule: Iterative, target: float) -> None:
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)
        self.trainer = StubTrainer()
        self.method = method
        self.schedule = schedule
        self.target = target
        self.cb: Pruning | None = None
        self.mp: ModelPruning | None = None
        if method.startswith("lightning_prune"):
            _, pattern, criterion = method.split(":")
            self.cb = Pruning(target, pattern=pattern, criterion=criterion, schedule=schedule, scope="global")
            self.cb.setup(self.trainer, model, "fit")  # type: ignore[arg-type]
            self.cb.on_train_start(self.trainer, model)  # type: ignore[arg-type]
        elif method == "ModelPruning":
            self.mp = ModelPruning("l1_unstructured", amount=target, use_global_unstructured=True, verbose=0)
            self.mp.setup(self.trainer, model, "fit")  # type: ignore[arg-type]
            self.reached = 0.0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        if self.cb is not None:
            self.cb.on_before_optimizer_step(self.trainer, self.model, self.opt)  # type: ignore[arg-type]
        if self.mp is not None and self.trainer.global_step in self.schedule.event_steps():
            # ModelPruning's amount applies to what is still unpruned: convert the cumulative schedule
            event = self.schedule.last_event_at(self.trainer.global_step)
            new = self.schedule.sparsity(event, self.target)
            self.mp.apply_pruning((new - self.reached) / (1.0 - self.reached))
            self.reached = new
        self.opt.step()
        if self.cb is not None:
            self.cb.on_train_batch_end(self.trainer, self.model, None, None, 0)  # type: ignore[arg-type]
        self.trainer.global_step += 1
        return time.perf_counter() - start


def measure(name: str, method: str, steps: int, start: int, end: int, frequency: int) -> dict[str, float]:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    base = factory()
    schedule = Iterative(start_step=start, end_step=end, frequency=frequency, decay="exp")
    dense = Runner(copy.deepcopy(base), "dense", schedule, 0.8)
    pruned = Runner(copy.deepcopy(base), method, schedule, 0.8)
    x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
    for _ in range(3):  # warm-up of the allocator and kernels, outside the schedule's steps
        dense.step(x, y)
    dense.trainer.global_step = 0
    times: list[tuple[float, float]] = []
    for i in range(steps):
        # alternate who goes first so that neither copy always follows the other's cache state
        if i % 2:
            td, tp = dense.step(x, y), pruned.step(x, y)
        else:
            tp, td = pruned.step(x, y), dense.step(x, y)
        times.append((td, tp))
    events = set(schedule.event_steps())

    def median_ratio(indices: list[int]) -> float:
        return statistics.median(times[i][1] / times[i][0] for i in indices) if indices else float("nan")

    window = list(range(start, end + 1))
    return {
        "before": median_ratio(list(range(start))),
        "window non-event": median_ratio([i for i in window if i not in events]),
        "event": median_ratio([i for i in window if i in events]),
        "window mean": sum(times[i][1] for i in window) / sum(times[i][0] for i in window),
        "after": median_ratio(list(range(end + 1, steps))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=130)
    parser.add_argument("--quick", action="store_true", help="a few steps, to check that it runs")
    parser.add_argument("--repeats", type=int, default=3, help="fresh runs per row; each figure is their median")
    parser.add_argument("--only", default="", help="run only the rows whose 'model method' contains this text")
    args = parser.parse_args()
    steps, start, end, frequency = (args.steps, 20, 80, 10) if not args.quick else (12, 2, 6, 2)
    methods = [
        "lightning_prune:4x1:snip_momentum",
        "lightning_prune:unstructured:magnitude",
        "ModelPruning",
    ]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {steps} steps, window {start}..{end}, "
        f"events every {frequency}; target 0.8; median ratio of step time to a dense copy stepped alternately; "
        f"each figure the median of {args.repeats} fresh runs\n"
    )
    header = ["model", "method", "before", "window non-event", "event", "window mean", "after"]
    print("| " + " | ".join([*header, "window mean, each run"]) + " |")
    print("|" + "---|" * (len(header) + 1))
    for name in MODELS:
        for method in methods:
            if args.only not in f"{name} {method}":
                continue
            runs = [measure(name, method, steps, start, end, frequency) for _ in range(args.repeats)]
            r = {k: statistics.median(run[k] for run in runs) for k in header[2:]}
            spread = sorted(run["window mean"] for run in runs)
            cells = [name, method.replace("lightning_prune:", "ours "), *(f"{r[k]:.3f}x" for k in header[2:])]
            cells.append(f"{spread[0]:.3f}-{spread[-1]:.3f}x")
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
