"""Intel Neural Compressor 3.7.1's pruner in the step-overhead harness; runs in INC's own virtual environment.

INC 3.7.1 needs numpy<2, `setuptools<81` and `six`, so it cannot share the main environment. `make bench`
builds `.venv-inc` and runs this module there through a subprocess (`benchmarks/run_all.py`); it prints one
JSON object per line: the phase ratios of each run and the bytes INC holds for its pruning state.

INC is driven through its own automation API (`prepare_pruning` hooks the model's forward and the
optimizer's `step`), with the same models, inputs, AdamW settings, target layers and window as every other
tool: exp decay, global scope, target 0.8.

Usage (in .venv-inc, from the repository root):
    python -m benchmarks.inc_worker --method 4x1:snip_momentum [--minilm PATH] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from typing import Any

from torch import nn

from benchmarks.harness import TARGET, Bench, Dense, benches, measure


class IncRunner(Dense):
    """A model copy pruned by INC: its hooks fire inside `model(x)` and `opt.step()`, so a step is dense's."""

    def __init__(self, model: nn.Module, bench: Bench, pattern: str, criterion: str) -> None:
        from neural_compressor.compression.pruner import prepare_pruning
        from neural_compressor.config import WeightPruningConfig

        super().__init__(model)
        w = bench.window
        # fresh lists: INC's defaults are shared mutable lists that its config processing appends to, so a
        # second config in one process inherits the first one's layers
        config = WeightPruningConfig(
            pruning_configs=[{}],
            excluded_op_names=[],
            target_sparsity=TARGET,
            pruning_type=criterion,
            pattern="1x1" if pattern == "unstructured" else pattern,
            op_names=[f"^{name}$" for name in bench.targets(model)],
            start_step=w.start,
            end_step=w.end,
            pruning_frequency=w.frequency,
            pruning_scope="global",
            sparsity_decay_type="exp",
        )
        self.pruning = prepare_pruning(model, config, optimizer=self.opt)
        self.pruning.on_train_begin()

    def roots(self) -> tuple[Any, ...]:
        return (self.model, self.opt, self.pruning)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, help="pattern:criterion, e.g. 4x1:snip_momentum")
    parser.add_argument("--minilm", default=None, help="folder of MiniLM-L6's weights")
    parser.add_argument("--only", default="", help="run only the models whose name contains this text")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    pattern, criterion = args.method.split(":")
    for name, bench in benches(args.minilm, args.quick).items():
        if args.only not in name:
            continue

        def pruned(model: nn.Module, bench: Bench = bench) -> IncRunner:
            return IncRunner(model, bench, pattern, criterion)

        row = {"model": name, "tool": "INC 3.7.1", "method": args.method, **measure(bench, pruned, args.repeats)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
