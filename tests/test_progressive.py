"""ProgressivePruning: partial interval masks between events, exact structured masks at events and the end."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_loader, make_module, make_trainer
from test_pruning_contract import unit_size

from lightning_prune import ProgressivePruning, Pruning
from lightning_prune.schedules import Iterative, OneShot

SCHEDULE = {"start_step": 2, "end_step": 26, "frequency": 8, "decay": "linear"}


class Observe(pl.Callback):
    """After every step: sparsity, whether masks fit the pattern, masks, and zeros kept."""

    def __init__(self, cb: Pruning) -> None:
        self.cb = cb
        self.rows: list[tuple[int, float, bool]] = []
        self.masks: list[dict[str, torch.Tensor]] = []
        self.violations = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        conform = all(self.cb.pattern.conforms(m) for m in self.cb.masks.values())
        self.rows.append((trainer.global_step - 1, self.cb.sparsity(), conform))
        self.masks.append({k: v.clone() for k, v in self.cb.masks.items()})
        params = dict(pl_module.named_parameters())
        self.violations += sum(int((params[n].detach()[~m] != 0).sum()) for n, m in self.cb.masks.items())


def run(pattern, scope="global", target=0.7, max_steps=30, kind="cnn", **kwargs):
    module = make_module(kind, "adamw")
    cb = ProgressivePruning(target, pattern=pattern, scope=scope, schedule=Iterative(**SCHEDULE), **kwargs)
    observe = Observe(cb)
    make_trainer([cb, observe], max_steps=max_steps).fit(module, make_loader(module))
    return module, cb, observe


@pytest.mark.parametrize(
    ("pattern", "scope"),
    [(p, s) for s in ("global", "local") for p in ("4x1", "1x4", "1xchannel", "channelx1", "2:4")]
    + [("4x1", "lamp"), ("1xchannel", "lamp")],
)
def test_partial_between_events_exact_at_events_and_end(pattern, scope):
    target = 0.5 if pattern == "2:4" else 0.7
    module, cb, observe = run(pattern, scope, target)
    events = set(Iterative(**SCHEDULE).event_steps())
    for step, _, conform in observe.rows:
        if step in events or step >= SCHEDULE["end_step"]:
            assert conform, f"masks fit {pattern} exactly at event/end step {step}"
    assert any(not conform for _, _, conform in observe.rows), "interval masks cut units partially"
    # interval masks raise sparsity between events: more distinct levels than events
    assert len({round(s, 6) for _, s, _ in observe.rows if s > 0}) > len(events) + 2
    params = dict(module.named_parameters())
    total = sum(m.numel() for m in cb.masks.values())
    if scope != "local":
        slack = (max(unit_size(pattern, tuple(params[n].shape)) for n in cb.masks) / 2 + 0.5) / total
    else:
        slack = sum(unit_size(pattern, tuple(params[n].shape)) / 2 + 0.5 for n in cb.masks) / total
    assert abs(cb.sparsity() - target) <= slack + 1e-9, "ends at the target"
    assert observe.violations == 0
    for before, after in zip(observe.masks, observe.masks[1:]):
        for name in before:
            assert not (after[name] & ~before[name]).any(), "monotone"


def test_one_progressive_step_is_plain_pruning():
    _, progressive, _ = run("4x1", progressive_steps=1)
    module = make_module("cnn", "adamw")
    plain = Pruning(0.7, pattern="4x1", schedule=Iterative(**SCHEDULE))
    make_trainer([plain], max_steps=30).fit(module, make_loader(module))
    for name, mask in plain.masks.items():
        assert torch.equal(progressive.masks[name], mask)


def test_resume_between_events_matches_uninterrupted(tmp_path):
    def callback():
        return ProgressivePruning(0.7, pattern="4x1", schedule=Iterative(**SCHEDULE))

    def loader(module):
        return make_loader(module, n=8, batch_size=8)

    torch.use_deterministic_algorithms(True)
    try:
        straight_module, straight = make_module("cnn", "adamw"), callback()
        make_trainer([straight], max_steps=30).fit(straight_module, loader(straight_module))
        first_module, first = make_module("cnn", "adamw"), callback()
        trainer = make_trainer([first], max_steps=13)  # between the events at 10 and 18, after an interval
        trainer.fit(first_module, loader(first_module))
        assert not all(first.pattern.conforms(m) for m in first.masks.values())
        path = tmp_path / "mid.ckpt"
        trainer.save_checkpoint(path)
        resumed_module, resumed = make_module("cnn", "adamw", seed=4), callback()
        make_trainer([resumed], max_steps=30).fit(resumed_module, loader(resumed_module), ckpt_path=path)
    finally:
        torch.use_deterministic_algorithms(False)
    for name, mask in straight.masks.items():
        assert torch.equal(resumed.masks[name], mask), name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pattern": "unstructured"}, "unstructured"),
        ({"schedule": OneShot(step=3)}, "one event"),
        ({"schedule": Iterative(start_step=0, end_step=9, frequency=3)}, "progressive_steps=4"),
        ({"progressive_steps": 0}, "progressive_steps"),
        ({"progressive_steps": 2.5}, "progressive_steps"),
        ({"progressive_type": "linear"}, "not implemented.*'scores'"),
        ({"progressive_type": "cubic"}, "progressive_type.*'scores'"),
        ({"pattern": "3x"}, "pattern"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProgressivePruning(0.5, **kwargs)


def test_default_schedule_too_dense_is_an_error_before_training():
    module = make_module("mlp")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="progressive_steps"):
        make_trainer([ProgressivePruning(0.5, progressive_steps=8)], max_steps=40).fit(module, make_loader(module))
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k])
