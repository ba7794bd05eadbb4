"""Under Lightning DDP (CPU, gloo, two processes) every rank holds the same masks after every event."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from conftest import make_loader, make_module

from lightning_prune import Pruning
from lightning_prune.schedules import Iterative


class MaskHashes(pl.Callback):
    """After each step, every rank's mask hash, gathered; rank zero writes them to a file."""

    def __init__(self, pruning: Pruning, path: Path) -> None:
        self.pruning, self.path = pruning, path
        self.rows: list[list[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        digest = hashlib.sha256()
        for name, mask in sorted(self.pruning.masks.items()):
            digest.update(name.encode())
            digest.update(mask.cpu().numpy().tobytes())
        gathered: list[str] = [""] * trainer.world_size
        dist.all_gather_object(gathered, digest.hexdigest())
        self.rows.append(gathered)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.path.write_text(json.dumps({"rows": self.rows, "sparsity": self.pruning.sparsity()}))


@pytest.mark.parametrize(
    ("pattern", "criterion"),
    [
        ("4x1", "snip_momentum"),
        pytest.param("2:4", "magnitude", marks=pytest.mark.slow),
        pytest.param("unstructured", "snip", marks=pytest.mark.slow),
    ],
)
def test_masks_identical_on_every_rank_under_ddp_spawn(tmp_path, pattern, criterion):
    module = make_module("mlp", "adamw")
    target = 0.5 if pattern == "2:4" else 0.7
    cb = Pruning(
        target, pattern=pattern, criterion=criterion, schedule=Iterative(start_step=0, end_step=6, frequency=2)
    )
    out = tmp_path / "hashes.json"
    trainer = pl.Trainer(
        max_steps=8,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        callbacks=[cb, MaskHashes(cb, out)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    torch.manual_seed(0)
    trainer.fit(module, make_loader(module))
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == 8
    for row in saved["rows"]:
        assert len(row) == 2 and row[0] == row[1], "ranks disagree"
    assert saved["sparsity"] == pytest.approx(target, abs=0.02)


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


@pytest.mark.parametrize("sizes", [[300, 50, 700, 20], [40_000, 30_000, 25_000, 1_000, 9_000]])
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
