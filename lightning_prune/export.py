"""Turn masks into real gains: baked-in zeros, physically slimmed models, compact checkpoints, 2:4 kernels.

- :func:`make_permanent`: the masks multiplied into the weights; a plain module, original names, no hooks.
- :func:`slim`: channels whose every producer outputs exactly zero (or whose every consumer ignores them)
  are removed for real, with everything coupled to them, using Torch-Pruning's dependency graph.
- :func:`save_sparse` / :func:`load_sparse`: safetensors with a packed bitmask plus the kept values.
- :func:`to_semi_structured`: 2:4-masked Linear weights as torch's semi-structured sparse tensors (CUDA).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.utils.prune as torch_prune
from torch import Tensor, nn

__all__ = ["load_sparse", "make_permanent", "save_sparse", "slim", "to_semi_structured"]


def _check_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, nn.Parameter]:
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
    params = _check_masks(model, masks)
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device, params[name].dtype))
    return model


# ----------------------------------------------------------------------------------------------- slimming
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


def _zero_producer(module: nn.Module, idxs: Tensor) -> Tensor:
    """Per index: whether ``module`` outputs exactly zero on that channel."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        zero = (module.weight[idxs].reshape(len(idxs), -1) == 0).all(1)
        if module.bias is not None:
            zero &= module.bias[idxs] == 0
        return zero
    if isinstance(module, _NORMS):
        if getattr(module, "weight", None) is None:
            return torch.zeros(len(idxs), dtype=torch.bool)  # no affine: a normalised channel is not zero
        zero = module.weight[idxs] == 0
        if module.bias is not None:
            zero &= module.bias[idxs] == 0
        return zero
    return torch.ones(len(idxs), dtype=torch.bool)  # parameter-free ops pass zeros through


