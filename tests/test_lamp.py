"""scope="lamp": layer-adaptive magnitude-based pruning (Lee et al. 2021), one global ranking of LAMP scores."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_prune import Pruner
from lightning_prune.engine.planning import lamp_scores
from lightning_prune.patterns import FFN
from lightning_prune.schedules import OneShot


def _by_definition(scores: torch.Tensor) -> torch.Tensor:
    """The paper's formula, one unit at a time: s^2 over the squares of the layer's kept units at or above s."""
    out = scores.clone()
    kept = scores[torch.isfinite(scores)]
    for i, s in enumerate(scores.tolist()):
        if s != float("-inf"):
            out[i] = s * s / float((kept[kept >= s] ** 2).sum())
    return out


def test_lamp_scores_follow_the_papers_formula_and_keep_pruned_units_first():
    torch.manual_seed(0)
    scores = torch.rand(50)
    scores[[3, 17, 40]] = float("-inf")
    got = lamp_scores(scores)
    assert torch.allclose(got, _by_definition(scores), rtol=1e-6)
    assert torch.isinf(got[[3, 17, 40]]).all() and float(got.max()) == 1.0
    ties = torch.tensor([2.0, 1.0, 2.0, float("-inf"), 1.0, 3.0, 0.0])  # tied units share a score
    assert torch.allclose(lamp_scores(ties), _by_definition(ties), rtol=1e-6)
    assert torch.equal(lamp_scores(ties[:3], values=ties[torch.isfinite(ties)]), lamp_scores(ties)[:3])
    # one shard of a layer, scored against the whole layer's kept values, gives the whole layer's scores
    whole = lamp_scores(scores)
    shard = lamp_scores(scores[:20], values=scores[torch.isfinite(scores)])
    assert torch.equal(shard, whole[:20])


def test_lamp_scores_of_a_layer_do_not_change_when_it_is_scaled():
    scores = torch.rand(64, 32)
    assert torch.allclose(lamp_scores(scores * 1000.0), lamp_scores(scores), rtol=1e-5)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def _masks(model: nn.Module, scope: str, target: float, **kwargs: float) -> dict[str, torch.Tensor]:
    pruner = Pruner(model, target, "unstructured", "magnitude", OneShot(step=0), scope=scope, **kwargs)
    pruner.before_optimizer_step(0)
    assert pruner.sparsity() == pytest.approx(target, abs=1e-3)
    return {name: mask.clone() for name, mask in pruner.masks.items()}


def test_lamp_masks_do_not_depend_on_a_layers_scale_while_global_ones_do():
    model, scaled = _mlp(), _mlp()
    with torch.no_grad():
        scaled[2].weight.mul_(1000.0)  # one layer's weights much larger, as after another initialisation
    lamp, lamp_scaled = _masks(copy.deepcopy(model), "lamp", 0.8), _masks(copy.deepcopy(scaled), "lamp", 0.8)
    assert all(torch.equal(lamp[k], lamp_scaled[k]) for k in lamp)
    glob, glob_scaled = _masks(copy.deepcopy(model), "global", 0.8), _masks(copy.deepcopy(scaled), "global", 0.8)
    assert not torch.equal(glob["2.weight"], glob_scaled["2.weight"])
    # global magnitude spares the large layer and prunes the others up to their cap
    assert glob_scaled["2.weight"].float().mean() > glob["2.weight"].float().mean() + 0.05


def test_lamp_keeps_every_layers_largest_weights_where_global_empties_a_layer():
    model = _mlp()
    with torch.no_grad():
        model[0].weight.mul_(0.01)
    glob = _masks(copy.deepcopy(model), "global", 0.9, max_sparsity_per_layer=1.0)
    assert not glob["0.weight"].any()  # the small-scale layer is pruned away
    lamp = _masks(copy.deepcopy(model), "lamp", 0.9, max_sparsity_per_layer=1.0)
    for name, mask in lamp.items():
        weight = model.get_parameter(name).detach().abs()
        assert mask.view(-1)[weight.argmax()], name
        assert mask.sum() >= 4, name


def test_lamp_on_coupled_neurons_prunes_whole_neurons_whatever_an_ffns_scale():
    def two_ffns(scale: float) -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)
        )
        with torch.no_grad():
            net[3].weight.mul_(scale)
            net[5].weight.mul_(scale)
        return net

    ffns = FFN(layers={"a": {"inputs": ["0"], "output": "2"}, "b": {"inputs": ["3"], "output": "5"}})

    def neurons_kept(scale: float, scope: str) -> list[int]:
        pruner = Pruner(two_ffns(scale), 0.5, ffns, "magnitude", OneShot(step=0), scope=scope)
        pruner.before_optimizer_step(0)
        rows = [pruner.masks["0.weight"], pruner.masks["3.weight"]]
        assert all(bool((r.all(dim=1) | ~r.any(dim=1)).all()) for r in rows)  # whole neurons only
        return [int(r.all(dim=1).sum()) for r in rows]

    assert neurons_kept(1.0, "lamp") == neurons_kept(100.0, "lamp")
    assert 0 < sum(neurons_kept(1.0, "lamp")) < 128
    assert neurons_kept(100.0, "global")[1] > neurons_kept(1.0, "global")[1]  # the large FFN spared
