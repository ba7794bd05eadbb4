"""Rewind: the learning-rate schedule (and weights) replayed from an earlier step once pruning is done."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyModule, make_loader, make_module, make_trainer

from lightning_prune import Pruning, Rewind
from lightning_prune.callbacks.rewind import warped_step
from lightning_prune.schedules import Iterative

TOTAL = 24


def linear_decay(step: int) -> float:
    return 1.0 - step / TOTAL


class Scheduled(TinyModule):
    """A TinyModule whose optimizer has a step-wise schedule: linear decay, cosine (chainable) or one-cycle."""

    def __init__(self, schedule: str = "linear", interval: str = "step", **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.schedule, self.interval = schedule, interval
        self.used: list[tuple[int, float]] = []  # (step, lr) of every optimizer step

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.0)
        if self.schedule == "linear":
            sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.LambdaLR(opt, linear_decay)
        elif self.schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL)
        else:
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=TOTAL)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.interval}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # after every callback's hook, inside the optimizer's step: the settings the update uses
        self.used.append((self.trainer.global_step, optimizer.param_groups[0]["lr"]))


def scheduled(schedule: str = "linear", seed: int = 0, **kwargs: object) -> Scheduled:
    torch.manual_seed(seed)
    base = make_module("mlp")
    return Scheduled(schedule, net=base.net, in_shape=base.in_shape, **kwargs)  # type: ignore[arg-type]


def one_batch(module: TinyModule) -> torch.utils.data.DataLoader:
    return make_loader(module, n=8, batch_size=8)


def schedule_without_rewind(schedule: str) -> list[float]:
    module = scheduled(schedule)
    make_trainer([], max_steps=TOTAL).fit(module, one_batch(module))
    return [lr for _, lr in module.used]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "onecycle"])
def test_after_at_the_schedule_is_replayed_from_rewind_to_compressed(schedule):
    plain = schedule_without_rewind(schedule)
    module = scheduled(schedule)
    rewind = Rewind(rewind_to=4, at=16)
    make_trainer([rewind], max_steps=TOTAL).fit(module, one_batch(module))
    used = dict(module.used)
    assert rewind.rewound and rewind.start == 16
    for step in range(16):
        assert used[step] == pytest.approx(plain[step]), step
    for step in range(16, TOTAL):
        point = warped_step(step, 16, 4, TOTAL)  # 4 + (step - 16) * 20 / 8: 4, 6.5, 9, ..., 21.5
        low = math.floor(point)
        expected = plain[low] + (point - low) * (plain[low + 1] - plain[low]) if point > low else plain[low]
        assert used[step] == pytest.approx(expected, rel=1e-6), step
    # the learning rate went back up at `at`: the point of the rewind
    assert used[16] > used[15]


def test_the_schedulers_own_course_is_left_as_it_was():
    plain = scheduled("cosine")
    trainer = make_trainer([], max_steps=TOTAL)
    trainer.fit(plain, one_batch(plain))
    module = scheduled("cosine")
    rewound = make_trainer([Rewind(rewind_to=0, at=12)], max_steps=TOTAL)
    rewound.fit(module, one_batch(module))
    ours = rewound.lr_scheduler_configs[0].scheduler
    theirs = trainer.lr_scheduler_configs[0].scheduler
    assert ours.last_epoch == theirs.last_epoch == TOTAL
    assert ours.get_last_lr() == pytest.approx(theirs.get_last_lr())


def test_default_at_is_the_step_after_the_last_pruning_event():
    module = scheduled()
    prune = Pruning(0.5, "unstructured", "magnitude", Iterative(start_step=0, end_step=10, frequency=5))
    rewind = Rewind(rewind_to=0)
    make_trainer([prune, rewind], max_steps=TOTAL).fit(module, one_batch(module))
    assert rewind.start == 11
    used = dict(module.used)
    assert used[11] == pytest.approx(0.01)  # step 0's learning rate again
    assert used[10] < used[11]


def test_default_at_with_a_derived_schedule_and_rewind_listed_first():
    module = scheduled()
    prune = Pruning(0.5, "unstructured", "magnitude", schedule=None)  # derived from the run's length at bind
    rewind = Rewind(rewind_to=0)
    with pytest.warns(UserWarning, match=r"step 24 is the end of the run, so nothing is trained after rewinding"):
        make_trainer([rewind, prune], max_steps=TOTAL).fit(module, one_batch(module))
    assert rewind.start == prune.pruner.resolved_schedule.end + 1 == TOTAL and not rewind.rewound


def test_weight_rewinding_resets_kept_weights_and_keeps_pruned_ones_zero():
    module = scheduled()
    prune = Pruning(0.5, "unstructured", "magnitude", Iterative(start_step=0, end_step=10, frequency=5))
    rewind = Rewind(rewind_to=3, weights=True)
    seen: dict[str, dict[str, torch.Tensor]] = {}

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, i):
            if trainer.global_step in (3, 11):
                seen[str(trainer.global_step)] = copy.deepcopy(pl_module.net.state_dict())

    make_trainer([prune, rewind, Watch()], max_steps=TOTAL).fit(module, one_batch(module))
    at_3, at_11 = seen["3"], seen["11"]
    for fqn, mask in prune.masks.items():
        name = fqn.removeprefix("net.")
        assert torch.equal(at_11[name], at_3[name] * mask), name  # kept weights from step 3, pruned ones zero
        assert (module.net.state_dict()[name][~mask] == 0).all()
    for name in at_3:
        if name.endswith("bias"):
            assert torch.equal(at_11[name], at_3[name]), name  # everything else rewound too
    assert not any(torch.equal(module.net.state_dict()[n], at_11[n]) for n in at_11), "training went on after"


class StopAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = trainer.global_step >= self.step


def test_resume_before_and_after_the_rewind_matches_an_uninterrupted_run(tmp_path):
    def callbacks():
        prune = Pruning(0.5, "unstructured", "magnitude", Iterative(start_step=0, end_step=10, frequency=5))
        return [prune, Rewind(rewind_to=3, weights=True)]

    torch.use_deterministic_algorithms(True)
    try:
        straight = scheduled()
        make_trainer(callbacks(), max_steps=TOTAL).fit(straight, one_batch(straight))
        for stop in (8, 14):  # before the rewind (weights of step 3 copied, not used yet) and after it
            first = scheduled()
            trainer = make_trainer([*callbacks(), StopAt(stop)], max_steps=TOTAL)  # an interrupted run
            trainer.fit(first, one_batch(first))
            path = tmp_path / f"stop{stop}.ckpt"
            trainer.save_checkpoint(path)
            resumed = scheduled(seed=123)
            make_trainer(callbacks(), max_steps=TOTAL).fit(resumed, one_batch(resumed), ckpt_path=path)
            for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
                assert torch.allclose(a, b, atol=1e-6), (stop, name)
    finally:
        torch.use_deterministic_algorithms(False)


def test_without_a_schedule_only_the_weights_move(caplog):
    module = make_module("mlp", "adamw")
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        make_trainer([Rewind(rewind_to=0, at=5)], max_steps=10).fit(module, make_loader(module))
    assert "not scheduled" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rewind_to": -1}, ValueError, r"rewind_to=-1 is not valid; choose an optimizer step >= 0"),
        ({"rewind_to": 1.5}, ValueError, r"rewind_to=1.5 is not valid"),
        ({"at": 0}, ValueError, r"at=0 is not valid; choose an optimizer step >= 1, or None"),
        ({"rewind_to": 10, "at": 5}, ValueError, r"rewind_to=10 is after at=5"),
        ({"weights": "yes"}, TypeError, r"weights='yes' is not valid; choose True or False"),
    ],
    ids=["negative", "float", "at-zero", "forward", "weights-str"],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Rewind(**kwargs)


def test_errors_when_training_starts_change_no_weight():
    cases = [
        (Rewind(), r"Rewind\(at=None\) rewinds after the last event .* and the trainer has 0"),
        (Rewind(rewind_to=2, at=40), r"at step 40 of a 24-step run"),
    ]
    for rewind, match in cases:
        module = scheduled()
        before = copy.deepcopy(module.state_dict())
        with pytest.raises(ValueError, match=match):
            make_trainer([rewind], max_steps=TOTAL).fit(module, one_batch(module))
        assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    module = scheduled(interval="epoch")
    with pytest.raises(ValueError, match=r"stepped every 1 epoch\(s\): use interval='step', frequency=1"):
        make_trainer([Rewind(at=4)], max_steps=TOTAL).fit(module, one_batch(module))
