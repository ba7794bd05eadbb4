"""Write docs/RESULTS.md and its plots from the ledgers of experiments/results_sweep.py.

Usage: python experiments/publish_results.py [--results outputs/results] [--docs docs]

Reads ``<results>/<suite>/rows.jsonl`` (cv, cvwide, cvlong, nlp, tweets) and merges them into
``<docs>/results/<suite>.jsonl`` (a run of a row and seed replaces the published one; rows not run again are
kept), so that the published numbers travel with the repository; draws the Pareto plots and the recovery
ablation into ``<docs>/images`` and prints the markdown tables (mean ± std over seeds where a row has
several) and the per-row commands for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.results_sweep import SUITES  # noqa: E402


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def merge(published: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The published records with each (row, seed) run again replaced by its newest run, new ones appended."""
    latest = {(r["name"], r["seed"]): r for r in new}
    out = [latest.pop((r["name"], r["seed"]), r) for r in published]
    return out + list(latest.values())


def by_row(records: list[dict[str, Any]], suite: str) -> dict[str, list[dict[str, Any]]]:
    """Runs grouped by row, in the sweep's row order."""
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        rows[r["name"]].append(r)
    order = [row["name"] for row in SUITES[suite][1]()]
    return {name: rows[name] for name in sorted(rows, key=lambda n: order.index(n) if n in order else len(order))}


