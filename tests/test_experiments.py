"""conf/ composes and instantiates; the main job, the samples and the sweep report run on tiny data."""

from __future__ import annotations

import inspect
import itertools
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

import experiments  # noqa: F401  (registers the lp.frac resolver)
from experiments.baselines import LightningModelPruning
from experiments.data import BBCNewsData, FashionMNISTData, load_bbc_news, load_tweets, read_idx
from experiments.report import write_report
from experiments.train import run
from lightning_prune import Distillation, OneShotPruning, PatternLock, Pruning, Rewind
from lightning_prune.regularization import GroupLasso

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
TINY_BERT = "{hidden_size:32,num_hidden_layers:2,num_attention_heads:2,intermediate_size:64}"


def configure(tmp_path: Path, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"output_dir={tmp_path}", *overrides])


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def check_keys(node: object, where: str) -> None:
    """Every key of every `_target_` node is a parameter of its target (no silently ignored keys)."""
    if isinstance(node, dict):
        if "_target_" in node:
            target = get_method(node["_target_"]) if "." in node["_target_"] else None
            params = inspect.signature(target).parameters
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                unknown = set(node) - set(params) - {"_target_", "_partial_", "_recursive_", "_convert_"}
                assert not unknown, f"{where}: {sorted(unknown)} are not arguments of {node['_target_']}"
        for key, value in node.items():
            check_keys(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_keys(value, f"{where}[{i}]")


def test_groups_are_the_documented_ones():
    assert set(GROUPS) == {
        "criterion",
        "data",
        "distill",
        "experiment",
        "logger",
        "model",
        "pattern",
        "pruner",
        "regularization",
        "rewind",
        "schedule",
        "trainer",
    }
    assert {"unstructured", "4x1", "1x4", "2x2", "channelx1", "1xchannel", "2in4"} <= set(options("pattern"))
    assert set(options("criterion")) == {"magnitude", "gradient", "snip", "snip_momentum", "wanda"}
    assert set(options("schedule")) == {"oneshot", "iterative"}
    assert set(options("pruner")) == {
        "basic",
        "pattern_lock",
        "progressive",
        "model_pruning",
        "sparsegpt",
        "wanda",
        "oneshot_magnitude",
    }


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, o) for g in ["pattern", "criterion", "schedule", "pruner", "data", "logger", "trainer"] for o in options(g)],
)
def test_every_option_composes_and_instantiates(tmp_path, group, option):
    overrides = [f"{group}={option}"]
    if (group == "pruner" and option == "progressive") or (group == "pattern" and option == "unstructured"):
        overrides.append("pruner=basic" if group == "pattern" else "pattern=4x1")
    if group == "pattern" and option == "2in4":
        overrides.append("pruner.target_sparsity=0.5")
    cfg = configure(tmp_path, overrides)
    node = OmegaConf.to_container(cfg[group], resolve=True)
    check_keys(node, group)
    if group == "data" and option == "fashion_mnist":
        obj = instantiate(cfg[group], dir=str(tmp_path))
    else:
        obj = instantiate(cfg[group])
    assert obj is not None
    pruner = instantiate(cfg.pruner)
    assert isinstance(pruner, (Pruning, PatternLock, LightningModelPruning, OneShotPruning))


@pytest.mark.parametrize("option", options("model"))
def test_models_compose_with_matching_keys(tmp_path, option):
    cfg = configure(tmp_path, [f"model={option}"])
    check_keys(OmegaConf.to_container(cfg.model, resolve=True), "model")


@pytest.mark.parametrize("option", options("experiment"))
def test_experiments_compose(tmp_path, option):
    cfg = configure(tmp_path, [f"experiment={option}"])
    check_keys(OmegaConf.to_container(cfg, resolve=True), "")
    assert isinstance(instantiate(cfg.pruner), Pruning)


def test_nlp_experiment_prunes_the_encoder_linears_only(tmp_path):
    cfg = configure(tmp_path, ["experiment=nlp_minilm_bbc"])
    pruner = instantiate(cfg.pruner)
    from experiments.models import Classifier, MiniLM

    tiny_config = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    net = MiniLM(pretrained=False, config=tiny_config)
    names = set(pruner.engine.check(Classifier(net, num_classes=5)))
    assert names and all(n.startswith("net.bert.encoder.layer.") for n in names)
    assert len(names) == 2 * 6, "q, k, v, attention output, intermediate, output in each of 2 layers"


