"""What every step-overhead runner shares, with nothing but torch: models, inputs, the alternating timer.

This module must import in Intel Neural Compressor's own virtual environment, which has torch (and
transformers) but neither Lightning nor lightning_prune, so that INC is measured on exactly the same
models, inputs, optimizer and schedule as the tools measured in the main environment.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

TARGET = 0.8  # final sparsity of every tool in every step-overhead row


@dataclass(frozen=True)
class Window:
    """Steps run, and the pruning window: events every `frequency` steps from `start` to `end`."""

    steps: int
    start: int
    end: int
    frequency: int

    def events(self) -> list[int]:
        """The event steps, `end` included."""
        return [*range(self.start, self.end, self.frequency), self.end]


def mlp() -> nn.Module:
    """Four Linear(1024, 1024) + ReLU and a 10-way classifier."""
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(1024, 10))


def cnn() -> nn.Module:
    """Four conv-BN-ReLU stages (32, 64, 128, 128 channels) on 28x28 single-channel images."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 128), nn.MaxPool2d(2), *block(128, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )  # fmt: skip


class MiniLMClassifier(nn.Module):
    """MiniLM-L6 with a 5-way head on the first token; input ids only (attention over every token)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        from transformers import AutoModel

        self.bert = AutoModel.from_pretrained(path)
        self.head = nn.Linear(self.bert.config.hidden_size, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bert(input_ids=ids).last_hidden_state[:, 0])


@dataclass(frozen=True)
class Bench:
    """One benchmark model: how to build it, its input, the modules every tool prunes, and its window."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    targets: Callable[[nn.Module], list[str]]
    window: Window
    repeats: int | None = None  # at most this many fresh runs (the compute-bound rows vary little between runs)


