"""The main job: train a model dense and pruned on the same budget; write results.json and plots.

Usage (from the repository root):
    python experiments/train.py                                   # digits, ResNet-style CNN, 4x1 at 80%
    python experiments/train.py pattern=2in4 criterion=magnitude schedule.decay=cos pruner.target_sparsity=0.5
    python experiments/train.py -m pattern=4x1,2in4 pruner.target_sparsity=0.5,0.7   # then experiments/report.py
    python experiments/train.py experiment=nlp_minilm_bbc
    python experiments/train.py pruner=sparsegpt                     # one-shot from the dense weights, evaluated
    python experiments/train.py -m pruner=sparsegpt,wanda pattern=unstructured,2in4 finetune_steps=0,100

Into the Hydra run folder: results.json, sparsity_vs_step.png, layer_sparsity.png, mask.png, pruned.ckpt and
the logger's files. The dense baseline is trained once per output folder (the sweep folder under -m) and
reused by later runs with the same data, model, trainer and seed (``dense=train`` retrains, ``dense=skip``
skips it).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import experiments
from experiments import plots
from experiments.timing import latency
from lightning_prune import OneShotPruning, PatternLock, Pruning, format_report
from lightning_prune.callbacks import MaskedWeights
from lightning_prune.export import make_permanent, save_sparse, slim

log = logging.getLogger("experiments.train")
EXPORTS = ("none", "permanent", "slim", "sparse")
CONF = str(Path(__file__).resolve().parent.parent / "conf")


class SparsityTrace(pl.Callback):
    """Scheduled and achieved sparsity after every optimizer step."""

    def __init__(self, pruner: MaskedWeights) -> None:
        self.pruner = pruner
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step - 1
        if self.rows and self.rows[-1]["step"] == step:
            return  # gradient accumulation: no new step
        achieved = self.pruner.sparsity()
        target = self.pruner.scheduled_sparsity(step) if isinstance(self.pruner, Pruning) else achieved
        self.rows.append({"step": step, "target": target, "achieved": achieved})


def _fit_and_test(
    cfg: DictConfig,
    callbacks: list[pl.Callback],
    init_from: str | dict[str, torch.Tensor] | None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = instantiate(cfg.data)
    model = instantiate(cfg.model)
    if init_from is not None:
        state = (
            init_from if isinstance(init_from, dict) else torch.load(init_from, map_location="cpu", weights_only=True)
        )
        model.load_state_dict(state.get("state_dict", state), strict=True)
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    steps = {} if max_steps is None else {"max_steps": max_steps}
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, **steps)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    tested = trainer.test(model, datamodule=data, verbose=False)
    accuracy = float(tested[0]["test/acc"])
    return {"trainer": trainer, "model": model, "datamodule": data, "accuracy": accuracy, "seconds": seconds}


def export(kind: str, model: pl.LightningModule, masks: dict[str, torch.Tensor], data: Any, out: Path) -> dict:
    """Write the export artifact into ``out``; returns its path, size and (for slim) the report."""
    model = model.cpu().eval()
    if kind == "permanent":
        path = out / "permanent.safetensors"
        plain = make_permanent(model, masks)
        save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(path))
        info: dict[str, Any] = {}
    elif kind == "sparse":
        path = out / "sparse.safetensors"
        info = save_sparse(model, path, masks)
    else:
        path = out / "slim.pt"
        batch = next(iter(data.test_dataloader()))[0]
        small, info = slim(model, masks, batch[:2])
        torch.save(small, path)
        info["latency_ratio"] = latency({"masked": model, "slimmed": small}, batch, rounds=15)["slimmed"]
    print(f"export={kind}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return {"kind": kind, "path": str(path), "bytes": path.stat().st_size, **info}


def _dense_key(cfg: DictConfig) -> str:
    """What makes two dense baselines the same: data, model, trainer, seed and budget."""
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("data", "model", "trainer")}
    parts.update(seed=cfg.seed, steps=cfg.steps, init_from=cfg.init_from)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def teacher(cfg: DictConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The distillation teacher: the model with the dense baseline's weights, or its ``distill.module`` part."""
    model = instantiate(cfg.model)
    model.load_state_dict(state, strict=True)
    return model.get_submodule(cfg.distill.module) if cfg.distill.get("module") else model


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def dense_cache_dir(cfg: DictConfig, out: Path) -> Path:
    """Where dense baselines are kept: ``dense_cache`` if set, else the sweep folder under -m, else the run's."""
    if cfg.get("dense_cache"):
        return Path(cfg.dense_cache)
    return Path(HydraConfig.get().sweep.dir) / "dense_baselines" if _multirun() else out / "dense_baselines"


