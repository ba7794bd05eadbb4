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

from benchmarks.harness import PHASES, TARGET, Dense, Window, alternate, held_bytes, mid_window, mlp, phase_ratios
from lightning_prune import Pruner
from lightning_prune.schedules import Iterative

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


class ShardedOurs(Dense):
    """The pruned copy: lightning_prune's engine on a sharded model, collectives at events counted."""

    def __init__(self, model: nn.Module, window: Window, targets: list[str]) -> None:
        super().__init__(model)
        self.global_step = 0
        self.events = set(window.events())
        self.sent: dict[int, int] = {}
        schedule = Iterative(start_step=window.start, end_step=window.end, frequency=window.frequency, decay="exp")
        self.pruner = Pruner(model, TARGET, "4x1", "snip_momentum", schedule=schedule, include=targets)

    def before_optimizer_step(self) -> None:
        if self.global_step in self.events:
            sent = [0]
            with counting(sent):
                self.pruner.before_optimizer_step(self.global_step, self.opt)
            self.sent[self.global_step] = sent[0]
        else:
            self.pruner.before_optimizer_step(self.global_step, self.opt)

    def after_optimizer_step(self) -> None:
        self.pruner.after_optimizer_step()
        self.global_step += 1

    def roots(self) -> tuple[Any, ...]:
        return (self.model, self.opt, self.pruner)


def _run(rank: int, init: str, window: Window, batch: int, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        runs, held, sent = [], {}, {}
        mid = mid_window(window)
        for _ in range(repeats):
            torch.manual_seed(0)
            base = mlp()
            targets = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)][:-1]
            unit = sum(base.get_submodule(n).weight.numel() * 4 for n in targets)  # whole pruned weights' bytes
            ref = Dense(shard(copy.deepcopy(base)))
            tool = ShardedOurs(shard(copy.deepcopy(base)), window, targets)
            g = torch.Generator().manual_seed(rank)
            x, y = torch.randn(batch // WORLD, 1024, generator=g), torch.randint(0, 10, (batch // WORLD,), generator=g)

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
    window = Window(12, 2, 6, 2) if quick else Window(130, 20, 80, 10)
    batch = 16 if quick else 256
    with tempfile.TemporaryDirectory() as scratch:
        out = str(Path(scratch) / "result.json")
        init = f"file://{Path(scratch) / 'rendezvous'}"
        torch.multiprocessing.spawn(_run, args=(init, window, batch, repeats, out), nprocs=WORLD)
        result = json.loads(Path(out).read_text())
    return {"model": f"mlp 4x1024, batch {batch}, FSDP2 over {WORLD} ranks", "window": vars(window), **result}


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
