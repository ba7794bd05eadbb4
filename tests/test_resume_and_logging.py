from __future__ import annotations

import csv
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_loader, make_module, make_trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_prune import Pruning, sparsity_report
from lightning_prune.schedules import Iterative


def callback(**overrides):
    kwargs = {
        "target_sparsity": 0.75,
        "pattern": "4x1",
        "criterion": "snip_momentum",
        "schedule": Iterative(start_step=2, end_step=20, frequency=3, decay="cube"),
    }
    kwargs.update(overrides)
    return Pruning(**kwargs)


def one_batch(module):
    # One batch per epoch: Lightning replays a batch when resuming from a checkpoint written at the end of
    # `fit`; with a single batch the data order cannot differ, so the test isolates the callback's state.
    return make_loader(module, n=8, batch_size=8)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_resume_mid_schedule_matches_uninterrupted(tmp_path, kind):
    torch.use_deterministic_algorithms(True)
    try:
        straight_module = make_module(kind, "adamw")
        straight = callback()
        make_trainer([straight], max_steps=32).fit(straight_module, one_batch(straight_module))

        first_module = make_module(kind, "adamw")
        first = callback()
        trainer = make_trainer([first], max_steps=8)  # in the middle of the pruning window
        trainer.fit(first_module, one_batch(first_module))
        assert 0 < first.sparsity() < 0.75
        path = tmp_path / "mid.ckpt"
        trainer.save_checkpoint(path)

        resumed_module = make_module(kind, "adamw", seed=123)  # different init: everything must come from the ckpt
        resumed = callback()
        make_trainer([resumed], max_steps=32).fit(resumed_module, one_batch(resumed_module), ckpt_path=path)
    finally:
        torch.use_deterministic_algorithms(False)
    for name, mask in straight.masks.items():
        assert torch.equal(resumed.masks[name], mask), name
    for (name, a), b in zip(straight_module.state_dict().items(), resumed_module.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_checkpoint_loads_into_plain_model_strictly(tmp_path):
    module = make_module("cnn")
    cb = callback()
    trainer = make_trainer([cb], max_steps=24)
    trainer.fit(module, make_loader(module))
    path = tmp_path / "end.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    plain = make_module("cnn", seed=99)
    plain.load_state_dict(checkpoint["state_dict"], strict=True)
    assert set(checkpoint["state_dict"]) == set(module.state_dict()), "parameter names never change"
    for name, mask in cb.masks.items():
        assert (plain.state_dict()[name][~mask] == 0).all()
    rows = sparsity_report(plain)  # zeros counted from the weights alone
    assert {r.name: round(r.sparsity, 6) for r in rows} == {r.name: round(r.sparsity, 6) for r in cb.report(module)}


def test_checkpoint_from_other_configuration_is_refused(tmp_path):
    module = make_module()
    trainer = make_trainer([callback()], max_steps=8)
    trainer.fit(module, make_loader(module))
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    other = callback(target_sparsity=0.5)
    with pytest.raises(ValueError, match=r"another pruning configuration \(target_sparsity: checkpoint 0.75, now 0.5"):
        make_trainer([other], max_steps=16).fit(make_module(), make_loader(module), ckpt_path=path)


def test_sparsity_and_target_reach_the_logger_at_each_event(tmp_path):
    module = make_module()
    cb = callback()
    logger = CSVLogger(tmp_path, name="run")
    make_trainer([cb], max_steps=24, logger=logger, log_every_n_steps=50).fit(module, make_loader(module))
    with open(logger.experiment.metrics_file_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("prune/sparsity")]
    steps = [int(r["step"]) for r in rows]
    assert steps == Iterative(2, 20, 3).event_steps()
    targets = [float(r["prune/target"]) for r in rows]
    reached = [float(r["prune/sparsity"]) for r in rows]
    assert targets == sorted(targets) and targets[-1] == 0.75
    assert reached == sorted(reached) and abs(reached[-1] - 0.75) < 0.02


def test_report_printed_at_end(caplog):
    module = make_module()
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        make_trainer([callback()], max_steps=24).fit(module, make_loader(module))
    assert "net.0.weight" in caplog.text and "total" in caplog.text


def test_warns_when_training_ends_before_schedule():
    module = make_module()
    with pytest.warns(UserWarning, match="before the pruning schedule's last event at step 20"):
        make_trainer([callback()], max_steps=10).fit(module, make_loader(module))


def _run_job(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    script = Path(__file__).parent / "crash_train.py"
    return subprocess.run([sys.executable, str(script), str(out), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_inside_the_window_then_resume_from_last_matches_an_uninterrupted_run(tmp_path):
    """A subprocess trains with ModelCheckpoint every 8 steps, dies by SIGKILL at step 13 (pruning window
    4..28, last checkpoint at step 8), and resumes with ckpt_path="last": masks and weights end identical."""
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    done = _run_job(whole)
    assert done.returncode == 0, done.stderr[-2000:]
    killed = _run_job(crashed, "--kill-at", "13")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (crashed / "final.pt").exists()
    assert sorted(p.name for p in (crashed / "ckpt").iterdir()) == ["epoch=0-step=8.ckpt", "last.ckpt"]
    resumed = _run_job(crashed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(whole / "final.pt", weights_only=True)
    b = torch.load(crashed / "final.pt", weights_only=True)
    assert a["step"] == b["step"] == 40
    assert set(a["masks"]) == set(b["masks"]) and all(torch.equal(a["masks"][k], b["masks"][k]) for k in a["masks"])
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert 1 - sum(int(m.sum()) for m in a["masks"].values()) / sum(m.numel() for m in a["masks"].values()) > 0.69
    other = _run_job(crashed, "--resume", str(crashed / "ckpt" / "epoch=0-step=8.ckpt"), "--target", "0.6")
    assert other.returncode != 0
    assert "another pruning configuration (target_sparsity: checkpoint 0.7, now 0.6)" in other.stderr
