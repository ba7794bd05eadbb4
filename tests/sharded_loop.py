"""The engine without Lightning: a plain loop over a model sharded with FSDP2 ``fully_shard``, under torchrun.

Usage: torchrun --nproc_per_node 2 tests/sharded_loop.py OUT_DIR [--nonfinite STEP]
       python tests/sharded_loop.py OUT_DIR --fabric      (Lightning Fabric's ModelParallelStrategy launches it)

It trains the model of ``sharded_train.py`` on the same data order as Lightning's DistributedSampler gives,
with the same ``Pruner`` settings as its ``Pruning`` callback, so that its masks can be compared with the
callback's. ``--nonfinite STEP`` puts an inf into rank 1's gradient shard at that step with
``skip_nonfinite`` on (as under fp16): every rank must skip that step's scoring and event alike. Rank zero
writes ``OUT_DIR/result.pt`` (whole masks, the steps that had events on each rank).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).parent))
from sharded_train import Net, loader, whole

from lightning_prune import Pruner
from lightning_prune.schedules import Iterative


def shard(module: nn.Module, mesh: object) -> nn.Module:
    """FSDP2 as ``sharded_train.py`` does it: each Linear, then the network whose forward runs."""
    for layer in (module.net[0], module.net[2], module.net[5]):
        fully_shard(layer, mesh=mesh)
    fully_shard(module.net, mesh=mesh)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--nonfinite", type=int, default=-1)
    parser.add_argument("--fabric", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = Net("single")
    if args.fabric:
        from lightning.fabric import Fabric
        from lightning.fabric.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(
            lambda model, mesh: shard(model, mesh["data_parallel"]),
            data_parallel_size=2,
            tensor_parallel_size=1,
        )
        fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
        fabric.launch()
        wrapped = fabric.setup_module(module)  # parallelize_fn shards `module` in place
        optimizer = fabric.setup_optimizers(torch.optim.AdamW(module.parameters(), lr=0.01, weight_decay=0.1))
        backward = fabric.backward
        forward = wrapped.net
    else:
        dist.init_process_group("gloo")
        shard(module, init_device_mesh("cpu", (dist.get_world_size(),)))
        optimizer = torch.optim.AdamW(module.parameters(), lr=0.01, weight_decay=0.1)
        backward, forward = torch.Tensor.backward, module.net
    rank, world = dist.get_rank(), dist.get_world_size()
    pruner = Pruner(None, 0.7, "4x1", "snip_momentum", schedule=Iterative(start_step=0, end_step=8, frequency=2))
    pruner.skip_nonfinite = args.nonfinite >= 0
    pruner.bind(module)
    dataset = loader(world).dataset
    # as Lightning injects it into a training DataLoader: shuffled with seed 0, a new order every epoch
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=0)
    data = DataLoader(dataset, batch_size=16 // world, sampler=sampler)
    events, step, epoch = [], 0, 0
    while step < 12:
        sampler.set_epoch(epoch)
        epoch += 1
        for x, y in data:
            backward(nn.functional.cross_entropy(forward(x), y))
            if step == args.nonfinite and rank == 1:
                module.net[0].weight.grad.to_local()[0, 0] = float("inf")
            event = pruner.before_optimizer_step(step, optimizer)
            if event is not None:
                events.append(step)
            if step != args.nonfinite:  # a GradScaler skips the step whose gradients are not finite
                optimizer.step()
            optimizer.zero_grad()
            pruner.after_optimizer_step()
            step += 1
            if step == 12:
                break
    masks = {fqn: whole(m) for fqn, m in pruner.masks.items()}
    every: list[list[int]] = [[] for _ in range(world)]
    dist.all_gather_object(every, events)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save({"masks": masks, "events": every, "sparsity": pruner.sparsity()}, args.out / "result.pt")
    dist.barrier()
    if not args.fabric:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
