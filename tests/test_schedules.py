import itertools
import math

import pytest

from lightning_prune.schedules import Iterative, OneShot, decay_curve


@pytest.mark.parametrize(
    ("decay", "formula"),
    [
        ("exp", lambda t, p: 1 - (1 - t) ** p),
        ("linear", lambda t, p: t * p),
        ("cos", lambda t, p: t * (1 - math.cos(p * math.pi / 2))),
        ("cube", lambda t, p: t * p**3),
    ],
)
def test_decay_shapes(decay, formula):
    for p in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert decay_curve(decay, 0.8, p) == pytest.approx(formula(0.8, p))


def test_cube_is_slow_start():
    assert decay_curve("cube", 0.9, 0.5) < decay_curve("linear", 0.9, 0.5)


@pytest.mark.parametrize("decay", ["exp", "linear", "cos", "cube"])
@pytest.mark.parametrize(("start", "end", "freq"), [(0, 100, 10), (5, 37, 7), (3, 3, 1), (0, 9, 20)])
def test_iterative_events(decay, start, end, freq):
    s = Iterative(start_step=start, end_step=end, frequency=freq, decay=decay)
    events = s.event_steps()
    assert events[0] == start and events[-1] == end
    assert events == sorted(set(events))
    assert s.num_events == len(events)
    sparsities = [s.sparsity(i, 0.8) for i in range(len(events))]
    assert sparsities[0] > 0, "the first event prunes"
    assert all(a <= b for a, b in itertools.pairwise(sparsities)), "never decreases"
    assert sparsities[-1] == 0.8, "the last event hits the target exactly"
    for step in range(0, end + 5):
        assert s.last_event_at(step) == sum(1 for e in events if e <= step) - 1


def test_oneshot():
    s = OneShot(step=7)
    assert s.event_steps() == [7]
    assert s.sparsity(0, 0.9) == 0.9
    assert s.last_event_at(6) == -1 and s.last_event_at(7) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start_step": 10, "end_step": 5}, r"start_step \(10\) must be <= end_step \(5\)"),
        ({"start_step": 0, "end_step": 5, "frequency": 0}, "frequency must be an int >= 1, got 0"),
        ({"start_step": -1, "end_step": 5}, "start_step must be an int >= 0, got -1"),
        ({"start_step": 0, "end_step": 5, "decay": "log"}, "decay 'log' is not valid; choose one of 'exp', 'linear'"),
    ],
)
def test_iterative_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Iterative(**kwargs)


def test_oneshot_rejects_negative():
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        OneShot(step=-3)
