"""Pruning sharded models under ModelParallelStrategy (FSDP2, tensor parallel, both), on CPU with gloo.

Each job is ``sharded_train.py`` (or ``sharded_loop.py`` under torchrun) in subprocesses bounded by a timeout,
so that a collective one rank skips fails the test instead of hanging it. Runs are compared with the same
run under ``strategy="ddp"``: same data order, same global batch, one thread per rank.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_prune.patterns import parse_pattern
from lightning_prune.selection import UnitShard, prune_lowest, select

HERE = Path(__file__).parent
TIMEOUT = 300


def _job(out: Path, *args: str, script: str = "sharded_train.py", torchrun: int = 0) -> dict[str, Any]:
    command = [sys.executable, str(HERE / script), str(out), *args]
    if torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", *command[1:]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out / "result.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Jobs by their arguments, each run once per module."""
    cache: dict[tuple[str, ...], tuple[Path, dict[str, Any]]] = {}

    def run(*args: str, **kwargs: Any) -> tuple[Path, dict[str, Any]]:
        key = (*args, *(f"{k}={v}" for k, v in kwargs.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp("job")
            cache[key] = (out, _job(out, *args, **kwargs))
        return cache[key]

    return run


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ in any bit."""
    assert set(a) == set(b)
    return [k for k in a if not torch.equal(a[k], b[k])]


def _gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> float:
    """The largest difference between same-named tensors."""
    return max(float((a[k] - b[k]).abs().max()) for k in a if k not in skip)


# ---------------------------------------------------------------------------- the default suite: one of each
def test_fsdp2_equals_ddp_bit_for_bit_with_half_the_mask_bytes_and_a_consolidated_checkpoint(runs, tmp_path):
    ckpt_dir, fsdp = runs("--mode", "fsdp", "--every", "4")
    _, ddp = runs("--mode", "ddp")
    assert _same(fsdp["masks"], ddp["masks"]) == []
    assert _same(fsdp["weights"], ddp["weights"]) == []
    assert set(fsdp["placements"].values()) == {"(Shard(dim=0),)"}  # masks placed like their parameters
    assert fsdp["mask_elements_rank0"] * 2 == ddp["mask_elements_rank0"]  # each rank holds its shard's mask
    assert len(set(fsdp["sparsity"])) == 1 and fsdp["sparsity"] == ddp["sparsity"]  # global, on every rank
    assert fsdp["sparsity"][0] == pytest.approx(0.7, abs=0.02)

    from lightning_prune.export import consolidate_checkpoint

    sys.path.insert(0, str(HERE))
    from sharded_train import Net

    path = consolidate_checkpoint(ckpt_dir / "ckpt" / "epoch=2-step=12.ckpt", tmp_path / "whole.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    plain = Net("single")
    plain.load_state_dict(checkpoint["state_dict"], strict=True)
    (state,) = [s for key, s in checkpoint["callbacks"].items() if key.startswith("Pruning")]
    assert _same(state["masks"], fsdp["masks"]) == []  # whole masks back in the callback state
    for fqn, mask in state["masks"].items():
        assert not plain.get_parameter(fqn).detach()[~mask].any()  # pruned weights are zero
    assert [len(group["params"]) for group in checkpoint["optimizer_states"][0]["param_groups"]] == [8]


def test_shards_that_cut_units_are_refused_alike_on_each_rank_with_the_model_untouched(fake_rank):
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_prune import Pruner
    from lightning_prune.schedules import OneShot

    messages = []
    for rank in (0, 1):
        fake_rank(rank)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(12, 26), nn.ReLU(), nn.Linear(26, 8))
        mesh = init_device_mesh("cpu", (2,))
        for layer in (net[0], net[2]):
            fully_shard(layer, mesh=mesh)
        before = [p.to_local().clone() for p in net.parameters()]
        with pytest.raises(ValueError) as info:
            Pruner(net, 0.5, "4x1", schedule=OneShot(step=0))
        messages.append(str(info.value))
        assert all(torch.equal(b, p.to_local()) for b, p in zip(before, net.parameters()))
        Pruner(net, 0.5, "1x1", schedule=OneShot(step=0))  # unstructured never cuts a unit
    assert messages[0] == messages[1]  # both ranks judge every rank's shard: the same error everywhere
    assert messages[0].startswith(
        "pattern '4x1' cannot prune '0.weight' (26, 12) as it is sharded (Shard(dim=0) over 2 ranks): the shard "
        "[0:13, 0:12] of rank 0 cuts its units"
    )


@pytest.mark.slow
def test_a_shard_that_cuts_units_is_refused_before_training_on_every_rank(tmp_path):
    done = subprocess.run(
        [sys.executable, str(HERE / "sharded_train.py"), str(tmp_path), "--mode", "fsdp", "--hidden", "26"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode != 0
    message = "pattern '4x1' cannot prune 'net.0.weight' (26, 12) as it is sharded (Shard(dim=0) over 2 ranks)"
    assert done.stderr.count(message) >= 2, done.stderr[-3000:]  # rank 0 and rank 1 alike
    assert "the shard [0:13, 0:12] of rank 0 cuts its units" in done.stderr
    assert not (tmp_path / "result.pt").exists()  # no step was taken


def _select_shards(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randint(0, 50, (7, 6), generator=g).float()  # many ties, split by rows: 4 + 3
        b = torch.randint(0, 50, (5, 4), generator=g).float()  # replicated: rank 0 counts it
        c = torch.randint(0, 50, (3, 8), generator=g).float()  # split by columns: 4 + 4, rank 1 empty rows
        mine = [a[:4] if rank == 0 else a[4:], b, c[:, :4] if rank == 0 else c[:, 4:]]
        shards = [
            UnitShard(True, (7, 6), (0, 0) if rank == 0 else (4, 0)),
            UnitShard(rank == 0, (5, 4), (0, 0)),
            UnitShard(True, (3, 8), (0, 0) if rank == 0 else (0, 4)),
        ]
        picks = {
            "global": select(mine, [1, 1, 1], [42, 20, 24], 0.6, "global", 0.1, 0.8, dist.group.WORLD, shards),
            "local": select(mine, [1, 1, 1], [42, 20, 24], 0.6, "local", group=dist.group.WORLD, shards=shards),
            "lowest": prune_lowest(mine, [1, 1, 1], 33, True, dist.group.WORLD, shards),
        }
        torch.save(picks, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_selection_over_shards_and_replicas_equals_one_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 50, (7, 6), generator=g).float()
    b = torch.randint(0, 50, (5, 4), generator=g).float()
    c = torch.randint(0, 50, (3, 8), generator=g).float()
    expected = {
        "global": select([a, b, c], [1, 1, 1], [42, 20, 24], 0.6, "global", 0.1, 0.8),
        "local": select([a, b, c], [1, 1, 1], [42, 20, 24], 0.6, "local"),
        "lowest": prune_lowest([a, b, c], [1, 1, 1], 33, True),
    }
    out = str(tmp_path / "picks")
    torch.multiprocessing.spawn(_select_shards, args=(2, f"file://{tmp_path / 'rdv'}", out), nprocs=2)
    got = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    for kind, (pa, pb, pc) in expected.items():
        assert torch.equal(torch.cat([got[0][kind][0], got[1][kind][0]]), pa), kind
        assert torch.equal(got[0][kind][1], pb) and torch.equal(got[1][kind][1], pb), kind  # replicas agree
        assert torch.equal(torch.cat([got[0][kind][2], got[1][kind][2]], dim=1), pc), kind


@pytest.mark.parametrize(
    ("pattern", "shape", "offset", "local", "expected"),
    [
        ("4x1", (32, 12), (16, 0), (16, 12), ((8, 12), (4, 0), False)),
        ("4x1", (26, 12), (13, 0), (13, 12), None),  # 13 rows cut a block
        ("4x1", (26, 12), (16, 0), (10, 12), ((7, 12), (4, 0), False)),  # the last shard ends the weight
        ("2:4", (8, 32), (0, 16), (8, 16), ((8, 8), (0, 4), False)),
        ("2:4", (8, 30), (0, 15), (8, 15), None),
        ("channelx1", (32, 12), (16, 0), (16, 12), ((12,), (0,), True)),  # a column across the split rows
        ("1xchannel", (32, 12), (16, 0), (16, 12), ((32,), (16,), False)),
        ("1x1", (5, 3), (0, 2), (5, 1), ((5, 3), (0, 2), False)),
        ("4x1", (8, 4, 3, 3), (0, 2, 0, 0), (8, 2, 3, 3), None),  # a convolution split along input channels
    ],
)
def test_shard_units_say_where_a_shards_units_are(pattern, shape, offset, local, expected):
    assert parse_pattern(pattern).shard_units(shape, offset, local) == expected


def test_flat_sharding_strategies_are_refused_naming_model_parallel_strategy():
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    from lightning_prune.callbacks.masked import _check_strategy

    class Stub:
        def __init__(self, strategy: object) -> None:
            self.strategy = strategy

    for cls in (FSDPStrategy, DeepSpeedStrategy):
        with pytest.raises(ValueError, match=f"strategy {cls.__name__} shards parameters as flat slices") as info:
            _check_strategy(Stub(cls.__new__(cls)))  # type: ignore[arg-type]
        assert "ModelParallelStrategy" in str(info.value)
    _check_strategy(Stub(ModelParallelStrategy.__new__(ModelParallelStrategy)))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- the full matrix (slow)
@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ("--pattern", "2:4", "--criterion", "magnitude", "--scope", "local"),
        ("--pattern", "unstructured", "--criterion", "snip"),
        ("--pattern", "channelx1", "--criterion", "snip"),  # channels summed across the split rows
        ("--pattern", "1xchannel", "--criterion", "gradient"),  # with the BatchNorm after the layer coupled
        ("--callback", "progressive"),
        ("--callback", "group_lasso"),
        ("--callback", "lock"),
        ("--pattern", "ffn", "--criterion", "snip_momentum"),  # neurons: rows of one Linear, columns of the next
        ("--callback", "feedback", "--pattern", "unstructured", "--criterion", "magnitude", "--lr", "0.05"),
        ("--pattern", "unstructured", "--criterion", "magnitude", "--scope", "lamp"),  # layers' scores gathered
        ("--pattern", "ffn", "--criterion", "magnitude", "--scope", "lamp"),
    ],
    ids=[
        "2:4-magnitude-local",
        "unstructured-snip",
        "channelx1",
        "1xchannel-bn",
        "progressive",
        "lasso",
        "lock",
        "ffn",
        "feedback",
        "unstructured-lamp",
        "ffn-lamp",
    ],
)
def test_fsdp2_equals_ddp_bit_for_bit_for_every_callback_and_pattern(runs, args):
    _, fsdp = runs("--mode", "fsdp", *args)
    _, ddp = runs("--mode", "ddp", *args)
    assert _same(fsdp["masks"], ddp["masks"]) == []
    assert _same(fsdp["weights"], ddp["weights"]) == []
    assert len(set(fsdp["sparsity"])) == 1 and fsdp["sparsity"] == ddp["sparsity"]
    if "1xchannel" in args:  # a pruned row's bias and BatchNorm entries are zero as well
        dead = ~fsdp["masks"]["net.2.weight"].any(dim=1)
        assert dead.any()
        for name in ("net.2.bias", "net.3.weight", "net.3.bias"):
            assert not fsdp["weights"][name][dead].any(), name


@pytest.mark.slow
def test_gradient_accumulation_sharded_keeps_the_masks_of_ddp(runs):
    # FSDP2 reduces every micro-batch while DDP reduces their sum: the same masks, weights up to float order
    _, fsdp = runs("--mode", "fsdp", "--accumulate", "2")
    _, ddp = runs("--mode", "ddp", "--accumulate", "2")
    assert _same(fsdp["masks"], ddp["masks"]) == []
    # the bias feeding the BatchNorm gets gradients that are float noise, which Adam scales up: left out
    assert 0 < _gap(fsdp["weights"], ddp["weights"], skip=("net.2.bias",)) < 1e-6
    assert fsdp["sparsity"] == ddp["sparsity"]


@pytest.mark.slow
def test_tensor_parallel_and_2d_mesh_give_the_masks_of_ddp(runs):
    _, tp = runs("--mode", "tp", "--devices", "2")
    _, ddp1 = runs("--mode", "ddp", "--devices", "1")
    assert tp["placements"] == {
        "net.0.weight": "(Shard(dim=0),)",
        "net.2.weight": "(Shard(dim=1),)",
        "net.5.weight": "plain",
    }
    assert _same(tp["masks"], ddp1["masks"]) == []
    assert tp["sparsity"] == [ddp1["sparsity"][0]] * 2  # the replicated last layer counted once
    _, mesh2d = runs("--mode", "fsdp_tp", "--devices", "4")
    _, ddp2 = runs("--mode", "ddp")
    assert "_StridedShard" in mesh2d["placements"]["net.0.weight"]
    assert _same(mesh2d["masks"], ddp2["masks"]) == []
    assert mesh2d["sparsity"] == [ddp2["sparsity"][0]] * 4


@pytest.mark.slow
def test_lamp_under_tensor_parallel_counts_the_replicated_layer_once(runs):
    lamp = ("--pattern", "unstructured", "--criterion", "magnitude", "--scope", "lamp")
    _, tp = runs("--mode", "tp", "--devices", "2", *lamp)
    _, ddp1 = runs("--mode", "ddp", "--devices", "1", *lamp)
    assert _same(tp["masks"], ddp1["masks"]) == []
    _, ranked = runs("--mode", "ddp", "--devices", "1", "--pattern", "unstructured", "--criterion", "magnitude")
    assert _same(ranked["masks"], ddp1["masks"]) != []  # LAMP allocates otherwise than the global ranking


@pytest.mark.slow
def test_coupled_neurons_under_tensor_parallel_give_the_masks_of_ddp(runs):
    # a neuron is a row of the column-wise sharded net.0 and a column of the row-wise sharded net.2
    _, tp = runs("--mode", "tp", "--devices", "2", "--pattern", "ffn")
    _, ddp1 = runs("--mode", "ddp", "--devices", "1", "--pattern", "ffn")
    assert _same(tp["masks"], ddp1["masks"]) == []
    dead = ~tp["masks"]["net.0.weight"].any(dim=1)
    assert 0 < int(dead.sum()) < 32 and torch.equal(dead, ~tp["masks"]["net.2.weight"].any(dim=0))


@pytest.mark.slow
def test_resume_from_a_sharded_checkpoint_same_and_other_world_sizes(runs, tmp_path):
    full_dir, full = runs("--mode", "fsdp", "--every", "4")
    resumed = _job(tmp_path / "same", "--mode", "fsdp", "--resume", str(full_dir / "ckpt" / "epoch=0-step=4.ckpt"))
    assert _same(resumed["masks"], full["masks"]) == [] and _same(resumed["weights"], full["weights"]) == []
    # across world sizes: without BatchNorm (its statistics are per rank) two uninterrupted runs on 1 and 2
    # ranks differ only by float summation order; resuming from one on the other keeps the masks
    two_dir, two = runs("--mode", "fsdp", "--every", "4", "--no-norm")
    one_dir, one = runs("--mode", "fsdp", "--devices", "1", "--every", "4", "--no-norm")
    assert _same(one["masks"], two["masks"]) == [] and _gap(one["weights"], two["weights"]) < 1e-6
    ckpt = "epoch=0-step=4.ckpt"
    down = _job(
        tmp_path / "2to1", "--mode", "fsdp", "--devices", "1", "--no-norm", "--resume", str(two_dir / "ckpt" / ckpt)
    )
    up = _job(tmp_path / "1to2", "--mode", "fsdp", "--no-norm", "--resume", str(one_dir / "ckpt" / ckpt))
    assert _same(down["masks"], two["masks"]) == [] and _gap(down["weights"], two["weights"]) < 1e-6
    assert _same(up["masks"], one["masks"]) == [] and _gap(up["weights"], one["weights"]) < 1e-6


@pytest.mark.slow
def test_feedback_resumes_from_a_sharded_checkpoint_inside_the_window(runs, tmp_path):
    # a learning rate high enough for pruned weights to come back within the 8-step window
    setting = ("--mode", "fsdp", "--pattern", "unstructured", "--criterion", "magnitude", "--lr", "0.05")
    full_dir, full = runs(*setting, "--callback", "feedback", "--every", "4")  # step 4 is inside the window
    ckpt = str(full_dir / "ckpt" / "epoch=0-step=4.ckpt")
    resumed = _job(tmp_path / "same", *setting, "--callback", "feedback", "--resume", ckpt)
    assert _same(resumed["masks"], full["masks"]) == [] and _same(resumed["weights"], full["weights"]) == []
    _, plain = runs(*setting)
    assert _same(full["masks"], plain["masks"]), "feedback chose other masks than plain pruning"


@pytest.mark.slow
def test_the_engine_in_a_plain_torchrun_loop_and_in_fabric_gives_the_callbacks_masks(runs, tmp_path):
    _, callback = runs("--mode", "fsdp")
    loop = _job(tmp_path / "loop", script="sharded_loop.py", torchrun=2)
    assert _same(loop["masks"], callback["masks"]) == []
    assert loop["events"] == [[0, 2, 4, 6, 8]] * 2
    # an inf in rank 1's gradient shard only: both ranks skip that step's event (fp16 with a GradScaler)
    skipped = _job(tmp_path / "nonfinite", "--nonfinite", "4", script="sharded_loop.py", torchrun=2)
    assert skipped["events"] == [[0, 2, 5, 6, 8]] * 2
    # and in Lightning Fabric, its ModelParallelStrategy sharding the model with the same plan
    fabric = _job(tmp_path / "fabric", "--fabric", script="sharded_loop.py")
    assert _same(fabric["masks"], callback["masks"]) == []


def test_one_shot_refuses_sharded_weights_alike_on_each_rank_with_the_model_untouched(fake_rank):
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_prune.oneshot import prune_oneshot

    messages = []
    for rank in (0, 1):
        fake_rank(rank)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))
        fully_shard(net, mesh=init_device_mesh("cpu", (2,)))
        before = [p.to_local().clone() for p in net.parameters()]
        with pytest.raises(ValueError) as info:
            prune_oneshot(net, [torch.randn(4, 12)], "sparsegpt", 0.5)
        messages.append(str(info.value))
        assert all(torch.equal(b, p.to_local()) for b, p in zip(before, net.parameters()))
    assert messages[0] == messages[1]
    assert messages[0].startswith("one-shot pruning cannot prune sharded weights (0.weight, 2.weight)")
