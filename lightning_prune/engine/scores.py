"""A criterion's running states for every target, from the start of the scoring window to its last event.

They are allocated for the window, updated at every step, reduced across processes at events, checkpointed
and freed after the last event.

The criterion declares its states (:class:`~lightning_prune.criteria.StateSpec`); this module does all the
bookkeeping, so that no criterion writes any of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_prune.criteria import Criterion, StateSpec
from lightning_prune.patterns import Pattern
from lightning_prune.sharding import Box, crop, is_dtensor, local

__all__ = ["Target", "TargetStates"]

_SLICE_ELEMENTS = 1 << 20  # per-step terms computed 1M weights (4 MB) at a time by elementwise criteria
_OPS = {"sum": "SUM", "mean": "SUM", "max": "MAX"}


class Target:
    """One pruned weight as a criterion sees it in :meth:`~lightning_prune.criteria.Criterion.setup`.

    Attributes:
        fqn: the weight's name, as in ``named_parameters()``.
        module: the module that holds it (register forward hooks here; fetch the weight from it by name).
        state: the criterion's running states for this weight, by name; filled in place for the window.

    Example:
        >>> target = Target("0.weight", nn.Linear(2, 2), window=lambda: True)
        >>> target.collecting  # no state allocated yet
        False
    """

    def __init__(self, fqn: str, module: nn.Module, window: Callable[[], bool]) -> None:
        self.fqn = fqn
        self.module = module
        self.state: dict[str, Tensor] = {}
        self._window = window

    @property
    def collecting(self) -> bool:
        """True while the scoring window is open (from its first step's forward pass to the last event)."""
        return self._window() and bool(self.state)

    def __repr__(self) -> str:
        return f"Target({self.fqn!r})"


class TargetStates:
    """The running states of ``criterion`` for a list of targets.

    Args:
        criterion: whose ``states`` are kept.
        pattern: the pruning pattern (for per-unit states and whole-unit row slices), or each target's own
            pattern by name (the member patterns of a :class:`~lightning_prune.patterns.Coupled` pattern).
        per_unit: keep ``"weight"``-shaped states per unit of ``pattern``.

    Example:
        >>> from lightning_prune.criteria import SnipMomentum
        >>> from lightning_prune.patterns import parse_pattern
        >>> states = TargetStates(SnipMomentum(), parse_pattern("4x1"), per_unit=True)
        >>> target, weight = Target("w", nn.Identity(), lambda: True), torch.ones(8, 3)
        >>> states.allocate([target], [weight])
        >>> states.update([target], [weight], [torch.ones(8, 3)])
        >>> target.state["score"]
        tensor([[0.9000, 0.9000, 0.9000],
                [0.9000, 0.9000, 0.9000]])
    """

    def __init__(self, criterion: Criterion, pattern: Pattern | Mapping[str, Pattern], per_unit: bool) -> None:
        self.criterion = criterion
        self.pattern = pattern
        self.per_unit = per_unit

    def pattern_of(self, fqn: str | None) -> Pattern:
        """The pattern of target ``fqn``."""
        if isinstance(self.pattern, Pattern):
            return self.pattern
        assert fqn is not None, "per-target patterns need the target's name"
        return self.pattern[fqn]

    def shape(self, spec: StateSpec, weight_shape: Sequence[int], fqn: str | None = None) -> tuple[int, ...]:
        """The shape a state is kept in for a weight of ``weight_shape`` (target ``fqn``)."""
        if self.per_unit and spec.shape == "weight":
            unit_scores = self.pattern_of(fqn).unit_scores
            return tuple(unit_scores(torch.empty(tuple(weight_shape), device="meta")).shape)
        return spec.full_shape(weight_shape)

    def allocate(self, targets: Sequence[Target], weights: Sequence[Tensor]) -> None:
        """Zero-filled states for every target that has none yet."""
        for target, weight in zip(targets, weights):
            if target.state:
                continue
            for name, spec in self.criterion.states.items():
                shape = self.shape(spec, weight.shape, target.fqn)
                target.state[name] = torch.zeros(shape, dtype=spec.dtype, device=weight.device)

    @staticmethod
    def release(targets: Sequence[Target]) -> None:
        """Drop every state (cleared in place: hooks holding a target see the window closed)."""
        for target in targets:
            target.state.clear()

    @torch.no_grad()
    def update(self, targets: Sequence[Target], weights: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
        """Fold one step into the states, in row slices of at most 4 MB where the criterion is elementwise.

        Slices cap an elementwise criterion's scratch memory whatever the model; each slice holds whole units
        (a multiple of ``pattern.unit_rows`` rows), so that per-unit states stay exact.
        """
        update = self.criterion.update
        for target, weight, grad in zip(targets, weights, grads):
            pattern = self.pattern_of(target.fqn)
            reduce = pattern.unit_scores if self.per_unit else None
            rows_per_unit = pattern.unit_rows if self.per_unit else 1
            rows = weight.shape[0] if weight.dim() else 0
            step = rows
            if self.criterion.elementwise and rows_per_unit is not None and rows > 1:
                step = max(_SLICE_ELEMENTS * rows // weight.numel() // rows_per_unit, 1) * rows_per_unit
            if step >= rows or rows_per_unit is None:
                update(target.state, weight, grad, reduce)
                continue
            for a in range(0, rows, step):
                b = min(a + step, rows)
                sliced = {k: v[a // rows_per_unit : -(-b // rows_per_unit)] for k, v in target.state.items()}
                update(sliced, weight[a:b], None if grad is None else grad[a:b], reduce)

    def reduced(self, target: Target, group: Any, sharded: bool = False) -> dict[str, Tensor]:
        """The target's states combined over the processes of ``group`` as declared.

        The states themselves where nothing is to be combined; copies otherwise, so that running sums stay
        per process. Sharded, states kept per weight hold each rank's own shard and are not combined (they
        come from gradients that are already reduced); ``"inputs"`` states are.
        """
        if group is None:
            return target.state
        out = dict(target.state)
        for name, spec in self.criterion.states.items():
            if spec.reduce is None or (sharded and spec.shape == "weight"):
                continue
            combined = out[name].clone()
            dist.all_reduce(combined, op=getattr(dist.ReduceOp, _OPS[spec.reduce]), group=group)
            if spec.reduce == "mean":
                combined.div_(dist.get_world_size(group))
            out[name] = combined
        return out

    def restore(
        self, fqn: str, saved: Mapping[str, Tensor] | Tensor, weight: Tensor, box: Box | None = None
    ) -> dict[str, Tensor]:
        """Checked states from a checkpoint, on the weight's device.

        A bare tensor is the single state of a checkpoint written before states had names; per-weight
        states where this run keeps them per unit (older checkpoints) are reduced to units. Sharded
        (``weight`` is this rank's shard, at ``box``), a state is a DTensor whose shard is taken, or a whole
        state that is sliced.

        Raises:
            ValueError: a state is missing or has a shape this run cannot use (the message names both).
        """
        specs = self.criterion.states
        if isinstance(saved, Tensor):
            if len(specs) != 1:
                raise ValueError(
                    f"checkpoint scores for '{fqn}' are one tensor; criterion {self.criterion!r} keeps {sorted(specs)}"
                )
            saved = {next(iter(specs)): saved}
        out = {}
        for name, spec in specs.items():
            if name not in saved:
                raise ValueError(f"checkpoint state of '{fqn}' lacks {name!r} of criterion {self.criterion!r}")
            value = self._shard(saved[name], spec, box, fqn).to(weight.device, spec.dtype)
            expected = self.shape(spec, weight.shape, fqn)
            if tuple(value.shape) != expected:
                if self.per_unit and spec.shape == "weight" and tuple(value.shape) == tuple(weight.shape):
                    value = self.pattern_of(fqn).unit_scores(value)
                else:
                    raise ValueError(
                        f"checkpoint scores for '{fqn}' have shape {tuple(value.shape)}; pattern "
                        f"'{self.pattern_of(fqn)}' "
                        f"on weight {tuple(weight.shape)} keeps them as {expected}"
                    )
            out[name] = value
        return out

    def _shard(self, value: Tensor, spec: StateSpec, box: Box | None, fqn: str) -> Tensor:
        """The part of a saved state for this rank (see :meth:`restore`)."""
        if is_dtensor(value):
            return local(value)
        if box is None or spec.shape != "weight" or box.local_shape == box.shape:
            return value
        if tuple(value.shape) == box.shape:  # a whole per-weight state
            return box.crop(value)
        found = box.units(self.pattern_of(fqn))
        if self.per_unit and found is not None and tuple(value.shape) == tuple(found[0]):  # whole, per unit
            local_units = self.shape(spec, box.local_shape, fqn)
            return crop(value, found[1], local_units)
        return value


def process_group() -> Any:
    """The default process group when several processes train together (DDP), else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None