def _ignoring_consumer(module: nn.Module, idxs: Tensor) -> Tensor | None:
    """Per index: whether ``module`` ignores that input channel (zero weights); None if it cannot tell."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and getattr(module, "groups", 1) == 1:
        return (module.weight[:, idxs].transpose(0, 1).reshape(len(idxs), -1) == 0).all(1)
    return None


def _removable(graph: Any, group: Any) -> set[int]:
    """Root indices of ``group`` whose removal leaves the outputs unchanged."""
    produce_zero: Tensor | None = None
    ignored: Tensor | None = None
    consumers = 0
    for dep, idxs in group:
        module = dep.target.module
        index = torch.as_tensor([int(i) for i in idxs], dtype=torch.long)
        if graph.is_out_channel_pruning_fn(dep.handler):
            zero = _zero_producer(module, index)
            produce_zero = zero if produce_zero is None else produce_zero & zero
        else:
            verdict = _ignoring_consumer(module, index)
            consumers += 1
            if verdict is None:
                verdict = torch.zeros(len(index), dtype=torch.bool)
            ignored = verdict if ignored is None else ignored & verdict
    root = [int(i) for i in group[0][1]]
    keep_zero = produce_zero if produce_zero is not None else torch.zeros(len(root), dtype=torch.bool)
    unused = ignored if ignored is not None and consumers else torch.zeros(len(root), dtype=torch.bool)
    return {i for i, ok in zip(root, (keep_zero | unused).tolist()) if ok}


def _torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError as err:  # pragma: no cover - installed with the package's extras
        raise ImportError("slim uses Torch-Pruning: pip install 'lightning-prune[export]'") from err
    return torch_pruning


def _count(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    tp = _torch_pruning()

    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(params), int(macs)


def slim(
    model: nn.Module, masks: Mapping[str, Tensor], example_inputs: Any, check: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """Physically remove pruned channels: a smaller, faster model whose outputs equal the masked model's.

    For each masked Conv/Linear weight, whole pruned output channels (rows, filters: ``"1xchannel"``) and
    whole pruned input channels (columns: ``"channelx1"``) are removed together with everything Torch-Pruning's
    dependency graph couples to them: norm channels, the next layers' inputs, residual additions, transformer
    FFN intermediate neurons. A channel is removed only where that changes no output: every producer of it
    outputs exactly zero (weights, bias and norm affine zero; `Pruning` keeps the coupled bias and norm entries
    of pruned filters at zero for this), or every consumer ignores it.

    Args:
        model: the trained model (not modified: a copy is slimmed).
        masks: parameter name → bool mask (True = kept) of channel-pattern pruning.
        example_inputs: inputs for one forward pass (traced by Torch-Pruning, then used for the check).
        check: compare the slimmed model's outputs with the masked model's and raise if they differ.

    Returns:
        The slimmed model and a report: ``params`` and ``macs`` before and after, channels removed per layer.

    Raises:
        ValueError: masks without a single whole pruned channel (e.g. unstructured or block masks), or a
            slimmed model whose outputs differ from the masked one's.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> keep = torch.ones(3, 4, dtype=torch.bool); keep[1] = False
        >>> with torch.no_grad(): net[0].bias[1] = 0.0
        >>> small, report = slim(net, {"0.weight": keep}, torch.randn(1, 4))
        >>> small[0].weight.shape, report["removed"]
        (torch.Size([2, 4]), {'0': 1})
    """
    tp = _torch_pruning()
    masked = make_permanent(model, masks)
    masked.eval()
    slimmed = copy.deepcopy(masked)
    modules = dict(slimmed.named_modules())
    before = _count(slimmed, example_inputs)
    with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
        graph = tp.DependencyGraph().build_dependency(slimmed, example_inputs, verbose=False)
    removed: dict[str, int] = {}
    any_channel = False
    for name, mask in masks.items():
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        if leaf != "weight" or not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        for dim, out in ((0, True), (1, False)):
            live = mask.reshape(mask.shape[0], mask.shape[1], -1).any(dim=2).any(dim=1 - dim)
            idxs = torch.nonzero(~live).flatten().tolist()
            if not idxs:
                continue
            any_channel = True
            current = module.weight.shape[dim]
            if current != mask.shape[dim]:
                continue  # already slimmed through a coupled layer: indices moved
            fn = (
                (tp.prune_conv_out_channels if out else tp.prune_conv_in_channels)
                if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
                else (tp.prune_linear_out_channels if out else tp.prune_linear_in_channels)
            )
            group = graph.get_pruning_group(module, fn, idxs=idxs)
            ok = sorted(_removable(graph, group))
            if len(ok) >= current:
                ok = ok[:-1]  # keep one channel: a layer cannot vanish entirely
            if not ok:
                continue
            group = graph.get_pruning_group(module, fn, idxs=ok)
            with torch.no_grad():
                group.prune()
            removed[module_name] = removed.get(module_name, 0) + len(ok)
    if not any_channel:
        raise ValueError(
            "slim removes whole channels, but no mask has a whole pruned channel; slimming needs channel "
            "patterns ('1xchannel': output channels, 'channelx1': input channels). For unstructured, block or "
            "N:M masks use make_permanent, save_sparse or to_semi_structured (2:4)"
        )
    after = _count(slimmed, example_inputs)
    if check:
        with torch.no_grad():
            _check_equal(masked, slimmed, example_inputs)
    report = {
        "params_before": before[0],
        "params_after": after[0],
        "macs_before": before[1],
        "macs_after": after[1],
        "removed": removed,
    }
    return slimmed, report


def _forward(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _check_equal(masked: nn.Module, slimmed: nn.Module, example_inputs: Any) -> None:
    a, b = _forward(masked.eval(), example_inputs), _forward(slimmed.eval(), example_inputs)
    a = a if isinstance(a, Tensor) else getattr(a, "last_hidden_state", a[0])
    b = b if isinstance(b, Tensor) else getattr(b, "last_hidden_state", b[0])
    if a.shape != b.shape:
        raise ValueError(
            f"slimming changed the output shape from {tuple(a.shape)} to {tuple(b.shape)}: the masks prune output "
            "channels of the model's last layer; exclude that layer from pruning"
        )
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        raise ValueError(
            f"the slimmed model's outputs differ from the masked model's (max |diff| {float((a - b).abs().max()):.3g});"
            " a removed channel was not exactly zero: were the coupled bias/norm entries trained under Pruning?"
        )


# ----------------------------------------------------------------------------------------------- checkpoints
_META_KEY = "lightning_prune.sparse"


def save_sparse(
    state_dict_or_model: Mapping[str, Tensor] | nn.Module, path: str | Path, masks: Mapping[str, Tensor]
) -> dict[str, int]:
    """Write a compact safetensors file: masked weights as a packed bitmask plus their kept values.

    Unmasked tensors are stored dense. :func:`load_sparse` restores an identical dense state_dict.

    Args:
        state_dict_or_model: a state_dict or a module (its ``state_dict()``).
        path: the ``.safetensors`` file to write.
        masks: parameter name → bool mask (True = kept); values outside the mask are dropped.

    Returns:
        ``{"bytes": file size, "dense_bytes": size of the dense tensors}``.

    Example:
        >>> import tempfile, os
        >>> sd = {"w": torch.tensor([[1.0, 0.0], [0.0, 2.0]])}
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> _ = save_sparse(sd, path, {"w": sd["w"] != 0})
        >>> torch.equal(load_sparse(path)["w"], sd["w"])
        True
    """
    from safetensors.torch import save_file

    state = state_dict_or_model.state_dict() if isinstance(state_dict_or_model, nn.Module) else state_dict_or_model
    missing = sorted(set(masks) - set(state))
    if missing:
        raise ValueError(f"masks name tensors the state_dict does not have: {missing[:5]}")
    tensors: dict[str, Tensor] = {}
    layout: dict[str, Any] = {}
    dense_bytes = 0
    for name, value in state.items():
        value = value.detach().cpu().contiguous()
        dense_bytes += value.numel() * value.element_size()
        if name in masks:
            mask = masks[name].detach().cpu().bool()
            if tuple(mask.shape) != tuple(value.shape):
                raise ValueError(f"mask for '{name}' has shape {tuple(mask.shape)}, the tensor {tuple(value.shape)}")
            tensors[f"{name}::values"] = value[mask].contiguous()
            tensors[f"{name}::bits"] = _pack(mask.flatten())
            layout[name] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
        else:
            tensors[name] = value
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(layout)})
    return {"bytes": Path(path).stat().st_size, "dense_bytes": dense_bytes}


def load_sparse(path: str | Path) -> dict[str, Tensor]:
    """The dense state_dict of a file written by :func:`save_sparse` (pruned entries are zero)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        layout = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
        stored = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    state: dict[str, Tensor] = {}
    for key, value in stored.items():
        if "::" not in key:
            state[key] = value
    for name, info in layout.items():
        shape = tuple(info["shape"])
        mask = _unpack(stored[f"{name}::bits"], math.prod(shape)).reshape(shape)
        values = stored[f"{name}::values"]
        dense = torch.zeros(shape, dtype=getattr(torch, info["dtype"]))
        dense[mask] = values
        state[name] = dense
    return state


def _pack(bits: Tensor) -> Tensor:
    padded = torch.zeros(math.ceil(bits.numel() / 8) * 8, dtype=torch.uint8)
    padded[: bits.numel()] = bits.to(torch.uint8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (padded.reshape(-1, 8) * weights).sum(1, dtype=torch.uint8)


def _unpack(packed: Tensor, n: int) -> Tensor:
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
    return ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:n].bool()


# ----------------------------------------------------------------------------------------------- 2:4 kernels
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
    params = _check_masks(model, masks)
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
