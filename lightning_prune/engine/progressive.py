"""``ProgressivePruner``: structured pruning eased in by unstructured interval masks between events."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_prune.engine.pruner import Event, Pruner
from lightning_prune.patterns import Coupled
from lightning_prune.schedules import Schedule
from lightning_prune.selection import UnitShard, prune_lowest
from lightning_prune.sharding import all_reduce_ints

__all__ = ["PROGRESSIVE_TYPES", "ProgressivePruner"]

PROGRESSIVE_TYPES = ("scores",)


class ProgressivePruner(Pruner):
    """Structured pruning whose blocks are removed gradually, weight by weight, between events (SPEC.md (d)).

    Between two structured events, ``progressive_steps - 1`` interval masks, evenly spaced, each take a
    further share of the weights that the next event's structured mask would drop (planned from the current
    scores), lowest-scored weights first. Interval masks may cut units partially; units with a pruned weight
    rank first at the next event, so every structured event, and the end, leaves masks that fit the pattern
    exactly, at the scheduled sparsity. The first event and the last are plain structured events.

    Args:
        model: as :class:`Pruner`.
        target_sparsity: as :class:`Pruner`.
        progressive_steps: interval masks per gap between events, counting the event that completes them
            (``4``: three interval masks, then the event). Each gap needs at least this many steps.
        progressive_type: ``"scores"``: interval masks pick weights by score (the only type built; the
            ``"linear"`` slice-by-slice variant is refused with an explicit error).
        **kwargs: every other argument of :class:`Pruner`.

    Raises:
        ValueError: an unstructured pattern, a schedule with fewer than two events, events closer than
            ``progressive_steps`` steps, ``progressive_steps < 1`` or an unknown ``progressive_type``; also
            everything :class:`Pruner` refuses.

    Example:
        >>> from lightning_prune.schedules import Iterative
        >>> p = ProgressivePruner(None, 0.8, pattern="4x1", progressive_steps=4,
        ...                       schedule=Iterative(start_step=0, end_step=400, frequency=100))
        >>> p.progressive_steps
        4
    """

    element_scores = True  # interval masks rank single weights inside the planned units

    def __init__(
        self,
        model: nn.Module | None,
        target_sparsity: float,
        progressive_steps: int = 4,
        progressive_type: str = "scores",
        **kwargs: Any,
    ) -> None:
        if not isinstance(progressive_steps, int) or isinstance(progressive_steps, bool) or progressive_steps < 1:
            raise ValueError(f"progressive_steps must be an int >= 1, got {progressive_steps!r}")
        if progressive_type == "linear":
            raise ValueError(
                "progressive_type 'linear' (a growing slice along each block) is not implemented; choose one of "
                f"{', '.join(map(repr, PROGRESSIVE_TYPES))}"
            )
        if progressive_type not in PROGRESSIVE_TYPES:
            raise ValueError(
                f"progressive_type {progressive_type!r} is not valid; choose one of "
                f"{', '.join(map(repr, PROGRESSIVE_TYPES))}"
            )
        self.progressive_steps = progressive_steps
        self.progressive_type = progressive_type
        self._last_interval = (-1, 0)  # (event, interval) last applied
        super().__init__(None, target_sparsity, **kwargs)
        if not self.pattern.structured:
            raise ValueError(
                f"pattern '{self.pattern}' has nothing to ease in: its units are single weights already; use "
                "Pruning, or a structured pattern ('4x1', '1xchannel', '2:4', ...)"
            )
        if isinstance(self.pattern, Coupled):
            raise ValueError(
                f"progressive pruning eases in single weights of each unit; pattern '{self.pattern}' prunes units "
                "spanning several weights (whole heads or neurons), which it cannot ease in; use Pruning"
            )
        if self.schedule is not None:
            self._check_schedule(self.schedule)
        if model is not None:
            self.bind(model, total_steps=kwargs.get("total_steps"))

    def config(self) -> dict[str, Any]:
        """The settings stored in checkpoints."""
        return {
            **super().config(),
            "progressive_steps": self.progressive_steps,
            "progressive_type": self.progressive_type,
        }

    def _check_schedule(self, schedule: Schedule | None) -> None:
        if schedule is None:
            return
        steps = schedule.event_steps()
        if len(steps) < 2:
            raise ValueError(
                f"ProgressivePruning eases in between pruning events, but schedule {schedule!r} has one event; "
                "use Pruning, or an Iterative schedule with start_step < end_step"
            )
        gap = min(b - a for a, b in itertools.pairwise(steps))
        if gap < self.progressive_steps:
            raise ValueError(
                f"events of schedule {schedule!r} are {gap} steps apart, fewer than progressive_steps="
                f"{self.progressive_steps}: every interval mask needs a step of its own; lower progressive_steps "
                "or raise the frequency"
            )

    def _adopt(self, model: nn.Module, state: Mapping[str, Any] | None, carried: bool) -> None:
        super()._adopt(model, state, carried)
        if state is not None and "last_interval" in state:
            event, interval = state["last_interval"]
            self._last_interval = (int(event), int(interval))
        elif not carried:
            self._last_interval = (-1, 0)

    def state_dict(self) -> dict[str, Any]:
        """As :class:`Pruner`, plus the last interval mask applied."""
        state = super().state_dict()
        if self._pending is None:
            state["last_interval"] = list(self._last_interval)
        return state

    def _advance(self, step: int) -> Event | None:
        event = super()._advance(step)
        if event is not None:
            self._last_interval = (self._last_event, 0)  # a structured event completes the previous gap
            return event
        schedule = self._resolved
        assert schedule is not None
        index = self._last_event
        if index < 0 or index >= schedule.num_events - 1:
            return None
        steps = schedule.event_steps()
        begin, gap = steps[index], steps[index + 1] - steps[index]
        interval = min((step - begin) * self.progressive_steps // gap, self.progressive_steps - 1)
        done_event, done = self._last_interval
        if done_event != index:
            done = 0
        if interval > done:
            share = (interval - done) / (self.progressive_steps - done)
            self._ease_in(schedule.sparsity(index + 1, self.target_sparsity), share)
            self._last_interval = (index, interval)
        return None

    @torch.no_grad()
    def _ease_in(self, next_sparsity: float, share: float) -> None:
        """Prune ``share`` of the still-kept weights that the next structured mask drops, lowest scores first."""
        scores = self._current_scores()
        plans = self._plan(scores, next_sparsity)
        masks = list(self._masks.values())
        # Pruned: -inf (counted first); in the plan: the weight's score; elsewhere: +inf (never taken).
        candidates = [torch.where(plan | ~mask, score, math.inf) for plan, score, mask in zip(plans, scores, masks)]
        # Sharded: counts over all ranks (each box counted by its owner); the selection spans all shards.
        group, boxes = self._group, list(self._boxes.values())
        owned = [box.owner for box in boxes] if group is not None else [True] * len(masks)
        shards = [UnitShard(b.owner, b.shape, b.offset) for b in boxes] if group is not None else None
        pending = all_reduce_ints([int((p & m).sum()) if o else 0 for p, m, o in zip(plans, masks, owned)], group)
        pruned = all_reduce_ints([int((~m).sum()) if o else 0 for m, o in zip(masks, owned)], group)
        if self.scope == "local":
            picks = []
            for i, (candidate, done, todo) in enumerate(zip(candidates, pruned, pending)):
                part = None if shards is None else [shards[i]]
                picks.append(prune_lowest([candidate], [1], done + round(share * todo), group=group, shards=part)[0])
        else:
            budget = sum(pruned) + round(share * sum(pending))
            picks = prune_lowest(candidates, [1] * len(candidates), budget, group=group, shards=shards)
        for pick, mask in zip(picks, masks):
            mask.logical_and_(~pick)
        self._masks_changed()
