"""Which parameters are pruned: module types and regexes over module names.

A target is the ``weight`` of a module whose type is one of ``op_types``; ``include`` and ``exclude`` are
regular expressions that must match a module's whole name (``re.fullmatch``). Biases and normalisation
layers are never targets (asking for one is an error: a norm's weight scales whole channels, and 1-D
weights have no structure to prune), and nothing is excluded silently (there is no hidden "classifier head"
rule).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

from torch import nn

__all__ = ["parse_op_types", "resolve_targets"]


def _as_list(name: str, value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a str or a list of str, got {value!r}")
    return list(value)


def _type_matches(module: nn.Module, op: str) -> bool:
    cls = getattr(nn, op, None)
    return (isinstance(cls, type) and isinstance(module, cls)) or type(module).__name__ == op


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)


def _is_norm(module: nn.Module) -> bool:
    """Torch's normalisation layers, and any class named like one (e.g. transformers' ``LlamaRMSNorm``)."""
    return isinstance(module, _NORMS) or type(module).__name__.lower().endswith("norm")


def _check_op_types(model: nn.Module, op_types: Sequence[str]) -> None:
    """Raise for an op type that is a miscased class name, or whose modules hold no ``weight`` parameter."""
    classes = {type(m).__name__ for m in model.modules()} | {n for n in dir(nn) if isinstance(getattr(nn, n), type)}
    for op in op_types:
        matched = [(name, m) for name, m in model.named_modules() if _type_matches(m, op)]
        if not matched and op not in classes:
            close = sorted(c for c in classes if c.lower() == op.lower())
            if close:
                raise ValueError(f"op_types {op!r} names no module class; class names are case-sensitive: {close[0]!r}")
        if matched and not any(isinstance(getattr(m, "weight", None), nn.Parameter) for _, m in matched):
            raise ValueError(
                f"op_types {op!r} matches modules without a `weight` parameter (e.g. {matched[0][0]!r}); op_types "
                "names the layer classes that hold the weights to prune, such as 'Linear' or 'Conv2d' (use "
                "include=... to pick layers inside a block)"
            )


def parse_op_types(op_types: str | Sequence[str], owner: str = "") -> tuple[str, ...]:
    """Module class names as a tuple, raising ``ValueError`` (prefixed with ``owner``) unless non-empty names.

    Example:
        >>> parse_op_types("Linear")
        ('Linear',)
    """
    ops = [op_types] if isinstance(op_types, str) else list(op_types)
    if not ops or not all(isinstance(op, str) and op for op in ops):
        raise ValueError(f"{owner}op_types must be a non-empty list of module class names, got {op_types!r}")
    return tuple(ops)


def compile_patterns(name: str, patterns: str | Sequence[str] | None) -> list[re.Pattern[str]]:
    """Compile regexes, raising ``ValueError`` that names the argument for a bad one."""
    compiled = []
    for text in _as_list(name, patterns):
        try:
            compiled.append(re.compile(text))
        except re.error as err:
            raise ValueError(f"{name} regex {text!r} is not valid: {err}") from err
    return compiled


def resolve_targets(
    model: nn.Module,
    op_types: Sequence[str] = ("Linear", "Conv1d", "Conv2d"),
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, nn.Parameter]:
    """Map target parameter names (as in ``named_parameters()``) to parameters, in model order.

    Args:
        model: the model to search.
        op_types: module class names (``torch.nn`` classes match subclasses too).
        include: regexes; if given, a module's full name must match one of them.
        exclude: regexes; a module whose full name matches one of them is skipped.

    Raises:
        ValueError: ``include``/``exclude`` matching no candidate module (the message lists them), no target
            at all, an op type in the wrong case or naming modules without a weight, a norm layer or 1-D weight,
            a target in a lazy module not initialised yet, or a target shared with another module (tied
            weights). Targets with no elements are skipped with a warning.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> list(resolve_targets(model, exclude=r"2"))
        ['0.weight']
    """
    includes = compile_patterns("include", include)
    excludes = compile_patterns("exclude", exclude)
    _check_op_types(model, op_types)
    candidates = {
        name: module
        for name, module in model.named_modules()
        if any(_type_matches(module, op) for op in op_types)
        and isinstance(getattr(module, "weight", None), nn.Parameter)
    }
    available = ", ".join(candidates) or "(none)"
    for label, regexes in (("include", includes), ("exclude", excludes)):
        for regex in regexes:
            if not any(regex.fullmatch(name) for name in candidates):
                raise ValueError(
                    f"{label} pattern {regex.pattern!r} matches no module of types {list(op_types)}; "
                    f"available: {available}"
                )
    holders: dict[int, list[tuple[str, nn.Module]]] = {}  # parameter -> every (name, module) that holds it
    for module_name, module in model.named_modules(remove_duplicate=False):
        for leaf, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((f"{module_name}.{leaf}" if module_name else leaf, module))
    selected = {
        name: module
        for name, module in candidates.items()
        if (not includes or any(r.fullmatch(name) for r in includes)) and not any(r.fullmatch(name) for r in excludes)
    }
    selected_ids = {id(m) for m in selected.values()}
    targets: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, module in selected.items():
        weight = module.weight
        if id(weight) in seen:  # a weight shared by two target modules is pruned once, under its first name
            continue
        seen.add(id(weight))
        fqn = f"{name}.weight" if name else "weight"
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"'{fqn}' belongs to a lazy module ({type(module).__name__}) that is not initialised yet; run one "
                "forward pass before fit (e.g. in LightningModule.setup) or exclude it"
            )
        tied = sorted({n for n, m in holders.get(id(weight), []) if id(m) not in selected_ids})
        if tied:
            raise ValueError(
                f"'{fqn}' is shared with {tied} (tied weights): pruning it would also prune them; untie the "
                f"weights or exclude {name!r}"
            )
        if _is_norm(module) or weight.dim() < 2:
            kind = "a normalisation layer" if _is_norm(module) else f"a {weight.dim()}-D weight"
            raise ValueError(
                f"'{fqn}' is the weight of {type(module).__name__}, {kind}: norm layers and 1-D weights are never "
                f"pruned (their entries scale whole channels); remove {type(module).__name__!r} from op_types or "
                f"exclude {name!r}"
            )
        if weight.numel() == 0:
            warnings.warn(f"'{fqn}' has shape {tuple(weight.shape)}: no elements to prune, skipped", stacklevel=2)
            continue
        targets[fqn] = weight
    if not targets:
        weighted = sorted(
            {type(m).__name__ for m in model.modules() if isinstance(getattr(m, "weight", None), nn.Parameter)}
        )
        raise ValueError(
            f"no parameter to prune: op_types={list(op_types)}, include={include!r}, exclude={exclude!r}; "
            f"modules of those types: {available}; classes in the model that hold a weight: {weighted or '(none)'}"
        )
    return targets
