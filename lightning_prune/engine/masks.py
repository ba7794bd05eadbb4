"""What every engine that holds masks shares: choosing the weights, and keeping pruned ones at exactly zero.

:class:`MaskKeeper` resolves its targets (``op_types``/``include``/``exclude``), holds one bool mask per target
(True = kept), zeroes the gradients of pruned weights before every optimizer step and makes sure the step
leaves them at zero. Subclasses decide where masks come from: a pruning schedule (:class:`~.Pruner`) or the
zeros already in the weights (:class:`~.MaskLock`). Nothing here knows Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.engine.zeroing import ZERO_KEEPING, all_kept, multiply, unit_multiplier
from lightning_prune.patterns import Coupled, Pattern, UnitGroup
from lightning_prune.report import SparsityRow
from lightning_prune.sharding import Box, all_reduce_ints, box_of, every_box, is_dtensor, local, placed, sharded_group
from lightning_prune.targets import compile_patterns, parse_op_types, resolve_targets

__all__ = ["MaskKeeper"]


class MaskKeeper:
    """Base class: targets, their masks, and pruned weights kept at exactly zero through training.

    The loop calls :meth:`bind` once the model's layers exist, :meth:`before_optimizer_step` when the
    gradients are final and :meth:`after_optimizer_step` after the optimizer stepped.

    Args:
        op_types: module class names whose ``weight`` is a target.
        include: regexes; only modules whose full name matches one are targets.
        exclude: regexes; modules whose full name matches one are not targets.

    Example:
        >>> keeper = MaskKeeper(op_types="Linear")
        >>> keeper.op_types
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
        self._targets: dict[str, nn.Parameter] = {}
        self._masks: dict[str, Tensor] = {}
        # Masks in each weight's dtype (the fused zeroing is ~3x faster than with bool masks); per unit where
        # the mask is made of whole units that form boxes in a view of the weight (`Pattern.unit_view`): then
        # `_unit_views[i]` is that view's shape and the multiplier broadcasts over it, else it is None.
        self._multipliers: list[Tensor] = []
        self._unit_views: list[tuple[int, ...] | None] = []
        self._model: nn.Module | None = None  # the model bound to
        self._pending: dict[str, Any] | None = None  # a loaded state, waiting for the model
        self._stepped = False  # an optimizer stepped that may have moved pruned weights
        self._moments_cleared: torch.optim.Optimizer | None = None  # zero-keeping optimizer, moments cleared
        # Parameters kept at zero along with the targets (a pruned filter's bias and norm entries), each with
        # the target whose mask decides it and its 0/1 multiplier.
        self._coupled: list[tuple[nn.Parameter, str, Tensor]] = []
        # Sharded models (DTensor parameters): masks, multipliers and states hold this rank's box of each
        # target; counts over the whole targets are all-reduced over `_group` whenever masks change.
        self._group: Any = None
        self._boxes: dict[str, Box] = {}
        self._kept: dict[str, int] = {}  # kept weights per target, over all ranks (sharded only)
        # Each target's own pattern where it differs from `_unit_pattern()` (members of a coupled pattern).
        self._patterns: dict[str, Pattern] = {}
        self._groups: list[UnitGroup] = []  # the layers of a coupled pattern, each a unit over several targets

    # ------------------------------------------------------------------ public views
    @property
    def targets(self) -> Mapping[str, nn.Parameter]:
        """Read-only mapping: parameter name → the parameter pruned (empty until :meth:`bind`)."""
        return MappingProxyType(self._targets)

    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Read-only mapping: parameter name → bool mask shaped like it, True = kept.

        For a sharded parameter (a DTensor) the mask is a DTensor placed like it: each rank holds the mask
        of its own shard.
        """
        if self._group is None:
            return MappingProxyType(self._masks)
        return MappingProxyType({fqn: placed(m, self._targets[fqn]) for fqn, m in self._masks.items()})

    @property
    def pattern_name(self) -> str:
        """The pattern's name for reports."""
        return ""

    def sparsity(self) -> float:
        """Fraction of zeros over all targets, from the masks (0.0 before there are any).

        Sharded, it counts the whole targets over all ranks (the same value on every rank, read from counts
        taken when the masks last changed: no communication here).
        """
        kept, total = self._counts()
        return 1.0 - sum(kept.values()) / sum(total.values()) if sum(total.values()) else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of zeros of each target, by name."""
        kept, total = self._counts()
        return {fqn: 1.0 - kept[fqn] / max(total[fqn], 1) for fqn in kept}

    def report(self) -> list[SparsityRow]:
        """Per-layer rows (name, shape, pattern, sparsity) of the current masks."""
        shapes = {fqn: tuple(p.shape) for fqn, p in self._targets.items()}
        return [
            SparsityRow(fqn, shapes.get(fqn, tuple(self._masks[fqn].shape)), self.pattern_name, value)
            for fqn, value in self.layer_sparsity().items()
        ]

    def _counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Kept and total weights of each target, over all ranks."""
        if self._group is not None:
            return dict(self._kept), {fqn: p.numel() for fqn, p in self._targets.items()}
        kept = {fqn: int(torch.count_nonzero(m)) for fqn, m in self._masks.items()}
        return kept, {fqn: m.numel() for fqn, m in self._masks.items()}

    def config(self) -> dict[str, Any]:
        """What defines this run, as stored in checkpoints and compared on resume."""
        return {"targets": list(self._targets)} if self._targets else {}

    # ------------------------------------------------------------------ binding to a model
    def check(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Resolve and validate the targets of ``model`` without touching it; raises on anything wrong."""
        targets = self._select_targets(model, resolve_targets(model, self.op_types, self.include, self.exclude))
        for fqn, param in targets.items():
            self._check_target(fqn, param)
        self._check_shards(targets)
        self._check_targets(targets)
        return targets

    def _check_shards(self, targets: Mapping[str, nn.Parameter]) -> None:
        """Raise, identically on every rank, if a shard of a target cuts the units of the pattern.

        Every rank's shard is computed from the placement alone, so that all ranks see the same faults.
        """
        for fqn, param in targets.items():
            pattern = self._pattern_for(fqn)
            if pattern is None or not is_dtensor(param):
                continue
            placements, mesh = param.placements, param.device_mesh  # type: ignore[attr-defined]
            for rank, box in every_box(param):
                if box.units(pattern) is None:
                    raise ValueError(
                        f"pattern '{pattern}' cannot prune '{fqn}' {tuple(param.shape)} as it is sharded "
                        f"({', '.join(map(repr, placements))} over {mesh.size()} ranks): the "
                        f"shard {box.describe()} of rank {rank} cuts its units; choose sizes whose shards hold "
                        "whole units (rows, or columns, per rank divisible by the block), exclude the layer, or "
                        "use pattern 'unstructured' or '1xchannel'/'channelx1'"
                    )

    def bind(self, model: nn.Module, state: Mapping[str, Any] | None = None) -> None:
        """Take the targets of ``model`` (its layers must exist) and set up masks; pruned weights are zeroed.

        Masks come from ``state`` (or one loaded earlier with :meth:`load_state_dict`) if given; otherwise
        masks held from an earlier binding carry over when the targets have the same names and shapes (a
        second ``fit``); otherwise they start as the subclass decides.

        Raises:
            ValueError: the targets cannot be pruned as configured, or the state was written under another
                configuration or does not fit them. Nothing is changed then.
        """
        patterns = self._patterns, self._groups  # check() sets the new targets' patterns
        pending = state is None and self._pending is not None
        if pending:
            state = self._pending
        try:
            targets = self.check(model)
            if state is not None:
                self._check_config(state.get("config", {}), targets)
        except Exception:
            self._patterns, self._groups = patterns
            raise
        carried = bool(self._masks) and {f: tuple(m.shape) for f, m in self._masks.items()} == {
            f: tuple(local(p).shape) for f, p in targets.items()
        }
        before = (self._model, self._targets, self._masks, self._group, self._boxes)
        self._model, self._targets = model, targets
        self._group = sharded_group(list(targets.values()))
        self._boxes = {fqn: box_of(p, self._group is not None) for fqn, p in targets.items()}
        try:
            self._adopt(model, state, carried)
        except Exception:
            self._model, self._targets, self._masks, self._group, self._boxes = before
            self._patterns, self._groups = patterns
            raise
        if pending:
            self._pending = None
        self._multipliers, self._unit_views, self._coupled = [], [], []
        self._masks_changed()

    # ------------------------------------------------------------------ the training step
    def before_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """Zero the gradients of pruned weights; make sure the coming step leaves them at zero."""
        self._mask_gradients(optimizer)

    def after_optimizer_step(self) -> None:
        """After a step by an optimizer that may move pruned weights, set them to zero again."""
        if self._stepped:
            self._zero_weights()
            self._stepped = False

    def zero_pruned(self) -> None:
        """Set the pruned weights to zero now, e.g. after something else wrote the weights."""
        self._zero_weights()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Masks and the configuration; a loaded state is returned as is until :meth:`bind` takes it."""
        if self._pending is not None:
            return self._pending
        return {"masks": {fqn: m.cpu() for fqn, m in self.masks.items()}, "config": self.config()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state: at once if bound to a model, else at :meth:`bind`, when the model is final.

        Until then its masks are readable through :attr:`masks` and :meth:`sparsity`.
        """
        if self._model is not None:
            self.bind(self._model, state_dict)
            return
        self._pending = dict(state_dict)
        self._masks = {fqn: m.to(torch.bool) for fqn, m in state_dict["masks"].items()}

    # ------------------------------------------------------------------ for subclasses
    def _check_target(self, fqn: str, param: nn.Parameter) -> None:
        """Raise if ``param`` cannot be a target (e.g. its shape does not suit the pattern)."""

    def _check_targets(self, targets: Mapping[str, nn.Parameter]) -> None:
        """Raise if the targets as a whole cannot be pruned as configured."""

    def _adopt(self, model: nn.Module, state: Mapping[str, Any] | None, carried: bool) -> None:
        """Set masks (and any other state) for newly bound targets."""
        if state is not None:
            self._masks = self._checked_masks(state["masks"])
        elif not carried:
            self._masks = {fqn: torch.ones_like(local(p), dtype=torch.bool) for fqn, p in self._targets.items()}
        else:
            self._masks = {fqn: m.to(self._targets[fqn].device) for fqn, m in self._masks.items()}

    def _unit_pattern(self) -> Pattern | None:
        """The pattern whose units masks are made of, if any (per-unit multipliers need one)."""
        return None

    def _pattern_for(self, fqn: str) -> Pattern | None:
        """The pattern whose units the mask of target ``fqn`` is made of (its member pattern, if coupled)."""
        return self._patterns.get(fqn) or self._unit_pattern()

    def _select_targets(self, model: nn.Module, targets: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        """The targets among the resolved ones: all, or for a coupled pattern the weights of its layers' units.

        Sets the targets' member patterns and the layers (:class:`~lightning_prune.patterns.UnitGroup`).

        Raises:
            ValueError: a coupled pattern finds no layer among the targets, or only some weights of one.
        """
        pattern = self._unit_pattern()
        if not isinstance(pattern, Coupled):
            self._patterns, self._groups = {}, []
            return targets
        noun = pattern.noun
        found = pattern.groups(model)
        if not found:
            raise ValueError(
                f"pattern '{pattern}' found no {noun} in {type(model).__name__}: its layers are recognised by the "
                "module names of common Hugging Face models (q_proj/k_proj/v_proj/o_proj, attention.self.query, "
                f"gate_proj/up_proj/down_proj, intermediate.dense ...); pass the layout: "
                f"{type(pattern).__name__}(layers={{...}})"
            )
        groups = []
        for g in found:
            inside = [f for f in g.fqns if f in targets]
            if inside and len(inside) < len(g.fqns):
                missing = [f for f in g.fqns if f not in targets]
                raise ValueError(
                    f"pattern '{pattern}' prunes each {noun} of '{g.name}' in {g.fqns} together, but op_types/include/"
                    f"exclude leave out {missing}: include all of them or none"
                )
            if inside:
                groups.append(g)
        if not groups:
            raise ValueError(
                f"pattern '{pattern}' found {noun} layers ({', '.join(g.name for g in found[:4])}"
                f"{' ...' if len(found) > 4 else ''}), but none among the targets that op_types={self.op_types}, "
                f"include={self.include!r} and exclude={self.exclude!r} select"
            )
        self._patterns = {m.fqn: m.pattern for g in groups for m in g.members}
        self._groups = groups
        return {fqn: param for fqn, param in targets.items() if fqn in self._patterns}

    def _check_config(self, saved: Mapping[str, Any], targets: Mapping[str, nn.Parameter]) -> None:
        """Raise if a loaded state was written under another configuration (a different run)."""
        current = {**self.config(), "targets": list(targets)}
        differs = {k: (saved[k], current[k]) for k in saved if k in current and saved[k] != current[k]}
        if differs:
            detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differs.items())
            raise ValueError(f"the checkpoint was written under another pruning configuration ({detail})")

    def _checked_masks(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Saved masks, checked against the targets by name and shape, on the targets' devices.

        Sharded, each rank takes its box: of a DTensor mask placed like the target, or of a whole mask.
        """
        boxes = self._checked_like_targets(masks, "masks", "mask")
        return {fqn: box.to(dtype=torch.bool) for fqn, box in boxes.items()}

    def _checked_like_targets(self, saved: Mapping[str, Tensor], plural: str, singular: str) -> dict[str, Tensor]:
        """Saved tensors shaped like the targets, checked by name and shape: this rank's boxes, on its devices.

        ``plural`` and ``singular`` name what was saved in the errors ("masks", "mask").
        """
        if set(saved) != set(self._targets):
            raise ValueError(
                f"checkpoint {plural} name {sorted(saved)}, but the targets now are {sorted(self._targets)}"
            )
        checked = {}
        for fqn, param in self._targets.items():
            value = saved[fqn]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"checkpoint {singular} for '{fqn}' has shape {tuple(value.shape)}, weight {tuple(param.shape)}"
                )
            checked[fqn] = self._local_box(fqn, value).to(device=param.device)
        return checked

    def _local_box(self, fqn: str, whole: Tensor) -> Tensor:
        """The part of a tensor shaped like target ``fqn`` on this rank: its shard, or a slice of a whole one."""
        box = self._boxes.get(fqn)
        if is_dtensor(whole):
            return local(whole)
        if box is None or box.local_shape == box.shape:
            return whole
        return box.crop(whole)

    def _masks_changed(self) -> None:
        """Call after masks lost entries: refresh multipliers, zero the weights, re-check optimizer state.

        Sharded, every rank calls it at the same point (it counts the masks over all ranks).
        """
        self._refresh_multipliers()
        self._zero_weights()
        self._moments_cleared = None
        if self._group is not None:
            counted = [int(torch.count_nonzero(m)) if self._boxes[f].owner else 0 for f, m in self._masks.items()]
            self._kept = dict(zip(self._masks, all_reduce_ints(counted, self._group)))

    def _refresh_multipliers(self) -> None:
        if not self._multipliers and all(all_kept(m) for m in self._masks.values()):
            return
        old: list[Tensor | None] = [*self._multipliers] or [None] * len(self._masks)
        self._multipliers, self._unit_views = [], []
        for previous, (fqn, param), mask in zip(old, self._targets.items(), self._masks.values()):
            shard = local(param.detach())
            view, multiplier = unit_multiplier(self._pattern_for(fqn), shard, mask)
            if multiplier is None:  # per weight; reuse the previous buffer when it is one
                if previous is not None and previous.shape == shard.shape and previous.dtype == shard.dtype:
                    multiplier = previous
                else:
                    multiplier = torch.empty_like(shard)
                multiplier.copy_(mask)
            self._multipliers.append(multiplier)
            self._unit_views.append(view)
        for _, fqn, multiplier in self._coupled:
            mask = self._masks[fqn]
            multiplier.copy_(mask.reshape(mask.shape[0], -1).any(dim=1))  # a filter with any weight left

    def _pairs(self) -> tuple[list[nn.Parameter], list[Tensor], list[tuple[int, ...] | None]]:
        """Every parameter kept at zero with its multiplier and unit view: the targets, then coupled ones."""
        params = [*self._targets.values(), *(p for p, _, _ in self._coupled)]
        views = [*self._unit_views, *(None for _ in self._coupled)]
        return params, [*self._multipliers, *(m for _, _, m in self._coupled)], views

    @torch.no_grad()
    def _zero_weights(self) -> None:
        if self._multipliers:
            params, mults, views = self._pairs()
            multiply([local(p.detach()) for p in params], mults, views)

    @torch.no_grad()
    def _mask_gradients(self, optimizer: torch.optim.Optimizer | None) -> None:
        if not self._multipliers:
            return
        triples = [(local(w.grad), m, v) for w, m, v in zip(*self._pairs()) if w.grad is not None]
        if triples:
            grads, mults, views = (list(x) for x in zip(*triples))
            multiply(grads, mults, views)
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the real one
        if optimizer is None or (self._moments_cleared is not optimizer and not self._clear_moments(optimizer)):
            self._stepped = True  # an optimizer we cannot reason about: re-zero the weights after it

    @torch.no_grad()
    def _clear_moments(self, optimizer: torch.optim.Optimizer) -> bool:
        """Zero the first moments of pruned weights if ``optimizer`` keeps zeros; False if it may not."""
        names = ZERO_KEEPING.get(type(optimizer))
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
                    moments.append(local(moment))
                    mults.append(mult)
                    moment_views.append(view)
                elif moment is not None:
                    return False
        if moments:
            multiply(moments, mults, moment_views)
        self._moments_cleared = optimizer
        return True