def test_documented_override_line(tmp_path):
    cfg = configure(
        tmp_path, ["pattern=2in4", "criterion=magnitude", "schedule.decay=cos", "pruner.target_sparsity=0.5"]
    )
    pruner = instantiate(cfg.pruner)
    assert (str(pruner.pattern), str(pruner.criterion), pruner.schedule.decay, pruner.target_sparsity) == (
        "2:4",
        "magnitude",
        "cos",
        0.5,
    )


def test_misspelt_key_is_an_error(tmp_path):
    with pytest.raises(ConfigCompositionException, match="target_sparsty"):
        configure(tmp_path, ["pruner.target_sparsty=0.5"])
    cfg = configure(tmp_path, ["+pruner.target_sparsty=0.5"])  # forced in with '+': the target refuses it
    with pytest.raises(Exception, match="target_sparsty"):
        instantiate(cfg.pruner)


def test_bad_value_fails_before_training(tmp_path):
    cfg = configure(tmp_path, ["pruner.target_sparsity=1.5", "dense=train"])
    with pytest.raises(Exception, match="target_sparsity"):
        run(cfg)
    assert not (tmp_path.parent / "dense_baselines").exists(), "nothing trained"


def tiny(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "steps=6",
        "data.subset=64",
        "trainer.enable_progress_bar=false",
        "trainer.check_val_every_n_epoch=1",
        *extra,
    ]


def test_main_job_writes_results_and_plots_and_reuses_the_dense_baseline(tmp_path):
    first = run(configure(tmp_path / "a", tiny(tmp_path, "pruner.target_sparsity=0.5")))
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"results.json", "sparsity_vs_step.png", "layer_sparsity.png", "mask.png", "pruned.ckpt", "logs"} <= files
    assert (tmp_path / "a" / "dense_baselines").is_dir(), "a single run keeps its dense baseline in its own folder"
    assert {p.name for p in tmp_path.iterdir()} == {"a"}, "nothing lands outside the run folder"
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert saved["dense_accuracy"] is not None and saved["delta_points"] is not None
    assert saved["trace"][-1]["target"] == pytest.approx(0.5)
    assert any(Path(tmp_path / "a" / "logs").rglob("metrics.csv"))
    shared = f"dense_cache={tmp_path / 'a' / 'dense_baselines'}"
    second = run(configure(tmp_path / "b", tiny(tmp_path, "pattern=2in4", shared)))
    assert second["dense_accuracy"] == first["dense_accuracy"], "same cache, same budget: the baseline is reused"
    assert second["target_sparsity"] == 0.5, "an N:M pattern runs at its N/M by default"
    assert (
        "reused" in (tmp_path / "b" / "results.json").read_text() or second["dense_seconds"] == first["dense_seconds"]
    )

    # pattern lock from the pruned checkpoint: the zeros stay
    locked = run(
        configure(tmp_path / "c", tiny(tmp_path, "pruner=pattern_lock", f"init_from={tmp_path / 'a' / 'pruned.ckpt'}"))
    )
    assert locked["pruner"] == "PatternLock"
    assert locked["sparsity"] == pytest.approx(saved["sparsity"], abs=1e-6)


