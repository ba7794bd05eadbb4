"""The pruning engine: ``Pruner`` runs the whole algorithm from any training loop, without Lightning."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.criteria import Criterion, parse_criterion
from lightning_prune.engine.coupling import Coupling
from lightning_prune.engine.masks import MaskKeeper
from lightning_prune.engine.planning import (
    TRAINING_SCOPES,
    check_coupled,
    check_reachable,
    plan,
    plan_coupled,
    pruned_first,
)
from lightning_prune.engine.scores import Target, TargetStates, process_group
from lightning_prune.patterns import Coupled, Pattern, parse_pattern
from lightning_prune.regularization import Regularization
from lightning_prune.schedules import Schedule, default_schedule
from lightning_prune.sharding import all_reduce_ints, local, placed

__all__ = ["Event", "Pruner", "check_fraction"]


def check_fraction(name: str, value: object, upper_open: bool) -> float:
    """``value`` as a float in [0, 1) (``upper_open``) or [0, 1]; ``ValueError`` naming ``name`` otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0.0 <= float(value) < 1.0 if upper_open else 0.0 <= float(value) <= 1.0):  # type: ignore[arg-type]
        bounds = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name} must be a number in {bounds}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Event:
    """A pruning event that just happened.

    Attributes:
        step: its optimizer step.
        index: its index in the schedule.
        scheduled: the sparsity it was scheduled to reach (the masks reach it up to one unit;
            :meth:`Pruner.sparsity` counts them).
        last: whether it was the schedule's last event.

    Example:
        >>> Event(step=10, index=1, scheduled=0.4, last=False).scheduled
        0.4
    """

    step: int
    index: int
    scheduled: float
    last: bool


