"""How weights are scored; the lowest scores are pruned.

A criterion is a small class that declares what it is and overrides one or two methods:

- ``needs_grad``: scores use gradients, so events must happen where gradients exist.
- ``states``: its running statistics, by name (:class:`StateSpec`: shape, dtype, how it is reduced across
  ranks). The engine allocates them per target for the scoring window, checkpoints them, reduces them
  across processes at events and frees them after the last event, so a criterion writes no bookkeeping or
  distributed code of its own. A criterion with states is updated on every optimizer step of the window.
- ``per_unit``: :meth:`Criterion.update` is linear in a per-weight term, so the engine may keep its
  ``"weight"``-shaped states per unit of the pattern instead (a quarter of the memory at 4x1): the mean of a
  running sum is the running sum of the means.
- ``elementwise``: :meth:`Criterion.update` treats every entry on its own, so the engine may pass row slices.
- :meth:`Criterion.setup` / :meth:`Criterion.teardown`: called with the targets (their modules and states)
  when pruning starts and after the last event, e.g. to register forward hooks that read layer inputs.

Scores are float32 whatever the weights' dtype and always finite where the weight is: NaN or infinite
gradients never reach them (a step whose gradients are not finite leaves running states unchanged). The
engine owns what :meth:`Criterion.score` returns and writes ``-inf`` over pruned entries in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

__all__ = [
    "CRITERIA",
    "Criterion",
    "Gradient",
    "Magnitude",
    "Snip",
    "SnipMomentum",
    "StateSpec",
    "TargetView",
    "Wanda",
    "parse_criterion",
]

CRITERIA = ("magnitude", "gradient", "snip", "snip_momentum", "wanda")
STATE_SHAPES = ("weight", "inputs")
STATE_REDUCTIONS = (None, "sum", "mean", "max")


@dataclass(frozen=True)
class StateSpec:
    """One running statistic of a criterion, per target.

    Args:
        shape: ``"weight"``: shaped like the weight (per unit where the engine keeps it so, see
            ``Criterion.per_unit``); ``"inputs"``: one entry per input column (``weight.shape[1]``).
        reduce: how processes combine it before scoring: ``None`` (already equal on every rank, e.g. computed
            from all-reduced gradients), ``"sum"``, ``"mean"`` or ``"max"``.
        dtype: its dtype.

    Example:
        >>> StateSpec("inputs", reduce="sum")
        StateSpec(shape='inputs', reduce='sum', dtype=torch.float32)
    """

    shape: str = "weight"
    reduce: str | None = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.shape not in STATE_SHAPES:
            raise ValueError(f"StateSpec shape {self.shape!r} is not valid; choose one of {STATE_SHAPES}")
        if self.reduce not in STATE_REDUCTIONS:
            raise ValueError(f"StateSpec reduce {self.reduce!r} is not valid; choose one of {STATE_REDUCTIONS}")

    def full_shape(self, weight_shape: Sequence[int]) -> tuple[int, ...]:
        """The state's shape for a weight of ``weight_shape`` (before any per-unit reduction)."""
        if self.shape == "inputs":
            return (int(weight_shape[1]) if len(weight_shape) > 1 else 1,)
        return tuple(int(d) for d in weight_shape)


class TargetView(Protocol):
    """What :meth:`Criterion.setup` sees of one target (the engine's ``Target``)."""

    fqn: str
    module: nn.Module
    state: dict[str, Tensor]

    @property
    def collecting(self) -> bool:
        """True inside the scoring window: statistics gathered now count."""
        ...


