"""One contract per extension point, run over every plug-in with plain tensors (no Trainer, no model).

Every pattern: unit shapes and sizes, expand/conform, dtype and device, unit views, linearity and row slices.
Every criterion: shape, float32, finite under non-finite gradients, per-unit states equal to reduced per-weight
ones, row slices equal to whole tensors, checkpointable configuration. Every schedule: monotone, ends at target.
"""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch

from lightning_prune.criteria import Criterion, Gradient, Magnitude, Snip, SnipMomentum, StateSpec
from lightning_prune.engine.scores import Target, TargetStates
from lightning_prune.patterns import parse_pattern
from lightning_prune.schedules import Iterative, OneShot, default_schedule

PATTERNS = ["unstructured", "4x1", "1x4", "2x2", "3x2", "channelx1", "1xchannel", "2:4", "1:3"]
SHAPES = [(8, 12), (10, 7), (6, 4, 3, 3), (5, 6, 1, 1)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def cases():
    for name, shape in itertools.product(PATTERNS, SHAPES):
        pattern = parse_pattern(name)
        try:
            pattern.check("w", shape)
        except ValueError:
            continue
        yield pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape))}")


def sizes_like(pattern, shape, units):
    sizes = pattern.unit_sizes(shape)
    return torch.full(units.shape, sizes) if isinstance(sizes, int) else sizes


# ----------------------------------------------------------------------------------------------- patterns
@pytest.mark.parametrize(("name", "shape"), list(cases()))
def test_pattern_units_cover_the_weight(name, shape):
    pattern = parse_pattern(name)
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    units = pattern.unit_scores(scores)
    sizes = sizes_like(pattern, shape, units)
    assert sizes.shape == units.shape and (sizes >= 0).all()
    everything = pattern.expand(torch.ones_like(units, dtype=torch.bool), scores)
    nothing = pattern.expand(torch.zeros_like(units, dtype=torch.bool), scores)
    assert everything.shape == scores.shape and everything.dtype == torch.bool
    assert not nothing.any()
    assert int(everything.sum()) == int(sizes.sum()), "a unit prunes exactly its size"
    if pattern.whole_units:
        assert everything.all(), "whole units tile the weight"
    else:
        assert int(everything.sum()) / everything.numel() <= pattern.max_sparsity + 1e-9


@pytest.mark.parametrize(("name", "shape"), list(cases()))
def test_pattern_expanded_units_conform(name, shape):
    pattern = parse_pattern(name)
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(shape, generator=g)
    units = pattern.unit_scores(scores)
    picks = torch.rand(units.shape, generator=g) < 0.5
    picks.view(-1)[0] = False  # the first unit, which holds the weight's first element, is kept
    mask = ~pattern.expand(picks, scores)
    assert pattern.conforms(mask)
    assert int((~mask).sum()) == int(sizes_like(pattern, shape, units)[picks].sum())
    if pattern.structured and pattern.whole_units:
        stray = mask.contiguous().clone()
        stray.view(-1)[0] = False  # one zero inside a kept unit
        assert not pattern.conforms(stray)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "shape"), list(cases()))
def test_pattern_keeps_dtype_and_device(name, shape, dtype):
    pattern = parse_pattern(name)
    scores = torch.rand(shape).to(dtype)
    units = pattern.unit_scores(scores)
    assert units.dtype == dtype and units.device == scores.device
    expanded = pattern.expand(units > units.median(), scores)
    assert expanded.dtype == torch.bool and expanded.device == scores.device and expanded.shape == scores.shape
    meta = pattern.unit_scores(torch.empty(shape, device="meta"))
    assert meta.shape == units.shape, "unit shapes are known without data"


