"""How much to prune, and when: pure functions of the optimizer step.

Steps are optimizer steps (``trainer.global_step``), counted from 0. An event at step ``s`` prunes before
the optimizer update of step ``s``, with that step's gradients.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

__all__ = ["DECAYS", "Iterative", "OneShot", "Schedule", "decay_curve", "default_schedule"]


def _exp(target: float, p: float) -> float:
    return 1.0 - (1.0 - target) ** p


def _linear(target: float, p: float) -> float:
    return target * p


def _cos(target: float, p: float) -> float:
    return target * (1.0 - math.cos(p * math.pi / 2.0))


def _cube(target: float, p: float) -> float:
    # SPEC.md's cube is slow-start, T·p³ (not Zhu & Gupta's fast-start cubic).
    return target * p**3


DECAYS: dict[str, Callable[[float, float], float]] = {"exp": _exp, "linear": _linear, "cos": _cos, "cube": _cube}


def decay_curve(decay: str, target: float, p: float) -> float:
    """Sparsity after a fraction ``p`` in [0, 1] of the schedule, for one of :data:`DECAYS`.

    ``exp``: 1 - (1 - T)^p; ``linear``: T·p; ``cos``: T·(1 - cos(pπ/2)); ``cube``: T·p³.

    Example:
        >>> round(decay_curve("linear", 0.8, 0.5), 3)
        0.4
    """
    if decay not in DECAYS:
        raise ValueError(f"decay {decay!r} is not valid; choose one of {', '.join(map(repr, DECAYS))}")
    if p >= 1.0:
        return target
    return DECAYS[decay](target, max(0.0, p))


class Schedule:
    """Base class: a list of event steps and the sparsity each event reaches."""

    def event_steps(self) -> list[int]:
        """Steps at which pruning events happen, ascending."""
        raise NotImplementedError

    @property
    def num_events(self) -> int:
        """Number of pruning events."""
        return len(self.event_steps())

    def sparsity(self, event: int, target: float) -> float:
        """Sparsity reached by event number ``event`` (0-based) for a final ``target``."""
        raise NotImplementedError

    @property
    def start(self) -> int:
        """First event step."""
        return self.event_steps()[0]

    @property
    def end(self) -> int:
        """Last event step, where the target is reached."""
        return self.event_steps()[-1]

    def last_event_at(self, step: int) -> int:
        """Index of the last event at or before ``step``; -1 before the first."""
        return sum(1 for e in self.event_steps() if e <= step) - 1


def _check_step(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


class OneShot(Schedule):
    """Prune to the target in one event at ``step``.

    Args:
        step: the optimizer step of the event; 0 prunes before the first update (SNIP at initialization
            with ``criterion="snip"``).

    Example:
        >>> OneShot(step=0).event_steps()
        [0]
    """

    def __init__(self, step: int = 0) -> None:
        self.step = _check_step("step", step)

    def event_steps(self) -> list[int]:
        """The single event."""
        return [self.step]

    def sparsity(self, event: int, target: float) -> float:
        """The target."""
        return target

    def __repr__(self) -> str:
        return f"OneShot(step={self.step})"


class Iterative(Schedule):
    """Raise sparsity in events every ``frequency`` steps from ``start_step`` to ``end_step``.

    Events fall on ``start_step, start_step + frequency, ...`` and always on ``end_step``, where the target
    is reached. With ``n`` events, event ``i`` reaches ``decay_curve(decay, target, (i + 1) / n)``, so the
    first event already prunes and sparsity never decreases.

    Args:
        start_step: first event (optimizer step).
        end_step: last event, where the target is reached; ``>= start_step``.
        frequency: steps between events, ``>= 1``.
        decay: ``"exp"`` (default), ``"linear"``, ``"cos"`` or ``"cube"``.

    Raises:
        ValueError: a negative step, ``start_step > end_step``, ``frequency < 1`` or an unknown decay.

    Example:
        >>> s = Iterative(start_step=0, end_step=30, frequency=10, decay="linear")
        >>> s.event_steps(), [round(s.sparsity(i, 0.8), 2) for i in range(4)]
        ([0, 10, 20, 30], [0.2, 0.4, 0.6, 0.8])
    """

    def __init__(self, start_step: int, end_step: int, frequency: int = 100, decay: str = "exp") -> None:
        self.start_step = _check_step("start_step", start_step)
        self.end_step = _check_step("end_step", end_step)
        if start_step > end_step:
            raise ValueError(f"start_step ({start_step}) must be <= end_step ({end_step})")
        if not isinstance(frequency, int) or isinstance(frequency, bool) or frequency < 1:
            raise ValueError(f"frequency must be an int >= 1, got {frequency!r}")
        if decay not in DECAYS:
            raise ValueError(f"decay {decay!r} is not valid; choose one of {', '.join(map(repr, DECAYS))}")
        self.frequency = frequency
        self.decay = decay
        if frequency > end_step - start_step > 0:
            warnings.warn(
                f"frequency {frequency} is longer than the window {start_step}..{end_step}: events only at "
                "start_step and end_step",
                stacklevel=2,
            )

    def event_steps(self) -> list[int]:
        """``start_step`` every ``frequency`` steps, ending on ``end_step``."""
        steps = list(range(self.start_step, self.end_step, self.frequency))
        return [*steps, self.end_step]

    @property
    def num_events(self) -> int:
        """``ceil((end_step - start_step) / frequency) + 1``."""
        return -(-(self.end_step - self.start_step) // self.frequency) + 1

    @property
    def start(self) -> int:
        """``start_step``."""
        return self.start_step

    @property
    def end(self) -> int:
        """``end_step``."""
        return self.end_step

    def last_event_at(self, step: int) -> int:
        """Index of the last event at or before ``step`` in O(1); -1 before the first."""
        if step < self.start_step:
            return -1
        if step >= self.end_step:
            return self.num_events - 1
        return (step - self.start_step) // self.frequency

    def sparsity(self, event: int, target: float) -> float:
        """Sparsity after event ``event``; the last event reaches ``target`` exactly."""
        return decay_curve(self.decay, target, (event + 1) / self.num_events)

    def __repr__(self) -> str:
        return (
            f"Iterative(start_step={self.start_step}, end_step={self.end_step}, "
            f"frequency={self.frequency}, decay={self.decay!r})"
        )


def default_schedule(total_steps: int) -> Iterative:
    """The schedule of ``schedule=None``: exp decay over the whole run.

    Events every ``max(1, total_steps // 20)`` steps from step 0 to the run's last step (``total_steps - 1``).

    Raises:
        ValueError: ``total_steps`` is not a whole number of steps >= 1.

    Example:
        >>> default_schedule(100)
        Iterative(start_step=0, end_step=99, frequency=5, decay='exp')
    """
    finite = isinstance(total_steps, (int, float)) and not isinstance(total_steps, bool) and math.isfinite(total_steps)
    if not finite or total_steps < 1:
        raise ValueError(
            f"schedule=None prunes over the whole run, but its length is {total_steps!r} optimizer steps; give the "
            "run a known length or pass schedule=Iterative(start_step, end_step, frequency)"
        )
    total = int(total_steps)
    return Iterative(start_step=0, end_step=total - 1, frequency=max(1, total // 20))
