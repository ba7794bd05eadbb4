"""Physically slimmed models: channels that output exactly zero removed, with Torch-Pruning's dependency graph."""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.export.permanent import make_permanent
from lightning_prune.export.transformer import describe_heads, hf_config, slim_transformer
from lightning_prune.hf import kv_cache_off

__all__ = ["slim"]


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
    masked = make_permanent(model, masks)
    masked.eval()
    slimmed = copy.deepcopy(masked)
    # a key/value cache makes the outputs tuples that Torch-Pruning cannot trace; the copies keep their setting
    with kv_cache_off(masked), kv_cache_off(slimmed):
        return _slim(masked, slimmed, masks, example_inputs, check)


# Attention projections of the common Hugging Face models: their channels are heads' dimensions, which the
# attention code reshapes by head count, so single channels cannot be removed.
_ATTENTION_OUT = re.compile(
    r"(.*\.)?(self_attn\.(q_proj|k_proj|v_proj)|attention\.self\.(query|key|value)|attn\.c_attn)"
)
_ATTENTION_IN = re.compile(r"(.*\.)?(self_attn\.o_proj|attention\.output\.dense|attn\.c_proj)")


def _refuse_attention_channels(masks: Mapping[str, Tensor], handled: set[str]) -> None:
    """Raise, before anything is traced, for whole channels pruned in attention projections."""
    for name, mask in masks.items():
        module_name, _, leaf = name.rpartition(".")
        if leaf != "weight" or mask.dim() < 2 or name in handled:
            continue
        matrix = mask.reshape(mask.shape[0], -1)
        rows, cols = bool((~matrix.any(1)).any()), bool((~matrix.any(0)).any())
        if (rows and _ATTENTION_OUT.fullmatch(module_name)) or (cols and _ATTENTION_IN.fullmatch(module_name)):
            raise ValueError(
                f"'{module_name}' is an attention projection with whole {'output' if rows else 'input'} channels "
                "pruned: slim cannot remove single channels of attention heads (the attention code reshapes them "
                "by head count). Exclude the attention projections from channel pruning (e.g. "
                r"exclude=r'.*self_attn\..*'), or prune whole heads with the 'head' pattern once it is available"
            )


def _slim(
    masked: nn.Module, slimmed: nn.Module, masks: Mapping[str, Tensor], example_inputs: Any, check: bool
) -> tuple[nn.Module, dict[str, Any]]:
    before = _count(slimmed, example_inputs)
    transformer = slim_transformer(slimmed, masks)  # whole heads and FFN neurons first
    _refuse_attention_channels(masks, transformer.handled)
    rest = {name: mask for name, mask in masks.items() if name not in transformer.handled}
    removed: dict[str, int] = {}
    channels: list[str] = []
    for layer, count in (*transformer.heads.items(), *transformer.neurons.items()):
        removed[layer] = count
        channels.append(f"{layer} {count} {'heads' if layer in transformer.heads else 'neurons'}")
    any_channel = bool(removed) or _any_whole(masks, transformer.handled)
    if rest:
        any_channel |= _slim_channels(slimmed, rest, example_inputs, removed, channels)
    if not any_channel:
        raise ValueError(
            "slim removes whole channels, but no mask has a whole pruned channel; slimming needs channel "
            "patterns ('1xchannel': output channels, 'channelx1': input channels, 'head', 'ffn'). For "
            "unstructured, block or N:M masks use make_permanent, save_sparse or to_semi_structured (2:4)"
        )
    _warn_transformer(transformer)
    explained = {f for f in transformer.handled if f.rpartition(".")[0].rpartition(".")[0] in transformer.padded}
    _warn_left({n: m for n, m in masks.items() if n not in explained}, slimmed, channels)
    describe_ffn_width(slimmed)
    describe_heads(slimmed)
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
        "heads": dict(transformer.heads),
        "neurons": dict(transformer.neurons),
    }
    return slimmed, report


def _any_whole(masks: Mapping[str, Tensor], names: set[str]) -> bool:
    """Whether any of the masks ``names`` prunes a whole row or column."""
    for name in names & set(masks):
        matrix = masks[name].reshape(masks[name].shape[0], -1)
        if bool((~matrix.any(1)).any()) or bool((~matrix.any(0)).any()):
            return True
    return False