@pytest.mark.parametrize(("method", "pattern"), [("sparsegpt", "unstructured"), ("wanda", "2in4")])
def test_oneshot_pruner_prunes_the_dense_weights_and_evaluates_them(tmp_path, method, pattern):
    pruner = "oneshot_magnitude" if method == "magnitude" else method
    out = run(configure(tmp_path, tiny(tmp_path, f"pruner={pruner}", f"pattern={pattern}")))
    assert out["pruner"] == "OneShotPruning" and out["criterion"] == method
    assert out["steps"] == 0, "one-shot pruners evaluate the pruned model without training by default"
    assert out["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert out["dense_accuracy"] is not None and out["accuracy"] is not None
    dense = torch.load(next((tmp_path / "dense_baselines").glob("*.pt")), weights_only=True)
    pruned = torch.load(tmp_path / "pruned.ckpt", weights_only=False)["state_dict"]
    for layer in out["layers"]:
        name = layer["name"]
        kept = pruned[name] != 0
        assert 0.4 < 1 - kept.float().mean() < 0.6
        if method == "wanda":  # no weight update: the kept weights are the dense model's
            assert torch.equal(pruned[name][kept], dense[name][kept]), name
        else:  # SparseGPT updates the kept weights of the dense model, it does not start afresh
            assert not torch.equal(pruned[name][kept], dense[name][kept]), name
        if pattern == "2in4" and pruned[name].dim() == 2:
            assert (kept.reshape(kept.shape[0], -1, 4).sum(-1) == 2).all(), name


def test_oneshot_pruner_fine_tunes_with_the_masks_locked(tmp_path):
    out = run(configure(tmp_path, tiny(tmp_path, "pruner=oneshot_magnitude", "finetune_steps=3")))
    assert out["steps"] == 3
    assert out["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert [row["achieved"] for row in out["trace"]] == pytest.approx([out["sparsity"]] * 3)


def test_oneshot_pruner_with_a_block_pattern_fails_before_training(tmp_path):
    with pytest.raises(Exception, match="pattern '4x1' is not valid here; choose 'unstructured' or 'N:M'"):
        run(configure(tmp_path, tiny(tmp_path, "pruner=wanda", "pattern=4x1", "dense=train")))
    assert not (tmp_path / "dense_baselines").exists(), "nothing trained"


def test_model_pruning_baseline_reaches_the_target_at_epoch_ends(tmp_path):
    """Lightning's ModelPruning as the baseline: 64 examples in batches of 16 are 4 steps per epoch, so a 24-step
    run has 3 epoch ends inside its first 60%; the sparsity reaches the target there and stays."""
    overrides = tiny(tmp_path, "pruner=model_pruning", "pruner.target_sparsity=0.7", "steps=24", "dense=skip")
    out = run(configure(tmp_path, [*overrides, "data.batch_size=16"]))
    assert out["pruner"] == "LightningModelPruning"
    assert out["sparsity"] == pytest.approx(0.7, abs=0.01)
    trace = [row["achieved"] for row in out["trace"]]
    assert trace[0] == 0.0 and trace == sorted(trace), "sparsity grows at epoch ends only"
    assert sum(b > a for a, b in itertools.pairwise(trace)) == 3
    assert out["layers"] and all(row["pattern"] == "unstructured" for row in out["layers"])


def test_model_pruning_baseline_every_n_steps_in_a_run_shorter_than_an_epoch(tmp_path):
    """With every_n_steps the baseline prunes every N steps inside its window, as at epoch ends: 12 steps of a
    64-step epoch, events at steps 3 and 6 (the window is the first 7.2 steps), the target reached at 6."""
    overrides = tiny(tmp_path, "pruner=model_pruning", "pruner.target_sparsity=0.7", "steps=12", "dense=skip")
    out = run(configure(tmp_path, [*overrides, "data.batch_size=1", "pruner.every_n_steps=3"]))
    assert out["sparsity"] == pytest.approx(0.7, abs=0.01)
    trace = [row["achieved"] for row in out["trace"]]
    assert [row["step"] for a, row in zip([0.0, *trace], out["trace"]) if row["achieved"] > a] == [2, 5]
    with pytest.raises(ValueError, match="every_n_steps must be a number of steps >= 1 or None, got 0"):
        LightningModelPruning(0.5, every_n_steps=0)


@pytest.mark.parametrize("rewind", [True, False])
def test_model_pruning_lottery_ticket_switch(rewind):
    """ModelPruning rewinds the kept weights to their initial values at each event by default; the switch
    turns that off, so the weights left after an event are the trained ones."""
    cb = LightningModelPruning(0.5, lottery_ticket=rewind)
    net = pl.LightningModule()
    net.layer = torch.nn.Linear(8, 8)
    cb.setup(None, net, "fit")  # type: ignore[arg-type]
    start = net.layer.weight.detach().clone()
    with torch.no_grad():
        net.layer.weight.add_(1.0)  # "training"
    cb.on_train_epoch_end(None, net)  # type: ignore[arg-type]
    kept = net.layer.weight_mask.bool()
    assert 0 < int(kept.sum()) < kept.numel()
    expected = start if rewind else start + 1.0
    assert torch.equal(net.layer.weight_orig.detach()[kept], expected[kept])


def test_pattern_lock_without_init_from_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="init_from"):
        run(configure(tmp_path, tiny(tmp_path, "pruner=pattern_lock")))


@pytest.mark.parametrize("pruner", ["basic", "progressive"])
def test_fast_dev_run_cv(tmp_path, pruner):
    overrides = tiny(tmp_path, f"pruner={pruner}", "trainer.fast_dev_run=true", "dense=skip", "steps=200")
    out = run(configure(tmp_path, overrides))
    assert out["pruner"] == ("ProgressivePruning" if pruner == "progressive" else "Pruning")


def write_idx(path: Path, array: torch.Tensor) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    path.write_bytes(header + array.to(torch.uint8).numpy().tobytes())


def test_fashion_mnist_from_idx_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 200), ("t10k", 50)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", torch.randint(0, 256, (n, 28, 28), generator=g))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", torch.arange(n) % 10)
    assert read_idx(tmp_path / "t10k-labels-idx1-ubyte").tolist()[:3] == [0, 1, 2]
    out = run(
        configure(
            tmp_path / "run",
            tiny(tmp_path, "experiment=cv_fashion_mnist", f"data.dir={tmp_path}", "trainer.fast_dev_run=true"),
        )
    )
    assert out["accuracy"] is not None


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTData(dir=str(tmp_path)).prepare_data()


