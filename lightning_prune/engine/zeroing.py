"""Keeping pruned weights at exactly zero, fast: 0/1 multipliers, fused multiplies, optimizers that keep zeros."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_prune.patterns import Pattern

__all__ = ["ZERO_KEEPING", "all_kept", "multiply", "owning_optimizer", "unit_multiplier"]

# Optimizers (exact classes) whose update of an entry is exactly zero when the entry's weight, gradient and
# first-moment state are zero (weight decay and second moments then move nothing). With these, pruned
# weights stay zero if their first moments are zeroed once per mask change and their gradients at every
# step, so no pass over the weights is needed after each step. Values: the first-moment state names.
ZERO_KEEPING: dict[type[torch.optim.Optimizer], tuple[str, ...]] = {
    torch.optim.SGD: ("momentum_buffer",),
    torch.optim.Adam: ("exp_avg",),
    torch.optim.AdamW: ("exp_avg",),
    torch.optim.NAdam: ("exp_avg",),
    torch.optim.RAdam: ("exp_avg",),
    torch.optim.Adamax: ("exp_avg",),
    torch.optim.RMSprop: ("momentum_buffer",),
    torch.optim.Adagrad: (),
    torch.optim.Adadelta: (),
}


def all_kept(mask: Tensor) -> bool:
    """Whether a bool mask is all True (a min over its bytes: several times faster than ``mask.all()``)."""
    return mask.numel() == 0 or bool(mask.reshape(-1).view(torch.uint8).amin())


def unit_multiplier(
    pattern: Pattern | None, param: Tensor, mask: Tensor
) -> tuple[tuple[int, ...] | None, Tensor | None]:
    """The view shape and per-unit 0/1 multiplier of ``mask``, or ``(None, None)`` if it has none.

    A mask has one if it is made of whole units that are boxes of a view of ``param``; not without a pattern,
    for patterns without such a view, or while progressive pruning has cut units partially.
    """
    found = pattern.unit_view(tuple(param.shape)) if pattern is not None and param.is_contiguous() else None
    if found is None:
        return None, None
    view, unit_dims = found
    boxes = mask.reshape(view).view(torch.uint8)  # bool all/any along inner dims are ~50x slower on CPU
    kept = boxes.amin(dim=unit_dims, keepdim=True)
    if not torch.equal(kept, boxes.amax(dim=unit_dims, keepdim=True)):
        return None, None
    return view, kept.to(param.dtype)


def multiply(tensors: list[Tensor], mults: list[Tensor], views: list[tuple[int, ...] | None]) -> None:
    """``tensors[i] *= mults[i]`` in place, fused; a per-unit multiplier broadcasts over its unit view."""
    fused: list[Tensor] = []
    factors: list[Tensor] = []
    for tensor, mult, view in zip(tensors, mults, views):
        if view is None:
            fused.append(tensor)
        elif tensor.is_contiguous():
            fused.append(tensor.view(view))
        else:  # e.g. a channels_last gradient of a contiguous weight: rare, and slower
            tensor.mul_(mult.expand(view).reshape(tensor.shape))
            continue
        factors.append(mult)
    if fused:
        torch._foreach_mul_(fused, factors)


def owning_optimizer(
    optimizers: Sequence[torch.optim.Optimizer], targets: Mapping[str, Tensor]
) -> torch.optim.Optimizer | None:
    """With several optimizers, the one that steps all the targets (its steps drive pruning); else None.

    Raises:
        ValueError: the targets are split across optimizers, or no optimizer steps them.

    Example:
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> first, second = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
        >>> owning_optimizer([first, second], {"weight": a.weight}) is first
        True
    """
    if len(optimizers) < 2:
        return None
    wanted = {id(p) for p in targets.values()}
    owners = [opt for opt in optimizers if {id(p) for g in opt.param_groups for p in g["params"]} >= wanted]
    if len(owners) != 1:
        raise ValueError(
            f"with {len(optimizers)} optimizers, the weights to prune must all be stepped by exactly one of them "
            f"(found {len(owners)}); split the model with include/exclude so that one optimizer holds them"
        )
    return owners[0]
