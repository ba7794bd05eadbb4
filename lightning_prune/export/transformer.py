"""Slimming transformer layers: whole attention heads and FFN neurons removed from a model with baked-in zeros.

Torch-Pruning removes channels one by one, which attention cannot take (its code reshapes channels by head
count) and which misses SwiGLU neurons zeroed through one factor only. Here a head goes when its output is
exactly zero (its columns of the output projection, or its value rows, are zero), and an FFN neuron when its
column of the down projection is zero or any factor of its product is (a zero gate row counts where the
activation maps 0 to 0, as SiLU and GELU do). The attention modules' head counts follow, so that the Hugging
Face code runs the slimmed layers unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.structure import AttentionLayout, FFNLayout, find_attention, find_ffn, linear_at

__all__ = ["TransformerSlimming", "describe_heads", "hf_config", "slim_transformer"]

_HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV_COUNTS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_ACTIVATIONS = ("act_fn", "activation_fn", "act", "intermediate_act_fn")


@dataclass
class TransformerSlimming:
    """What :func:`slim_transformer` did.

    Attributes:
        heads: query heads removed, by attention layer.
        neurons: FFN neurons removed, by FFN.
        handled: the weights it slimmed (or found nothing to remove in); channel slimming leaves them alone.
        padded: heads kept although zero, by layer: grouped-query attention needs the same number of query
            heads per key/value head.
        left: FFN neurons with a zero factor it could not remove (an activation that does not map 0 to 0).

    Example:
        >>> TransformerSlimming().heads
        {}
    """

    heads: dict[str, int] = field(default_factory=dict)
    neurons: dict[str, int] = field(default_factory=dict)
    handled: set[str] = field(default_factory=set)
    padded: dict[str, int] = field(default_factory=dict)
    left: dict[str, int] = field(default_factory=dict)


def _zero_rows(linear: nn.Linear) -> Tensor:
    """Per output row: weights and bias exactly zero."""
    zero = (linear.weight.detach() == 0).all(dim=1)
    if linear.bias is not None:
        zero &= linear.bias.detach() == 0
    return zero


def _zero_columns(linear: nn.Linear) -> Tensor:
    return (linear.weight.detach() == 0).all(dim=0)


def _sliced(linear: nn.Linear, rows: Tensor | None = None, columns: Tensor | None = None) -> nn.Linear:
    """A new Linear holding ``linear``'s ``rows`` (outputs) and ``columns`` (inputs)."""
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        weight = weight[rows]
        bias = None if bias is None else bias[rows]
    if columns is not None:
        weight = weight[:, columns]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    out.weight.requires_grad_(linear.weight.requires_grad)
    return out


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _check_whole_heads(layout: AttentionLayout, masks: Mapping[str, Tensor]) -> None:
    """Raise if the masks prune whole rows (q, k, v) or columns (o) that do not make whole heads."""
    d = layout.head_dim
    for role in ("q", "k", "v", "o"):
        mask = masks.get(f"{getattr(layout, role)}.weight")
        if mask is None:
            continue
        dead = ~mask.any(dim=1) if role != "o" else ~mask.any(dim=0)
        per_head = dead.reshape(-1, d)
        if not torch.equal(per_head.all(dim=1), per_head.any(dim=1)):
            side = "columns" if role == "o" else "rows"
            raise ValueError(
                f"the masks of '{getattr(layout, role)}' (attention layer '{layout.name}') prune whole {side} that are "
                f"not whole heads of {d}: slim removes attention heads only whole; prune them with pattern 'head', "
                "or exclude the attention projections from channel pruning"
            )


def _slim_attention(model: nn.Module, layout: AttentionLayout, done: TransformerSlimming) -> None:
    q, k, v, o = (linear_at(model, getattr(layout, r)) for r in ("q", "k", "v", "o"))
    h, kv, d, g = layout.num_heads, layout.num_kv_heads, layout.head_dim, layout.group_size
    dead = _zero_columns(o).reshape(h, d).all(dim=1)  # the head's output is never read
    dead |= _zero_rows(v).reshape(kv, d).all(dim=1).repeat_interleave(g)  # or its values are all zero
    if bool(dead.all()):
        dead[0] = False  # one head stays: a layer cannot vanish
    kept = ~dead.reshape(kv, g)
    per_group = kept.sum(dim=1)
    width = int(per_group.max())
    padded = 0
    for group in range(kv):  # equal query heads per key/value head: pad with zero heads
        short = width - int(per_group[group])
        if int(per_group[group]) > 0 and short:
            fill = torch.nonzero(~kept[group]).flatten()[:short]
            kept[group, fill] = True
            padded += short
    kv_kept = kept.any(dim=1)
    kept_heads = kept.reshape(-1)
    removed = h - int(kept_heads.sum())
    if not removed:
        return
    rows = kept_heads.repeat_interleave(d)
    kv_rows = kv_kept.repeat_interleave(d)
    _replace(model, layout.q, _sliced(q, rows=rows))
    _replace(model, layout.k, _sliced(k, rows=kv_rows))
    _replace(model, layout.v, _sliced(v, rows=kv_rows))
    _replace(model, layout.o, _sliced(o, columns=rows))
    holder = model.get_submodule(layout.q.rpartition(".")[0])
    new_heads, new_kv = int(kept_heads.sum()), int(kv_kept.sum())
    for names, value in ((_HEAD_COUNTS, new_heads), (_KV_COUNTS, new_kv), (("num_key_value_groups",), width)):
        for name in names:
            if isinstance(getattr(holder, name, None), int):
                setattr(holder, name, value)
    if isinstance(getattr(holder, "all_head_size", None), int):
        setattr(holder, "all_head_size", new_heads * d)  # noqa: B010 - an attribute of the HF module
    done.heads[layout.name] = removed
    if padded:
        done.padded[layout.name] = padded


