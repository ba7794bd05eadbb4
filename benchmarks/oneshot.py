"""One-shot pruning of a small Llama: lightning_prune against llm-compressor 0.14, each in its own process.

llm-compressor pins its own dependencies, so it lives in ``.venv-llmc`` (``make bench`` builds it) and this
module runs there as a worker too. Both tools get the same saved model directory (the Llama pretrained on
BBC News by ``experiments.llm``, with its tokenizer), the same 32 calibration sequences of 256 tokens, the
same method, sparsity and pattern, every decoder Linear pruned and ``lm_head`` left out.

Each worker loads the model from the directory, prunes it, and reports its wall time (load and prune) and
its peak resident memory above what the process held before pruning started (imports done), then writes
the pruned Linear weights. The parent process computes each layer's relative reconstruction error
``||W X - W' X||^2 / ||W X||^2`` on the dense model's inputs to that layer (the calibration sequences), for
both tools.

Usage:
    python -m benchmarks.oneshot                       # the section, printed as JSON (main environment)
    python -m benchmarks.oneshot --worker ours|llmcompressor --method sparsegpt --pattern 2:4 \
        --model DIR --calibration FILE --out FILE      # one worker run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
LLMC_PYTHON = ROOT / ".venv-llmc" / "bin" / "python"
CASES = (("sparsegpt", "unstructured"), ("sparsegpt", "2:4"), ("wanda", "unstructured"), ("wanda", "2:4"))
SPARSITY = 0.5


def _status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> float:
    """Start a new peak-memory measurement (``VmHWM`` back to the current RSS); the current RSS in MB.

    ``getrusage``'s ``ru_maxrss`` would not do: a child keeps its parent's peak across fork and exec.
    """
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _prune_ours(model_dir: str, ids: torch.Tensor, method: str, pattern: str, batch_size: int) -> Any:
    from transformers import LlamaForCausalLM

    from lightning_prune.oneshot import prune_oneshot

    model = LlamaForCausalLM.from_pretrained(model_dir, local_files_only=True, torch_dtype=torch.float32)
    batches = [{"input_ids": ids[i : i + batch_size]} for i in range(0, ids.shape[0], batch_size)]
    prune_oneshot(model, batches, method, SPARSITY, pattern, op_types="Linear", exclude=r"lm_head")
    return model


def _prune_llmcompressor(model_dir: str, ids: torch.Tensor, method: str, pattern: str, batch_size: int) -> Any:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    structure = "0:0" if pattern == "unstructured" else pattern
    modifier = SparseGPTModifier if method == "sparsegpt" else WandaPruningModifier
    # "lm_head" alone does not match: llm-compressor names the layer "lm_head." and asks for this regex
    recipe = modifier(sparsity=SPARSITY, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=data,
        recipe=recipe,
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
        batch_size=batch_size,
    )
    return model


def worker(
    tool: str, method: str, pattern: str, model_dir: str, calibration: str, out: str, batch_size: int = 8
) -> dict[str, Any]:
    """Load, prune, save the Linear weights; time and peak memory of loading and pruning."""
    # the imports each tool needs are not part of the measurement
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    if tool == "llmcompressor":
        from datasets import Dataset  # noqa: F401
        from llmcompressor import oneshot  # noqa: F401
        from llmcompressor.modifiers.pruning import WandaPruningModifier  # noqa: F401
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier  # noqa: F401
    else:
        from lightning_prune.oneshot import prune_oneshot  # noqa: F401
    ids = torch.load(calibration, weights_only=True)
    before = _reset_peak()
    start = time.perf_counter()
    model = (_prune_ours if tool == "ours" else _prune_llmcompressor)(model_dir, ids, method, pattern, batch_size)
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    torch.save(weights, out)
    return {"tool": tool, "seconds": seconds, "peak_mb": peak, "added_mb": peak - before}


def _run_worker(
    python: Path, tool: str, method: str, pattern: str, model_dir: str, calib: str, out: str, batch_size: int
) -> dict:
    cmd = [str(python), "-m", "benchmarks.oneshot", "--worker", tool, "--method", method, "--pattern", pattern]
    cmd += ["--model", model_dir, "--calibration", calib, "--out", out, "--batch-size", str(batch_size)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)  # llm-compressor logs a lot
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} {method} {pattern} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@torch.no_grad()
def reconstruction_errors(model: Any, ids: torch.Tensor, pruned: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per layer ``||W X - W' X||^2 / ||W X||^2`` with X the dense model's inputs to that layer."""
    sums: dict[str, list[float]] = {n: [0.0, 0.0] for n in pruned if n != "lm_head"}
    modules = dict(model.named_modules())
    hooks = []
    for name in sums:
        layer = modules[name]

        def hook(module: Any, args: tuple, name: str = name) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            dense = x @ module.weight.T
            diff = x @ (module.weight - pruned[name]).T
            sums[name][0] += float(diff.square().sum())
            sums[name][1] += float(dense.square().sum())

        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        for i in range(0, ids.shape[0], 8):
            model(input_ids=ids[i : i + 8])
    finally:
        for h in hooks:
            h.remove()
    return {n: a / b for n, (a, b) in sums.items()}


