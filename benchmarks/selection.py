"""Exact global selection over many score tensors: counting selection against kthvalue on a concatenation.

Time: both methods alternate in one process; medians and their ratio. Peak extra memory: each method runs
once in a fresh subprocess, measured as the rise of the peak resident set above the scores' own footprint.
Both methods must select the same number of units (checked).

Usage: python benchmarks/selection.py [--numel 110e6] [--tensors 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lightning_prune.selection import prune_lowest


def make_scores(numel: int, tensors: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(numel // tensors, generator=g) for _ in range(tensors)]


def ours(scores: list[torch.Tensor], k: int) -> int:
    return sum(int(m.sum()) for m in prune_lowest(scores, [1] * len(scores), k))


def concatenated(scores: list[torch.Tensor], k: int) -> int:
    flat = torch.cat(scores)
    threshold = torch.kthvalue(flat, k).values
    return sum(int((s <= threshold).sum()) for s in scores)


METHODS = {"counting (ours)": ours, "kthvalue on torch.cat": concatenated}


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB.

    Not `getrusage`'s ru_maxrss: that carries the peak of the process that started this one across fork and
    exec, so a child of a large process (`run_all.py` holding MiniLM) would report its parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(method: str, numel: int, tensors: int) -> None:
    scores = make_scores(numel, tensors)
    base = peak_rss_mb()
    METHODS[method](scores, int(0.8 * numel))
    print(json.dumps({"extra_mb": peak_rss_mb() - base, "scores_mb": numel * 4 / 2**20}))


def measure(numel: int, tensors: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds and peak extra memory (MB, and as a multiple of the scores' bytes) of each method."""
    # Memory in fresh children, each with only its own scores and method.
    memory = {}
    for name in METHODS:
        out = subprocess.run(
            [sys.executable, __file__, "--child", name, "--numel", str(numel), "--tensors", str(tensors)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        memory[name] = json.loads(out.stdout.strip().splitlines()[-1])
    scores = make_scores(numel, tensors)
    k = int(0.8 * numel)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    counts = {}
    for _ in range(repeats):
        for name, fn in METHODS.items():
            start = time.perf_counter()
            counts[name] = fn(scores, k)
            times[name].append(time.perf_counter() - start)
    # ours takes exactly k; "<= k-th value" also takes the k-th value's ties (rand has 2^24 distinct values)
    assert counts["counting (ours)"] == k <= counts["kthvalue on torch.cat"], counts
    ratio = statistics.median(a / b for a, b in zip(times["counting (ours)"], times["kthvalue on torch.cat"]))
    return {
        name: {
            "seconds": statistics.median(times[name]),
            "extra_mb": memory[name]["extra_mb"],
            "extra_x": memory[name]["extra_mb"] / memory[name]["scores_mb"],
            "time_ratio_to_kthvalue": ratio if name == "counting (ours)" else 1.0,
        }
        for name in METHODS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=float, default=110e6)
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    numel = int(args.numel)
    if args.child:
        child(args.child, numel, args.tensors)
        return
    result = measure(numel, args.tensors, args.repeats)
    print(
        f"{numel / 1e6:.0f}M float32 scores in {args.tensors} tensors, k = 80%, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.repeats} alternating repeats\n"
    )
    print("| method | median time | peak extra memory |")
    print("|---|---|---|")
    for name, r in result.items():
        print(f"| {name} | {r['seconds']:.3f} s | {r['extra_mb']:.0f} MB ({r['extra_x']:.2f}x the scores) |")
    print(f"\nmedian time ratio ours / kthvalue: {result['counting (ours)']['time_ratio_to_kthvalue']:.3f}")


if __name__ == "__main__":
    main()