def test_bbc_news_loader_reads_the_packaged_files():
    texts, labels, classes = load_bbc_news()
    assert len(texts) == 2225 and classes == sorted(classes) and len(classes) == 5
    assert sorted(set(labels)) == list(range(5))
    data = BBCNewsData(max_length=16, subset=50, eval_subset=25, seed=3)
    data.setup()
    x, y = data.splits["train"][:]
    assert x.shape == (50, 2, 16) and x.dtype == torch.long
    assert torch.bincount(y, minlength=5).min() >= 9, "stratified"
    again = BBCNewsData(max_length=16, subset=50, eval_subset=25, seed=3)
    again.setup()
    assert torch.equal(again.splits["test"][:][0], data.splits["test"][:][0]), "fixed split for a seed"


def test_tweet_loader_reads_the_packaged_csv_once_per_text():
    texts, labels, classes = load_tweets()
    assert classes == ["negative", "neutral", "positive"]
    assert len(texts) == len(set(texts)) == len(labels) > 37_000
    counts = torch.bincount(torch.tensor(labels), minlength=3).tolist()
    assert counts[0] > counts[1] > counts[2] > 6_000, "negative, neutral, positive in the corpus' proportions"


def test_rewind_and_distill_groups_compose_and_the_job_runs_with_both(tmp_path):
    cfg = configure(tmp_path, tiny(tmp_path, "rewind=weights", "distill=kd", "pruner.target_sparsity=0.5"))
    assert isinstance(instantiate(cfg.rewind), Rewind) and instantiate(cfg.rewind).weights
    check_keys(OmegaConf.to_container(cfg.distill, resolve=True), "distill")
    out = run(configure(tmp_path, tiny(tmp_path, "rewind=lr", "distill=kd", "pruner.target_sparsity=0.5")))
    assert out["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert out["config"]["rewind"]["rewind_to"] == 0 and out["config"]["distill"]["alpha"] == 0.5
    with pytest.raises(ValueError, match=r"distill=kd is taught by the run's dense baseline: use dense=reuse"):
        run(configure(tmp_path, tiny(tmp_path, "distill=kd", "dense=skip")))
    assert issubclass(get_method(cfg.distill._target_), Distillation)


def test_the_lasso_group_sets_the_pruners_regularization_and_shrinks_weights_in_the_window(tmp_path):
    cfg = configure(tmp_path, tiny(tmp_path, "regularization=lasso", "pattern=unstructured"))
    pruner = instantiate(cfg.pruner)
    assert isinstance(pruner.regularization, GroupLasso) and pruner.regularization.coeff == 0.01
    assert str(pruner.regularization.pattern) == str(pruner.pattern), "the lasso's groups are the pruner's units"
    check_keys(OmegaConf.to_container(cfg.pruner, resolve=True), "pruner")
    assert configure(tmp_path, tiny(tmp_path)).pruner.regularization is None, "off unless chosen"
    with pytest.raises(ValueError, match=r"regularization=lasso .* pruner=LightningModelPruning .* pruner=basic"):
        run(configure(tmp_path, tiny(tmp_path, "regularization=lasso", "pruner=model_pruning")))

    # a coefficient so large that every block is zero after each step of the window: the weights left at the end
    # are what the steps after the window grew from zero, far smaller than without the lasso
    def conv_weights(folder: Path, *extra: str) -> list[torch.Tensor]:
        out = run(configure(folder, tiny(tmp_path, "pruner.target_sparsity=0.5", *extra)))
        assert out["sparsity"] == pytest.approx(0.5, abs=0.01), "the masks reach the target either way"
        state = torch.load(folder / "pruned.ckpt", map_location="cpu", weights_only=False)["state_dict"]
        return [v for k, v in state.items() if k.endswith("conv1.weight")]

    plain = conv_weights(tmp_path / "plain")
    shrunk = conv_weights(tmp_path / "big", "regularization=lasso", "pruner.regularization.coeff=1e6")
    assert plain and all(s.abs().mean() < 0.1 * p.abs().mean() for s, p in zip(shrunk, plain))


def test_nlp_smoke_with_a_tiny_random_bert(tmp_path):
    out = run(
        configure(
            tmp_path,
            tiny(
                tmp_path,
                "experiment=nlp_minilm_bbc",
                "model.net.pretrained=false",
                f"+model.net.config={TINY_BERT}",
                "data.subset=40",
                "data.eval_subset=20",
                "data.max_length=16",
                "steps=4",
            ),
        )
    )
    assert out["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert all(r["name"].startswith("net.bert.encoder.layer.") for r in out["layers"])


@pytest.mark.parametrize(
    ("pattern", "names"),
    [
        pytest.param("head", r"attention\.(self\.(query|key|value)|output\.dense)", marks=pytest.mark.slow),
        pytest.param("ffn", r"(intermediate|output)\.dense", marks=pytest.mark.slow),
    ],
)
def test_nlp_smoke_prunes_whole_heads_or_neurons(tmp_path, pattern, names):
    out = run(
        configure(
            tmp_path,
            tiny(
                tmp_path,
                "experiment=nlp_minilm_bbc",
                f"pattern={pattern}",
                "pruner.target_sparsity=0.5",
                "model.net.pretrained=false",
                "+model.net.config={hidden_size:32,num_hidden_layers:2,num_attention_heads:4,intermediate_size:64}",
                "data.subset=40",
                "data.eval_subset=20",
                "data.max_length=16",
                "steps=4",
            ),
        )
    )
    assert out["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert out["layers"] and all(re.search(names + r"\.weight$", r["name"]) for r in out["layers"])


def test_sweep_report_from_a_fabricated_multirun(tmp_path):
    for i, (pattern, sparsity, acc) in enumerate([("4x1", 0.5, 0.97), ("4x1", 0.8, 0.95), ("2:4", 0.5, 0.96)]):
        job = tmp_path / str(i)
        job.mkdir()
        result = {
            "pruner": "Pruning",
            "pattern": pattern,
            "criterion": "snip_momentum",
            "schedule": "Iterative(...)",
            "target_sparsity": sparsity,
            "sparsity": sparsity,
            "accuracy": acc,
            "dense_accuracy": 0.98,
            "delta_points": 100 * (acc - 0.98),
            "seconds": 1.5,
        }
        (job / "results.json").write_text(json.dumps(result))
    rows = write_report(tmp_path)
    assert len(rows) == 3
    md = (tmp_path / "report.md").read_text()
    assert "| 1 | ok | Pruning | 4x1 | snip_momentum |" in md and "-3.00" in md
    assert (tmp_path / "report.csv").read_text().count("\n") == 4
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="no results.json"):
        write_report(tmp_path / "0" / "missing")


def test_callbacks_from_lightning_cli_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "cli.yaml"
    config.write_text(
        """
seed_everything: 0
trainer:
  max_steps: 6
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_prune.Pruning
      init_args:
        target_sparsity: 0.5
        pattern: 2x2
        criterion:
          class_path: lightning_prune.criteria.SnipMomentum
          init_args: {momentum: 0.9, scale: 1.0}
        schedule:
          class_path: lightning_prune.schedules.Iterative
          init_args: {start_step: 0, end_step: 4, frequency: 2, decay: cos}
        regularization:
          class_path: lightning_prune.regularization.GroupLasso
          init_args: {coeff: 0.001}
model:
  class_path: experiments.models.Classifier
  init_args:
    net:
      class_path: experiments.models.ResNetSmall
      init_args: {widths: [8, 16]}
    num_classes: 10
data:
  class_path: experiments.data.DigitsData
  init_args: {subset: 64}
"""
    )
    cli = LightningCLI(run=False, args=["--config", str(config)], save_config_callback=None)
    pruning = next(cb for cb in cli.trainer.callbacks if isinstance(cb, Pruning))
    assert (str(pruning.pattern), pruning.criterion.momentum, pruning.schedule.decay) == ("2x2", 0.9, "cos")
    assert pruning.regularization.coeff == 0.001
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert pruning.sparsity() == pytest.approx(0.5, abs=0.01)


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist not installed"
)
def test_fashion_mnist_debian_package(tmp_path):
    data = FashionMNISTData(subset=100)
    data.setup()
    x, y = data.splits["train"][:]
    assert x.shape == (100, 1, 28, 28) and len(data.splits["test"]) == 10_000


@pytest.mark.parametrize(
    ("kind", "pattern", "artifact"),
    [
        ("permanent", "4x1", "permanent.safetensors"),
        ("sparse", "4x1", "sparse.safetensors"),
        ("slim", "1xchannel", "slim.pt"),
    ],
)
def test_export_option_writes_the_artifact(tmp_path, kind, pattern, artifact):
    out = run(
        configure(
            tmp_path, tiny(tmp_path, f"export={kind}", f"pattern={pattern}", "pruner.target_sparsity=0.5", "dense=skip")
        )
    )
    assert (tmp_path / artifact).stat().st_size == out["export"]["bytes"] > 0
    if kind == "slim":
        assert out["export"]["params_after"] < out["export"]["params_before"]


def test_unknown_export_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="export='onnx'.*'slim'"):
        run(configure(tmp_path, tiny(tmp_path, "export=onnx")))


