"""Where a transformer's attention heads and FFN neurons live: which Linears, which rows and columns.

A head is ``head_dim`` rows of the query, key and value projections and the same ``head_dim`` columns of the
output projection; with grouped-query attention (GQA) a key/value head serves ``num_heads / num_kv_heads``
query heads. An FFN neuron is one row of each input projection (``up``, and ``gate`` for gated FFNs such as
SwiGLU) and one column of the output projection (``down``).

Layouts are found by module names as the common Hugging Face models spell them (Llama, Mistral and Qwen
``q_proj``/``k_proj``/``v_proj``/``o_proj``; BERT ``attention.self.query`` and ``attention.output.dense``;
DistilBERT, OPT, T5), and head counts from the attention module or ``config`` (``num_attention_heads``,
``num_key_value_heads``, ``head_dim``). Any other model passes its layout explicitly. Nothing here imports
``transformers``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["AttentionLayout", "FFNLayout", "find_attention", "find_ffn", "linear_at"]

# (query, key, value, output) child names of one attention module
_ATTENTION_NAMES = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("q_proj", "k_proj", "v_proj", "out_proj"),
    ("q_lin", "k_lin", "v_lin", "out_lin"),
    ("q", "k", "v", "o"),
)
# (inputs, output) child names of one FFN module
_FFN_NAMES = (
    (("gate_proj", "up_proj"), "down_proj"),
    (("w1", "w3"), "w2"),
    (("up_proj",), "down_proj"),
    (("fc1",), "fc2"),
    (("lin1",), "lin2"),
)
_HEADS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_HEAD_DIM = ("head_dim", "attention_head_size", "d_kv")
_LAYOUT_KEYS = ("q", "k", "v", "o", "num_heads", "num_kv_heads", "head_dim")


@dataclass(frozen=True)
class AttentionLayout:
    """One attention layer: its projections by full module name and its head geometry.

    Attributes:
        name: the attention module's name (for messages and reports).
        q, k, v, o: the query, key, value and output projections (``nn.Linear`` names).
        num_heads: query heads.
        num_kv_heads: key/value heads (``num_heads`` without grouped-query attention).
        head_dim: rows per head.

    Example:
        >>> AttentionLayout("attn", "attn.q", "attn.k", "attn.v", "attn.o", 8, 2, 16).group_size
        4
    """

    name: str
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class FFNLayout:
    """One FFN: the Linears whose rows are its neurons (``inputs``) and the one whose columns read them.

    Example:
        >>> FFNLayout("mlp", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", 688).gated
        True
    """

    name: str
    inputs: tuple[str, ...]
    output: str
    neurons: int

    @property
    def gated(self) -> bool:
        """Whether neurons are products of several inputs (SwiGLU: ``act(gate) * up``)."""
        return len(self.inputs) > 1


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def linear_at(model: nn.Module, name: str) -> nn.Linear:
    """The ``nn.Linear`` named ``name`` in ``model``; ``ValueError`` if there is none.

    Example:
        >>> linear_at(nn.Sequential(nn.Linear(2, 3)), "0").out_features
        3
    """
    found = _linear(model, name)
    if found is None:
        raise ValueError(f"{name!r} is not an nn.Linear of the model")
    return found


def _linear(model: nn.Module, name: str) -> nn.Linear | None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None


def _first_int(objects: list[Any], names: tuple[str, ...]) -> int | None:
    for obj in objects:
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _checked(model: nn.Module, layout: AttentionLayout) -> AttentionLayout:
    """``layout`` if its projections exist and their shapes fit its head counts; ValueError naming the fault."""
    where = f"attention layer '{layout.name}'"
    linears = {}
    for role in ("q", "k", "v", "o"):
        linear = _linear(model, getattr(layout, role))
        if linear is None:
            raise ValueError(f"{where}: {role}={getattr(layout, role)!r} is not an nn.Linear of the model")
        linears[role] = linear
    h, kv, d = layout.num_heads, layout.num_kv_heads, layout.head_dim
    for name, value in (("num_heads", h), ("num_kv_heads", kv), ("head_dim", d)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    if h % kv:
        raise ValueError(f"{where}: num_heads ({h}) must be a multiple of num_kv_heads ({kv})")
    expected = {"q": (h * d, "out"), "k": (kv * d, "out"), "v": (kv * d, "out"), "o": (h * d, "in")}
    for role, (size, side) in expected.items():
        actual = linears[role].out_features if side == "out" else linears[role].in_features
        if actual != size:
            raise ValueError(
                f"{where}: {role} ({getattr(layout, role)}) has {actual} {side}put features, but num_heads={h}, "
                f"num_kv_heads={kv}, head_dim={d} need {size}; pass the right head counts"
            )
    return layout


def _from_mapping(model: nn.Module, name: str, spec: Mapping[str, Any]) -> AttentionLayout:
    unknown = sorted(set(spec) - set(_LAYOUT_KEYS))
    missing = [key for key in ("q", "k", "v", "o", "num_heads") if key not in spec]
    if unknown or missing:
        raise ValueError(
            f"attention layer '{name}': the mapping {dict(spec)!r} "
            + (f"has unknown keys {unknown} " if unknown else "")
            + (f"lacks {missing} " if missing else "")
            + f"(keys: {', '.join(_LAYOUT_KEYS)}; num_kv_heads and head_dim are optional)"
        )
    q = _linear(model, spec["q"])
    heads = spec["num_heads"]
    head_dim: Any = spec.get("head_dim")
    if head_dim is None and isinstance(heads, int) and heads > 0:
        head_dim = q.out_features // heads if q is not None else 1
    layout = AttentionLayout(
        name, spec["q"], spec["k"], spec["v"], spec["o"], heads, spec.get("num_kv_heads", heads), head_dim
    )
    return _checked(model, layout)


def find_attention(model: nn.Module, layers: Mapping[str, Mapping[str, Any]] | None = None) -> list[AttentionLayout]:
    """Every attention layer of ``model`` whose heads can be pruned, in module order.

    Args:
        model: the model.
        layers: an explicit layout, by attention module name: ``{"q": ..., "k": ..., "v": ..., "o": ...}`` (full
            Linear names), ``"num_heads"``, and optionally ``"num_kv_heads"`` and ``"head_dim"``. Given, only
            these layers are used.

    Raises:
        ValueError: a layout that does not fit the model (naming the layer and the fault).

    Example:
        >>> class Attention(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.num_heads, self.head_dim = 2, 4
        ...         self.q_proj, self.k_proj, self.v_proj = (nn.Linear(8, 8) for _ in range(3))
        ...         self.o_proj = nn.Linear(8, 8)
        >>> [(a.name, a.num_heads, a.head_dim) for a in find_attention(nn.ModuleDict({"attn": Attention()}))]
        [('attn', 2, 4)]
    """
    if layers is not None:
        return [_from_mapping(model, name, spec) for name, spec in layers.items()]
    found = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        roles = None
        for names in _ATTENTION_NAMES:
            if all(isinstance(children.get(n), nn.Linear) for n in names):
                roles = tuple(_join(name, n) for n in names)
                break
        holder = module
        if roles is None and all(isinstance(children.get(n), nn.Linear) for n in ("query", "key", "value")):
            parent_name, _, _ = name.rpartition(".")
            output = _join(parent_name, "output.dense") if name.endswith("self") else ""
            if output and _linear(model, output) is not None:  # BERT: attention.self and attention.output.dense
                roles = (*(_join(name, n) for n in ("query", "key", "value")), output)
                name = parent_name
        if roles is None:
            continue
        config = getattr(holder, "config", None) or getattr(model, "config", None)
        q, k = linear_at(model, roles[0]), linear_at(model, roles[1])
        # The shapes decide where the head size is known: a slimmed layer keeps its head size, not its count.
        head_dim = _first_int([holder, config], _HEAD_DIM)
        heads = q.out_features // head_dim if head_dim else _first_int([holder, config], _HEADS)
        if heads is None:
            raise ValueError(
                f"attention layer '{name}': its head count is not known (no num_attention_heads/num_heads on the "
                "module or config); pass it: Head(layers={" + repr(name) + ": {'q': ..., 'k': ..., 'v': ..., "
                "'o': ..., 'num_heads': N}})"
            )
        head_dim = head_dim or q.out_features // heads
        kv = k.out_features // head_dim
        q_name, k_name, v_name, o_name = roles
        found.append(_checked(model, AttentionLayout(name, q_name, k_name, v_name, o_name, heads, kv, head_dim)))
    return found


def find_ffn(model: nn.Module, layers: Mapping[str, Mapping[str, Any]] | None = None) -> list[FFNLayout]:
    """Every transformer FFN of ``model``, in module order.

    Args:
        model: the model.
        layers: an explicit layout, by FFN name: ``{"inputs": [names of the Linears whose rows are neurons],
            "output": name of the Linear that reads them}``. Given, only these are used.

    Raises:
        ValueError: a layout that does not fit the model.

    Example:
        >>> mlp = nn.ModuleDict({"fc1": nn.Linear(4, 16), "fc2": nn.Linear(16, 4)})
        >>> find_ffn(nn.ModuleDict({"mlp": mlp}))
        [FFNLayout(name='mlp', inputs=('mlp.fc1',), output='mlp.fc2', neurons=16)]
    """
    candidates: list[tuple[str, tuple[str, ...], str]] = []
    if layers is not None:
        for name, spec in layers.items():
            if set(spec) != {"inputs", "output"}:
                raise ValueError(
                    f"FFN '{name}': the mapping {dict(spec)!r} needs exactly the keys 'inputs' and 'output'"
                )
            inputs = (spec["inputs"],) if isinstance(spec["inputs"], str) else tuple(spec["inputs"])
            candidates.append((name, inputs, spec["output"]))
    else:
        for name, module in model.named_modules():
            children = dict(module.named_children())
            for inputs, output in _FFN_NAMES:
                if all(isinstance(children.get(n), nn.Linear) for n in (*inputs, output)):
                    candidates.append((name, tuple(_join(name, n) for n in inputs), _join(name, output)))
                    break
            else:  # BERT: layer.intermediate.dense -> layer.output.dense
                first, second = _join(name, "intermediate.dense"), _join(name, "output.dense")
                if (
                    "intermediate" in children
                    and "output" in children
                    and _linear(model, first)
                    and _linear(model, second)
                ):
                    candidates.append((name, (first,), second))
    found = []
    for name, inputs, output in candidates:
        linears = [_linear(model, n) for n in (*inputs, output)]
        if any(linear is None for linear in linears):
            missing = [n for n, linear in zip((*inputs, output), linears) if linear is None]
            raise ValueError(f"FFN '{name}': {missing} are not nn.Linear modules of the model")
        widths = {linear.out_features for linear in linears[:-1]}  # type: ignore[union-attr]
        reads = linears[-1].in_features  # type: ignore[union-attr]
        if widths != {reads}:
            raise ValueError(
                f"FFN '{name}': the inputs {list(inputs)} output {sorted(widths)} features but '{output}' reads {reads}"
            )
        found.append(FFNLayout(name, inputs, output, reads))
    return found