def dense_baseline(cfg: DictConfig, out: Path, weights: bool = False) -> dict[str, Any] | None:
    """Train the dense model, or reuse the one trained earlier with the same data, model, trainer and seed.

    With ``weights`` the record also holds the trained weights (``"state"``), kept next to the record for
    later runs (one-shot pruners start from them); a cached record without them is retrained once.
    """
    if cfg.dense == "skip":
        return None
    cache = dense_cache_dir(cfg, out) / f"{_dense_key(cfg)}.json"
    saved = cache.with_suffix(".pt")
    if cfg.dense == "reuse" and cache.exists() and (saved.exists() or not weights):
        log.info("dense baseline reused from %s", cache)
        record = {**json.loads(cache.read_text()), "reused_from": str(cache)}
        if weights:
            record["state"] = torch.load(saved, map_location="cpu", weights_only=True)
        return record
    _say(f"dense:  training {cfg.steps} steps ...")
    result = _fit_and_test(cfg.copy(), [], cfg.init_from)
    record = {"accuracy": result["accuracy"], "seconds": result["seconds"]}
    # the weights are kept too, so that a later run that starts from them (one-shot pruners) or learns from them
    # (distillation) reuses this very baseline instead of training another one
    state = {k: v.detach().cpu().clone() for k, v in result["model"].state_dict().items()}
    if result["trainer"].is_global_zero:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(record))
        if not any(hasattr(v, "full_tensor") for v in state.values()):  # a sharded model is not kept
            torch.save(state, saved)
    return {**record, "state": state} if weights else record


def _say(line: str) -> None:
    """A progress line, once (rank zero under DDP)."""
    if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) == 0:
        print(line, flush=True)