class Criterion:
    """Base class for scoring rules; see the module docstring for what a subclass declares.

    Example (a rule that keeps the largest mean |W| seen during the window, in a few lines):
        >>> class PeakMagnitude(Criterion):
        ...     states = {"peak": StateSpec()}
        ...     def update(self, state, weight, grad, reduce=None):
        ...         torch.maximum(state["peak"], weight.detach().float().abs(), out=state["peak"])
        ...     def score(self, state, weight, grad):
        ...         return state["peak"]
        >>> c, state = PeakMagnitude(), {"peak": torch.zeros(2)}
        >>> c.update(state, torch.tensor([1.0, -3.0]), None)
        >>> c.score(state, torch.zeros(2), None)
        tensor([1., 3.])
    """

    needs_grad: ClassVar[bool] = False
    per_unit: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False
    states: ClassVar[Mapping[str, StateSpec]] = {}

    @property
    def accumulates(self) -> bool:
        """Whether this criterion keeps running states through the scoring window."""
        return bool(self.states)

    def setup(self, targets: Sequence[TargetView]) -> None:
        """Called once the targets are known, before the first step (e.g. to register forward hooks)."""

    def teardown(self) -> None:
        """Called after the last event and when pruning stops: remove hooks, drop scratch memory."""

    def update(
        self,
        state: dict[str, Tensor],
        weight: Tensor,
        grad: Tensor | None,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Fold one optimizer step into ``state`` (criteria with states, on every step of the window).

        With ``reduce`` (a linear map such as a block mean; only for ``per_unit`` criteria), each step's
        per-weight term is reduced before it is folded in, and ``"weight"``-shaped states hold reduced values.
        """

    def score(self, state: dict[str, Tensor], weight: Tensor, grad: Tensor | None) -> Tensor:
        """Scores for one target at a pruning event: float32, finite, shaped like the weight.

        Shaped like the weight's units instead where the states are kept per unit; the engine may modify the
        result in place.
        """
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """What defines this criterion (its name and coefficients), as stored in checkpoints."""
        settings = {k: _plain(v) for k, v in vars(self).items() if not k.startswith("_")}
        return {"name": repr(self), "class": f"{type(self).__module__}.{type(self).__qualname__}", **settings}

    def __repr__(self) -> str:
        return type(self).__name__.lower()


def _plain(value: object) -> object:
    """``value`` if checkpoints can hold it under ``weights_only=True`` loading, else its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return repr(value)


def _grad_or_zeros(weight: Tensor, grad: Tensor | None) -> Tensor:
    return torch.zeros_like(weight) if grad is None else grad


class Magnitude(Criterion):
    """Score = |W|.

    Example:
        >>> Magnitude().score({}, torch.tensor([-2.0, 1.0]), None)
        tensor([2., 1.])
    """

    def score(self, state: dict[str, Tensor], weight: Tensor, grad: Tensor | None) -> Tensor:
        """Absolute weights."""
        return weight.detach().float().abs().nan_to_num_(0.0, 0.0, 0.0)

    def __repr__(self) -> str:
        return "magnitude"


class Gradient(Criterion):
    """Score = |G|, the gradient of the pruning event's step; a weight without a gradient scores 0.

    Example:
        >>> Gradient().score({}, torch.ones(2), torch.tensor([0.5, -3.0]))
        tensor([0.5000, 3.0000])
    """

    needs_grad = True

    def score(self, state: dict[str, Tensor], weight: Tensor, grad: Tensor | None) -> Tensor:
        """Absolute gradients."""
        return _grad_or_zeros(weight, grad).detach().float().abs().nan_to_num_(0.0, 0.0, 0.0)

    def __repr__(self) -> str:
        return "gradient"


class Snip(Criterion):
    """Score = |W·G|, connection sensitivity.

    Lee, Ajanthan, Torr, "SNIP: Single-shot network pruning based on connection sensitivity", ICLR 2019,
    arXiv:1810.02340. With ``OneShot(step=0)`` this is SNIP at initialization.

    Example:
        >>> Snip().score({}, torch.tensor([2.0, -1.0]), torch.tensor([0.5, 4.0]))
        tensor([1., 4.])
    """

    needs_grad = True

    def score(self, state: dict[str, Tensor], weight: Tensor, grad: Tensor | None) -> Tensor:
        """Absolute weight-gradient products."""
        product = weight.detach().float() * _grad_or_zeros(weight, grad).detach().float()
        return product.abs_().nan_to_num_(0.0, 0.0, 0.0)

    def __repr__(self) -> str:
        return "snip"


class SnipMomentum(Criterion):
    """SNIP with momentum: Score_n = momentum · Score_{n-1} + scale · |W_n · G_n| (SPEC.md).

    The defaults are the documented formula (1.0, 0.9). Intel Neural Compressor's code ran the reverse,
    ``SnipMomentum(momentum=0.9, scale=1.0)``; pass those to reproduce it.

    Args:
        momentum: coefficient of the previous score.
        scale: coefficient of the new |W·G| term.

    Example:
        >>> c, state = SnipMomentum(), {"score": torch.zeros(2)}
        >>> c.update(state, torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))
        >>> state["score"]
        tensor([0.9000, 1.8000])
    """

    needs_grad = True
    per_unit = True
    elementwise = True
    states: ClassVar[Mapping[str, StateSpec]] = {"score": StateSpec("weight")}

    def __init__(self, momentum: float = 1.0, scale: float = 0.9) -> None:
        for name, value in (("momentum", momentum), ("scale", scale)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0.0:
                raise ValueError(f"SnipMomentum {name} must be a float >= 0, got {value!r}")
        if scale == 0:
            raise ValueError("SnipMomentum scale must be > 0, got 0 (scores would never change)")
        self.momentum = float(momentum)
        self.scale = float(scale)
        self._buffer: Tensor | None = None

    def update(
        self,
        state: dict[str, Tensor],
        weight: Tensor,
        grad: Tensor | None,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Score ← momentum·Score + scale·reduce(|W·G|); a non-finite |W·G| leaves the score unchanged."""
        if grad is None:
            return
        w, g = weight.detach(), grad.detach()
        # One scratch buffer, reused for every tensor and step: allocating |W·G| afresh each step costs more
        # (page faults) than the arithmetic.
        buffer = self._buffer
        if buffer is None or buffer.numel() < w.numel() or buffer.device != w.device:
            buffer = self._buffer = torch.empty(w.numel(), dtype=torch.float32, device=w.device)
        product = buffer[: w.numel()].view(w.shape)
        if w.dtype == torch.float32 and g.dtype == torch.float32:
            torch.mul(w, g, out=product)
        else:
            product.copy_(w).mul_(g)
        torch.abs(product, out=product)
        term = product if reduce is None else reduce(product)
        # |W·G| >= 0, so its max is finite exactly when every entry is (NaN propagates through amax).
        if term.numel() and not math.isfinite(float(term.amax())):
            return
        score = state["score"]
        if self.momentum == 0.0:  # not -inf * 0: pruned entries restart at 0 and are masked at the next event
            torch.mul(term, self.scale, out=score)
            return
        if self.momentum != 1.0:
            score.mul_(self.momentum)
        score.add_(term, alpha=self.scale)

    def teardown(self) -> None:
        """Drop the |W·G| scratch buffer (as large as the largest slice scored)."""
        self._buffer = None

    def score(self, state: dict[str, Tensor], weight: Tensor, grad: Tensor | None) -> Tensor:
        """The running score itself (no copy: 16 MB per 4M weights saved at every event)."""
        return state["score"]

    def __repr__(self) -> str:
        return "snip_momentum"


class Wanda(Criterion):
    """Wanda while training: score = |W_ij| · ‖X_j‖₂ (Sun et al. 2024, arXiv:2306.11695).

    ``‖X_j‖₂²`` is the running sum of the squared inputs of input column j (a convolution: input channel j,
    over batch and positions), gathered by forward hooks on the targets' modules during training forward
    passes inside the scoring window (never in validation, where modules are in eval mode). The sums are
    checkpointed with the other states and added up across processes at each event (``reduce="sum"``).

    Example:
        >>> from lightning_prune.engine import Target
        >>> layer = nn.Linear(2, 1)
        >>> _ = torch.nn.init.ones_(layer.weight)
        >>> target = Target("weight", layer, window=lambda: True)
        >>> target.state["sq_norms"] = torch.zeros(2)
        >>> c = Wanda(); c.setup([target])
        >>> _ = layer(torch.tensor([[3.0, 0.0], [4.0, 1.0]]))
        >>> c.score(target.state, layer.weight, None)
        tensor([[5., 1.]])
        >>> c.teardown()
    """

    states: ClassVar[Mapping[str, StateSpec]] = {"sq_norms": StateSpec("inputs", reduce="sum")}

    def __init__(self) -> None:
        self._hooks: list[Any] = []

    def setup(self, targets: Sequence[Any]) -> None:
        """Hook every target's module to add up its inputs' squares while the window is open."""
        self.teardown()
        self._hooks = [t.module.register_forward_pre_hook(self._collector(t)) for t in targets]

    @staticmethod
    def _collector(target: Any) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def collect(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not (module.training and target.collecting and args and isinstance(args[0], Tensor)):
                return
            x = args[0].detach().float()
            if isinstance(module, nn.Linear) or x.dim() < 3:
                columns = x.reshape(-1, x.shape[-1])
            else:  # a convolution: input channels along dim 1
                columns = x.transpose(0, 1).reshape(x.shape[1], -1).T
            target.state["sq_norms"].add_(columns.square().sum(0))

        return collect

    def teardown(self) -> None:
        """Remove the hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def score(self, state: dict[str, Tensor], weight: Tensor, grad: Tensor | None) -> Tensor:
        """|W| times the input column's norm, broadcast over the weight's other dimensions."""
        norms = state["sq_norms"].sqrt()
        view = [1] * weight.dim()
        view[1] = -1
        return weight.detach().float().abs() * norms.view(view)

    def __repr__(self) -> str:
        return "wanda"


def parse_criterion(criterion: str | Criterion) -> Criterion:
    """Turn a criterion name into a :class:`Criterion`; criterion objects pass through.

    Raises:
        ValueError: unknown name.
        TypeError: neither a string nor a :class:`Criterion`.

    Example:
        >>> parse_criterion("snip_momentum")
        snip_momentum
    """
    if isinstance(criterion, Criterion):
        return criterion
    if not isinstance(criterion, str):
        raise TypeError(f"criterion must be a str or a Criterion, got {type(criterion).__name__} {criterion!r}")
    table: dict[str, type[Criterion]] = {
        "magnitude": Magnitude,
        "gradient": Gradient,
        "snip": Snip,
        "snip_momentum": SnipMomentum,
        "wanda": Wanda,
    }
    key = criterion.strip().lower()
    if key not in table:
        raise ValueError(f"criterion {criterion!r} is not valid; choose one of {', '.join(map(repr, CRITERIA))}")
    return table[key]()
