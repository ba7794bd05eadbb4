"""2:4-masked Linear weights on torch's semi-structured sparse kernels (CUDA)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_prune.export.permanent import check_masks

__all__ = ["to_semi_structured"]


def to_semi_structured(model: nn.Module, masks: Mapping[str, Tensor], inplace: bool = False) -> nn.Module:
    """Linear weights with 2:4 masks as ``torch.sparse.SparseSemiStructuredTensor`` (CUDA, fp16/bf16).

    Args:
        model: the model, on a CUDA device, in float16 or bfloat16.
        masks: parameter name → bool mask; the Linear weights whose masks are 2:4 are converted.
        inplace: modify ``model`` itself instead of a deep copy.

    Raises:
        RuntimeError: the weights are not on CUDA (semi-structured kernels exist only there), or no mask is 2:4.
        ValueError: a weight's dtype is not float16/bfloat16.

    Example:
        >>> try:
        ...     to_semi_structured(nn.Linear(8, 8), {})
        ... except RuntimeError as err:
        ...     print(str(err)[:34])
        to_semi_structured needs CUDA: tor
    """
    params = check_masks(model, masks)
    devices = {p.device.type for name, p in params.items() if name in masks} or {p.device.type for p in params.values()}
    if devices != {"cuda"}:
        raise RuntimeError(
            f"to_semi_structured needs CUDA: torch's 2:4 semi-structured kernels run only on NVIDIA GPUs "
            f"(compute capability 8.0+), and the weights are on {sorted(devices)}. Move the model with "
            ".cuda().half() first; on CPU use make_permanent or save_sparse instead"
        )
    from torch.sparse import to_sparse_semi_structured

    model = model if inplace else copy.deepcopy(model)
    modules = dict(model.named_modules())
    converted = 0
    for name, mask in masks.items():
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        if leaf != "weight" or not isinstance(module, nn.Linear) or not _is_two_four(mask):
            continue
        if module.weight.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"'{name}' is {module.weight.dtype}; semi-structured sparsity needs float16 or bfloat16")
        dense = module.weight.detach() * mask.to(module.weight.device, module.weight.dtype)
        module.weight = nn.Parameter(to_sparse_semi_structured(dense), requires_grad=False)
        converted += 1
    if not converted:
        raise RuntimeError("no Linear weight has a 2:4 mask (exactly 2 kept in every 4 along the input dimension)")
    return model


def _is_two_four(mask: Tensor) -> bool:
    if mask.dim() != 2 or mask.shape[1] % 4:
        return False
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())