def run(cfg: DictConfig) -> dict[str, Any]:
    """One job: validate the pruner, dense baseline, pruned run, results.json and plots."""
    if cfg.dense not in ("reuse", "train", "skip"):
        raise ValueError(f"dense={cfg.dense!r} is not valid; choose one of 'reuse', 'train', 'skip'")
    if cfg.get("export", "none") not in EXPORTS:
        raise ValueError(f"export={cfg.export!r} is not valid; choose one of {', '.join(map(repr, EXPORTS))}")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    strategy = cfg.trainer.get("strategy")
    if cfg.get("export", "none") != "none" and "ModelParallel" in str(getattr(strategy, "_target_", strategy)):
        raise ValueError(
            f"export={cfg.export} needs the whole model, which trainer=model_parallel keeps sharded: run with "
            "export=none, then consolidate the run's pruned.ckpt folder with "
            "lightning_prune.export.consolidate_checkpoint and export from that file"
        )
    pruner_class = get_class(cfg.pruner._target_)
    if cfg.pruner.get("regularization") and "regularization" not in inspect.signature(pruner_class).parameters:
        raise ValueError(
            f"regularization=lasso shrinks weights inside a pruning window, which pruner={pruner_class.__name__} "
            "does not have: use it with pruner=basic or pruner=progressive"
        )
    pruner = instantiate(cfg.pruner)  # bad pruning arguments fail here, before any training
    if isinstance(pruner, PatternLock) and not cfg.init_from:
        raise ValueError(
            "pruner=pattern_lock locks the zeros of a sparse model: set init_from=<checkpoint>, e.g. the "
            "pruned.ckpt that a pruning run wrote into its folder"
        )
    oneshot = isinstance(pruner, OneShotPruning)
    if oneshot and cfg.dense == "skip" and not cfg.init_from:
        raise ValueError(
            "one-shot pruners prune a trained model: with dense=skip set init_from=<checkpoint of trained weights>"
        )
    steps = cfg.get("finetune_steps")
    steps = int(cfg.steps if steps is None and not oneshot else steps or 0)
    if steps < 0:
        raise ValueError(f"finetune_steps={steps} is not valid; choose a number of optimizer steps >= 0, or null")
    extra = [instantiate(cfg.rewind)] if cfg.get("rewind") else []
    distill = bool(cfg.get("distill"))
    if distill and cfg.dense == "skip":
        raise ValueError("distill=kd is taught by the run's dense baseline: use dense=reuse or dense=train, not skip")
    dense = dense_baseline(cfg, out, weights=(oneshot and not cfg.init_from) or distill)
    if distill:
        extra.append(instantiate(cfg.distill, teacher=teacher(cfg, dense["state"])))
    # the pruned run starts from init_from, or (one-shot pruners) the dense weights; else from initialisation
    start = cfg.init_from or ((dense or {}).get("state") if oneshot else None)
    trace = SparsityTrace(pruner)
    verb = f"pruned by {pruner.method}, then " if oneshot else ""
    what = "".join(f" and {type(cb).__name__}" for cb in extra)
    _say(f"pruned: {verb}training {steps} steps with {type(pruner).__name__}{what} ...")
    pruned = _fit_and_test(cfg, [pruner, trace, *extra], start, max_steps=steps)
    trainer, model = pruned["trainer"], pruned["model"]
    if not cfg.trainer.get("fast_dev_run"):
        trainer.save_checkpoint(out / "pruned.ckpt", weights_only=True)  # every rank calls it; rank zero writes
    # sharded masks (DTensors) gathered whole, by every rank, before rank zero works alone
    masks = {n: m.full_tensor() if hasattr(m, "full_tensor") else m for n, m in pruner.masks.items()}
    if not trainer.is_global_zero:
        return {}  # under DDP, rank zero writes the results

    rows = [row._asdict() for row in pruner.report(model)]
    layers = [r for r in rows if r["name"] != "total"]
    results = {
        "status": "ok",
        "pruner": type(pruner).__name__,
        "pattern": str(getattr(pruner, "pattern", None)),
        "criterion": str(getattr(pruner, "criterion", getattr(pruner, "method", None))),
        "schedule": repr(getattr(pruner, "schedule", None)),
        "target_sparsity": getattr(pruner, "target_sparsity", None),
        "sparsity": pruner.sparsity(),
        "accuracy": pruned["accuracy"],
        "seconds": pruned["seconds"],
        "dense_accuracy": dense["accuracy"] if dense else None,
        "dense_seconds": dense["seconds"] if dense else None,
        "delta_points": 100 * (pruned["accuracy"] - dense["accuracy"]) if dense else None,
        "steps": int(trainer.global_step),
        "layers": layers,
        "trace": trace.rows,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if cfg.get("export", "none") != "none":
        results["export"] = export(cfg.export, model, masks, pruned["datamodule"], out)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if cfg.plots and layers:
        if trace.rows:
            title = f"{results['pruner']} {results['pattern']} {results['criterion']}"
            plots.sparsity_vs_step(trace.rows, out / "sparsity_vs_step.png", title)
        plots.layer_sparsity(layers, out / "layer_sparsity.png", f"per-layer sparsity, total {results['sparsity']:.3f}")
        # the layer whose sparsity is nearest the total, among the larger ones: a typical mask
        big = {n: m for n, m in masks.items() if m.numel() >= 1024} or masks
        name, mask = min(big.items(), key=lambda kv: abs(1 - kv[1].float().mean().item() - results["sparsity"]))
        plots.mask_picture(name, mask, out / "mask.png", results["pattern"])

    if dense:
        reused = ", reused" if "reused_from" in dense else ""
        print(f"dense  accuracy {dense['accuracy']:.4f}  ({dense['seconds']:.1f} s{reused})")
    print(f"pruned accuracy {pruned['accuracy']:.4f}  ({pruned['seconds']:.1f} s)", end="")
    print(f"  delta {results['delta_points']:+.2f} points" if dense else "")
    print(format_report(pruner.report(model)))
    print(f"results: {out / 'results.json'}")
    return results


def run_or_report(cfg: DictConfig) -> float:
    """:func:`run`, returning the pruned accuracy.

    In a sweep, a job that fails writes ``results.json`` with its error instead of raising, so that the other
    jobs run and ``report.md`` lists it as failed.
    """
    if not _multirun():
        return float(run(cfg).get("accuracy", math.nan))
    try:
        return float(run(cfg).get("accuracy", math.nan))
    except Exception as err:  # any failure of one job is reported; the sweep goes on
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        cause: BaseException = err
        while cause.__cause__ is not None:  # the error itself, not Hydra's instantiation wrapper
            cause = cause.__cause__
        error = " ".join(f"{type(cause).__name__}: {cause}".split())
        overrides = " ".join(HydraConfig.get().overrides.task)
        failed = {"status": "failed", "error": error, "overrides": overrides}
        (out / "results.json").write_text(json.dumps(failed, indent=1, default=str))
        log.error("job failed: %s", error)
        print(f"job failed: {error}", flush=True)
        return math.nan


@hydra.main(version_base="1.3", config_path=CONF, config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the pruned accuracy (for sweepers)."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    for name in ("lightning.pytorch", "lightning.fabric"):  # one clean summary: no device and tip banners
        logging.getLogger(name).setLevel(logging.WARNING)
    return run_or_report(cfg)


if __name__ == "__main__":
    assert experiments  # imported for its resolver
    main()
