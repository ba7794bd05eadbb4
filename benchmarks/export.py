"""What export buys: CPU latency, parameters and MACs of dense, masked and slimmed models; checkpoint sizes.

Models are pruned by the `Pruning` callback itself (one-shot magnitude at step 0, a few training steps on
random data), so masks and the zeroed coupled bias/BatchNorm entries are exactly what training leaves.
Latencies: the three variants run alternately, in one process, batch after batch; medians of per-round
ratios to dense are reported (timings on shared machines drift).

- cnn: the benchmark CNN (conv-BN-ReLU stages) at 50% output channels, every conv.
- resnet: the sample ResNetSmall at 50% output channels of the layers outside residual additions
  (each block's first conv and the stem), the channels slim can remove without changing outputs.
- minilm: MiniLM-L6 with 50% of its FFN intermediate neurons (1xchannel on intermediate.dense).
- checkpoint: MiniLM at 90% unstructured: save_sparse against a dense safetensors file.

Usage: python benchmarks/export.py [--rounds 100] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import cnn
from experiments.models import Classifier, MiniLM, ResNetSmall
from experiments.timing import latency
from lightning_prune import Pruning
from lightning_prune.export import make_permanent, save_sparse, slim
from lightning_prune.schedules import OneShot


def prune(net: nn.Module, inputs: torch.Tensor, classes: int, **pruning: Any) -> dict[str, torch.Tensor]:
    """Masks from the Pruning callback after 3 steps on random data (prefix 'net.' removed)."""
    model = Classifier(net, num_classes=classes, schedule="constant", lr=1e-4)
    cb = Pruning(schedule=OneShot(step=0), criterion="magnitude", **pruning)
    data = TensorDataset(inputs, torch.randint(0, classes, (len(inputs),)))
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=max(1, len(inputs) // 3)))
    return {k.removeprefix("net."): v for k, v in cb.masks.items()}


def compare(title: str, net: nn.Module, masks: dict[str, torch.Tensor], x: torch.Tensor, rounds: int) -> None:
    masked = make_permanent(net, masks)
    small, report = slim(net, masks, x[:2])
    ratios = latency({"dense": net, "masked": masked, "slimmed": small}, x, rounds)
    print(
        f"| {title} | {ratios['masked']:.2f}x | {ratios['slimmed']:.2f}x | "
        f"{report['params_before'] / 1e6:.3f}M → {report['params_after'] / 1e6:.3f}M | "
        f"{report['macs_before'] / 1e6:.1f}M → {report['macs_after'] / 1e6:.1f}M |",
        flush=True,
    )


def versus_torch_pruning(rounds: int, quick: bool = False) -> dict[str, Any]:
    """The benchmark CNN at 50% output channels of every conv: our pruning + `slim` against Torch-Pruning alone.

    Ours: the `Pruning` callback (1xchannel, magnitude, local) during training, then `slim`. Torch-Pruning
    alone: its `MagnitudePruner` (L1 importance, 50% of every conv's channels, the classifier kept) on the
    same dense network. Latencies alternate with dense in one process; medians of per-round ratios.
    """
    import torch_pruning as tp

    batch = 8 if quick else 64
    torch.manual_seed(0)
    x = torch.randn(batch, 1, 28, 28)
    net = cnn()
    masks = prune(net, x, 10, target_sparsity=0.5, pattern="1xchannel", scope="local", op_types="Conv2d")
    ours, report = slim(net, masks, x[:2])
    alone = copy.deepcopy(net)
    pruner = tp.pruner.MagnitudePruner(
        alone,
        x[:2],
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[m for m in alone.modules() if isinstance(m, nn.Linear)],
    )
    pruner.step()
    ratios = latency({"dense": net, "ours": ours, "torch-pruning": alone}, x, rounds)
    # Each ratio to dense swings with the machine's state between runs (0.29x to 0.42x seen); the two slim
    # models timed against each other are the comparison that holds still.
    head_to_head = latency({"torch-pruning": alone, "ours": ours}, x, rounds)["ours"]
    macs, params = tp.utils.count_ops_and_params(alone.eval(), x[:2])
    return {
        "model": f"cnn 28x28, batch {batch}, 50% output channels of every conv",
        "ours_over_torch_pruning": head_to_head,
        "ours": {"latency": ratios["ours"], "params": report["params_after"], "macs": report["macs_after"] / 2},
        "torch-pruning": {"latency": ratios["torch-pruning"], "params": params, "macs": macs / 2},
        "dense": {"latency": 1.0, "params": report["params_before"], "macs": report["macs_before"] / 2},
    }


def _unit_importance(keep: dict[nn.Module, tuple[str, torch.Tensor]]) -> Any:
    """A Torch-Pruning importance that scores each channel 1 if its unit is kept and 0 if removed.

    ``keep`` maps a Linear to ("out" or "in", a bool per output row or input column). A group is scored from
    its root, the layer Torch-Pruning ranks it by; groups rooted elsewhere (the hidden size) are not pruned.
    """
    import torch_pruning as tp

    class Kept(tp.importance.Importance):
        @torch.no_grad()
        def __call__(self, group: Any) -> torch.Tensor | None:
            root = group[0].dep.target.module
            if root not in keep:
                return None
            is_out = getattr(group[0].dep.handler, "__name__", "") == "prune_out_channels"
            where, kept = keep[root]
            if (where == "out") != is_out:
                return None
            idxs = torch.as_tensor([int(i) for i in group[0].idxs])
            return kept[idxs].float()

    return Kept()


def heads_versus_torch_pruning(rounds: int, quick: bool = False) -> dict[str, Any]:
    """MiniLM-L6 with 25% of its heads and 50% of its FFN neurons removed: our `slim` against Torch-Pruning's.

    The same units go in both: masks from the `head` and `ffn` patterns (magnitude, local: 3 of 12 heads and
    768 of 1536 neurons in every layer). Ours: `slim` of the masked model. Torch-Pruning: its `BasePruner` on
    the dense model with `num_heads` of every query/key/value projection, `prune_num_heads=True` and the
    same per-layer ratios (its example for Hugging Face BERT), ranking by an importance that is 1 for the kept
    units and 0 for the removed ones, then the attention modules' head counts set as its example does. The two
    slimmed models run alternately in one process; the median of per-round ratios is reported. ``quick``: a
    random 2-layer BERT.
    """
    import torch_pruning as tp

    from experiments.structured_results import magnitude_masks
    from lightning_prune.structure import find_attention, find_ffn, linear_at

    if quick:
        config = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "num_hidden_layers": 2}
        net, length, batch = MiniLM(pretrained=False, config=config), 16, 2
    else:
        net, length, batch = MiniLM(), 128, 8
    net.eval()
    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, 2, length))
    ids[:, 1] = 1
    masks = magnitude_masks(net, {"head": 0.25, "ffn": 0.5}, None, scope="local")  # zeroes them in net
    ours, report = slim(net, masks, ids[:2])

    theirs = copy.deepcopy(net)
    keep: dict[nn.Module, tuple[str, torch.Tensor]] = {}
    num_heads: dict[nn.Module, int] = {}
    ratios: dict[nn.Module, float] = {}
    for layout in find_attention(net):
        kept_columns = (masks[f"{layout.o}.weight"] != 0).any(dim=0)
        keep[linear_at(theirs, layout.o)] = ("in", kept_columns)
        for name in (layout.q, layout.k, layout.v):
            keep[linear_at(theirs, name)] = ("out", kept_columns)
            num_heads[linear_at(theirs, name)] = layout.num_heads
            ratios[linear_at(theirs, name)] = 1 - int(kept_columns.sum()) / kept_columns.numel()
    ffn_ratios = {}
    for ffn in find_ffn(net):
        kept = (masks[f"{ffn.output}.weight"] != 0).any(dim=0)
        keep[linear_at(theirs, ffn.output)] = ("in", kept)
        for name in ffn.inputs:
            keep[linear_at(theirs, name)] = ("out", kept)
            ffn_ratios[linear_at(theirs, name)] = 1 - int(kept.sum()) / kept.numel()
    pruner = tp.pruner.BasePruner(
        theirs,
        ids[:2],
        importance=_unit_importance(keep),
        global_pruning=False,
        pruning_ratio=0.0,
        pruning_ratio_dict={**ffn_ratios, **ratios},  # heads: Torch-Pruning skips a layer whose ratio is 0
        num_heads=num_heads,
        prune_head_dims=False,
        prune_num_heads=True,
        head_pruning_ratio=0.25,
        head_pruning_ratio_dict=ratios,
    )
    pruner.step()
    for module in theirs.modules():
        if hasattr(module, "attention_head_size") and getattr(module, "query", None) in pruner.num_heads:
            module.num_attention_heads = pruner.num_heads[module.query]
            module.all_head_size = module.query.out_features
    with torch.no_grad():
        difference = float((ours(ids) - theirs(ids)).abs().max())
    _, params_theirs = tp.utils.count_ops_and_params(theirs, ids[:2])
    ratio = latency({"torch-pruning": theirs, "ours": ours}, ids, rounds)["ours"]
    to_dense = latency({"dense": net, "ours": ours, "torch-pruning": theirs}, ids, max(3, rounds // 4))
    return {
        "model": f"{'random 2-layer BERT' if quick else 'MiniLM-L6'}, batch {batch} x {length} tokens, "
        "25% of heads and 50% of FFN neurons in every layer",
        "ours_over_torch_pruning": ratio,
        "rounds": rounds,
        "max_output_difference": difference,
        "heads_removed": sum(report["heads"].values()),
        "neurons_removed": sum(report["neurons"].values()),
        "params": {"dense": report["params_before"], "ours": report["params_after"], "torch-pruning": params_theirs},
        "latency_to_dense": {"ours": to_dense["ours"], "torch-pruning": to_dense["torch-pruning"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="small inputs and few rounds, to check that it runs")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rounds = 3 if args.quick else args.rounds
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds; median ratios to dense\n")
    print("| model | masked latency | slimmed latency | parameters | MACs |")
    print("|---|---|---|---|---|")

    batch = 8 if args.quick else 64
    x = torch.randn(batch, 1, 28, 28)
    net = cnn()
    masks = prune(net, x, 10, target_sparsity=0.5, pattern="1xchannel", scope="local", op_types="Conv2d")
    compare(f"cnn 28x28, batch {batch}, 50% output channels", net, masks, x, rounds)

    x = torch.randn(batch, 1, 28, 28)
    net = ResNetSmall(widths=(32, 64, 128))
    outside = r"net\.(stem\.0|stages\.\d+\.conv1)"
    masks = prune(net, x, 10, target_sparsity=0.5, pattern="1xchannel", scope="local", include=outside)
    compare(f"resnet_small (32-64-128) 28x28, batch {batch}, 50% of non-residual channels", net, masks, x, rounds)

    length, batch = (16, 2) if args.quick else (128, 8)
    ids = torch.randint(1000, 20000, (batch, 2, length))
    ids[:, 1] = 1
    net = MiniLM(num_classes=5)
    ffn = r"net\.bert\.encoder\.layer\.\d+\.intermediate\.dense"
    masks = prune(net, ids, 5, target_sparsity=0.5, pattern="1xchannel", scope="local", include=ffn)
    compare(f"MiniLM-L6, batch {batch} x {length} tokens, 50% FFN neurons", net, masks, ids, rounds)

    net = MiniLM(num_classes=5)
    masks = prune(net, ids, 5, target_sparsity=0.9, pattern="unstructured", include=r"net\.bert\.encoder\..*")
    plain = make_permanent(net, masks)
    with tempfile.TemporaryDirectory() as tmp:
        dense_path, sparse_path = Path(tmp, "dense.safetensors"), Path(tmp, "sparse.safetensors")
        save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(dense_path))
        info = save_sparse(plain, sparse_path, masks)
        dense_size = dense_path.stat().st_size
        encoder = sum(m.numel() * 4 for m in masks.values())
    print(
        f"\ncheckpoint, MiniLM-L6 with its encoder Linears at 90% unstructured: dense safetensors "
        f"{dense_size / 1e6:.1f} MB, save_sparse {info['bytes'] / 1e6:.1f} MB ({info['bytes'] / dense_size:.3f}x); "
        f"the pruned encoder weights alone: {encoder / 1e6:.1f} MB dense"
    )
    net = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 2048))
    masks = {f"{i}.weight": torch.rand(2048, 2048) > 0.9 for i in (0, 1)}
    plain = make_permanent(net, masks)
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(Path(tmp, "d.safetensors")))
        info = save_sparse(plain, Path(tmp, "s.safetensors"), masks)
        ratio = info["bytes"] / Path(tmp, "d.safetensors").stat().st_size
    print(f"checkpoint, 2 x Linear(2048, 2048) at 90% unstructured (all weights masked): {ratio:.3f}x of dense")


if __name__ == "__main__":
    main()