def _weight_layers(model: nn.Module, prefix: str = "") -> list[str]:
    """Names of the Linear and Conv2d modules under `prefix`, in order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d) and n.startswith(prefix)]


def benches(minilm_path: str | None, quick: bool = False) -> dict[str, Bench]:
    """The step-overhead models by row name; MiniLM only when its weights' folder is given.

    Every tool prunes the same modules: the hidden Linears of the MLP (not its classifier), every conv of
    the CNN, the 36 encoder Linears of MiniLM (not the embeddings, the pooler or the head).
    """
    w = Window(12, 2, 6, 2) if quick else Window(130, 20, 80, 10)
    rows = {
        "mlp 4x1024, batch 256": Bench(
            mlp,
            lambda: (torch.randn(8 if quick else 256, 1024), torch.randint(0, 10, (8 if quick else 256,))),
            lambda m: _weight_layers(m)[:-1],  # all but the classifier
            w,
        ),
        "cnn 28x28, batch 64": Bench(
            cnn,
            lambda: (torch.randn(8 if quick else 64, 1, 28, 28), torch.randint(0, 10, (8 if quick else 64,))),
            lambda m: _weight_layers(m)[:-1],  # every conv, not the classifier
            w,
            repeats=1,
        ),
    }
    if minilm_path is not None:
        batch, length = (2, 16) if quick else (8, 64)
        rows[f"MiniLM-L6, batch {batch} x {length} tokens"] = Bench(
            lambda: MiniLMClassifier(minilm_path),
            lambda: (torch.randint(1000, 20000, (batch, length)), torch.randint(0, 5, (batch,))),
            lambda m: _weight_layers(m, "bert.encoder."),
            Window(8, 1, 5, 2) if quick else Window(70, 10, 40, 5),
            repeats=1,
        )
    return rows


class Stepper(Protocol):
    """One model copy with its optimizer and, for a pruned copy, a pruning tool's hooks."""

    model: nn.Module

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One training step (forward, backward, optimizer step, the tool's hooks); its seconds."""
        ...

    def roots(self) -> tuple[Any, ...]:
        """What holds this copy's state: model, optimizer and the tool's own objects."""
        ...


class Dense:
    """The dense reference: AdamW, no pruning. Pruned copies subclass it and fill in the two hook points."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.opt = make_optimizer(model)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(self.model(x), y).backward()
        self.before_optimizer_step()
        self.opt.step()
        self.after_optimizer_step()
        return time.perf_counter() - start

    def before_optimizer_step(self) -> None:
        """Between backward and the optimizer step: nothing for dense."""

    def after_optimizer_step(self) -> None:
        """After the optimizer step: nothing for dense."""

    def roots(self) -> tuple[Any, ...]:
        return (self.model, self.opt)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of every copy of every row."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)


def alternate(
    dense: Stepper,
    pruned: Stepper,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    probe: Callable[[int], None] | None = None,
) -> list[tuple[float, float]]:
    """(dense, pruned) seconds of each step, the two copies stepped alternately, who goes first alternating.

    `probe(i)`, if given, is called after step i, outside the timed region.
    """
    for _ in range(3):  # warm-up; only the dense copy, the pruned one must not step outside its schedule
        dense.step(x, y)
    times = []
    for i in range(steps):
        if i % 2:
            td, tp = dense.step(x, y), pruned.step(x, y)
        else:
            tp, td = pruned.step(x, y), dense.step(x, y)
        times.append((td, tp))
        if probe is not None:
            probe(i)
    return times


def mid_window(window: Window) -> int:
    """A step inside the window, after its middle event: where a tool holds its scores and masks."""
    return window.events()[len(window.events()) // 2] + 1


def measure(bench: Bench, pruned: Callable[[nn.Module], Stepper], repeats: int) -> dict[str, Any]:
    """Phase ratios (medians over `repeats` fresh runs) and the extra bytes the pruned copy holds.

    Extra bytes: what the pruned copy's roots hold beyond the dense copy's, inside the window (after its
    middle event) and after it, as a multiple of the pruned weights' own bytes.
    """
    runs: list[dict[str, float]] = []
    held: dict[str, float] = {}
    mid = mid_window(bench.window)
    for _ in range(min(repeats, bench.repeats or repeats)):
        torch.manual_seed(0)
        base = bench.build()
        x, y = bench.inputs()
        ref, tool = Dense(copy.deepcopy(base)), pruned(copy.deepcopy(base))
        unit = sum(w.numel() * w.element_size() for w in target_weights(base, bench))

        def probe(i: int, ref: Stepper = ref, tool: Stepper = tool, unit: int = unit) -> None:
            if i in (mid, bench.window.steps - 1):
                held["held in window" if i == mid else "held after"] = (
                    held_bytes(*tool.roots()) - held_bytes(*ref.roots())
                ) / unit

        runs.append(phase_ratios(alternate(ref, tool, x, y, bench.window.steps, probe), bench.window))
    weights = target_weights(tool.model, bench)
    return {
        **{k: statistics.median(r[k] for r in runs) for k in PHASES},
        "window mean, runs": sorted(r["window mean"] for r in runs),
        **held,
        "sparsity": sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights),
    }


PHASES = ("before", "window non-event", "event", "window mean", "after")


def phase_ratios(times: Sequence[tuple[float, float]], window: Window) -> dict[str, float]:
    """Median pruned/dense ratio per phase; "window mean" is total pruned over total dense time in the window."""
    events = set(window.events())
    inside = range(window.start, window.end + 1)

    def median(indices: Sequence[int]) -> float:
        return statistics.median(times[i][1] / times[i][0] for i in indices) if indices else float("nan")

    return {
        "before": median(range(window.start)),
        "window non-event": median([i for i in inside if i not in events]),
        "event": median([i for i in inside if i in events]),
        "window mean": sum(times[i][1] for i in inside) / sum(times[i][0] for i in inside),
        "after": median(range(window.end + 1, len(times))),
    }


def target_weights(model: nn.Module, bench: Bench) -> list[torch.Tensor]:
    """The weights every tool prunes in this row (for ModelPruning, its recomputed masked `weight`)."""
    modules = dict(model.named_modules())
    return [modules[name].weight for name in bench.targets(model)]


_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType, types.FrameType)


def held_bytes(*roots: Any) -> int:
    """Bytes of the distinct tensor storages reachable from `roots` (parameters' gradients included).

    Walks Python references (not into classes, modules or functions, whose globals reach everything), so it
    sees whatever a tool keeps: masks, scores, reparametrised weights, optimizer state. A DTensor counts its
    local shard: the bytes this process holds.
    """
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _OPAQUE):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            local = getattr(obj, "_local_tensor", None)  # a DTensor: its shard on this rank holds the bytes
            if isinstance(local, torch.Tensor):
                stack.append(local)
                if obj.grad is not None:
                    stack.append(obj.grad)
                continue
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            if obj.grad is not None:
                stack.append(obj.grad)
            continue
        stack.extend(gc.get_referents(obj))
    return sum(storages.values())