@pytest.mark.parametrize(
    ("option", "expected", "target"),
    [
        ("8x1", "8x1", 0.8),
        ("1x1", "unstructured", 0.8),
        ("3in8", "3:8", 0.375),
        ("2in4", "2:4", 0.5),
        ("16x4", "16x4", 0.8),
    ],
)
def test_any_block_or_n_in_m_pattern_is_an_option(tmp_path, option, expected, target):
    pruner = instantiate(configure(tmp_path, [f"pattern={option}"]).pruner)
    assert str(pruner.pattern) == expected
    assert pruner.target_sparsity == target, "N:M runs at its natural N/M unless a target is given"


def test_a_pattern_name_that_is_no_pattern_is_refused_by_hydra(tmp_path):
    with pytest.raises(ConfigCompositionException, match="Could not find 'pattern/4by1'"):
        configure(tmp_path, ["pattern=4by1"])


@pytest.mark.parametrize(
    ("steps", "pattern"), [(8, "4x1"), (10, "2in4"), (37, "1xchannel"), (60, "1xchannel"), (600, "4x1")]
)
def test_derived_schedules_are_valid_for_every_budget(tmp_path, steps, pattern):
    for pruner in ("basic", "progressive"):
        cfg = configure(tmp_path, [f"pattern={pattern}", f"pruner={pruner}", f"steps={steps}"])
        built = instantiate(cfg.pruner)  # the progressive pruner checks its schedule here
        schedule = built.schedule
        assert 0 <= schedule.start <= schedule.end < steps


