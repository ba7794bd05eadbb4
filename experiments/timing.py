"""Latency of models against each other: median ratios, the models run alternately (the machine's drift shared)."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.no_grad()
def latency(models: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median ratio of each model's latency to the first one's, run alternately."""
    for m in models.values():
        m.eval()
        m(x)
    ratios: dict[str, list[float]] = {name: [] for name in models}
    for i in range(rounds):
        order = list(models.items()) if i % 2 == 0 else list(models.items())[::-1]
        times = {}
        for name, m in order:
            start = time.perf_counter()
            m(x)
            times[name] = time.perf_counter() - start
        base = times[next(iter(models))]
        for name in models:
            ratios[name].append(times[name] / base)
    return {name: statistics.median(r) for name, r in ratios.items()}
