"""Sparsity tables: per-layer rows and a printable table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import Tensor, nn

from lightning_prune.patterns import Pattern

__all__ = ["SparsityRow", "format_report", "sparsity_report"]


class _Row(NamedTuple):
    name: str
    shape: tuple[int, ...]
    pattern: str
    sparsity: float


class SparsityRow(_Row):
    """One layer of a sparsity report: ``name``, ``shape``, ``pattern``, ``sparsity``.

    A named tuple that also answers ``row["sparsity"]``.
    """

    __slots__ = ()

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return super().__getitem__(key)


def sparsity_report(
    model: nn.Module,
    masks: Mapping[str, Tensor] | None = None,
    pattern: str | Pattern | Mapping[str, str | Pattern] | None = None,
) -> list[SparsityRow]:
    """Per-layer sparsity (fraction of zeros) of a model.

    Args:
        model: the model; shapes come from its parameters.
        masks: parameter name → bool mask (True = kept), e.g. ``Pruning.masks``. Without masks every weight
            of two or more dimensions is reported, counting its exact zeros.
        pattern: the pattern for the ``pattern`` column: one for all layers or a mapping by name.

    Raises:
        KeyError: a mask names a parameter the model does not have.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> _ = nn.init.zeros_(model.weight)
        >>> sparsity_report(model)[0].sparsity
        1.0
    """
    params = dict(model.named_parameters())
    if masks is None:
        rows = {name: (p.detach() != 0) for name, p in params.items() if p.dim() >= 2}
    else:
        missing = [name for name in masks if name not in params]
        if missing:
            raise KeyError(f"masks name parameters the model lacks: {missing}")
        rows = dict(masks)
    report = []
    for name, keep in rows.items():
        kind = pattern.get(name, "") if isinstance(pattern, Mapping) else (pattern or "")
        sparsity = 1.0 - float(keep.sum()) / max(1, keep.numel())
        report.append(SparsityRow(name, tuple(params[name].shape), str(kind), sparsity))
    return report


def format_report(rows: list[SparsityRow]) -> str:
    """A fixed-width table of ``rows`` with a total line (sparsity over all listed elements).

    Example:
        >>> format_report([SparsityRow("w", (2, 2), "4x1", 0.5)]).splitlines()[-1].split()
        ['total', '4', '0.5000']
    """
    name_w = max([len("layer"), len("total")] + [len(r.name) for r in rows])
    lines = [f"{'layer':<{name_w}}  {'shape':>16}  {'pattern':>11}  {'sparsity':>8}"]
    zeros = total = 0.0
    for r in rows:
        numel = 1
        for d in r.shape:
            numel *= d
        zeros += r.sparsity * numel
        total += numel
        lines.append(f"{r.name:<{name_w}}  {'x'.join(map(str, r.shape)):>16}  {r.pattern:>11}  {r.sparsity:>8.4f}")
    lines.append(f"{'total':<{name_w}}  {int(total):>16}  {'':>11}  {zeros / max(total, 1):>8.4f}")
    return "\n".join(lines)
