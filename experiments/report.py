"""Sweep report: one table row per job of a Hydra multirun folder, and a Pareto plot.

Usage: python experiments/report.py multirun/2026-11-24/12-00-00 [--out <folder>]

Reads every ``results.json`` under the folder (written by experiments/train.py) and writes, into the folder
(or ``--out``): ``report.md`` and ``report.csv`` (config, sparsity reached, accuracy, delta to dense, time)
and ``pareto.png`` (test accuracy against sparsity reached, one series per pruner/pattern/criterion).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from experiments import plots

COLUMNS = [
    "job",
    "status",
    "pruner",
    "pattern",
    "criterion",
    "schedule",
    "target",
    "sparsity",
    "accuracy",
    "dense_accuracy",
    "delta_points",
    "seconds",
]


def collect(folder: Path) -> list[dict[str, Any]]:
    """One row per ``results.json`` under ``folder``, sorted by job folder."""
    rows = []
    for path in sorted(folder.rglob("results.json")):
        r = json.loads(path.read_text())
        failed = r.get("status") == "failed"
        job = str(path.parent.relative_to(folder)) or "."
        rows.append(
            {
                "job": f"{job} ({r.get('overrides')})" if failed else job,
                "status": f"failed: {r.get('error', '?')}" if failed else "ok",
                "pruner": r.get("pruner"),
                "pattern": r.get("pattern"),
                "criterion": r.get("criterion"),
                "schedule": r.get("schedule"),
                "target": r.get("target_sparsity"),
                "sparsity": r.get("sparsity"),
                "accuracy": r.get("accuracy"),
                "dense_accuracy": r.get("dense_accuracy"),
                "delta_points": r.get("delta_points"),
                "seconds": r.get("seconds"),
            }
        )
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def write_report(folder: Path, out: Path | None = None) -> list[dict[str, Any]]:
    """Write report.md, report.csv and pareto.png for the sweep in ``folder``; returns the rows."""
    rows = collect(folder)
    if not rows:
        raise FileNotFoundError(f"no results.json under {folder}: is it the folder of a train.py run or sweep?")
    out = out or folder
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# Sweep report: {folder}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        cells = [_cell(row[c]) for c in COLUMNS]
        cells[COLUMNS.index("delta_points")] = "–" if row["delta_points"] is None else f"{row['delta_points']:+.2f}"
        cells[COLUMNS.index("seconds")] = "–" if row["seconds"] is None else f"{row['seconds']:.1f}"
        lines.append("| " + " | ".join(cells) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        label = f"{row['pruner']} {row['pattern']} {row['criterion']}"
        series.setdefault(label, []).append((row["sparsity"], row["accuracy"]))
    dense = [r["dense_accuracy"] for r in rows if r.get("dense_accuracy") is not None]
    plots.pareto(series, statistics.mean(dense) if dense else None, out / "pareto.png", f"{len(rows)} runs")
    return rows


class SweepReport(Callback):
    """Hydra callback: write the report into the sweep folder when a multirun ends (conf/train.yaml)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        if any(folder.rglob("results.json")):
            write_report(folder)
            print(f"sweep report: {folder / 'report.md'}, report.csv, pareto.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = write_report(args.folder, args.out)
    report = (args.out or args.folder) / "report.md"
    print(report.read_text(), end="")
    print(f"{len(rows)} runs; written: {report}, report.csv, pareto.png")


if __name__ == "__main__":
    main()
