"""OneShotPruning: prune once at fit start from calibration batches, lock through training, resume without pruning."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TinyModule, make_loader, make_module, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_prune import OneShotPruning, PatternLock
from lightning_prune.callbacks import oneshot as oneshot_callback
from lightning_prune.oneshot import prune_oneshot


def four_wide() -> TinyModule:
    """Input widths that are multiples of 4, for 2:4."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    return TinyModule(net, (12,), "adamw")


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if n.endswith("weight")}


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_max_steps_zero_prunes_exactly_like_prune_oneshot_from_the_first_batches(method):
    module = make_module("mlp")
    loader = make_loader(module, n=64, batch_size=8)
    reference = copy.deepcopy(module)
    expected = prune_oneshot(reference, [x for x, _ in list(loader)[:3]], method, 0.5)
    cb = OneShotPruning(method=method, target_sparsity=0.5, calibration_batches=3, verbose=False)
    trainer = make_trainer([cb], max_steps=0)
    trainer.fit(module, loader)
    assert set(cb.masks) == set(expected)
    for name, mask in expected.items():
        assert torch.equal(cb.masks[name], mask), name
    for (name, p), q in zip(module.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    assert cb.sparsity() == pytest.approx(0.5, abs=0.01)
    assert trainer.global_step == 0


def test_dataloader_argument_replaces_the_training_batches():
    module = make_module("mlp")
    calibration = [torch.randn(16, 12, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    reference = copy.deepcopy(module)
    expected = prune_oneshot(reference, calibration, "wanda", 0.5)
    cb = OneShotPruning(method="wanda", dataloader=calibration, verbose=False)
    make_trainer([cb], max_steps=0).fit(module, make_loader(module))
    for name, mask in expected.items():
        assert torch.equal(cb.masks[name], mask), name


def test_custom_forward_runs_the_module_on_each_batch():
    module = make_module("mlp")
    seen = []

    def forward(m, batch):
        seen.append(batch[0].shape[0])
        return m(batch[0])

    cb = OneShotPruning(method="wanda", calibration_batches=2, forward=forward, verbose=False)
    make_trainer([cb], max_steps=0).fit(module, make_loader(module, batch_size=4))
    assert seen == [4, 4], "one full forward per calibration batch (a model without a layer list is one block)"


def test_two_four_stays_locked_while_the_kept_weights_train():
    module = four_wide()
    cb = OneShotPruning(method="sparsegpt", target_sparsity=0.5, pattern="2:4", calibration_batches=4, verbose=False)
    trainer = make_trainer([cb], max_steps=10)
    trainer.fit(module, make_loader(module))
    for name, p in module.named_parameters():
        if not name.endswith("weight"):
            continue
        mask = cb.masks[name]
        groups = mask.reshape(mask.shape[0], -1, 4).sum(-1)
        assert (groups == 2).all(), f"{name}: exactly 2 of every 4 kept"
        assert (p[~mask] == 0).all(), f"{name}: pruned weights stay zero"
        assert (p[mask] != 0).all()
    assert trainer.global_step == 10


def test_kept_weights_move_during_fine_tuning():
    module = make_module("mlp", "adamw")
    cb = OneShotPruning(method="magnitude", target_sparsity=0.6, verbose=False)
    make_trainer([cb], max_steps=0).fit(module, make_loader(module))
    pruned = weights(module)
    make_trainer([cb], max_steps=8).fit(module, make_loader(module))
    for name, w in weights(module).items():
        mask = cb.masks[name]
        assert torch.equal(mask, pruned[name] != 0), "a second fit keeps the masks of the first"
        assert (w[~mask] == 0).all()
        assert (w[mask] != pruned[name][mask]).float().mean() > 0.5, name


def test_a_resumed_run_restores_the_masks_and_does_not_prune_again(tmp_path, monkeypatch):
    module = make_module("mlp", "adamw")
    cb = OneShotPruning(method="sparsegpt", target_sparsity=0.5, calibration_batches=4, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    make_trainer([cb, ckpt], max_steps=4, enable_checkpointing=True).fit(module, make_loader(module))
    masks = {n: m.clone() for n, m in cb.masks.items()}
    saved = next(tmp_path.glob("*.ckpt"))

    def no_pruning(*args, **kwargs):
        raise AssertionError("a resumed run must not prune again")

    monkeypatch.setattr(oneshot_callback, "prune_oneshot", no_pruning)
    fresh = make_module("mlp", "adamw", seed=1)  # other weights: the checkpoint's are restored
    again = OneShotPruning(method="sparsegpt", target_sparsity=0.5, calibration_batches=4, verbose=False)
    make_trainer([again], max_steps=8).fit(fresh, make_loader(fresh), ckpt_path=saved)
    for name, mask in masks.items():
        assert torch.equal(again.masks[name], mask), name
        assert (dict(fresh.named_parameters())[name][~mask] == 0).all()


def test_pruned_model_is_evaluated_by_trainer_test():
    class Scored(TinyModule):
        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test/loss", nn.functional.cross_entropy(self(x), y))

    torch.manual_seed(0)
    module = Scored(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)), (12,))
    loader = make_loader(module)
    trainer = make_trainer([], max_steps=0)
    dense = trainer.test(module, loader, verbose=False)[0]["test/loss"]
    cb = OneShotPruning(method="magnitude", target_sparsity=0.9, verbose=False)
    trainer = make_trainer([cb], max_steps=0)
    trainer.fit(module, loader)
    pruned = trainer.test(module, loader, verbose=False)[0]["test/loss"]
    assert pruned != dense
    assert cb.sparsity() == pytest.approx(0.9, abs=0.02)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "obs"}, "method 'obs' is not valid; choose one of 'sparsegpt', 'wanda', 'magnitude'"),
        ({"pattern": "4x1"}, "pattern '4x1' is not valid here"),
        ({"pattern": "2:4", "target_sparsity": 0.6}, "sparsity 0.6 differs"),
        ({"target_sparsity": 1.0}, "target_sparsity"),
        ({"calibration_batches": 0}, "calibration_batches must be a positive int, got 0"),
        ({"block_size": 0}, "block_size must be a positive int"),
        ({"damp": -1.0}, "damp must be a number >= 0"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OneShotPruning(**kwargs)


def test_uncalibratable_fit_fails_before_any_weight_changes():
    module = make_module("mlp")
    before = weights(module)
    cb = OneShotPruning(method="wanda", verbose=False)
    trainer = make_trainer([cb], max_steps=0, limit_train_batches=0)
    with pytest.raises(ValueError, match="pass dataloader="):
        trainer.fit(module, make_loader(module))
    for name, w in weights(module).items():
        assert torch.equal(w, before[name])


def test_a_target_one_shot_cannot_prune_fails_at_setup():
    torch.manual_seed(0)
    module = TinyModule(
        nn.Sequential(nn.Unflatten(1, (1, 12)), nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(40, 3)), (12,)
    )
    before = weights(module)
    cb = OneShotPruning(method="wanda", op_types=["Conv1d", "Linear"], verbose=False)
    with pytest.raises(ValueError, match="'net.1.weight' is a Conv1d; one-shot pruning handles Linear and Conv2d"):
        make_trainer([cb], max_steps=2).fit(module, make_loader(module))
    for name, w in weights(module).items():
        assert torch.equal(w, before[name])


def test_shares_no_target_with_another_mask_owner():
    module = make_module("mlp")
    before = weights(module)
    trainer = make_trainer([OneShotPruning(verbose=False), PatternLock(verbose=False)], max_steps=0)
    with pytest.raises(ValueError, match="both claim"):
        trainer.fit(module, make_loader(module))
    for name, w in weights(module).items():
        assert torch.equal(w, before[name])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_under_ddp_every_rank_prunes_to_the_same_masks_and_weights(tmp_path, method):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "oneshot_ddp.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "--method", method], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    assert len(ranks) == 2
    for when in range(2):  # right after pruning, and after the fine-tuning steps
        first, second = ranks[0][when], ranks[1][when]
        assert first == second, f"ranks differ at {first['when']}"
        assert first["zeros"] and first["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert ranks[0][0]["masks"] == ranks[0][1]["masks"], "the masks stay locked while it trains"
    assert ranks[0][0]["weights"] != ranks[0][1]["weights"], "the kept weights train"