@pytest.mark.parametrize(("name", "shape"), list(cases()))
def test_pattern_unit_view_broadcasts_unit_decisions(name, shape):
    pattern = parse_pattern(name)
    found = pattern.unit_view(shape)
    if found is None:
        return
    view, dims = found
    scores = torch.rand(shape)
    units = pattern.unit_scores(scores)
    mask = ~pattern.expand(torch.rand(units.shape) < 0.5, scores)
    boxes = mask.reshape(view)
    kept = boxes.amin(dim=dims, keepdim=True)
    assert torch.equal(kept, boxes.amax(dim=dims, keepdim=True)), "each unit is a box of the view"
    assert torch.equal(kept.expand(view).reshape(shape), mask)


@pytest.mark.parametrize(("name", "shape"), list(cases()))
def test_linear_patterns_reduce_linearly_and_by_row_slices(name, shape):
    pattern = parse_pattern(name)
    if not pattern.linear:
        return
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(shape, generator=g, dtype=torch.float64), torch.rand(shape, generator=g, dtype=torch.float64)
    combined = 2 * pattern.unit_scores(x) + 3 * pattern.unit_scores(y)
    torch.testing.assert_close(pattern.unit_scores(2 * x + 3 * y), combined)
    rows = pattern.unit_rows
    if rows is None or shape[0] <= rows:
        return
    whole = pattern.unit_scores(x)
    cut = rows * max(1, shape[0] // rows // 2)
    torch.testing.assert_close(torch.cat([pattern.unit_scores(x[:cut]), pattern.unit_scores(x[cut:])]), whole)


# ----------------------------------------------------------------------------------------------- criteria
class PeakMagnitude(Criterion):
    """A user-written accumulating criterion: the largest |W| seen in the window."""

    states = {"peak": StateSpec()}  # noqa: RUF012
    elementwise = True

    def update(self, state, weight, grad, reduce=None):
        torch.maximum(state["peak"], weight.detach().float().abs(), out=state["peak"])

    def score(self, state, weight, grad):
        return state["peak"].nan_to_num(0.0, 0.0, 0.0)


CRITERIA = [Magnitude(), Gradient(), Snip(), SnipMomentum(), SnipMomentum(0.9, 1.0), PeakMagnitude()]


def run(criterion, weight, grads, per_unit_pattern=None):
    """Every step's update, then the score, through the engine's state bookkeeping."""
    pattern = per_unit_pattern or parse_pattern("unstructured")
    states = TargetStates(criterion, pattern, per_unit=per_unit_pattern is not None)
    target = Target("w", torch.nn.Identity(), lambda: True)
    states.allocate([target], [weight])
    for grad in grads:
        states.update([target], [weight], [grad])
    return criterion.score(dict(target.state), weight, grads[-1])


@pytest.mark.parametrize("criterion", CRITERIA, ids=repr)
@pytest.mark.parametrize("shape", [(8, 12), (6, 4, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_criterion_scores_are_float32_finite_and_shaped_like_the_weight(criterion, shape, dtype):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(shape, generator=g).to(dtype)
    grads = [torch.randn(shape, generator=g).to(dtype) for _ in range(3)]
    score = run(criterion, weight, grads)
    assert score.shape == weight.shape and score.dtype == torch.float32
    assert torch.isfinite(score).all()
    assert torch.equal(score, run(criterion, weight, grads)), "deterministic"


@pytest.mark.parametrize("criterion", CRITERIA, ids=repr)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_criterion_scores_stay_finite_under_non_finite_gradients(criterion, bad):
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(6, 8, generator=g)
    good = torch.randn(6, 8, generator=g)
    broken = good.clone()
    broken[2, 3] = bad
    score = run(criterion, weight, [good, broken])
    assert torch.isfinite(score).all()
    if criterion.accumulates and criterion.needs_grad:
        reference = run(criterion, weight, [good])
        torch.testing.assert_close(score, reference)  # a step with a non-finite gradient leaves states unchanged


@pytest.mark.parametrize("criterion", [c for c in CRITERIA if c.per_unit], ids=repr)
@pytest.mark.parametrize("name", ["4x1", "2x2", "3x2", "channelx1", "1xchannel"])
@pytest.mark.parametrize("shape", [(8, 12), (10, 7), (6, 4, 3, 3)])
def test_per_unit_states_equal_reduced_per_weight_states(criterion, name, shape):
    pattern = parse_pattern(name)
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(shape, generator=g, dtype=torch.float64).float()
    grads = [torch.randn(shape, generator=g) for _ in range(4)]
    per_unit = run(criterion, weight, grads, per_unit_pattern=pattern)
    per_weight = run(criterion, weight, grads)
    torch.testing.assert_close(per_unit, pattern.unit_scores(per_weight), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("criterion", [c for c in CRITERIA if c.elementwise], ids=repr)
@pytest.mark.parametrize("per_unit", [None, "4x1"])
def test_elementwise_updates_by_row_slices_equal_whole_tensors(monkeypatch, criterion, per_unit):
    from lightning_prune.engine import scores as engine_scores

    pattern = parse_pattern(per_unit) if per_unit and criterion.per_unit else None
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(32, 16, generator=g)
    grads = [torch.randn(32, 16, generator=g) for _ in range(3)]
    whole = run(criterion, weight, grads, pattern).clone()
    monkeypatch.setattr(engine_scores, "_SLICE_ELEMENTS", 40)  # slices of a few rows
    torch.testing.assert_close(run(criterion, weight, grads, pattern), whole)


@pytest.mark.parametrize("criterion", CRITERIA, ids=repr)
def test_criterion_config_survives_a_weights_only_checkpoint(criterion):
    buffer = io.BytesIO()
    torch.save(criterion.config(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == criterion.config()
    assert criterion.config()["name"] == repr(criterion)


def test_criterion_config_tells_coefficients_apart():
    assert SnipMomentum().config() != SnipMomentum(0.9, 1.0).config()
    assert SnipMomentum().config() == SnipMomentum(1.0, 0.9).config()


def test_state_spec_shapes():
    assert StateSpec("inputs").full_shape((5, 7, 3, 3)) == (7,)
    assert StateSpec().full_shape((5, 7)) == (5, 7)
    with pytest.raises(ValueError, match="StateSpec shape 'rows' is not valid"):
        StateSpec("rows")
    with pytest.raises(ValueError, match="StateSpec reduce 'median' is not valid"):
        StateSpec(reduce="median")


# ----------------------------------------------------------------------------------------------- schedules
SCHEDULES = [
    OneShot(0),
    OneShot(7),
    *(Iterative(0, 9, 3, decay) for decay in ("exp", "linear", "cos", "cube")),
    Iterative(5, 5, 1),
    Iterative(2, 40, 7, "cube"),
    default_schedule(1),
    default_schedule(95),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
@pytest.mark.parametrize("target", [0.0, 0.3, 0.9])
def test_schedule_is_monotone_and_ends_at_the_target(schedule, target):
    steps = schedule.event_steps()
    assert steps == sorted(set(steps)) and len(steps) == schedule.num_events
    assert (schedule.start, schedule.end) == (steps[0], steps[-1])
    values = [schedule.sparsity(i, target) for i in range(schedule.num_events)]
    assert all(a <= b for a, b in itertools.pairwise(values)), "sparsity never decreases"
    assert values[-1] == target, "the last event reaches the target exactly"
    assert all(0.0 <= v <= target for v in values)
    if target > 0:
        assert values[0] > 0, "the first event already prunes"
    for step in range(schedule.end + 3):
        assert schedule.last_event_at(step) == sum(1 for s in steps if s <= step) - 1


@pytest.mark.parametrize("total", [0, -3, math.inf, math.nan, None, True])
def test_default_schedule_needs_a_known_length(total):
    with pytest.raises(ValueError, match="schedule=None prunes over the whole run"):
        default_schedule(total)  # type: ignore[arg-type]
