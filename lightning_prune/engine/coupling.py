"""Parameters that must stay zero with a pruned output channel: its bias, and the norm entries that read it.

A filter whose weights are all pruned must output exactly zero, so that slimming can remove it without
changing the model. Its bias is found by name; the BatchNorm that reads its output is found during the first
forward pass after binding, by following the output tensor from one module to the next.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.sharding import local

__all__ = ["Coupling"]


class Coupling:
    """Watch the first forward pass of ``model`` for the bias and BatchNorm that go with each target's rows.

    Args:
        model: the bound model.
        targets: the pruned weights by name.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        >>> watch = Coupling(net, {"0.weight": net[0].weight})
        >>> _ = net(torch.randn(1, 1, 5, 5))
        >>> [name for name, _ in watch.found["0.weight"]]
        ['0.bias', '1.weight', '1.bias']
    """

    def __init__(self, model: nn.Module, targets: Mapping[str, nn.Parameter]) -> None:
        self._model = model
        names = {id(m): n for n, m in model.named_modules()}
        rows = {fqn: p.shape[0] for fqn, p in targets.items()}
        produced: dict[int, str] = {}  # id of an output tensor -> the target that produced it
        self.found: dict[str, list[tuple[str, nn.Parameter]]] = {fqn: [] for fqn in targets}
        self._hooks: list[Any] = []
        for fqn in targets:
            module_name = fqn.rpartition(".")[0]
            module = model.get_submodule(module_name)
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter) and bias.shape == (rows[fqn],):
                self.found[fqn].append((f"{module_name}.bias" if module_name else "bias", bias))

            def record(module: nn.Module, args: Any, output: Any, fqn: str = fqn) -> None:
                if isinstance(output, Tensor):
                    produced[id(output)] = fqn

            self._hooks.append(module.register_forward_hook(record))

        def norm_reads(module: nn.Module, args: Any) -> None:
            fqn = produced.get(id(args[0])) if args and isinstance(args[0], Tensor) else None
            if fqn is None or getattr(module, "weight", None) is None or module.weight.shape != (rows[fqn],):
                return
            known = {n for n, _ in self.found[fqn]}
            for leaf in ("weight", "bias"):
                param = getattr(module, leaf, None)
                name = f"{names[id(module)]}.{leaf}"
                if isinstance(param, nn.Parameter) and name not in known:
                    self.found[fqn].append((name, param))

        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self._hooks.append(module.register_forward_pre_hook(norm_reads))

    @property
    def watching(self) -> bool:
        """Whether the hooks are still in place (until :meth:`stop`)."""
        return bool(self._hooks)

    def stop(self) -> list[tuple[nn.Parameter, str, Tensor]]:
        """Remove the hooks; every coupled parameter with its target's name and a 0/1 multiplier like it."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        # Re-fetched by name: inside a forward pass a sharded model (FSDP2) shows unsharded temporaries.
        coupled = [(self._model.get_parameter(name), fqn) for fqn, params in self.found.items() for name, _ in params]
        return [(param, fqn, torch.ones_like(local(param.detach()))) for param, fqn in coupled]
