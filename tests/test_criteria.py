import pytest
import torch

from lightning_prune.criteria import Gradient, Magnitude, Snip, SnipMomentum, parse_criterion


def test_formulas():
    w, g = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, -4.0]])
    assert torch.equal(Magnitude().scores(None, [w], [g])[0], w.abs())
    assert torch.equal(Gradient().scores(None, [w], [g])[0], g.abs())
    assert torch.equal(Snip().scores(None, [w], [g])[0], (w * g).abs())


def test_snip_momentum_follows_spec_by_default():
    c = SnipMomentum()
    assert (c.momentum, c.scale) == (1.0, 0.9)
    w, g = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])
    state = [torch.tensor([1.0, 1.0])]
    c.update(state, [w], [g])
    assert torch.allclose(state[0], 1.0 * torch.tensor([1.0, 1.0]) + 0.9 * (w * g).abs())


def test_snip_momentum_inc_coefficients():
    c = SnipMomentum(momentum=0.9, scale=1.0)
    state = [torch.tensor([2.0])]
    c.update(state, [torch.tensor([1.0])], [torch.tensor([3.0])])
    assert torch.allclose(state[0], torch.tensor([0.9 * 2.0 + 3.0]))


def test_snip_momentum_skips_non_finite_steps_when_checking():
    c = SnipMomentum()
    c._check_finite = True
    state = [torch.tensor([1.0, 1.0])]
    c.update(state, [torch.tensor([1.0, 1.0])], [torch.tensor([float("inf"), 1.0])])
    assert torch.equal(state[0], torch.tensor([1.0, 1.0]))


def test_scores_are_float32_for_bf16_weights():
    w = torch.randn(4, 4, dtype=torch.bfloat16)
    assert Magnitude().scores(None, [w], [None])[0].dtype == torch.float32
    state = [torch.zeros(4, 4)]
    SnipMomentum().update(state, [w], [w])
    assert state[0].dtype == torch.float32 and state[0].sum() > 0


def test_missing_gradient_scores_zero():
    assert Snip().scores(None, [torch.ones(3)], [None])[0].sum() == 0


@pytest.mark.parametrize("name", ["magnitude", "gradient", "snip", "snip_momentum"])
def test_parse(name):
    assert str(parse_criterion(name)) == name


def test_parse_rejects():
    with pytest.raises(ValueError, match="criterion 'l1' is not valid; choose one of 'magnitude', 'gradient'"):
        parse_criterion("l1")
    with pytest.raises(TypeError, match="criterion must be a str or a Criterion"):
        parse_criterion(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "match"), [({"momentum": -1}, "momentum"), ({"scale": 0}, "scale")])
def test_snip_momentum_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SnipMomentum(**kwargs)
