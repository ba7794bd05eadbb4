"""PatternLock: existing zeros stay zero through fine-tuning, nothing else is masked."""

from __future__ import annotations

import pytest
import torch
from conftest import make_loader, make_module, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_prune import PatternLock, Pruning
from lightning_prune.patterns import as_matrix
from lightning_prune.schedules import Iterative


def weights(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if n.endswith("weight")}


def sprinkle_zeros(module, fraction=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight"):
                p.mul_(torch.rand(p.shape, generator=g) > fraction)


def two_four(module):
    """Zero the 2 smallest of every 4 consecutive input weights (widths here are multiples of 4 or padded)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight"):
                m = as_matrix(p.data)
                full = m.shape[1] // 4 * 4
                groups = m[:, :full].reshape(m.shape[0], -1, 4)
                low = groups.abs().argsort(-1)[..., :2]
                groups.scatter_(-1, low, 0.0)
                m[:, :full] = groups.reshape(m.shape[0], full)
                p.copy_(m.reshape(p.shape) if m.shape == p.shape else p.data)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "rprop"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_zeros_stay_zero_and_everything_else_trains(kind, optimizer):
    module = make_module(kind, optimizer)
    sprinkle_zeros(module)
    before = weights(module)
    lock = PatternLock()
    make_trainer([lock], max_steps=12).fit(module, make_loader(module))
    after = weights(module)
    moved = live = 0
    for name, w0 in before.items():
        assert torch.equal(lock.masks[name], w0 != 0), "masks are exactly the zeros found"
        assert (after[name][w0 == 0] == 0).all(), name
        assert (after[name][w0 != 0] != 0).all(), "no live weight is zeroed"
        moved += int((after[name] != w0)[w0 != 0].sum())
        live += int((w0 != 0).sum())
    assert moved / live > 0.5, "live weights train (dead ReLUs of this tiny net leave some without gradient)"


def test_two_four_model_locked_with_two_four_pattern_keeps_exactly_half():
    module = make_module("mlp", "adamw")
    two_four(module)
    before = weights(module)
    lock = PatternLock(pattern="2:4", include=["net\\.0", "net\\.2"])  # widths 12 and 16: whole groups
    make_trainer([lock], max_steps=12).fit(module, make_loader(module))
    for name in ("net.0.weight", "net.2.weight"):
        assert torch.equal(lock.masks[name], before[name] != 0)
        w = module.get_parameter(name).detach()
        groups = w.reshape(w.shape[0], -1, 4)
        assert ((groups == 0).sum(-1) == 2).all(), "exactly 2 zeros in every group, as before"
    assert lock.sparsity() == pytest.approx(0.5)


def test_zeros_not_fitting_the_pattern_are_an_error_before_training():
    module = make_module("mlp")
    sprinkle_zeros(module, 0.3)
    before = weights(module)
    with pytest.raises(ValueError, match=r"net\.0\.weight.*4x1") as err:
        make_trainer([PatternLock(pattern="4x1")], max_steps=4).fit(module, make_loader(module))
    assert "pattern=None" in str(err.value)
    for name, w in weights(module).items():
        assert torch.equal(w, before[name]), "model untouched"


def test_no_zeros_warns():
    module = make_module("mlp")
    with pytest.warns(UserWarning, match="no zeros"):
        make_trainer([PatternLock()], max_steps=2).fit(module, make_loader(module))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pattern": "5:4"}, "pattern"),
        ({"pattern": "diagonal"}, "pattern"),
        ({"op_types": []}, "op_types"),
        ({"include": "("}, "include"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PatternLock(**kwargs)


def prune_and_checkpoint(tmp_path):
    module = make_module("mlp", "adamw")
    pruning = Pruning(0.6, pattern="4x1", schedule=Iterative(start_step=0, end_step=6, frequency=2))
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="pruned", save_last=False)
    make_trainer([pruning, ckpt], max_steps=8, enable_checkpointing=True).fit(module, make_loader(module))
    return pruning, tmp_path / "pruned.ckpt"


def test_fine_tune_a_fresh_module_from_a_pruning_checkpoint(tmp_path):
    pruning, path = prune_and_checkpoint(tmp_path)
    fresh = make_module("mlp", "sgd", seed=7)
    state = torch.load(path, weights_only=True)["state_dict"]
    fresh.load_state_dict(state, strict=True)
    lock = PatternLock(pattern="4x1")
    make_trainer([lock], max_steps=10).fit(fresh, make_loader(fresh, seed=3))  # a "downstream" task
    for name, mask in pruning.masks.items():
        assert torch.equal(lock.masks[name], mask), "the locked zeros are the pruned weights"
        assert (fresh.get_parameter(name).detach()[~mask] == 0).all()
    assert lock.sparsity() == pytest.approx(pruning.sparsity())


def test_fit_from_a_pruning_checkpoint_path_locks_its_zeros(tmp_path):
    pruning, path = prune_and_checkpoint(tmp_path)
    module = make_module("mlp", "adamw", seed=5)
    lock = PatternLock()
    make_trainer([lock], max_steps=16).fit(module, make_loader(module), ckpt_path=path)
    for name, mask in pruning.masks.items():
        assert torch.equal(lock.masks[name], mask)
        assert (module.get_parameter(name).detach()[~mask] == 0).all()


def test_resume_from_own_checkpoint_keeps_the_masks(tmp_path):
    module = make_module("mlp", "adamw")
    sprinkle_zeros(module)
    lock = PatternLock()
    trainer = make_trainer([lock], max_steps=4)
    trainer.fit(module, make_loader(module))
    path = tmp_path / "lock.ckpt"
    trainer.save_checkpoint(path)
    original = {k: v.clone() for k, v in lock.masks.items()}

    resumed_module = make_module("mlp", "adamw", seed=9)
    resumed = PatternLock()
    make_trainer([resumed], max_steps=10).fit(resumed_module, make_loader(resumed_module), ckpt_path=path)
    for name, mask in original.items():
        assert torch.equal(resumed.masks[name], mask)
        assert (resumed_module.get_parameter(name).detach()[~mask] == 0).all()
