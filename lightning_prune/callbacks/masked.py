"""What every callback that holds masks shares: choosing the weights, keeping pruned ones at exactly zero.

`MaskedWeights` resolves its targets (``op_types``/``include``/``exclude``), holds one bool mask per target
(True = kept), zeroes the gradients of pruned weights before every optimizer step and makes sure the step
leaves them at zero. Subclasses decide where masks come from: a pruning schedule (`Pruning`) or the zeros
already in the weights (`PatternLock`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_prune.patterns import Pattern
from lightning_prune.report import SparsityRow, sparsity_report
from lightning_prune.targets import compile_patterns, parse_op_types, resolve_targets

__all__ = ["MaskedWeights"]

# Optimizers (exact classes) whose update of an entry is exactly zero when the entry's weight, gradient and
# first-moment state are zero (weight decay and second moments then move nothing). With these, pruned
# weights stay zero if their first moments are zeroed once per mask change and their gradients at every
# step, so no pass over the weights is needed after each step. Values: the first-moment state names.
_ZERO_KEEPING: dict[type[torch.optim.Optimizer], tuple[str, ...]] = {
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


# Strategies that shard parameters: a rank holds a flat slice of each weight, so masks shaped like whole
# weights have nothing to multiply (README, "Distributed training").
_SHARDING = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


def _check_strategy(trainer: pl.Trainer) -> None:
    """Raise for a strategy that shards parameters (masks are kept per whole parameter)."""
    strategy = getattr(trainer, "strategy", None)
    names = {cls.__name__ for cls in type(strategy).__mro__}
    sharding = sorted(names.intersection(_SHARDING))
    if sharding:
        raise ValueError(
            f"strategy {type(strategy).__name__} shards parameters, which lightning_prune does not support yet: "
            "its masks are kept per whole parameter; use a single device, 'ddp' or 'ddp_spawn' (supported: "
            "unsharded strategies)"
        )


def _unit_multiplier(
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


def all_kept(mask: Tensor) -> bool:
    """Whether a bool mask is all True (a min over its bytes: several times faster than ``mask.all()``)."""
    return mask.numel() == 0 or bool(mask.reshape(-1).view(torch.uint8).amin())


def _multiply(tensors: list[Tensor], mults: list[Tensor], views: list[tuple[int, ...] | None]) -> None:
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


class MaskedWeights(Callback):
    """Base class: targets, their masks, and pruned weights kept at exactly zero through training.

    Args:
        op_types: module class names whose ``weight`` is a target.
        include: regexes; only modules whose full name matches one are targets.
        exclude: regexes; modules whose full name matches one are not targets.

    Example:
        >>> cb = MaskedWeights(op_types="Linear")
        >>> cb.op_types
        ('Linear',)
    """

    def __init__(
        self,
        op_types: str | Sequence[str] = ("Linear", "Conv1d", "Conv2d"),
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
    ) -> None:
        self.op_types = parse_op_types(op_types)
        compile_patterns("include", include)
        compile_patterns("exclude", exclude)
        self.include, self.exclude = include, exclude
        self._targets: dict[str, torch.nn.Parameter] = {}
        self._masks: dict[str, Tensor] = {}
        # Masks in each weight's dtype (the fused zeroing is ~3x faster than with bool masks); per unit where
        # the mask is made of whole units that form boxes in a view of the weight (`Pattern.unit_view`): then
        # `_unit_views[i]` is that view's shape and the multiplier broadcasts over it, else it is None.
        self._multipliers: list[Tensor] = []
        self._unit_views: list[tuple[int, ...] | None] = []
        self._pending: dict[str, Any] | None = None
        self._stepped = False  # an optimizer stepped that may have moved pruned weights
        self._moments_cleared: torch.optim.Optimizer | None = None  # zero-keeping optimizer, moments cleared
        # Parameters kept at zero along with the targets (a pruned filter's bias and norm entries), each with
        # the target whose mask decides it: (parameter, target name, its 0/1 multiplier).
        self._coupled: list[tuple[torch.nn.Parameter, str, Tensor]] = []

    # ------------------------------------------------------------------ public read-only views
    @property
    def state_key(self) -> str:
        """Identifies the parameters this callback owns, so that several instances can coexist."""
        return self._generate_state_key(op_types=self.op_types, include=self.include, exclude=self.exclude)

    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Read-only mapping: parameter name → bool mask shaped like it, True = kept."""
        return MappingProxyType(self._masks)

    def sparsity(self) -> float:
        """Fraction of zeros over all targets, from the masks."""
        total = sum(m.numel() for m in self._masks.values())
        kept = sum(int(m.sum()) for m in self._masks.values())
        return 1.0 - kept / max(total, 1)

    def report(self, pl_module: torch.nn.Module) -> list[SparsityRow]:
        """Per-layer rows (name, shape, pattern, sparsity) of the current masks."""
        return sparsity_report(pl_module, self._masks, self._pattern_name())

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve and validate targets; raises before training with the model untouched."""
        if stage == "fit":
            _check_strategy(trainer)
            self._targets = self._resolve_now(pl_module)
            self._check_unclaimed(trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Zero the gradients of pruned weights; make sure the coming step leaves them at zero."""
        self._mask_gradients(optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After a step by an optimizer that may move pruned weights, set them to zero again."""
        if self._stepped:
            self._zero_weights()
            self._stepped = False

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the state until ``on_train_start``, when the model is final and its weights restored."""
        self._pending = dict(state_dict)

    # ------------------------------------------------------------------ for subclasses
    def _pattern_name(self) -> str | None:
        return None

    def _check_target(self, fqn: str, param: torch.nn.Parameter) -> None:
        """Raise if ``param`` cannot be a target (e.g. its shape does not suit the pattern)."""

    def _resolve_now(self, pl_module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        targets = resolve_targets(pl_module, self.op_types, self.include, self.exclude)
        for fqn, param in targets.items():
            self._check_target(fqn, param)
        return targets

    def _check_unclaimed(self, trainer: pl.Trainer) -> None:
        """Raise if another mask-holding callback of ``trainer`` already claims one of our targets."""
        for other in getattr(trainer, "callbacks", []):
            if other is self or not isinstance(other, MaskedWeights) or not other._targets:
                continue
            theirs = {id(p) for p in other._targets.values()}
            shared = [fqn for fqn, p in self._targets.items() if id(p) in theirs]
            if shared:
                raise ValueError(
                    f"{type(self).__name__} and {type(other).__name__} both claim {shared[:6]}"
                    f"{' ...' if len(shared) > 6 else ''}: a weight can have one mask owner; split them with "
                    "include/exclude"
                )

    def _bind(self, pl_module: torch.nn.Module) -> bool:
        """Point the targets at the module's current parameters; True if they differ from those at setup.

        Strategies and ``configure_model`` may replace modules after ``setup``: the targets are resolved and
        checked again here, still before the first step, and a change of names or shapes is reported.
        """
        before = {fqn: tuple(p.shape) for fqn, p in self._targets.items()}
        self._targets = self._resolve_now(pl_module)
        now = {fqn: tuple(p.shape) for fqn, p in self._targets.items()}
        if before and before != now:
            changed = sorted(set(before.items()) ^ set(now.items()))
            rank_zero_warn(
                f"the modules to prune changed between setup and the start of training (replaced modules?): "
                f"{changed[:6]}{' ...' if len(changed) > 6 else ''}; pruning the current ones"
            )
            return True
        return False

    def _checked_masks(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Saved masks, checked against the targets by name and shape, on the targets' devices."""
        if set(masks) != set(self._targets):
            raise ValueError(f"checkpoint masks name {sorted(masks)}, but the targets now are {sorted(self._targets)}")
        checked = {}
        for fqn, param in self._targets.items():
            mask = masks[fqn]
            if tuple(mask.shape) != tuple(param.shape):
                raise ValueError(
                    f"checkpoint mask for '{fqn}' has shape {tuple(mask.shape)}, weight {tuple(param.shape)}"
                )
            checked[fqn] = mask.to(device=param.device, dtype=torch.bool)
        return checked

    def _masks_changed(self) -> None:
        """Call after masks lost entries: refresh multipliers, zero the weights, re-check optimizer state."""
        self._refresh_multipliers()
        self._zero_weights()
        self._moments_cleared = None

    def _unit_pattern(self) -> Pattern | None:
        """The pattern whose units masks are made of, if any (per-unit multipliers need one)."""
        return None

    def _refresh_multipliers(self) -> None:
        if not self._multipliers and all(all_kept(m) for m in self._masks.values()):
            return
        pattern = self._unit_pattern()
        old: list[Tensor | None] = [*self._multipliers] or [None] * len(self._masks)
        self._multipliers, self._unit_views = [], []
        for previous, param, mask in zip(old, self._targets.values(), self._masks.values()):
            view, multiplier = _unit_multiplier(pattern, param, mask)
            if multiplier is None:  # per weight; reuse the previous buffer when it is one
                if previous is not None and previous.shape == param.shape and previous.dtype == param.dtype:
                    multiplier = previous
                else:
                    multiplier = torch.empty_like(param)
                multiplier.copy_(mask)
            self._multipliers.append(multiplier)
            self._unit_views.append(view)
        for _, fqn, multiplier in self._coupled:
            mask = self._masks[fqn]
            multiplier.copy_(mask.reshape(mask.shape[0], -1).any(dim=1))  # a filter with any weight left

    def _pairs(self) -> tuple[list[torch.nn.Parameter], list[Tensor], list[tuple[int, ...] | None]]:
        """Every parameter kept at zero with its multiplier and unit view: the targets, then coupled ones."""
        params = [*self._targets.values(), *(p for p, _, _ in self._coupled)]
        views = [*self._unit_views, *(None for _ in self._coupled)]
        return params, [*self._multipliers, *(m for _, _, m in self._coupled)], views

    @torch.no_grad()
    def _zero_weights(self) -> None:
        if self._multipliers:
            params, mults, views = self._pairs()
            _multiply([p.data for p in params], mults, views)

    def _mask_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._multipliers:
            return
        triples = [(w.grad, m, v) for w, m, v in zip(*self._pairs()) if w.grad is not None]
        if triples:
            grads, mults, views = (list(x) for x in zip(*triples))
            _multiply(grads, mults, views)
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the real one
        if self._moments_cleared is not optimizer and not self._clear_moments(optimizer):
            self._stepped = True  # an optimizer we cannot reason about: re-zero the weights after it

    @torch.no_grad()
    def _clear_moments(self, optimizer: torch.optim.Optimizer) -> bool:
        """Zero the first moments of pruned weights if ``optimizer`` keeps zeros; False if it may not."""
        names = _ZERO_KEEPING.get(type(optimizer))
        if names is None:
            return False
        params, multipliers, views = self._pairs()
        managed = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not all(id(p) in managed for p in params if p.grad is not None):
            return False  # e.g. sharded or flattened parameters: the optimizer steps other tensors
        moments: list[Tensor] = []
        mults: list[Tensor] = []
        moment_views: list[tuple[int, ...] | None] = []
        for param, mult, view in zip(params, multipliers, views):
            state = optimizer.state.get(param, {})
            for name in names:
                moment = state.get(name)
                if isinstance(moment, Tensor) and moment.shape == param.shape and moment.dtype == mult.dtype:
                    moments.append(moment)
                    mults.append(mult)
                    moment_views.append(view)
                elif moment is not None:
                    return False
        if moments:
            _multiply(moments, mults, moment_views)
        self._moments_cleared = optimizer
        return True