class Pruner(MaskKeeper):
    """Prune a model while it trains (SPEC.md): pattern, criterion, schedule and scope, from any training loop.

    Masks are kept per target (True = kept) and only ever lose entries (with ``feedback``, they are chosen
    afresh at every event until the last). Pruned weights are exactly zero after every optimizer step; their
    gradients are zeroed before it (with ``feedback``, from the last event on). Parameter names never change.
    The state (masks, running scores, schedule position, feedback's dense weights) round-trips through
    :meth:`state_dict`.

    Args:
        model: the model to prune, or None to :meth:`bind` one later (e.g. once its layers exist).
        target_sparsity: final fraction of zeros over all targets, in [0, 1).
        pattern: ``"unstructured"``/``"1x1"``, ``"NxM"`` (e.g. ``"4x1"``), ``"channelx1"``, ``"1xchannel"``,
            ``"N:M"`` (e.g. ``"2:4"``) or a :class:`~lightning_prune.patterns.Pattern`.
        criterion: ``"magnitude"``, ``"gradient"``, ``"snip"``, ``"snip_momentum"`` or a
            :class:`~lightning_prune.criteria.Criterion`.
        schedule: :class:`~lightning_prune.schedules.OneShot` or :class:`~lightning_prune.schedules.Iterative`;
            ``None`` prunes over the whole run (:func:`~lightning_prune.schedules.default_schedule` of
            ``total_steps``).
        scope: ``"global"`` (one ranking across targets, budget in elements), ``"local"`` (each layer), or
            ``"lamp"``: one ranking of layer-adaptive LAMP scores (Lee et al. 2021, arXiv:2010.07611), which
            keep every layer's largest weights and do not depend on a layer's scale
            (``lightning_prune.engine.planning.lamp_scores``).
        op_types: module class names whose ``weight`` is pruned.
        include: regexes; only modules whose full name matches one are pruned.
        exclude: regexes; modules whose full name matches one are not pruned.
        min_sparsity_per_layer: global scope: the least sparsity of any layer at the end (scaled down
            proportionally at earlier events).
        max_sparsity_per_layer: global scope: the most sparsity of any layer.
        regularization: e.g. :class:`~lightning_prune.regularization.GroupLassoStep` (or the ``GroupLasso``
            callback), applied to the targets' groups of ``pattern`` at every optimizer step of the window.
        total_steps: the run's optimizer steps, needed only with ``schedule=None``.
        feedback: dynamic pruning with feedback (Lin et al. 2020, "Dynamic Model Pruning with Feedback",
            arXiv:2006.07253). Inside the pruning window the forward pass still sees the pruned model, but the
            optimizer steps the dense weights with its gradient, ``W ← W − lr · ∇L(W ⊙ M)``, and every event
            chooses the masks afresh from the dense weights, so a weight pruned too early comes back. After the
            last event the masks are final and pruned weights stay zero, as without feedback. Holds one copy of
            the targets during the window. Patterns whose units lie inside one weight only (unstructured,
            NxM, N:M); not with ``regularization``.

    Raises:
        ValueError: an argument out of range or unknown (the message names it, shows it and lists choices);
            with a model, targets that cannot be pruned as configured.
        TypeError: an argument of the wrong type.

    Example:
        >>> from lightning_prune.schedules import Iterative
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> pruner = Pruner(model, 0.5, pattern="4x1", schedule=Iterative(start_step=0, end_step=4, frequency=2))
        >>> for step in range(6):
        ...     model(torch.randn(4, 8)).square().mean().backward()
        ...     event = pruner.before_optimizer_step(step, opt)   # scores, events, pruned gradients zeroed
        ...     opt.step(); opt.zero_grad()
        ...     pruner.after_optimizer_step()                      # pruned weights stay exactly zero
        >>> round(pruner.sparsity(), 2)
        0.5
    """

    # Subclasses that rank single weights inside units (progressive pruning) keep running scores per weight.
    element_scores: bool = False

    def __init__(
        self,
        model: nn.Module | None,
        target_sparsity: float,
        pattern: str | Pattern = "4x1",
        criterion: str | Criterion = "snip_momentum",
        schedule: Schedule | None = None,
        scope: str = "global",
        op_types: str | Sequence[str] = ("Linear", "Conv1d", "Conv2d"),
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        min_sparsity_per_layer: float = 0.0,
        max_sparsity_per_layer: float = 0.98,
        regularization: Regularization | None = None,
        total_steps: int | None = None,
        feedback: bool = False,
    ) -> None:
        self.target_sparsity = check_fraction("target_sparsity", target_sparsity, upper_open=True)
        self.pattern = parse_pattern(pattern)
        self.criterion = parse_criterion(criterion)
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be OneShot, Iterative or None, got {type(schedule).__name__}")
        self.schedule = schedule
        if scope not in TRAINING_SCOPES:
            choices = ", ".join(map(repr, TRAINING_SCOPES))
            raise ValueError(f"scope {scope!r} is not valid; choose one of {choices}")
        self.scope = scope
        super().__init__(op_types, include, exclude)
        self.min_sparsity_per_layer = check_fraction("min_sparsity_per_layer", min_sparsity_per_layer, False)
        self.max_sparsity_per_layer = check_fraction("max_sparsity_per_layer", max_sparsity_per_layer, False)
        if self.min_sparsity_per_layer > self.max_sparsity_per_layer:
            raise ValueError(
                f"min_sparsity_per_layer ({min_sparsity_per_layer}) must be <= max_sparsity_per_layer "
                f"({max_sparsity_per_layer})"
            )
        if not self.min_sparsity_per_layer <= self.target_sparsity <= self.max_sparsity_per_layer:
            raise ValueError(
                f"target_sparsity {target_sparsity} is infeasible with min_sparsity_per_layer="
                f"{min_sparsity_per_layer} and max_sparsity_per_layer={max_sparsity_per_layer}: every layer "
                "stays within [min, max], so the target must too"
            )
        if self.target_sparsity > self.pattern.max_sparsity + 1e-9:
            raise ValueError(
                f"target_sparsity {target_sparsity} is above what pattern '{self.pattern}' can reach "
                f"({self.pattern.max_sparsity:g}); use target_sparsity <= {self.pattern.max_sparsity:g}"
            )
        if regularization is not None and not isinstance(regularization, Regularization):
            raise TypeError(
                f"regularization must be a GroupLasso or None, got {type(regularization).__name__} {regularization!r}"
            )
        if regularization is not None and isinstance(self.pattern, Coupled):
            raise ValueError(
                f"regularization (group lasso) does not apply to pattern '{self.pattern}', whose units span several "
                "weights; use regularization=None, or a single-weight pattern ('1xchannel', '4x1', ...)"
            )
        if not isinstance(feedback, bool):
            raise TypeError(f"feedback must be True or False, got {type(feedback).__name__} {feedback!r}")
        if feedback:
            self._check_feedback(regularization)
        self.feedback = feedback
        if regularization is not None:
            regularization.attach(self, self.pattern)
        self.regularization = regularization
        # fp16 with a GradScaler: a step with non-finite gradients is one the scaler skips, so scores and
        # masks wait for the next finite step (set by the loop; the Lightning callback sets it for "16-mixed").
        self.skip_nonfinite = False
        self._resolved: Schedule | None = None
        self._last_event = -1
        self._next_step = 0  # the optimizer step whose forward pass runs now
        self._views: list[Target] = []
        self._states: TargetStates | None = None
        self._set_up = False  # the criterion's setup ran and its teardown did not yet
        self._coupling: Coupling | None = None
        # feedback: what the optimizer made of every target, pruned entries included (this rank's shards),
        # from the first event to the last; and whether the targets hold those dense values right now.
        self._dense: list[Tensor] = []
        self._densified = False
        self._warned_adaptive = False
        if model is not None:
            self.bind(model, total_steps=total_steps)

    # ------------------------------------------------------------------ public views
    @property
    def pattern_name(self) -> str:
        """The pattern's name for reports."""
        return str(self.pattern)

    @property
    def resolved_schedule(self) -> Schedule | None:
        """The schedule in use (``schedule``, or the one derived from the run's length); None before binding."""
        return self._resolved or self.schedule

    @property
    def last_event(self) -> int:
        """Index of the last event applied; -1 before the first."""
        return self._last_event

    @property
    def finished(self) -> bool:
        """Whether the schedule's last event has happened."""
        schedule = self.resolved_schedule
        return schedule is not None and self._last_event >= schedule.num_events - 1

    @property
    def states(self) -> Mapping[str, Mapping[str, Tensor]]:
        """The criterion's running states by target name, then state name (empty outside the scoring window)."""
        return MappingProxyType({v.fqn: MappingProxyType(v.state) for v in self._views if v.state})

    def config(self) -> dict[str, Any]:
        """The settings that define this pruning run, as stored in checkpoints and compared on resume."""
        return {
            "target_sparsity": self.target_sparsity,
            "pattern": str(self.pattern),
            "criterion": self.criterion.config(),
            "scope": self.scope,
            "schedule": repr(self.resolved_schedule),
            "min_sparsity_per_layer": self.min_sparsity_per_layer,
            "max_sparsity_per_layer": self.max_sparsity_per_layer,
            "regularization": repr(self.regularization),
            "feedback": self.feedback,
            **super().config(),
        }

    def scheduled_sparsity(self, step: int) -> float:
        """Sparsity the schedule asks for once optimizer step ``step`` is taken (0.0 before the first event).

        Raises:
            RuntimeError: ``schedule=None`` before the run's length is known.

        Example:
            >>> from lightning_prune.schedules import Iterative
            >>> p = Pruner(None, 0.8, schedule=Iterative(start_step=10, end_step=30, frequency=10, decay="linear"))
            >>> [round(p.scheduled_sparsity(s), 3) for s in (0, 10, 25, 30)]
            [0.0, 0.267, 0.533, 0.8]
        """
        schedule = self.resolved_schedule
        if schedule is None:
            raise RuntimeError("schedule=None spans the whole run, whose length is known once training starts")
        event = schedule.last_event_at(step)
        return 0.0 if event < 0 else schedule.sparsity(event, self.target_sparsity)

    # ------------------------------------------------------------------ binding
    def bind(
        self, model: nn.Module, state: Mapping[str, Any] | None = None, total_steps: int | None = None, step: int = 0
    ) -> None:
        """Take the targets of ``model`` and get ready to prune; see :meth:`MaskKeeper.bind`.

        Args:
            model: the model, its layers built.
            state: a state from :meth:`state_dict` to resume from.
            total_steps: the run's optimizer steps, for ``schedule=None``.
            step: the optimizer step training starts from (the restored step when resuming).

        Raises:
            ValueError: ``schedule=None`` without ``total_steps``, or targets that cannot be pruned as
                configured; nothing is changed then.
        """
        resolved: Schedule | None
        if self.schedule is None and self._resolved is None:
            if total_steps is None:
                raise ValueError(
                    "schedule=None prunes over the whole run, whose length the Pruner does not know: pass "
                    "total_steps=<optimizer steps> or schedule=Iterative(start_step, end_step, frequency)"
                )
            resolved = default_schedule(total_steps)
        else:
            resolved = self._resolved or self.schedule
        self._check_schedule(resolved)
        previous = self._resolved, self._next_step
        self._resolved, self._next_step = resolved, step
        try:
            super().bind(model, state)
        except Exception:
            self._resolved, self._next_step = previous
            raise
        self._open_window()

    def _check_schedule(self, schedule: Schedule | None) -> None:
        """Raise if ``schedule`` cannot drive this pruner (subclasses add their own rules)."""

    def _check_feedback(self, regularization: Regularization | None) -> None:
        """Raise if ``feedback=True`` cannot work with the other settings."""
        refused = None
        if self.element_scores:
            refused = f"{type(self).__name__}, whose interval masks cut units between events"
        elif isinstance(self.pattern, Coupled) or self.pattern.output_units:
            refused = f"pattern '{self.pattern}', whose pruned units also zero other parameters (biases, norms)"
        elif regularization is not None:
            refused = "regularization (group lasso shrinks the groups that feedback would bring back)"
        if refused is not None:
            raise ValueError(
                f"feedback=True does not work with {refused}; use feedback=False, or a pattern whose units lie "
                "inside one weight ('unstructured', 'NxM' such as '4x1', 'N:M' such as '2:4')"
            )

    def _check_target(self, fqn: str, param: nn.Parameter) -> None:
        pattern = self._pattern_for(fqn)
        assert pattern is not None
        pattern.check(fqn, param.shape)
        if self.criterion.needs_grad and not param.requires_grad:
            raise ValueError(
                f"'{fqn}' is frozen (requires_grad=False), but criterion '{self.criterion}' scores weights by their "
                "gradients, which it never gets (it would be pruned first); exclude it or use criterion='magnitude'"
            )

    def _check_targets(self, targets: Mapping[str, nn.Parameter]) -> None:
        """Raise if the pattern cannot prune ``target_sparsity`` of the targets (e.g. layers narrower than M)."""
        if isinstance(self.pattern, Coupled):
            check_coupled(self.pattern, self._groups, self.target_sparsity, self.scope)
            return
        shapes = {fqn: tuple(p.shape) for fqn, p in targets.items()}
        check_reachable(self.pattern, shapes, self.target_sparsity, self.scope, self.max_sparsity_per_layer)

    def _per_unit(self) -> bool:
        """Whether running states can be kept per unit rather than per weight (linear patterns only)."""
        states = self.criterion.states.values()
        return (
            self.criterion.per_unit
            and self.pattern.linear
            and not self.element_scores
            and bool(states)
            and all(spec.shape == "weight" for spec in states)
            and not any(self._cut(fqn) for fqn in self._boxes)
        )

    def _cut(self, fqn: str) -> bool:
        """Whether the shard of ``fqn`` cuts units whose scores are summed over ranks (sharded channels)."""
        box = self._boxes[fqn]
        found = box.units(self._pattern_for(fqn))
        return found is not None and found[2]

    def _adopt(self, model: nn.Module, state: Mapping[str, Any] | None, carried: bool) -> None:
        """Masks, running states and the schedule position: restored, carried over, or fresh."""
        states = TargetStates(self.criterion, self._patterns or self.pattern, self._per_unit())
        modules = {fqn: model.get_submodule(fqn.rpartition(".")[0]) for fqn in self._targets}
        views = [Target(fqn, modules[fqn], self._collecting) for fqn in self._targets]
        weights = self._local_weights()
        if state is not None:  # everything that can refuse the state, before anything changes
            masks = self._checked_masks(state["masks"])
            saved = state.get("states", state.get("scores"))
            restored = None
            if saved is not None:
                restored = [
                    states.restore(v.fqn, saved[v.fqn], w, self._boxes.get(v.fqn)) for v, w in zip(views, weights)
                ]
            dense = self._checked_dense(state.get("dense"))
        self._teardown_criterion()
        if self._coupling is not None and self._coupling.watching:
            self._coupling.stop()  # hooks of an earlier binding that never saw a step
        if state is not None:
            self._masks, self._last_event = masks, int(state["last_event"])
            self._dense, self._densified = dense, False
            for view, values in zip(views, restored or []):
                view.state.update(values)
        elif carried:
            super()._adopt(model, None, True)
            for view, old in zip(views, self._views):
                view.state.update({k: v.to(self._targets[view.fqn].device) for k, v in old.state.items()})
        else:
            super()._adopt(model, None, False)
            self._last_event = -1
            self._dense, self._densified = [], False
        self._views, self._states = views, states
        if not self.finished:
            self._setup_criterion()
        if self.pattern.output_units:
            self._coupling = Coupling(model, self._targets)

    def _checked_dense(self, saved: Mapping[str, Tensor] | None) -> list[Tensor]:
        """Feedback's dense weights from a checkpoint, checked against the targets (this rank's boxes)."""
        if not saved:
            return []
        boxes = self._checked_like_targets(saved, "dense weights", "dense weight")
        return [boxes[fqn].to(dtype=param.dtype).clone() for fqn, param in self._targets.items()]

    def _collecting(self) -> bool:
        schedule = self._resolved
        return schedule is not None and schedule.start <= self._next_step <= schedule.end and not self.finished

    def _open_window(self) -> None:
        """Allocate running states once the next forward pass belongs to the scoring window."""
        if self.criterion.accumulates and self._states is not None and self._collecting():
            self._states.allocate(self._views, self._local_weights())

    def _setup_criterion(self) -> None:
        self.criterion.setup(self._views)
        self._set_up = True

    def _teardown_criterion(self) -> None:
        if self._set_up:
            self.criterion.teardown()
            self._set_up = False

    def close(self) -> None:
        """Stop for now: the criterion's teardown (its hooks removed).

        Masks, states and the schedule position stay; the next :meth:`bind` sets the criterion up again if
        events are left.
        """
        self._teardown_criterion()
        self._stop_watching()

    def _stop_watching(self) -> None:
        """End the coupling watch (after the first forward pass): the coupled parameters join the zero keeping."""
        if self._coupling is not None and self._coupling.watching:
            self._coupled = self._coupling.stop()
            self._masks_changed()

    # ------------------------------------------------------------------ the training step
    def before_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> Event | None:
        """Update scores inside the window, prune at events, zero the gradients of pruned weights.

        Call it once per optimizer step, after the gradients are final (unscaled, all-reduced, accumulated)
        and before the optimizer steps; ``step`` counts optimizer steps from 0.

        Returns:
            The event, if this step had one (for logging), else None.
        """
        if not self._targets:
            raise RuntimeError("the Pruner has no model yet: pass one to Pruner(...) or call bind(model) first")
        self._stop_watching()
        if self._dense:
            self._densify()  # feedback: the step (and any event) sees the dense weights
        event = None
        if not (self.skip_nonfinite and not self._gradients_finite()):
            event = self._advance(step)
        self._next_step = step + 1
        self._open_window()
        if self._dense:
            self._stepped = True  # the step moves the dense weights; after it they are kept and zeroed again
            self._warn_adaptive(optimizer)
        else:
            self._mask_gradients(optimizer)
        schedule = self._resolved
        if self.regularization is not None and schedule is not None and schedule.start <= step <= schedule.end:
            self.regularization.before_step(self._targets, optimizer)
        return event

    def _warn_adaptive(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Feedback with an adaptive optimizer: warn once (pruned weights drift by about lr per step)."""
        optimizer = getattr(optimizer, "optimizer", optimizer)
        if self._warned_adaptive or optimizer is None or type(optimizer) is torch.optim.SGD:
            return
        self._warned_adaptive = True
        warnings.warn(
            f"feedback=True with {type(optimizer).__name__}: an adaptive optimizer moves every pruned weight by "
            "about the learning rate at each step whatever its gradient, so masks churn between events; dynamic "
            "pruning with feedback was designed with SGD (Lin et al. 2020), and with AdamW it lost accuracy on "
            "this project's CNN (docs/RESULTS.md)",
            stacklevel=3,
        )

    def after_optimizer_step(self) -> None:
        """Keep pruned weights at zero; then the regularization step, if any (pruned groups have norm 0).

        With ``feedback`` inside the window, what the optimizer made of the pruned weights is kept first.
        """
        if self._densified:
            torch._foreach_copy_(self._dense, [w.detach() for w in self._local_weights()])
            self._densified = False
        super().after_optimizer_step()
        if self.regularization is not None:
            self.regularization.after_step(self._targets)

    def _gradients_finite(self) -> bool:
        finite = all(bool(torch.isfinite(local(w.grad)).all()) for w in self._targets.values() if w.grad is not None)
        if self._group is not None:  # every rank takes the same branch
            finite = all_reduce_ints([int(not finite)], self._group)[0] == 0
        return finite

    def _local_weights(self) -> list[Tensor]:
        """The shard of every target on this rank (the targets themselves when not sharded)."""
        return [local(w) for w in self._targets.values()]

    def _advance(self, step: int) -> Event | None:
        """Scores and the event, if any, for the step about to be taken."""
        schedule = self._resolved
        assert schedule is not None and self._states is not None
        weights = self._local_weights()
        if self.criterion.accumulates and schedule.start <= step <= schedule.end and not self.finished:
            self._states.allocate(self._views, weights)
            if type(self.criterion).update is not Criterion.update:
                grads = [None if w.grad is None else local(w.grad) for w in self._targets.values()]
                self._states.update(self._views, weights, grads)
        index = schedule.last_event_at(step)
        if index <= self._last_event:
            return None
        scheduled = schedule.sparsity(index, self.target_sparsity)
        last = index == schedule.num_events - 1
        if self.feedback:
            self._reselect(scheduled, last)
        else:
            self._prune(scheduled)
        self._last_event = index
        if last:  # no event left: running states, hooks and scratch memory are no longer needed
            self.close()
            TargetStates.release(self._views)
        return Event(step, index, scheduled, last)

    @torch.no_grad()
    def _prune(self, sparsity: float) -> None:
        scores = self._current_scores()
        for pruned, mask in zip(self._plan(scores, sparsity), self._masks.values()):
            mask.logical_and_(~pruned)
        self._masks_changed()

    @torch.no_grad()
    def _reselect(self, sparsity: float, last: bool) -> None:
        """Feedback: masks chosen afresh from the dense weights (the targets hold them now); pruned ones zeroed.

        Until the last event the dense weights are kept and written back for the coming optimizer step.
        """
        if not self._densified:  # the first event: the targets are dense already
            self._dense = [w.detach().clone() for w in self._local_weights()]
            self._densified = True
        fresh = [torch.ones_like(mask) for mask in self._masks.values()]
        for pruned, mask in zip(self._plan(self._current_scores(fresh), sparsity), self._masks.values()):
            torch.logical_not(pruned, out=mask)
        self._masks_changed()
        if last:  # the masks are final: pruned weights stay zero from now on
            self._dense, self._densified = [], False
        else:
            self._densify()

    @torch.no_grad()
    def _densify(self) -> None:
        """Feedback: write the dense values back into the pruned entries of the targets."""
        for weight, dense, mask in zip(self._local_weights(), self._dense, self._masks.values()):
            weight.detach().copy_(torch.where(mask, weight.detach(), dense))
        self._densified = True

    def _current_scores(self, masks: Sequence[Tensor] | None = None) -> list[Tensor]:
        """The criterion's scores, -inf where pruned: per element, or per unit where states are kept so.

        ``masks``: rank as if these were the masks (all kept, for feedback) instead of the current ones.
        """
        assert self._states is not None
        reduced = any(spec.reduce is not None for spec in self.criterion.states.values())
        group = process_group() if reduced else None
        sharded = self._group is not None
        scores = [
            self.criterion.score(
                self._states.reduced(view, group, sharded),
                local(weight),
                None if weight.grad is None else local(weight.grad),
            )
            for view, weight in zip(self._views, self._targets.values())
        ]
        patterns = [self._patterns[f] for f in self._targets] if self._patterns else self.pattern
        if masks is not None:
            return pruned_first(scores, masks, patterns, self._states.per_unit)
        masks = list(self._masks.values())
        return pruned_first(scores, masks, patterns, self._states.per_unit, self._multipliers, self._unit_views)

    def _plan(self, scores: list[Tensor], sparsity: float) -> list[Tensor]:
        """Element masks (True = pruned) of the units that reach ``sparsity``, from :meth:`_current_scores`."""
        assert self._states is not None
        scale = sparsity / self.target_sparsity if self.target_sparsity > 0 else 0.0
        if self._groups:
            return plan_coupled(
                scores,
                [tuple(w.shape) for w in self._local_weights()],
                list(self._targets),
                self._groups,
                self._states.per_unit,
                sparsity,
                self.scope,
                min_sparsity=self.min_sparsity_per_layer * scale,
                max_sparsity=self.max_sparsity_per_layer,
                boxes=list(self._boxes.values()) if self._group is not None else None,
                group=self._group,
            )
        return plan(
            scores,
            [tuple(w.shape) for w in self._local_weights()],
            self.pattern,
            self._states.per_unit,
            sparsity,
            self.scope,
            min_sparsity=self.min_sparsity_per_layer * scale,
            max_sparsity=self.max_sparsity_per_layer,
            boxes=list(self._boxes.values()) if self._group is not None else None,
            group=self._group,
        )

    def _unit_pattern(self) -> Pattern | None:
        return self.pattern

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Masks, running criterion states, the last event and the configuration."""
        if self._pending is not None:
            return self._pending
        state = super().state_dict()
        state["last_event"] = self._last_event
        if self._dense:  # feedback: the pruned weights' dense values, sharded like their targets
            state["dense"] = {
                fqn: placed(d.cpu(), w) if self._group is not None else d.cpu()
                for (fqn, w), d in zip(self._targets.items(), self._dense)
            }
        if any(view.state for view in self._views):
            state["states"] = {
                v.fqn: {k: self._placed_state(v.fqn, k, t) for k, t in v.state.items()} for v in self._views
            }
        return state

    def _placed_state(self, fqn: str, name: str, value: Tensor) -> Tensor:
        """A running state for a checkpoint: sharded like its target where it is kept per weight or unit."""
        weight = self._targets.get(fqn)
        spec = self.criterion.states.get(name)
        if self._group is None or weight is None or spec is None or spec.shape != "weight":
            return value.cpu()
        box = self._boxes[fqn]
        if self._states is not None and self._states.per_unit:
            found = box.units(self._pattern_for(fqn))
            assert found is not None
            return placed(value.cpu(), weight, found[0])
        return placed(value.cpu(), weight)