def train_script(*overrides: str) -> subprocess.CompletedProcess:
    """``experiments/train.py`` as a user runs it, in a subprocess (bounded: a DDP job must not hang)."""
    script = Path(__file__).resolve().parent.parent / "experiments" / "train.py"
    done = subprocess.run([sys.executable, str(script), *overrides], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_a_failing_job_is_reported_and_the_sweep_goes_on(tmp_path):
    tiny_sweep = ["steps=4", "data.subset=64", "dense=skip", "plots=false", f"hydra.sweep.dir={tmp_path}"]
    train_script("-m", "pattern=2in4", "pruner.target_sparsity=0.7,0.5", *tiny_sweep)
    report = (tmp_path / "report.md").read_text()
    assert "| 0 (pattern=2in4 pruner.target_sparsity=0.7 " in report
    assert "| failed: ValueError: target_sparsity 0.7 is above what pattern '2:4' can reach (0.5)" in report
    assert "| 1 | ok | Pruning | 2:4 |" in report, "the job after the failing one ran"


@pytest.mark.slow
def test_under_ddp_rank_zero_alone_reports_and_writes(tmp_path):
    ddp = ["+trainer.strategy=ddp", "trainer.devices=2"]
    done = train_script(*ddp, "steps=4", "data.subset=64", f"hydra.run.dir={tmp_path}")
    assert done.stdout.count("pruned accuracy") == 1 and done.stdout.count("results: ") == 1, done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["sparsity"] == pytest.approx(0.8, abs=0.01) and len(results["layers"]) == 10
    assert {p.name for p in (tmp_path / "dense_baselines").iterdir()}, "the dense baseline stays in the run folder"


@pytest.mark.slow
def test_trainer_model_parallel_runs_the_job_sharded(tmp_path):
    sharded = ["trainer=model_parallel", r"pruner.exclude=[net\.head]"]
    done = train_script(*sharded, "steps=8", "data.subset=64", f"hydra.run.dir={tmp_path}")
    assert done.stdout.count("pruned accuracy") == 1, done.stdout  # rank zero alone reports
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert results["config"]["trainer"]["strategy"]["_target_"].endswith("ModelParallelStrategy")
    assert (tmp_path / "pruned.ckpt" / "meta.pt").is_file()  # a distributed checkpoint directory
    assert (tmp_path / "mask.png").is_file()
    refused = subprocess.run(
        [sys.executable, "experiments/train.py", *sharded, "export=slim", f"hydra.run.dir={tmp_path / 'x'}"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0 and "export=slim needs the whole model" in refused.stderr


@pytest.mark.slow
def test_the_sharded_llama_example_prunes_and_consolidates(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "experiments.sharded_llama", "--steps", "12", "--out", str(tmp_path)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sparsity 0.5000 over 28 projections" in done.stdout
    assert "loads into the plain LlamaForCausalLM (strict)" in done.stdout
    assert (tmp_path / "pruned.ckpt").is_file()


def test_publish_merges_newest_runs_and_tables_the_dense_baseline() -> None:
    from experiments.publish_results import merge, table

    def record(name: str, seed: int, acc: float, dense: float) -> dict:
        return {"name": name, "seed": seed, "accuracy": acc, "dense_accuracy": dense, "sparsity": 0.9}

    published = [record("a", 0, 0.80, 0.90), record("b", 0, 0.70, 0.90)]
    merged = merge(published, [record("a", 0, 0.85, 0.88), record("a", 1, 0.83, 0.86)])
    assert [(r["name"], r["seed"], r["accuracy"]) for r in merged] == [("a", 0, 0.85), ("b", 0, 0.70), ("a", 1, 0.83)]
    for r in merged:
        r.update(seconds=10.0, dense_seconds=20.0)
    rows = {"a": [merged[0], merged[2]]}
    lines = table(rows, ["a"], dense=True)
    assert lines[2] == "| dense | 0 | 87.00 ± 1.41 | | 0,1 | 20 s |"
    assert lines[3].startswith("| a | 0.900 | 84.00 ± 1.41 | -3.00 ± 0.00 | 0,1 |")
    assert len(table(rows, ["a"])) == 3