def _warn_transformer(done: Any) -> None:
    """Say what the head and neuron slimming kept although zero."""
    if done.padded:
        warnings.warn(
            f"grouped-query attention needs the same number of query heads per key/value head, so slim kept "
            f"{sum(done.padded.values())} pruned (zero) heads as padding ({dict(done.padded)}); they output zero. "
            "Prune heads in multiples of the group size per key/value head to remove them all",
            stacklevel=3,
        )
    if done.left:
        warnings.warn(
            f"FFN neurons with a zero input row stay where the activation does not map 0 to 0 (or is unknown): "
            f"{dict(done.left)}; prune them with pattern 'ffn' (which zeroes the down projection's columns too)",
            stacklevel=3,
        )


def _slim_channels(
    slimmed: nn.Module, masks: Mapping[str, Tensor], example_inputs: Any, removed: dict[str, int], channels: list[str]
) -> bool:
    """Single channels with Torch-Pruning's dependency graph; whether any mask had a whole channel."""
    tp = _torch_pruning()
    modules = dict(slimmed.named_modules())
    with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
        graph = tp.DependencyGraph().build_dependency(slimmed, example_inputs, verbose=False)
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
            channels.append(f"{module_name} {'out' if out else 'in'} {ok[:8]}{' ...' if len(ok) > 8 else ''}")
    return any_channel


# The first Linear of a transformer FFN in the common Hugging Face models: its outputs are the FFN's neurons.
_FFN_INPUT = re.compile(r"(.*\.)?(mlp\.(up_proj|gate_proj|fc1|c_fc|dense_h_to_4h)|intermediate\.dense)")


def describe_ffn_width(model: nn.Module) -> int | None:
    """Make a Hugging Face ``config.intermediate_size`` describe a model whose FFN neurons were removed.

    If every layer kept the same number of FFN neurons, that number goes into the config, so that
    ``save_pretrained`` / ``from_pretrained`` round-trip the slimmed model; it is returned. Hugging Face
    configs have one width for all layers: if the layers differ, the config is left as it was, a warning says
    so, and None is returned (save the module itself, ``torch.save(model)``, instead).

    Example:
        >>> describe_ffn_width(nn.Linear(2, 2)) is None  # no config, nothing to describe
        True
    """
    config = hf_config(model)
    if config is None or not hasattr(config, "intermediate_size"):
        return None
    widths = {
        name: module.out_features
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _FFN_INPUT.fullmatch(name)
    }
    if not widths or set(widths.values()) == {config.intermediate_size}:
        return None
    if len(set(widths.values())) > 1:
        warnings.warn(
            f"the slimmed layers keep different FFN widths ({sorted(set(widths.values()))}), which a Hugging Face "
            f"config cannot describe (intermediate_size={config.intermediate_size}): save_pretrained would not "
            "load back; save the module with torch.save, or prune with scope='local' for one width",
            stacklevel=3,
        )
        return None
    config.intermediate_size = next(iter(widths.values()))
    return int(config.intermediate_size)


def _warn_left(masks: Mapping[str, Tensor], slimmed: nn.Module, channels: list[str]) -> None:
    """Warn if most of the masks' zeros were not in removable channels (e.g. unstructured masks)."""
    pruned = sum(int((~m).sum()) for m in masks.values())
    params = dict(slimmed.named_parameters())
    left = sum(int((params[n].detach() == 0).sum()) for n in masks if n in params)
    if pruned and left > 0.01 * pruned:
        warnings.warn(
            f"slim removed whole channels ({'; '.join(channels[:6])}{' ...' if len(channels) > 6 else ''}) holding "
            f"{1 - left / pruned:.1%} of the masks' pruned weights; the other {left / pruned:.1%} are zeros inside "
            "channels that stay (not whole channels, or tied to kept ones) and remain as zeros in the slimmed "
            "model: prune with '1xchannel'/'channelx1', 'head' or 'ffn' to remove them, or keep them with "
            "make_permanent/save_sparse",
            stacklevel=3,
        )


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
