"""Under Lightning DDP (CPU, gloo, two processes) every rank holds the same masks after every event."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from conftest import make_loader, make_module
from ddp_train import fit

from lightning_prune import Pruning


def check_hashes(out: Path, target: float) -> None:
    saved = json.loads((out / "hashes.json").read_text())
    assert len(saved["rows"]) == 8
    for row in saved["rows"]:
        assert len(row) == 2 and row[0] == row[1], "ranks disagree"
    assert saved["sparsity"] == pytest.approx(target, abs=0.02)
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("prune/sparsity")]
    assert [int(r["step"]) for r in logged] == [0, 2, 4, 6], "each event logged once, by rank zero"


@pytest.mark.parametrize(
    ("pattern", "criterion"),
    [
        ("4x1", "snip_momentum"),
        pytest.param("2:4", "magnitude", marks=pytest.mark.slow),
        pytest.param("unstructured", "snip", marks=pytest.mark.slow),
        pytest.param("1xchannel", "gradient", marks=pytest.mark.slow),
        pytest.param("unstructured", "input_norms", marks=pytest.mark.slow),  # states reduced across ranks
    ],
)
def test_masks_identical_on_every_rank_under_ddp_spawn(tmp_path, pattern, criterion):
    target, cb = fit(tmp_path, "ddp_spawn", pattern, criterion)
    check_hashes(tmp_path, target)
    # the launching process gets the masks and the report back from rank zero
    assert set(cb.masks) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    assert cb.sparsity() == pytest.approx(target, abs=0.02)
    assert [row.name for row in cb.report()] == list(cb.masks)
    assert cb.state_dict()["last_event"] == 3


@pytest.mark.parametrize(
    ("pattern", "criterion"),
    [
        pytest.param("2:4", "snip_momentum", marks=pytest.mark.slow),
        pytest.param("4x1", "magnitude", marks=pytest.mark.slow),
        pytest.param("channelx1", "snip", marks=pytest.mark.slow),
    ],
)
def test_masks_identical_on_every_rank_under_ddp(tmp_path, pattern, criterion):
    """Plain ``ddp`` re-launches its script for rank 1, so the job runs as a script in a subprocess."""
    script = Path(__file__).parent / "ddp_train.py"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp_path),
            "--strategy",
            "ddp",
            "--pattern",
            pattern,
            "--criterion",
            criterion,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    check_hashes(tmp_path, 0.5 if ":" in pattern else 0.7)
    output = done.stdout + done.stderr
    assert output.count("Pruning: per-layer sparsity") == 1, "the report is printed once, on rank zero"


def _select_on_rank(rank: int, world: int, init: str, out: str, sizes: list[int], budget: int) -> None:
    from lightning_prune.selection import prune_lowest

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        tensors = [torch.randint(0, 5000, (n,), generator=g).float() for n in sizes]  # many ties
        mine = tensors[rank::world]
        unit = [1 if i % 2 else 2 for i in range(len(sizes))][rank::world]
        picks = prune_lowest(mine, unit, budget, nearest=True, group=dist.group.WORLD)
        torch.save(picks, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param([300, 50, 700, 20], marks=pytest.mark.slow),  # the default FSDP2 test splits selection too
        pytest.param([40_000, 30_000, 25_000, 1_000, 9_000], marks=pytest.mark.slow),
    ],
)
def test_counting_selection_split_across_processes_equals_one_process(tmp_path, sizes):
    from lightning_prune.selection import prune_lowest

    world = 2
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randint(0, 5000, (n,), generator=g).float() for n in sizes]
    units = [1 if i % 2 else 2 for i in range(len(sizes))]
    budget = int(0.6 * sum(n * u for n, u in zip(sizes, units)))
    # one process, tensors in (rank, position-on-rank) order
    order = [i for r in range(world) for i in range(r, len(sizes), world)]
    expected = prune_lowest([tensors[i] for i in order], [units[i] for i in order], budget, nearest=True)
    by_index = dict(zip(order, expected))
    out = str(tmp_path / "picks")
    init = f"file://{tmp_path / 'rendezvous'}"
    torch.multiprocessing.spawn(_select_on_rank, args=(world, init, out, sizes, budget), nprocs=world)
    for rank in range(world):
        picks = torch.load(f"{out}.{rank}", weights_only=True)
        for pick, index in zip(picks, range(rank, len(sizes), world)):
            assert torch.equal(pick, by_index[index]), (rank, index)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning runs FSDP on GPUs only")
def test_fsdp_is_refused_before_training_with_the_model_untouched():
    module = make_module("mlp", "adamw")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(
        max_steps=2, accelerator="gpu", devices=1, strategy="fsdp", callbacks=[Pruning(0.5, "4x1")], logger=False
    )
    with pytest.raises(ValueError, match="strategy FSDPStrategy shards parameters"):
        trainer.fit(module, make_loader(module))
    assert all(torch.equal(before[k], v.cpu()) for k, v in module.state_dict().items())


def test_sharding_strategies_are_refused_by_name():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from lightning_prune.callbacks.masked import _check_strategy

    class Stub:
        def __init__(self, strategy: object) -> None:
            self.strategy = strategy

    with pytest.raises(ValueError, match="strategy FSDPStrategy shards parameters"):
        _check_strategy(Stub(FSDPStrategy.__new__(FSDPStrategy)))  # type: ignore[arg-type]
    _check_strategy(Stub(DDPStrategy()))  # type: ignore[arg-type]