def pm(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """Mean ± std in percent (std only with two or more values)."""
    mean = scale * statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    acc = [r["accuracy"] for r in runs]
    dense = [r["dense_accuracy"] for r in runs]
    delta = [a - d for a, d in zip(acc, dense)]
    return {
        "acc": acc,
        "dense": dense,
        "delta": delta,
        "sparsity": statistics.mean(r["sparsity"] for r in runs),
        "seeds": sorted(r["seed"] for r in runs),
        "train": statistics.mean(r["seconds"] for r in runs),
    }


def table(rows: dict[str, list[dict[str, Any]]], names: list[str], dense: bool = False) -> list[str]:
    """A markdown table of ``names``; with ``dense``, a first line for the dense baseline of their seeds."""
    out = [
        "| run | sparsity | accuracy % | Δ vs dense (points) | seeds | training time per run |",
        "|---|---|---|---|---|---|",
    ]
    if dense:
        baseline = {r["seed"]: r for name in names for r in reversed(rows[name])}
        runs = [baseline[seed] for seed in sorted(baseline)]
        out.append(
            f"| dense | 0 | {pm([r['dense_accuracy'] for r in runs])} | | {','.join(map(str, sorted(baseline)))} | "
            f"{statistics.mean(r['dense_seconds'] or 0.0 for r in runs):.0f} s |"
        )
    for name in names:
        s = summary(rows[name])
        out.append(
            f"| {name} | {s['sparsity']:.3f} | {pm(s['acc'])} | {pm(s['delta'], digits=2)} | "
            f"{','.join(map(str, s['seeds']))} | {s['train']:.0f} s |"
        )
    return out


def pareto(rows: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Accuracy against sparsity: one line per method (pattern and criterion), dense as a band."""
    lines: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    dense: list[float] = []
    for name, runs in rows.items():
        group = runs[0]["group"]
        if group not in ("grid", "nlp"):
            continue
        s = summary(runs)
        method = name.rsplit(" ", 1)[0] if group == "grid" else name
        lines[method].append((s["sparsity"], 100 * statistics.mean(s["acc"]), 100 * statistics.mean(s["delta"])))
        dense += s["dense"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, points in sorted(lines.items()):
        points.sort()
        style = "--" if "ModelPruning" in method else "-"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=method)
    if dense:
        ax.axhline(100 * statistics.mean(dense), color="black", lw=1, label="dense (mean over seeds)")
    ax.set_xlabel("sparsity of the pruned layers")
    ax.set_ylabel("test accuracy %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_U9 = "unstructured magnitude 0.9"
_RECOVERED = ("lr rewinding", "weight rewinding", "distillation", "lr rewinding + distillation")
_BEST = "lr rewinding + distillation"
# pruner.scope=lamp: alone, with the best recovery, and with the lasso (regularization=lasso) on top
_LAMP = (f"{_U9}, LAMP", f"{_U9}, LAMP + {_BEST}", f"{_U9}, LAMP + lasso + {_BEST}")
# The recovery ablation (issue 19): per pruning setting, the rows compared in one panel of results_recovery.png.
RECOVERY_PANELS = [
    (
        "cv",
        "CV, 600 steps: unstructured 90%",
        [
            _U9,
            *(f"{_U9}, {r}" for r in _RECOVERED),
            f"{_U9}, {_BEST}, window ends at 80%",
            f"{_U9}, lasso",
            f"{_U9}, lasso + {_BEST}",
            *_LAMP,
            "ModelPruning 0.9",
        ],
    ),
    ("cv", "CV, 600 steps: 4x1 75%", ["4x1 magnitude 0.75", f"4x1 magnitude 0.75, {_BEST}"]),
    (
        "cvlong",
        "CV, 1800 steps: unstructured 90%",
        [f"long {_U9}", f"long {_U9}, {_BEST}", *(f"long {n}" for n in _LAMP), "long ModelPruning 0.9"],
    ),
    ("cvlong", "CV, 1800 steps: 4x1 75%", ["long 4x1 magnitude 0.75", f"long 4x1 magnitude 0.75, {_BEST}"]),
    (
        "nlp",
        "MiniLM-L6, BBC News: 2:4",
        ["2:4 snip_momentum 0.5", f"2:4 snip_momentum 0.5, {_BEST}", "2:4 snip_momentum 0.5, window ends at 40%"],
    ),
    (
        "tweets",
        "MiniLM-L6, tweet sentiment",
        [
            "4x1 snip_momentum 0.8",
            f"4x1 snip_momentum 0.8, {_BEST}",
            "ModelPruning 0.8",
            "2:4 snip_momentum 0.5",
            f"2:4 snip_momentum 0.5, {_BEST}",
        ],
    ),
]


def recovery_plot(panels: list[tuple[str, dict[str, list[dict[str, Any]]], list[str]]], path: Path) -> None:
    """One panel per pruning setting: Δ vs dense (mean ± std over seeds) of each row, the dense line at 0."""
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, rows, names) in zip(axes.flat, panels):
        present = [n for n in names if n in rows]
        means = [100 * statistics.mean(summary(rows[n])["delta"]) for n in present]
        stds = [100 * statistics.stdev(summary(rows[n])["delta"]) if len(rows[n]) > 1 else 0.0 for n in present]
        colors = ["tab:gray" if "ModelPruning" in n else "tab:blue" if "," not in n else "tab:green" for n in present]
        ax.barh(range(len(present)), means, xerr=stds, color=colors, capsize=3)
        ax.set_yticks(range(len(present)), [n.split(", ", 1)[-1] if "," in n else n for n in present], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="black", lw=1)
        ax.set_xlabel("Δ vs dense, points (mean ± std over seeds)", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=ROOT / "outputs" / "results")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    (args.docs / "results").mkdir(parents=True, exist_ok=True)
    (args.docs / "images").mkdir(parents=True, exist_ok=True)
    suites = {}
    for suite in ("cv", "cvwide", "cvlong", "nlp", "tweets"):
        published = args.docs / "results" / f"{suite}.jsonl"
        records = merge(load(published), load(args.results / suite / "rows.jsonl"))
        if records:
            published.write_text("".join(json.dumps(r) + "\n" for r in records))
        suites[suite] = by_row(records, suite)
    for suite, title in (("cv", "Fashion-MNIST, ResNet-style CNN"), ("nlp", "MiniLM-L6 on BBC News")):
        if suites[suite]:
            pareto(suites[suite], args.docs / "images" / f"results_{suite}_pareto.png", title)
    panels = [
        (title, suites[suite], [n for n in names if n in suites[suite]])
        for suite, title, names in RECOVERY_PANELS
        if any(n in suites[suite] for n in names)
    ]
    if panels:
        recovery_plot(panels, args.docs / "images" / "results_recovery.png")
    for suite, rows in suites.items():
        for group in ("grid", "one-shot", "schedule", "ablation", "recovery", "capacity", "budget", "nlp", "tweets"):
            names = [n for n, runs in rows.items() if runs[0]["group"] == group]
            if names:
                print(f"\n### {suite} {group}\n")
                print("\n".join(table(rows, names, dense=group in ("recovery", "budget", "tweets"))))
        print(f"\n### {suite} commands\n")
        for name, runs in rows.items():
            print(f"- {name}: `{runs[0]['command']}`" + (" (seeds " + ",".join(str(r["seed"]) for r in runs) + ")"))


if __name__ == "__main__":
    main()