def calibration_ids(tokenizer: Any, rows: int = 32, seq_len: int = 256, seed: int = 0) -> torch.Tensor:
    from experiments.llm import bbc_splits, pack

    ids = pack(bbc_splits(seed)["train"], tokenizer, seq_len)
    return ids[torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(seed))[:rows]]


def tiny_model_dir(folder: Path) -> str:
    """A tiny random Llama with a small tokenizer, saved like the pretrained one (for smoke runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from experiments.llm import bbc_splits, train_tokenizer

    tokenizer = train_tokenizer(bbc_splits()["train"][:100], 512)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def measure(repeats: int = 2, quick: bool = False, python: Path = LLMC_PYTHON) -> dict[str, Any]:
    """Both tools on every case, alternating, ``repeats`` times; medians of time and memory, errors."""
    from experiments.llm import load, pretrain

    if not python.exists():
        return {"note": f"llm-compressor not run: {python} does not exist (`make bench` builds it)"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model_dir(Path(tmp) / "tiny") if quick else str(pretrain())
        dense, tokenizer = load(model_dir)
        ids = calibration_ids(tokenizer, rows=8 if quick else 32, seq_len=64 if quick else 256)
        cases = CASES[:1] if quick else CASES
        calib = str(Path(tmp) / "calibration.pt")
        torch.save(ids, calib)
        for method, pattern in cases:
            # llm-compressor with the same batches of 8 as ours, and with its default batch size (1)
            variants = {"llmcompressor": (python, 8), "ours": (Path(sys.executable), 8)}
            variants["llmcompressor, batch 1"] = (python, 1)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
            errors: dict[str, dict[str, float]] = {}
            for _ in range(1 if quick else repeats):
                for name, (exe, batch) in variants.items():
                    tool = name.split(",")[0]
                    out = str(Path(tmp) / f"{tool}.pt")
                    runs[name].append(_run_worker(exe, tool, method, pattern, model_dir, calib, out, batch))
                    if batch == 8:
                        errors[tool] = reconstruction_errors(dense, ids, torch.load(out, weights_only=True))
            layers = sorted(errors["ours"])
            ratio = [errors["ours"][n] / errors["llmcompressor"][n] for n in layers]
            row = {
                "method": method,
                "pattern": pattern,
                "seconds": {t: statistics.median(r["seconds"] for r in v) for t, v in runs.items()},
                "added_mb": {t: statistics.median(r["added_mb"] for r in v) for t, v in runs.items()},
                "peak_mb": {t: statistics.median(r["peak_mb"] for r in v) for t, v in runs.items()},
                "error_mean": {t: statistics.mean(errors[t].values()) for t in errors},
                "error_ratio_median": statistics.median(ratio),
                "error_ratio_max": max(ratio),
                "error_ratio_min": min(ratio),
            }
            row["time_ratio"] = row["seconds"]["ours"] / row["seconds"]["llmcompressor"]
            row["time_ratio_default_batch"] = row["seconds"]["ours"] / row["seconds"]["llmcompressor, batch 1"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"rows": rows, "calibration": list(ids.shape), "model": model_dir, "repeats": repeats}


@torch.no_grad()
def reference_sparsegpt(
    weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, block: int = 128, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """SparseGPT as the paper's Algorithm 1 reads (arXiv:2301.00774), float32, unstructured; the pruned weight.

    The straightforward form: damp the Hessian, invert it, take the upper Cholesky factor; per block of
    columns choose the mask from ``w^2 / [H^-1]_jj^2``, then per column zero the pruned weights and spread
    the error over the block's later columns; after the block, update all later columns with its errors.
    """
    W = weight.clone().to(dtype)
    H = hessian.clone().to(dtype)
    H += 0.01 * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=dtype)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    for i1 in range(0, W.shape[1], block):
        i2 = min(i1 + block, W.shape[1])
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        scores = W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2
        mask1 = scores <= torch.sort(scores.flatten())[0][int(scores.numel() * sparsity)]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


def layer_speed(repeats: int = 7, size: int = 1024, tokens: int = 4096) -> dict[str, Any]:
    """``sparsegpt_prune`` against :func:`reference_sparsegpt` on one Linear, alternating in one process."""
    from lightning_prune.oneshot import sparsegpt_prune

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(size, size, generator=g)
    x = torch.randn(tokens, size, generator=g) @ (torch.eye(size) + torch.randn(size, size, generator=g) / size**0.5)
    hessian = 2 / tokens * x.T @ x
    ratios = []
    for _ in range(repeats):
        start = time.perf_counter()
        ours, _ = sparsegpt_prune(weight, hessian, 0.5)
        mine = time.perf_counter() - start
        start = time.perf_counter()
        reference = reference_sparsegpt(weight, hessian, 0.5)
        ratios.append(mine / (time.perf_counter() - start))
    exact = reference_sparsegpt(weight, hessian, 0.5, dtype=torch.float64)  # the same algorithm in float64

    def agreement(a: torch.Tensor) -> float:
        return float(((a == 0) == (exact == 0)).float().mean())

    def error(a: torch.Tensor) -> float:
        return float(((weight - a.float()) @ x.T).square().sum() / (weight @ x.T).square().sum())

    return {
        "size": size,
        "tokens": tokens,
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "agreement_float64": {"ours": agreement(ours), "reference": agreement(reference)},
        "error": {"ours": error(ours), "reference": error(reference), "float64": error(exact)},
    }


def depth_worker(depth: int, method: str, tokens: tuple[int, int] = (32, 256)) -> dict[str, Any]:
    """Peak memory that ``prune_oneshot`` adds to a random Llama of ``depth`` layers (hidden 256), in MB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_prune.oneshot import prune_oneshot

    torch.manual_seed(0)
    config = {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4}
    model = LlamaForCausalLM(LlamaConfig(**config, num_hidden_layers=depth, tie_word_embeddings=False)).eval()
    ids = torch.randint(0, 4096, tokens, generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[i : i + 8]} for i in range(0, tokens[0], 8)]
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    with torch.no_grad():
        model(**batches[0])  # first-use allocations of torch and transformers are not pruning's
    before = _reset_peak()
    prune_oneshot(model, batches, method, SPARSITY, op_types="Linear", exclude=r"lm_head")
    return {"depth": depth, "model_mb": model_mb, "added_mb": _status_mb("VmHWM") - before}


def memory_by_depth(depths: tuple[int, ...] = (2, 4, 8, 16), method: str = "sparsegpt") -> list[dict[str, Any]]:
    """:func:`depth_worker` for each depth, each in a fresh process."""
    rows = []
    for depth in depths:
        cmd = [sys.executable, "-m", "benchmarks.oneshot", "--depth", str(depth), "--method", method]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=("ours", "llmcompressor"))
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--model")
    parser.add_argument("--calibration")
    parser.add_argument("--out")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layer", action="store_true", help="only the per-layer speed against the reference")
    parser.add_argument("--depth", type=int, help="a depth_worker run: peak memory added at this depth")
    parser.add_argument("--memory", action="store_true", help="only the peak memory against depth")
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.method, args.pattern, args.model, args.calibration, args.out, args.batch_size)
        print(json.dumps(result))
    elif args.depth:
        print(json.dumps(depth_worker(args.depth, args.method)))
    elif args.memory:
        print(json.dumps(memory_by_depth(method=args.method), indent=1))
    elif args.layer:
        print(json.dumps(layer_speed(3 if args.quick else 7), indent=1))
    else:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(measure(args.repeats, args.quick), indent=1))


if __name__ == "__main__":
    main()
