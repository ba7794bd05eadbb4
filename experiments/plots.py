"""Pictures of a run (sparsity against step, per-layer sparsity, one layer's mask) and of a sweep (Pareto)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from lightning_prune.patterns import as_matrix


def sparsity_vs_step(trace: Sequence[dict[str, float]], path: Path, title: str) -> None:
    """Scheduled target and achieved sparsity after every step."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in trace]
    ax.step(steps, [r["target"] for r in trace], where="post", label="scheduled target", color="0.6", lw=2)
    ax.plot(steps, [r["achieved"] for r in trace], label="achieved", color="C0", lw=1.2)
    ax.set(xlabel="optimizer step", ylabel="sparsity", ylim=(-0.02, 1.0), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def layer_sparsity(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """One horizontal bar per layer."""
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.28 * len(rows)))
    names = [r["name"] for r in rows]
    ax.barh(range(len(rows)), [r["sparsity"] for r in rows], color="C1")
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="sparsity", title=title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mask_picture(
    name: str, mask: torch.Tensor, path: Path, pattern: str, max_size: tuple[int, int] = (64, 192)
) -> None:
    """The top-left corner of one layer's mask in its [out, kernel·in] matrix view: dark = pruned."""
    m = as_matrix(mask.cpu()).float()[: max_size[0], : max_size[1]]
    fig, ax = plt.subplots(figsize=(min(9, 1 + m.shape[1] / 20), min(4, 1 + m.shape[0] / 20)))
    ax.imshow(m.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    ax.set(
        title=f"{name} ({pattern}), kept = white; first {m.shape[0]}x{m.shape[1]}",
        xlabel="input (kernel position x input channel, channel innermost)",
        ylabel="output",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pareto(series: dict[str, list[tuple[float, float]]], dense: float | None, path: Path, title: str) -> None:
    """Accuracy against sparsity, one series per label, each series' points joined in sparsity order."""
    fig, ax = plt.subplots(figsize=(6, 4))
    markers, styles = "osD^vP*X", ["-", "--", ":", "-."]
    for i, (label, points) in enumerate(sorted(series.items())):
        points = sorted(points)
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker=markers[i % len(markers)],
            ls=styles[i % len(styles)],
            markersize=8 - (i % 4),  # series that coincide stay visible
            color=f"C{i % 10}",
            label=label,
        )
    if dense is not None:
        ax.axhline(dense, color="0.4", ls="--", lw=1, label="dense")
    ax.set(xlabel="sparsity reached", ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
