"""Smoke runs of the benchmarks: they run and write their tables. Nothing here looks at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INC_PYTHON = ROOT / ".venv-inc" / "bin" / "python"
LLMC_PYTHON = ROOT / ".venv-llmc" / "bin" / "python"


@pytest.mark.slow
def test_run_all_quick_writes_results(tmp_path: Path) -> None:
    cmd = [sys.executable, "benchmarks/run_all.py", "--quick", "--no-minilm", "--out", str(tmp_path)]
    cmd += ["--inc-python", str(tmp_path / "no-inc" / "python")]  # INC has its own test below
    cmd += ["--llmc-python", str(tmp_path / "no-llmc" / "python")]  # and so has llm-compressor
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "RESULTS.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.png").stat().st_size > 10_000
    rows = {(r["model"], r["tool"], r["method"]) for r in results["steps"]}
    for model in ("mlp 4x1024, batch 256", "cnn 28x28, batch 64"):
        for tool, method in [
            ("lightning_prune", "4x1:snip_momentum"),
            ("lightning_prune", "unstructured:magnitude"),
            ("ModelPruning", "unstructured:l1"),
        ]:
            assert (model, tool, method) in rows
            assert f"| {model} | {tool} | {method} |" in text
    for row in results["steps"]:
        assert row["sparsity"] == pytest.approx(0.8, abs=0.01), row  # every tool reached the same target
        assert row["held after"] >= 0.0
    assert "INC not run" in text
    assert set(results["selection"]) == {"0.2M", "0.4M"}
    assert "| Torch-Pruning alone |" in text
    assert "ours / Torch-Pruning = " in text
    slim = results["slim"]
    assert slim["ours"]["params"] == slim["torch-pruning"]["params"] < slim["dense"]["params"]
    assert slim["ours_over_torch_pruning"] > 0
    heads = results["heads"]
    assert heads["params"]["ours"] == heads["params"]["torch-pruning"] < heads["params"]["dense"]
    assert heads["max_output_difference"] < 1e-4, "both removed the same heads and neurons"
    assert heads["heads_removed"] == 2 and heads["neurons_removed"] == 128
    assert "ours / Torch-Pruning = " in text and "## Slimmed latency of whole heads" in text
    shard = results["sharded"]
    assert shard["held in window"] == pytest.approx(0.5, abs=0.05)  # each of 2 ranks: half the one-process 1.00x
    assert shard["held after"] == pytest.approx(0.25, abs=0.05)
    assert 0 < shard["sent per event, max (bytes)"] < shard["unit scores (bytes)"]
    assert shard["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert "## Sharded: FSDP2 over 2 processes" in text
    one = results["oneshot"]
    assert "llm-compressor not run" in one["llmcompressor"]["note"] and "llm-compressor not run" in text
    assert one["layer"]["agreement_float64"]["ours"] > 0.99, "ours chooses the weights the exact algorithm does"
    assert one["layer"]["error"]["ours"] == pytest.approx(one["layer"]["error"]["float64"], rel=1e-3)
    assert [m["depth"] for m in one["memory"]] == [1, 2] and all(m["added_mb"] > 0 for m in one["memory"])
    assert "ours / reference = " in text

    # one section again: the others are kept from results.json
    proc = subprocess.run([*cmd, "--sections", "slim"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["steps"] == results["steps"] and again["selection"] == results["selection"]
    assert "--sections slim" in again["meta"]["command"]


@pytest.mark.slow
def test_run_all_rejects_unknown_section(tmp_path: Path) -> None:
    cmd = [sys.executable, "benchmarks/run_all.py", "--quick", "--out", str(tmp_path), "--sections", "stepz"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--sections: 'stepz'; choose from steps, selection, slim, heads, sharded, oneshot" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not INC_PYTHON.exists(), reason="no .venv-inc (make bench builds it)")
def test_inc_worker_quick() -> None:
    cmd = [str(INC_PYTHON), "-m", "benchmarks.inc_worker", "--method", "4x1:snip_momentum", "--quick"]
    cmd += ["--repeats", "1", "--only", "mlp"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert row["tool"] == "INC 3.7.1" and row["sparsity"] == pytest.approx(0.8, abs=0.01)


@pytest.mark.slow
@pytest.mark.skipif(not LLMC_PYTHON.exists(), reason="no .venv-llmc (make bench builds it)")
def test_llmcompressor_comparison_quick() -> None:
    cmd = [sys.executable, "-m", "benchmarks.oneshot", "--quick"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout[proc.stdout.index("{\n") :])["rows"][0]
    assert (row["method"], row["pattern"]) == ("sparsegpt", "unstructured")
    assert set(row["seconds"]) == {"ours", "llmcompressor", "llmcompressor, batch 1"}
    assert row["added_mb"]["ours"] > 0 and row["added_mb"]["llmcompressor"] > 0
    # the first decoder layer sees the same inputs in both tools: the same algorithm gives the same error
    assert 0.9 < row["error_ratio_median"] < 1.1
