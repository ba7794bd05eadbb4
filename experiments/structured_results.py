"""Structured pruning results (docs/RESULTS.md, "Heads and FFN neurons"): whole attention heads and FFN neurons
removed from MiniLM-L6 and the small Llama, slimmed for real, timed against the dense model.

- ``minilm``: MiniLM-L6 fine-tuned on BBC News topics (128 tokens, batch 16, AdamW one-cycle). Rows: dense;
  heads and FFN neurons pruned *while fine-tuning* (``Pruning``, snip_momentum, global, the default
  schedule); and pruned *retrain-free* from the dense fine-tuned model (``OneShotPruning("retrain_free")``,
  Kwon et al. 2022: Fisher importances and a least-squares re-fit on 16 training batches, no training), next
  to plain magnitude ranking of the same units without re-fit. Each pruned model is slimmed (``slim``).
- ``llama``: the small Llama of ``experiments.llm`` (cached). Perplexity on held-out BBC articles after
  retrain-free and after magnitude head/neuron pruning, then after 100 fine-tuning steps with the masks locked.

Every row: test accuracy (or perplexity), parameters and MACs of the slimmed model, and its CPU latency as the
median ratio to the dense model's over alternating runs on the same batch, in one process.

Usage: python -m experiments.structured_results minilm|llama [--out docs] [--steps 300] [--plot-only]
Writes ``<out>/results/structured_<name>.jsonl`` and ``<out>/images/structured_<name>.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from experiments.data import BBCNewsData
from experiments.models import Classifier, MiniLM
from experiments.timing import latency
from lightning_prune import OneShotPruning, Pruner, Pruning
from lightning_prune.export import slim
from lightning_prune.schedules import OneShot

# (label, {pattern: fraction of its units}) for every structured row
SETTINGS: list[tuple[str, dict[str, float]]] = [
    ("heads 25%", {"head": 0.25}),
    ("heads 50%", {"head": 0.5}),
    ("FFN 25%", {"ffn": 0.25}),
    ("FFN 50%", {"ffn": 0.5}),
    ("FFN 50% + heads 25%", {"ffn": 0.5, "head": 0.25}),
    ("FFN 50% + heads 50%", {"ffn": 0.5, "head": 0.5}),
]
# the Llama's rows (each pruned model is fine-tuned, so fewer of them)
LLAMA_SETTINGS = [SETTINGS[0], SETTINGS[3], SETTINGS[4]]
# retrain-free only: the FLOP reductions of INC's published retrain-free rows (10% of MLP channels)
RETRAIN_FREE_ONLY: list[tuple[str, dict[str, float]]] = [("FFN 10%", {"ffn": 0.1})]
CHECKPOINTS = Path("checkpoints")
ENCODER = r"net\.bert\.encoder\.layer\.\d+\..*"  # MiniLM's pruned layers


def trainer_options() -> dict[str, Any]:
    return {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }


def latency_ratio(dense: nn.Module, small: nn.Module, x: torch.Tensor, rounds: int = 15) -> float:
    """Median over ``rounds`` of small's time / dense's time on ``x``, the two run alternately."""
    return latency({"dense": dense, "small": small}, x, rounds)["small"]


def magnitude_masks(
    model: nn.Module, fractions: dict[str, float], include: str | None, scope: str = "global"
) -> dict[str, torch.Tensor]:
    """Whole units ranked by mean ``|w|`` (no data, no re-fit): the baseline for retrain-free pruning."""
    masks: dict[str, torch.Tensor] = {}
    for pattern, fraction in fractions.items():
        pruner = Pruner(model, fraction, pattern, "magnitude", OneShot(step=0), include=include, scope=scope)
        pruner.before_optimizer_step(0)
        masks.update(pruner.masks)
        pruner.close()
    return masks


# ---------------------------------------------------------------------------- MiniLM-L6 on BBC News
def _data(seed: int) -> BBCNewsData:
    data = BBCNewsData(max_length=128, batch_size=16, seed=seed)
    data.prepare_data()
    data.setup("fit")
    return data


def _test(model: pl.LightningModule, data: BBCNewsData) -> float:
    return float(pl.Trainer(**trainer_options()).test(model, datamodule=data, verbose=False)[0]["test/acc"])


def _fit(model: pl.LightningModule, data: BBCNewsData, steps: int, callbacks: list[pl.Callback]) -> None:
    pl.Trainer(max_steps=steps, callbacks=callbacks, **trainer_options()).fit(model, datamodule=data)


def _masks_of(callbacks: Sequence[Any]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("net."): v for cb in callbacks for k, v in cb.masks.items()}


def _dense(data: BBCNewsData, steps: int, seed: int) -> Classifier:
    """The dense fine-tuned MiniLM of ``seed``: trained ``steps`` steps once, then loaded from its cache."""
    cache = CHECKPOINTS / f"minilm_bbc_{steps}_{seed}.pt"
    dense = Classifier(MiniLM(), num_classes=5, lr=1e-4, weight_decay=0.01)
    if cache.exists():
        dense.load_state_dict(torch.load(cache, weights_only=True))
    else:
        _fit(dense, data, steps, [])
        CHECKPOINTS.mkdir(exist_ok=True)
        torch.save(dense.state_dict(), cache)
    return dense


def _retrain_free(
    dense: Classifier, data: BBCNewsData, fractions: dict[str, float], calibration: int
) -> tuple[Classifier, dict[str, torch.Tensor]]:
    """A copy of ``dense`` pruned retrain-free (one callback per pattern), and its masks."""
    model = copy.deepcopy(dense)
    callbacks = [
        OneShotPruning("retrain_free", f, p, calibration_batches=calibration, include=ENCODER, verbose=False)
        for p, f in fractions.items()
    ]
    _fit(model, data, 0, callbacks)
    return model, _masks_of(callbacks)


def _slim_row(
    dense: nn.Module, model: Classifier, masks: dict[str, torch.Tensor], x: torch.Tensor, timed: bool = True
) -> dict[str, Any]:
    small, report = slim(model.net, masks, x[:4])
    ratio = latency_ratio(dense, small, x) if timed else None
    return {
        "params": report["params_after"],
        "params_ratio": report["params_after"] / report["params_before"],
        "macs_ratio": report["macs_after"] / report["macs_before"],
        "latency_ratio": ratio,
        "heads_removed": sum(report["heads"].values()),
        "neurons_removed": sum(report["neurons"].values()),
    }


def minilm_rows(
    steps: int = 300,
    seed: int = 0,
    calibration: int = 16,
    settings: list[tuple[str, dict[str, float]]] = SETTINGS,
    timed: bool = True,
) -> list[dict[str, Any]]:
    """The MiniLM rows of one seed; ``timed=False`` leaves the latencies out (the other seeds' rows)."""
    torch.manual_seed(seed)
    data = _data(seed)
    x = next(iter(data.test_dataloader()))[0][:16]  # latency at the training batch size
    start = time.perf_counter()
    dense = _dense(data, steps, seed)
    rows = [
        {"method": "dense", "setting": "dense", "accuracy": _test(dense, data), "seconds": time.perf_counter() - start}
    ]
    rows[-1].update(params_ratio=1.0, macs_ratio=1.0, latency_ratio=1.0)
    print(json.dumps(rows[-1]), flush=True)
    for label, fractions in settings + (RETRAIN_FREE_ONLY if timed else []):
        # retrain-free from the dense fine-tuned model: no training at all
        start = time.perf_counter()
        model, masks = _retrain_free(dense, data, fractions, calibration)
        row = {"method": "retrain-free", "setting": label, "seconds": time.perf_counter() - start}
        row.update(accuracy=_test(model, data), **_slim_row(dense.net, model, masks, x, timed))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if (label, fractions) in RETRAIN_FREE_ONLY:
            continue
        # the same units ranked by magnitude, no data and no re-fit
        model = copy.deepcopy(dense)
        magnitude_masks(model, fractions, ENCODER)  # the pruned weights are zero now
        row = {"method": "magnitude, no re-fit", "setting": label, "accuracy": _test(model, data)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        # pruned while fine-tuning from the pretrained model, the dense run's steps
        torch.manual_seed(seed)
        model = Classifier(MiniLM(), num_classes=5, lr=1e-4, weight_decay=0.01)
        callbacks = [Pruning(f, p, "snip_momentum", include=ENCODER, verbose=False) for p, f in fractions.items()]
        start = time.perf_counter()
        _fit(model, data, steps, callbacks)
        row = {"method": "during fine-tuning", "setting": label, "seconds": time.perf_counter() - start}
        row.update(accuracy=_test(model, data), **_slim_row(dense.net, model, _masks_of(callbacks), x, timed))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def minilm_retime(
    label: str,
    steps: int = 300,
    seed: int = 0,
    calibration: int = 16,
    rounds: int = 21,
    batches: Sequence[int] = (1, 8, 16, 64),
) -> dict[int, float]:
    """The retrain-free row ``label`` again, on a quiet machine: its slimmed latency ratio at several batch sizes.

    A slimmed model's speed depends only on how many units each layer keeps, so this re-times the row's
    architecture with nothing else running (the sweep itself trains between rows), on batches of ``batches``
    test articles (128 tokens).
    """
    fractions = dict(SETTINGS + RETRAIN_FREE_ONLY)[label]
    data = _data(seed)
    x = next(iter(data.test_dataloader()))[0]
    dense = _dense(data, steps, seed)
    model, masks = _retrain_free(dense, data, fractions, calibration)
    small, _ = slim(model.net, masks, x[:4])
    return {b: latency_ratio(dense.net, small, x[:b], rounds) for b in batches}


# ---------------------------------------------------------------------------- the small Llama
def llama_rows(
    calibration: int = 64, eval_rows: int = 256, finetune_steps: int = 100, seed: int = 0
) -> list[dict[str, Any]]:
    from experiments.llm import CausalLM, bbc_splits, load, loader, pack, pretrain
    from experiments.oneshot_results import perplexity

    folder = pretrain(steps=800)  # as docs/RESULTS.md's one-shot section (cached: reused)
    _, tokenizer = load(folder)
    splits = bbc_splits(seed)
    g = torch.Generator().manual_seed(seed)
    train_ids = pack(splits["train"], tokenizer)
    test_ids = pack(splits["test"], tokenizer)
    test_ids = test_ids[torch.randperm(test_ids.shape[0], generator=g)[:eval_rows]]
    calib = train_ids[torch.randperm(train_ids.shape[0], generator=g)[:calibration]]
    calib_batches = [(calib[i : i + 8],) for i in range(0, calibration, 8)]
    x = test_ids[:8]
    options = trainer_options()

    def finetune(module: CausalLM, callbacks: list[pl.Callback]) -> None:
        trainer = pl.Trainer(max_steps=finetune_steps, callbacks=callbacks, gradient_clip_val=1.0, **options)
        trainer.fit(module, loader(train_ids, 8, True, seed))

    dense_llm = load(folder)[0]
    dense = CausalLM(copy.deepcopy(dense_llm), lr=3e-4, weight_decay=0.0)
    rows = [{"method": "dense", "setting": "dense", "ppl": perplexity(dense, test_ids)}]
    finetune(dense, [])
    rows[-1].update(ppl_finetuned=perplexity(dense, test_ids), params_ratio=1.0, macs_ratio=1.0, latency_ratio=1.0)
    print(json.dumps(rows[-1]), flush=True)
    for label, fractions in LLAMA_SETTINGS:
        for method in ("retrain-free", "magnitude"):
            module = CausalLM(load(folder)[0], lr=3e-4, weight_decay=0.0)
            if method == "retrain-free":
                callbacks = [
                    OneShotPruning("retrain_free", f, p, dataloader=calib_batches, verbose=False)
                    for p, f in fractions.items()
                ]
                pl.Trainer(max_steps=0, callbacks=callbacks, **options).fit(module, loader(train_ids, 8, True, seed))
                masks = {k.removeprefix("llm."): v for cb in callbacks for k, v in cb.masks.items()}
            else:
                masks = {k.removeprefix("llm."): v for k, v in magnitude_masks(module, fractions, None).items()}
                callbacks = []
            row: dict[str, Any] = {"method": method, "setting": label, "ppl": perplexity(module, test_ids)}
            small, report = slim(module.llm, masks, {"input_ids": x[:2]})
            row.update(
                params_ratio=report["params_after"] / report["params_before"],
                macs_ratio=report["macs_after"] / report["macs_before"],
                latency_ratio=latency_ratio(dense_llm, small, x),  # x: input_ids
            )
            if not callbacks:  # lock the magnitude masks for the fine-tune
                from lightning_prune import PatternLock

                callbacks = [PatternLock(verbose=False)]
            finetune(module, callbacks)
            row["ppl_finetuned"] = perplexity(module, test_ids)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# ---------------------------------------------------------------------------- tables and plots
def plot(rows: list[dict[str, Any]], panels: dict[str, str], title: str, path: Path) -> None:
    """Each metric of ``panels`` ({metric: y label}) against the slimmed model's latency ratio, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 4.6), squeeze=False)
    dense = next(r for r in rows if r["method"] == "dense")
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]
    timed = {r["setting"]: r["latency_ratio"] for r in rows if r.get("latency_ratio") is not None}
    rows = [r if r.get("latency_ratio") is not None else {**r, "latency_ratio": timed.get(r["setting"])} for r in rows]
    for ax, (metric, ylabel) in zip(axes[0], panels.items()):
        ax.axhline(dense[metric], color="0.4", ls="--", lw=1, label="dense")
        for i, method in enumerate(methods):
            mine = [r for r in rows if r["method"] == method and r["latency_ratio"] is not None and metric in r]
            if not mine:
                continue
            ax.scatter([r["latency_ratio"] for r in mine], [r[metric] for r in mine], color=f"C{i}", label=method)
            for r in mine:
                xy = (r["latency_ratio"], r[metric])
                ax.annotate(r["setting"], xy, fontsize=7, xytext=(4, 2), textcoords="offset points")
        ax.set(xlabel="CPU latency of the slimmed model / dense (median of alternating runs)", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:
    lines = ["| method | setting | " + " | ".join(columns.values()) + " |", "|---" * (2 + len(columns)) + "|"]
    for r in rows:
        values = [f"{r[k]:.4f}" if isinstance(r.get(k), float) else "" if k not in r else str(r[k]) for k in columns]
        lines.append(f"| {r['method']} | {r['setting']} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=("minilm", "llama"))
    parser.add_argument("--out", default="docs")
    parser.add_argument("--steps", type=int, default=300, help="MiniLM fine-tuning steps (dense and pruned runs)")
    parser.add_argument("--plot-only", action="store_true", help="table and plot from the saved rows, no runs")
    parser.add_argument(
        "--retime",
        metavar="SETTING",
        help="minilm: re-time one retrain-free row's slimmed model at batches of 1, 8, 16 and 64",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="minilm: another seed's rows, accuracy only (written to structured_minilm_seed<N>.jsonl)",
    )
    parser.add_argument("--settings", help="with --seed: the settings to run, ';'-separated labels (default: all)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.retime:
        row = {"setting": args.retime, "latency_ratio_by_batch": minilm_retime(args.retime, args.steps)}
        with (out / "results" / "structured_minilm_latency.jsonl").open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row))
        return
    if args.seed:
        chosen = [s for s in SETTINGS if args.settings is None or s[0] in args.settings.split(";")]
        rows = minilm_rows(args.steps, args.seed, settings=chosen, timed=False)
        with (out / "results" / f"structured_minilm_seed{args.seed}.jsonl").open("w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
        return
    saved = out / "results" / f"structured_{args.name}.jsonl"
    loaded = [json.loads(line) for line in saved.read_text().splitlines()] if args.plot_only else None
    if args.name == "minilm":
        rows = loaded or minilm_rows(args.steps)
        title = "MiniLM-L6 on BBC News: heads and FFN neurons removed"
        plot(rows, {"accuracy": "test accuracy"}, title, out / "images" / "structured_minilm.png")
        columns = {"accuracy": "accuracy", "params_ratio": "params", "macs_ratio": "MACs", "latency_ratio": "latency"}
    else:
        rows = loaded or llama_rows()
        title = "Llama 5.5M: heads and FFN neurons removed (left), then 100 steps with the masks locked (right)"
        panels = {"ppl": "perplexity, held-out BBC", "ppl_finetuned": "perplexity after the fine-tune"}
        plot(rows, panels, title, out / "images" / "structured_llama.png")
        columns = {
            "ppl": "ppl",
            "ppl_finetuned": "ppl, fine-tuned",
            "params_ratio": "params",
            "macs_ratio": "MACs",
            "latency_ratio": "latency",
        }
    with saved.open("w") as handle:
        for r in rows:
            handle.write(json.dumps(r) + "\n")
    print(table(rows, columns))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
