"""Pruning a sharded model: step overhead, bytes held per rank and bytes communicated per event, on 2 ranks.

The MLP row of `step_overhead.py` (4 x Linear(1024, 1024), the hidden Linears pruned to 0.8 with 4x1
snip_momentum, global scope, the same window) is sharded with FSDP2 `fully_shard` over 2 CPU processes (gloo,
one thread each, global batch 256). On every rank a dense sharded copy and a pruned sharded copy step
alternately, as in the one-process rows, so both share the machine's drift; the pruned copy's `Pruner` is
driven exactly as the `Pruning` callback drives it under Lightning's ModelParallelStrategy.

Reported (rank 0; the ranks step in lockstep): the phase ratios, what each rank holds beyond its dense copy
as a multiple of the pruned weights' whole bytes (the one-process figure is 1.00x inside the window and
0.50x after it; sharded over 2 ranks, each rank should hold half of that), and the bytes this rank sends in
the collectives of each event, next to the bytes its unit scores would take to gather.

Usage: python benchmarks/sharded.py [--repeats 3] [--quick] [--out benchmarks/sharded.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import pickle
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (
    PHASES,
    Bench,
    Dense,
    alternate,
    benches,
    held_bytes,
    mid_window,
    phase_ratios,
    target_weights,
)
from benchmarks.step_overhead import Ours

WORLD = 2


@contextmanager
def counting(sent: list[int]) -> Iterator[None]:
    """Add to ``sent[0]`` the bytes this rank contributes to every collective called inside the block."""
    originals: dict[str, Callable[..., Any]] = {}

    def wrap(name: str, size: Callable[..., int]) -> None:
        original = originals[name] = getattr(dist, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            sent[0] += size(*args)
            return original(*args, **kwargs)

        setattr(dist, name, counted)

    wrap("all_reduce", lambda t, *a: t.numel() * t.element_size())
    wrap("broadcast", lambda t, *a: t.numel() * t.element_size())
    wrap("all_gather_object", lambda out, obj, *a: len(pickle.dumps(obj)))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def shard(model: nn.Module) -> nn.Module:
    """FSDP2 over all ranks: every Linear, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class ShardedOurs(Ours):
    """The one-process rows' pruned copy (4x1 snip_momentum), on a sharded model; collectives at events counted."""

    def __init__(self, model: nn.Module, bench: Bench) -> None:
        super().__init__(model, bench, "4x1", "snip_momentum")
        self.events = set(bench.window.events())
        self.sent: dict[int, int] = {}

    def before_optimizer_step(self) -> None:
        if self.global_step not in self.events:
            super().before_optimizer_step()
            return
        sent = [0]
        with counting(sent):
            super().before_optimizer_step()
        self.sent[self.global_step] = sent[0]


def _bench(quick: bool) -> tuple[str, Bench]:
    """The MLP row of the one-process benchmark (spawned ranks rebuild it: its lambdas do not pickle)."""
    name = next(n for n in benches(None, quick) if n.startswith("mlp"))
    return name, benches(None, quick)[name]


def _run(rank: int, init: str, quick: bool, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        _, bench = _bench(quick)
        window = bench.window
        runs, held, sent = [], {}, {}
        mid = mid_window(window)
        for _ in range(repeats):
            torch.manual_seed(0)
            base = bench.build()
            unit = sum(w.numel() * w.element_size() for w in target_weights(base, bench))  # whole pruned weights
            ref = Dense(shard(copy.deepcopy(base)))
            tool = ShardedOurs(shard(copy.deepcopy(base)), bench)
            x, y = bench.inputs()  # the global batch; each rank steps its half
            x, y = x[rank::WORLD], y[rank::WORLD]

            def probe(i: int, ref: Dense = ref, tool: ShardedOurs = tool, unit: int = unit) -> None:
                if i in (mid, window.steps - 1):
                    extra = held_bytes(*tool.roots()) - held_bytes(*ref.roots())
                    held["held in window" if i == mid else "held after"] = extra / unit

            runs.append(phase_ratios(alternate(ref, tool, x, y, window.steps, probe), window))
            sent = tool.sent
            units = sum(
                tool.pruner.pattern.unit_scores(torch.empty(p.shape, device="meta")).numel()
                for p in tool.pruner.targets.values()
            )
            sparsity = tool.pruner.sparsity()
        result = {
            **{k: statistics.median(r[k] for r in runs) for k in PHASES},
            "window mean, runs": sorted(r["window mean"] for r in runs),
            **held,
            "sent per event (bytes)": statistics.median(sent.values()),
            "sent per event, max (bytes)": max(sent.values()),
            "unit scores (bytes)": units * 4,
            "sparsity": sparsity,
        }
        if rank == 0:
            Path(out).write_text(json.dumps(result, indent=1))
    finally:
        dist.destroy_process_group()


def measure(repeats: int, quick: bool) -> dict[str, Any]:
    """The sharded row: 2 processes spawned here; rank 0's figures."""
    name, bench = _bench(quick)
    with tempfile.TemporaryDirectory() as scratch:
        out = str(Path(scratch) / "result.json")
        init = f"file://{Path(scratch) / 'rendezvous'}"
        torch.multiprocessing.spawn(_run, args=(init, quick, repeats, out), nprocs=WORLD)
        result = json.loads(Path(out).read_text())
    return {"model": f"{name}, FSDP2 over {WORLD} ranks", "window": vars(bench.window), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = measure(1 if args.quick else args.repeats, args.quick)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