def _activation(model: nn.Module, layout: FFNLayout) -> Any:
    owners = [model.get_submodule(layout.name) if layout.name else model]
    owners.append(model.get_submodule(layout.inputs[0].rpartition(".")[0]))
    for owner in owners:
        for name in _ACTIVATIONS:
            act = getattr(owner, name, None)
            if callable(act):
                return act
    return None


def _slim_ffn(model: nn.Module, layout: FFNLayout, done: TransformerSlimming) -> None:
    inputs = [linear_at(model, n) for n in layout.inputs]
    down = linear_at(model, layout.output)
    dead = _zero_columns(down)
    act = _activation(model, layout)
    maps_zero = act is not None and bool(act(torch.zeros(1, dtype=down.weight.dtype)).eq(0).all())
    stuck = torch.zeros_like(dead)
    for i, linear in enumerate(inputs):
        zero = _zero_rows(linear)
        # the activated input (gate, or the only one) gives zero only where act(0) = 0; a plain factor always
        activated = i == 0
        if activated and not maps_zero:
            stuck |= zero
        else:
            dead |= zero
    if bool(dead.all()):
        dead[0] = False
    left = int((stuck & ~dead).sum())
    if left:
        done.left[layout.name] = left
    removed = int(dead.sum())
    if not removed:
        return
    keep = ~dead
    for name, linear in zip(layout.inputs, inputs):
        _replace(model, name, _sliced(linear, rows=keep))
    _replace(model, layout.output, _sliced(down, columns=keep))
    done.neurons[layout.name] = removed


def slim_transformer(model: nn.Module, masks: Mapping[str, Tensor]) -> TransformerSlimming:
    """Remove the attention heads and FFN neurons of ``model`` that output exactly zero, in place.

    Only layers with a weight in ``masks`` are looked at; ``model`` holds the masked weights (e.g. from
    :func:`~lightning_prune.export.make_permanent`). Called by :func:`~lightning_prune.export.slim`.

    Raises:
        ValueError: masks of an attention projection that prune whole rows or columns not forming whole heads.

    Example:
        >>> mlp = nn.ModuleDict({"fc1": nn.Linear(4, 6), "fc2": nn.Linear(6, 4)})
        >>> with torch.no_grad(): _ = mlp.fc2.weight[:, :2].zero_()
        >>> slim_transformer(nn.ModuleDict({"mlp": mlp}), {"mlp.fc2.weight": mlp.fc2.weight != 0}).neurons
        {'mlp': 2}
    """
    done = TransformerSlimming()
    for layout in find_attention(model):
        fqns = {f"{getattr(layout, r)}.weight" for r in ("q", "k", "v", "o")}
        if fqns.isdisjoint(masks):
            continue
        _check_whole_heads(layout, masks)
        done.handled |= fqns
        _slim_attention(model, layout, done)
    for ffn in find_ffn(model):
        fqns = {f"{n}.weight" for n in (*ffn.inputs, ffn.output)}
        if fqns.isdisjoint(masks):
            continue
        done.handled |= fqns
        _slim_ffn(model, ffn, done)
    return done


def hf_config(model: nn.Module) -> Any:
    """The Hugging Face config of ``model``, or of the first submodule that has one; None if there is none.

    A model wrapped in a LightningModule or a classifier has its config on the wrapped module.

    Example:
        >>> hf_config(nn.Linear(2, 2)) is None
        True
    """
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            return config
    return None


def describe_heads(model: nn.Module) -> tuple[int, int] | None:
    """Make a Hugging Face config describe a model whose attention heads were removed, where it can.

    If every attention layer keeps the same query and key/value heads and the config states ``head_dim`` (as
    Llama's does), ``num_attention_heads`` and ``num_key_value_heads`` are set, so that ``save_pretrained`` /
    ``from_pretrained`` round-trip the slimmed model; the counts are returned. Otherwise the config is left
    as it was, a warning says what does not round-trip, and None is returned.

    Example:
        >>> describe_heads(nn.Linear(2, 2)) is None  # no config, nothing to describe
        True
    """
    config = hf_config(model)
    if config is None or not hasattr(config, "num_attention_heads"):
        return None
    counts = {}
    for layout in find_attention(model):
        q, k = linear_at(model, layout.q), linear_at(model, layout.k)
        counts[layout.name] = (q.out_features // layout.head_dim, k.out_features // layout.head_dim)
    original = (config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads))
    if not counts or set(counts.values()) == {original}:
        return None
    if len(set(counts.values())) > 1:
        warnings.warn(
            f"the slimmed attention layers keep different head counts ({sorted(set(counts.values()))} query and "
            "key/value heads), which a Hugging Face config cannot describe: save_pretrained would not load back; "
            "save the module with torch.save, or prune heads with scope='local' for equal counts",
            stacklevel=3,
        )
        return None
    heads, kv_heads = next(iter(counts.values()))
    head_dim = next(iter(find_attention(model))).head_dim
    if getattr(config, "head_dim", None) != head_dim:
        warnings.warn(
            f"{type(config).__name__} derives the head size from hidden_size / num_attention_heads, so it cannot "
            f"describe {heads} heads of {head_dim}: save_pretrained would not load back into the slimmed shapes; "
            "save the module with torch.save",
            stacklevel=3,
        )
        return None
    config.num_attention_heads = heads
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = kv_heads
    return heads, kv_heads
