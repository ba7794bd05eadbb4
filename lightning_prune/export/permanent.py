"""Masks baked into the weights: a plain module with the original parameter names and no hooks."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.utils.prune as torch_prune
from torch import Tensor, nn

__all__ = ["check_masks", "make_permanent"]


def check_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, nn.Parameter]:
    """The model's parameters by name, after checking that every mask names one and has its shape."""
    params = dict(model.named_parameters())
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise ValueError(f"masks name parameters the model does not have: {unknown[:5]}; it has {sorted(params)[:8]}")
    for name, mask in masks.items():
        if tuple(mask.shape) != tuple(params[name].shape):
            shape = tuple(params[name].shape)
            raise ValueError(f"mask for '{name}' has shape {tuple(mask.shape)}, the parameter {shape}")
    return params


@torch.no_grad()
def make_permanent(model: nn.Module, masks: Mapping[str, Tensor], inplace: bool = False) -> nn.Module:
    """The model with ``weight *= mask`` baked in: a plain module, original parameter names, no hooks.

    Modules pruned with ``torch.nn.utils.prune`` (``weight_orig``/``weight_mask``) are made permanent too.

    Args:
        model: the trained model.
        masks: parameter name → bool mask (True = kept), e.g. ``Pruning.masks``.
        inplace: modify ``model`` itself instead of a deep copy.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> plain = make_permanent(net, {"weight": torch.tensor([[True, False], [False, True]])})
        >>> int((plain.weight == 0).sum())
        2
    """
    if not inplace:
        # torch.nn.utils.prune keeps `weight` as a computed, non-leaf attribute that deepcopy refuses: copy
        # without it (its pre-hook recomputes it from weight_orig and weight_mask).
        computed = [
            (m, h._tensor_name, getattr(m, h._tensor_name))
            for m in model.modules()
            for h in m._forward_pre_hooks.values()
            if isinstance(h, torch_prune.BasePruningMethod) and hasattr(m, h._tensor_name)
        ]
        for module, name, _ in computed:
            delattr(module, name)
        try:
            model = copy.deepcopy(model)
        finally:
            for module, name, value in computed:
                setattr(module, name, value)
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                torch_prune.remove(module, hook._tensor_name)
    params = check_masks(model, masks)
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device, params[name].dtype))
    return model
