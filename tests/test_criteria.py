import pytest
import torch

from lightning_prune.criteria import Gradient, Magnitude, Snip, SnipMomentum, parse_criterion


def test_formulas():
    w, g = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, -4.0]])
    assert torch.equal(Magnitude().score({}, w, g), w.abs())
    assert torch.equal(Gradient().score({}, w, g), g.abs())
    assert torch.equal(Snip().score({}, w, g), (w * g).abs())


def test_snip_momentum_follows_spec_by_default():
    c = SnipMomentum()
    assert (c.momentum, c.scale) == (1.0, 0.9)
    w, g = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])
    state = {"score": torch.tensor([1.0, 1.0])}
    c.update(state, w, g)
    assert torch.allclose(state["score"], 1.0 * torch.tensor([1.0, 1.0]) + 0.9 * (w * g).abs())


def test_snip_momentum_inc_coefficients():
    c = SnipMomentum(momentum=0.9, scale=1.0)
    state = {"score": torch.tensor([2.0])}
    c.update(state, torch.tensor([1.0]), torch.tensor([3.0]))
    assert torch.allclose(state["score"], torch.tensor([0.9 * 2.0 + 3.0]))


def test_snip_momentum_skips_non_finite_steps():
    c = SnipMomentum()
    state = {"score": torch.tensor([1.0, 1.0])}
    c.update(state, torch.tensor([1.0, 1.0]), torch.tensor([float("inf"), 1.0]))
    assert torch.equal(state["score"], torch.tensor([1.0, 1.0]))


def test_snip_momentum_scratch_buffer_is_released_by_teardown():
    c = SnipMomentum()
    c.update({"score": torch.zeros(3)}, torch.ones(3), torch.ones(3))
    assert c._buffer is not None
    c.teardown()
    assert c._buffer is None


def test_scores_are_float32_for_bf16_weights():
    w = torch.randn(4, 4, dtype=torch.bfloat16)
    assert Magnitude().score({}, w, None).dtype == torch.float32
    state = {"score": torch.zeros(4, 4)}
    SnipMomentum().update(state, w, w)
    assert state["score"].dtype == torch.float32 and state["score"].sum() > 0


def test_missing_gradient_scores_zero():
    assert Snip().score({}, torch.ones(3), None).sum() == 0
    state = {"score": torch.ones(3)}
    SnipMomentum().update(state, torch.ones(3), None)
    assert torch.equal(state["score"], torch.ones(3))


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


def test_wanda_scores_training_inputs_of_the_window_only():
    from lightning_prune import Pruner
    from lightning_prune.schedules import OneShot

    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)  # weights stay put: the score is easy to recompute
    pruner = Pruner(layer, 0.5, "unstructured", "wanda", schedule=OneShot(step=2))
    weight = layer.weight.detach().clone()
    seen = torch.zeros(8)
    for step in range(4):
        x = torch.randn(16, 8) * torch.arange(1, 9)
        if step == 2:
            seen += x.square().sum(0)  # only the forward pass of the window's step counts
            layer.eval()
            layer(torch.randn(5, 8) * 100)  # a validation pass in the window: ignored
            layer.train()
        layer(x).square().mean().backward()
        event = pruner.before_optimizer_step(step, opt)
        assert (event is not None) == (step == 2)
        opt.step()
        opt.zero_grad()
        pruner.after_optimizer_step()
    score = (weight.abs() * seen.sqrt()).flatten()
    kept = pruner.masks["weight"].flatten()
    assert int((~kept).sum()) == 16
    assert torch.equal(kept, score > torch.kthvalue(score, 16).values)  # the 16 lowest |W|·‖X_j‖ pruned
    assert pruner.states == {}  # hooks and sums released after the last event


def test_wanda_is_chosen_by_name():
    assert str(parse_criterion("wanda")) == "wanda"
