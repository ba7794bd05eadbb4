"""The ``Pruning`` callback: prunes targets while the model trains, on a schedule, resumably."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_prune.callbacks.masked import MaskedWeights, all_kept
from lightning_prune.criteria import Criterion, parse_criterion
from lightning_prune.patterns import Channel, Pattern, parse_pattern
from lightning_prune.regularization import GroupLasso
from lightning_prune.report import format_report
from lightning_prune.schedules import Iterative, Schedule
from lightning_prune.selection import SCOPES, select

__all__ = ["Pruning"]

_FLOAT32_MAX = torch.finfo(torch.float32).max
_SLICE_ELEMENTS = 1 << 20  # |W·G| computed 1M weights (4 MB) at a time when scoring


def _check_fraction(name: str, value: object, upper_open: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0.0 <= float(value) < 1.0 if upper_open else 0.0 <= float(value) <= 1.0):  # type: ignore[arg-type]
        bounds = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name} must be a number in {bounds}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


class Pruning(MaskedWeights):
    """Prune a model while it trains (SPEC.md): pattern, criterion, schedule and scope in one callback.

    Masks are kept per target (True = kept) and only ever lose entries. Pruned weights are exactly zero after
    every optimizer step; their gradients are zeroed before it. Parameter names never change, so checkpoints
    load into the plain model, and the callback's state (masks, running scores, schedule position) resumes
    with ``trainer.fit(ckpt_path=...)``.

    Args:
        target_sparsity: final fraction of zeros over all targets, in [0, 1).
        pattern: ``"unstructured"``/``"1x1"``, ``"NxM"`` (e.g. ``"4x1"``), ``"channelx1"``, ``"1xchannel"``,
            ``"N:M"`` (e.g. ``"2:4"``) or a :class:`~lightning_prune.patterns.Pattern`.
        criterion: ``"magnitude"``, ``"gradient"``, ``"snip"``, ``"snip_momentum"`` or a
            :class:`~lightning_prune.criteria.Criterion`.
        schedule: :class:`~lightning_prune.schedules.OneShot` or :class:`~lightning_prune.schedules.Iterative`;
            ``None`` prunes iteratively over the whole run: events every ``max(1, total // 20)`` steps from 0
            to the last step, ``total = trainer.estimated_stepping_batches``, exp decay.
        scope: ``"global"`` (one ranking across targets, budget in elements) or ``"local"`` (each layer).
        op_types: module class names whose ``weight`` is pruned.
        include: regexes; only modules whose full name matches one are pruned.
        exclude: regexes; modules whose full name matches one are not pruned.
        min_sparsity_per_layer: global scope: the least sparsity of any layer at the end (scaled down
            proportionally at earlier events).
        max_sparsity_per_layer: global scope: the most sparsity of any layer.
        log_per_layer: also log ``prune/sparsity/<name>`` for every target at each event.
        regularization: a :class:`~lightning_prune.regularization.GroupLasso`, applied to the targets' groups
            of ``pattern`` after every optimizer step inside the pruning window.

    Raises:
        ValueError: an argument out of range or unknown (the message names it, shows it and lists choices).
        TypeError: an argument of the wrong type.

    Example:
        >>> from lightning_prune.schedules import Iterative
        >>> cb = Pruning(0.8, pattern="4x1", criterion="snip_momentum",
        ...              schedule=Iterative(start_step=0, end_step=1000, frequency=100))
        >>> trainer = pl.Trainer(callbacks=[cb], max_steps=2000)  # doctest: +SKIP
    """

    def __init__(
        self,
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
        log_per_layer: bool = False,
        regularization: GroupLasso | None = None,
    ) -> None:
        self.target_sparsity = _check_fraction("target_sparsity", target_sparsity, upper_open=True)
        self.pattern = parse_pattern(pattern)
        self.criterion = parse_criterion(criterion)
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be OneShot, Iterative or None, got {type(schedule).__name__}")
        self.schedule = schedule
        if scope not in SCOPES:
            raise ValueError(f"scope {scope!r} is not valid; choose one of {', '.join(map(repr, SCOPES))}")
        self.scope = scope
        super().__init__(op_types, include, exclude)
        self.min_sparsity_per_layer = _check_fraction("min_sparsity_per_layer", min_sparsity_per_layer, False)
        self.max_sparsity_per_layer = _check_fraction("max_sparsity_per_layer", max_sparsity_per_layer, False)
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
        self.log_per_layer = log_per_layer
        if regularization is not None and not isinstance(regularization, GroupLasso):
            raise TypeError(
                f"regularization must be a GroupLasso or None, got {type(regularization).__name__} {regularization!r}"
            )
        if regularization is not None:
            regularization.attach(self, self.pattern)
        self.regularization = regularization
        self._scores: list[Tensor] | None = None
        self._check_finite = False
        self._scores_per_unit = False  # decided at the start of training (`_keeps_unit_scores`)
        self._hooks: list[Any] = []  # forward hooks that find a pruned filter's coupled bias and norm
        self._last_event = -1
        self._resolved: Schedule | None = None
        self._owner: torch.optim.Optimizer | None = None  # with several optimizers, the one holding the targets

    # ------------------------------------------------------------------ public views
    def config(self) -> dict[str, Any]:
        """The settings that define this pruning run, as stored in checkpoints."""
        return {
            "target_sparsity": self.target_sparsity,
            "pattern": str(self.pattern),
            "criterion": str(self.criterion),
            "scope": self.scope,
            "schedule": repr(self._resolved or self.schedule),
            "min_sparsity_per_layer": self.min_sparsity_per_layer,
            "max_sparsity_per_layer": self.max_sparsity_per_layer,
            "regularization": repr(self.regularization),
        }

    def scheduled_sparsity(self, step: int) -> float:
        """Sparsity the schedule asks for once optimizer step ``step`` is taken (0.0 before the first event).

        Raises:
            RuntimeError: ``schedule=None`` before training starts (its length is not known yet).

        Example:
            >>> from lightning_prune.schedules import Iterative
            >>> cb = Pruning(0.8, schedule=Iterative(start_step=10, end_step=30, frequency=10, decay="linear"))
            >>> [round(cb.scheduled_sparsity(s), 3) for s in (0, 10, 25, 30)]
            [0.0, 0.267, 0.533, 0.8]
        """
        schedule = self._resolved or self.schedule
        if schedule is None:
            raise RuntimeError("schedule=None spans the whole run, whose length is known once training starts")
        event = schedule.last_event_at(step)
        return 0.0 if event < 0 else schedule.sparsity(event, self.target_sparsity)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve and validate targets, and check that the pattern can reach the target on them."""
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._check_reachable()
            if self.target_sparsity == 0.0:
                rank_zero_warn("target_sparsity=0: nothing will be pruned (the callback only reports)")

    def _check_reachable(self) -> None:
        """Raise if the pattern cannot prune ``target_sparsity`` of the targets (e.g. layers narrower than M)."""
        capacity = {}
        for fqn, param in self._targets.items():
            sizes = self.pattern.unit_sizes(tuple(param.shape))
            units = self.pattern.unit_scores(torch.empty(param.shape, device="meta")).numel()
            capacity[fqn] = sizes * units if isinstance(sizes, int) else int(sizes.sum())
        total = sum(p.numel() for p in self._targets.values())
        needed = round(self.target_sparsity * total)
        short = sorted(f for f, p in self._targets.items() if capacity[f] < round(self.target_sparsity * p.numel()))
        if self.scope == "local":
            reachable = sum(min(capacity[f], round(self.target_sparsity * p.numel())) for f, p in self._targets.items())
        else:
            reachable = sum(
                min(capacity[f], math.floor(self.max_sparsity_per_layer * p.numel())) for f, p in self._targets.items()
            )
        if reachable >= needed:
            return
        message = (
            f"pattern '{self.pattern}' can prune at most {reachable / max(total, 1):.4f} of the targets, below "
            f"target_sparsity {self.target_sparsity} ({self.scope} scope); layers it cannot bring to the target: "
            f"{short[:6]}{' ...' if len(short) > 6 else ''}"
        )
        if reachable == 0 or needed - reachable > 0.01 * total:
            raise ValueError(message + "; exclude them or choose another pattern")
        rank_zero_warn(message + "; pruning goes as far as the pattern allows")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Adopt restored state (checkpoints are restored before this hook whatever the strategy)."""
        if self._bind(pl_module):
            self._check_reachable()
        self._owner = self._owning_optimizer(trainer)
        self._resolved = self.schedule or self._default_schedule(trainer)
        precision = str(trainer.precision)
        # fp16: a step with non-finite gradients is one the GradScaler skips; scores and masks both wait for
        # the next finite step, checked here once (so the criterion need not scan the gradients again).
        self._check_finite = precision.startswith("16")
        # bf16: no scaler skips the step; the criterion only keeps non-finite products out of its scores.
        self.criterion._check_finite = "bf16" in precision  # type: ignore[attr-defined]
        self._scores_per_unit = self._keeps_unit_scores()
        state, self._pending = self._pending, None
        if state is not None:
            self._restore(state)
        else:
            self._masks = {fqn: torch.ones_like(p, dtype=torch.bool) for fqn, p in self._targets.items()}
        if isinstance(self.pattern, Channel) and self.pattern.kind == "output":
            self._watch_coupling(pl_module)
        self._masks_changed()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Update scores inside the window, prune at events, zero the gradients of pruned weights."""
        if self._resolved is None:
            return
        if self._owner is not None and getattr(optimizer, "optimizer", optimizer) is not self._owner:
            return  # another optimizer's step: it holds none of the targets
        if self._hooks:
            self._stop_watching()
        self._advance(trainer)
        self._mask_gradients(optimizer)
        if self.regularization is not None and self._resolved.start <= trainer.global_step <= self._resolved.end:
            self.regularization.before_step(self._targets, optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Keep pruned weights at zero; then the group-lasso step, if any (pruned groups have norm 0)."""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.regularization is not None:
            self.regularization.after_step(self._targets)

    def _advance(self, trainer: pl.Trainer) -> None:
        """Scores and events for the step about to be taken."""
        schedule = self._resolved
        assert schedule is not None
        if self._check_finite and not all(
            bool(torch.isfinite(w.grad).all()) for w in self._targets.values() if w.grad is not None
        ):
            return  # a step the gradient scaler will skip: scores and masks wait for the next finite one
        step = trainer.global_step
        weights = list(self._targets.values())
        if self.criterion.accumulates and schedule.start <= step <= schedule.end:
            if self._scores is None:
                shapes = [self._score_shape(w) for w in weights]
                self._scores = [torch.zeros(s, dtype=torch.float32, device=w.device) for s, w in zip(shapes, weights)]
            self._update_scores(weights)
        event = schedule.last_event_at(step)
        if event > self._last_event:
            self._prune(schedule.sparsity(event, self.target_sparsity))
            self._last_event = event
            self._log_event(trainer, schedule.sparsity(event, self.target_sparsity))
            if event == schedule.num_events - 1:
                self._scores = None  # no event left: running scores and scratch memory are no longer needed
                self.criterion.release()

    @torch.no_grad()
    def _update_scores(self, weights: list[torch.nn.Parameter]) -> None:
        """Fold this step into the running scores, in row slices where the criterion is elementwise.

        Slices of at most 4 MB cap the criterion's |W·G| scratch whatever the model; each slice holds
        whole units (a multiple of ``pattern.unit_rows`` rows), so that per-unit scores stay exact.
        """
        assert self._scores is not None
        per_unit = self._scores_per_unit
        rows_per_unit = self.pattern.unit_rows if per_unit else 1
        scores: list[Tensor] = []
        values: list[Tensor] = []
        grads: list[Tensor | None] = []
        for score, weight in zip(self._scores, weights):
            grad = weight.grad
            rows = weight.shape[0] if weight.dim() else 0
            step = rows
            if self.criterion.elementwise and rows_per_unit is not None and rows > 1:
                step = max(_SLICE_ELEMENTS * rows // weight.numel() // rows_per_unit, 1) * rows_per_unit
            if step >= rows or rows_per_unit is None:
                scores.append(score)
                values.append(weight)
                grads.append(grad)
                continue
            for a in range(0, rows, step):
                b = min(a + step, rows)
                scores.append(score[a // rows_per_unit : -(-b // rows_per_unit)])
                values.append(weight[a:b])
                grads.append(None if grad is None else grad[a:b])
        if per_unit:
            self.criterion.update(scores, values, grads, reduce=self.pattern.unit_scores)
        else:
            self.criterion.update(scores, values, grads)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Print the sparsity table; warn if training ended before the schedule did."""
        if not self._masks:
            return
        schedule = self._resolved
        if schedule is not None and self._last_event < schedule.num_events - 1:
            rank_zero_warn(
                f"training ended at step {trainer.global_step}, before the pruning schedule's last event at step "
                f"{schedule.end}: sparsity reached {self.sparsity():.4f} of target {self.target_sparsity}"
            )
        rank_zero_info("Pruning: per-layer sparsity\n" + format_report(self.report(pl_module)))

    @override
    def state_dict(self) -> dict[str, Any]:
        """Masks, running scores and the schedule position."""
        if self._pending is not None:
            return self._pending
        state: dict[str, Any] = {
            "masks": {fqn: m.cpu() for fqn, m in self._masks.items()},
            "last_event": self._last_event,
            "config": self.config(),
        }
        if self._scores is not None:
            state["scores"] = {fqn: s.cpu() for fqn, s in zip(self._targets, self._scores)}
        return state

    # ------------------------------------------------------------------ helpers
    def _pattern_name(self) -> str:
        return str(self.pattern)

    def _unit_pattern(self) -> Pattern | None:
        return self.pattern

    def _check_target(self, fqn: str, param: torch.nn.Parameter) -> None:
        self.pattern.check(fqn, param.shape)
        if self.criterion.needs_grad and not param.requires_grad:
            raise ValueError(
                f"'{fqn}' is frozen (requires_grad=False), but criterion '{self.criterion}' scores weights by their "
                "gradients, which it never gets (it would be pruned first); exclude it or use criterion='magnitude'"
            )

    def _owning_optimizer(self, trainer: pl.Trainer) -> torch.optim.Optimizer | None:
        """With several optimizers, the one that steps all the targets (their steps drive pruning); else None.

        Raises:
            ValueError: the targets are split across optimizers, or no optimizer steps them.
        """
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        if len(optimizers) < 2:
            return None
        owners = [
            opt
            for opt in optimizers
            if {id(p) for group in opt.param_groups for p in group["params"]} >= {id(p) for p in self._targets.values()}
        ]
        if len(owners) != 1:
            raise ValueError(
                f"with {len(optimizers)} optimizers, the weights to prune must all be stepped by exactly one of them "
                f"(found {len(owners)}); split the model with include/exclude so that one optimizer holds them"
            )
        return owners[0]

    def _default_schedule(self, trainer: pl.Trainer) -> Schedule:
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ValueError(
                f"schedule=None prunes over the whole run, but its length is {total} steps; set max_steps or "
                "max_epochs, or pass schedule=Iterative(start_step, end_step, frequency)"
            )
        total = int(total)
        return Iterative(start_step=0, end_step=total - 1, frequency=max(1, total // 20))

    def _restore(self, state: Mapping[str, Any]) -> None:
        saved = state.get("config", {})
        current = self.config()
        differs = {k: (saved[k], current[k]) for k in saved if k in current and saved[k] != current[k]}
        if differs:
            detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differs.items())
            raise ValueError(f"the checkpoint was written under another pruning configuration ({detail})")
        self._masks = self._checked_masks(state["masks"])
        self._last_event = int(state["last_event"])
        scores = state.get("scores")
        if scores is not None:
            self._scores = [self._restored_scores(fqn, scores[fqn], p) for fqn, p in self._targets.items()]

    def _score_shape(self, weight: Tensor) -> tuple[int, ...]:
        """Running scores are kept per unit where the pattern allows it (a quarter of the memory at 4x1)."""
        if self._scores_per_unit:
            return tuple(self.pattern.unit_scores(torch.empty(weight.shape, device="meta")).shape)
        return tuple(weight.shape)

    def _restored_scores(self, fqn: str, saved: Tensor, param: Tensor) -> Tensor:
        """Saved running scores on the weight's device; element scores (older checkpoints) reduced to units."""
        scores = saved.to(param.device, torch.float32)
        expected = self._score_shape(param)
        if tuple(scores.shape) == expected:
            return scores
        if self._scores_per_unit and tuple(scores.shape) == tuple(param.shape):
            return self.pattern.unit_scores(scores)
        raise ValueError(
            f"checkpoint scores for '{fqn}' have shape {tuple(scores.shape)}; pattern '{self.pattern}' on weight "
            f"{tuple(param.shape)} keeps them as {expected}"
        )

    @torch.no_grad()
    def _prune(self, sparsity: float) -> None:
        scores = self._current_scores()
        for plan, mask in zip(self._plan(scores, sparsity), self._masks.values()):
            mask.logical_and_(~plan)
        self._masks_changed()

    def _watch_coupling(self, pl_module: torch.nn.Module) -> None:
        """Record, during the first forward pass, each target's bias and the BatchNorm that reads its output.

        A filter whose weights are all pruned must output exactly zero, so that slimming can remove it without
        changing the model: its bias and its BatchNorm's weight and bias entries are kept at zero too.
        """
        names = {id(m): n for n, m in pl_module.named_modules()}
        owners = {fqn.rpartition(".")[0]: fqn for fqn in self._targets}
        produced: dict[int, str] = {}
        self._coupling: dict[str, list[tuple[str, torch.nn.Parameter]]] = {fqn: [] for fqn in self._targets}
        for module_name, fqn in owners.items():
            module = pl_module.get_submodule(module_name)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.nn.Parameter) and bias.shape == (self._targets[fqn].shape[0],):
                self._coupling[fqn].append((f"{module_name}.bias", bias))

            def record(module: torch.nn.Module, args: Any, output: Any, fqn: str = fqn) -> None:
                if isinstance(output, Tensor):
                    produced[id(output)] = fqn

            self._hooks.append(module.register_forward_hook(record))

        def norm_reads(module: torch.nn.Module, args: Any) -> None:
            fqn = produced.get(id(args[0])) if args and isinstance(args[0], Tensor) else None
            if fqn is None or getattr(module, "weight", None) is None:
                return
            if module.weight.shape != (self._targets[fqn].shape[0],):
                return
            name = names[id(module)]
            known = {n for n, _ in self._coupling[fqn]}
            for leaf in ("weight", "bias"):
                param = getattr(module, leaf, None)
                if isinstance(param, torch.nn.Parameter) and f"{name}.{leaf}" not in known:
                    self._coupling[fqn].append((f"{name}.{leaf}", param))

        for module in pl_module.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                self._hooks.append(module.register_forward_pre_hook(norm_reads))

    def _stop_watching(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._coupled = [
            (param, fqn, torch.ones_like(param)) for fqn, params in self._coupling.items() for _, param in params
        ]
        self._masks_changed()

    def _keeps_unit_scores(self) -> bool:
        """Whether running scores can be kept per unit rather than per weight (linear patterns only)."""
        if not (self.criterion.accumulates and self.pattern.linear) or self._element_scores:
            return False
        # A criterion (or a wrapper around its update) written without ``reduce`` keeps per-weight scores.
        parameters = inspect.signature(self.criterion.update).parameters.values()
        return any(p.name == "reduce" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)

    # Subclasses that rank single weights inside units (progressive pruning) keep running scores per weight.
    _element_scores: bool = False

    def _current_scores(self) -> list[Tensor]:
        """The criterion's scores, -inf where pruned (so units holding pruned weights sort first).

        Element scores, or unit scores where running scores are kept per unit (``_scores_per_unit``).
        """
        weights = list(self._targets.values())
        scores = self.criterion.scores(self._scores, weights, [w.grad for w in weights])
        # Arithmetic on 0/1 factors: masked_fill_ with a scattered mask is ~30x slower on CPU.
        for i, (score, mask) in enumerate(zip(scores, self._masks.values())):
            score.nan_to_num_(nan=0.0, posinf=_FLOAT32_MAX, neginf=-math.inf)  # kept scores become finite
            if self._scores_per_unit:
                if all_kept(mask):
                    continue
                kept, view = self.pattern.unit_scores(mask.float()).floor_(), None  # 1: unit wholly kept, else 0
            elif self._multipliers:
                kept, view = self._multipliers[i], self._unit_views[i]
                if view is not None and not score.is_contiguous():
                    kept, view = kept.expand(view).reshape(score.shape), None
            else:
                continue
            (score if view is None else score.view(view)).div_(kept)  # kept: same; pruned: ±inf or NaN
            score.nan_to_num_(nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
        return scores

    def _plan(self, scores: list[Tensor], sparsity: float) -> list[Tensor]:
        """Element masks (True = pruned) of the pattern's units that reach ``sparsity``, pruned ones first.

        ``scores`` are those of :meth:`_current_scores`: per element, or per unit if kept so.
        """
        if self._scores_per_unit:
            units = scores
            scores = [torch.empty(p.shape, device="meta") for p in self._targets.values()]  # shapes, for expand
        else:
            units = [self.pattern.unit_scores(s) for s in scores]
        scale = sparsity / self.target_sparsity if self.target_sparsity > 0 else 0.0
        picks = select(
            units,
            [self.pattern.unit_sizes(tuple(s.shape)) for s in scores],
            [s.numel() for s in scores],
            sparsity,
            self.scope,
            min_sparsity=self.min_sparsity_per_layer * scale,
            max_sparsity=self.max_sparsity_per_layer,
        )
        # A unit holding a pruned weight is always taken whole, even where the budget's rounding would stop
        # just before it: masks stay monotone and made of whole units.
        return [self.pattern.expand(pick | (u == -math.inf), s) for pick, u, s in zip(picks, units, scores)]

    def _log_event(self, trainer: pl.Trainer, scheduled: float) -> None:
        # Written to the loggers directly: `pl_module.log` only reaches them on `log_every_n_steps` steps,
        # and an event between two of those would be lost.
        if not trainer.is_global_zero or not trainer.loggers:
            return
        metrics = {"prune/sparsity": self.sparsity(), "prune/target": scheduled}
        if self.log_per_layer:
            for fqn, mask in self._masks.items():
                metrics[f"prune/sparsity/{fqn}"] = 1.0 - float(mask.sum()) / mask.numel()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
