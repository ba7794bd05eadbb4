"""Whole attention heads and FFN neurons: found in Hugging Face models, pruned as units, slimmed for real."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_trainer
from torch import nn

from experiments.models import Classifier, MiniLM
from lightning_prune import Pruner, Pruning
from lightning_prune.export import slim
from lightning_prune.patterns import Head
from lightning_prune.schedules import Iterative, OneShot
from lightning_prune.structure import find_attention, find_ffn

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}


def llama(heads: int = 4, kv_heads: int = 2, layers: int = 2, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=8,
    )
    return LlamaForCausalLM(config)


def bert() -> Any:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, **TINY_BERT))


def dead_heads(mask: torch.Tensor, head_dim: int, columns: bool = False) -> list[int]:
    """Heads whose rows (or columns) the mask prunes entirely."""
    matrix = mask.T if columns else mask
    return torch.nonzero(~matrix.reshape(-1, head_dim * matrix.shape[1]).any(dim=1)).flatten().tolist()


class Toy(nn.Module):
    """Attention-shaped Linears under names no rule knows."""

    def __init__(self, heads: int = 4, head_dim: int = 4) -> None:
        super().__init__()
        width = heads * head_dim
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(8, width), nn.Linear(8, width), nn.Linear(8, width), None)
        self.wo = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.wq(x) * self.wk(x) + self.wv(x))


TOY = {"toy": {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "num_heads": 4}}


# ---------------------------------------------------------------------------- finding heads and neurons
def test_finds_the_heads_of_llama_with_grouped_query_attention_and_of_bert():
    [first, _] = find_attention(llama(heads=4, kv_heads=2))
    assert (first.name, first.q, first.o) == (
        "model.layers.0.self_attn",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.o_proj",
    )
    assert (first.num_heads, first.num_kv_heads, first.head_dim, first.group_size) == (4, 2, 8, 2)
    layouts = find_attention(bert())
    assert [a.name for a in layouts] == ["encoder.layer.0.attention", "encoder.layer.1.attention"]
    assert (layouts[0].k, layouts[0].o) == (
        "encoder.layer.0.attention.self.key",
        "encoder.layer.0.attention.output.dense",
    )
    assert (layouts[0].num_heads, layouts[0].num_kv_heads, layouts[0].head_dim) == (4, 4, 8)
    ffn = find_ffn(llama())[0]
    assert (ffn.inputs, ffn.output, ffn.neurons, ffn.gated) == (
        ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"),
        "model.layers.0.mlp.down_proj",
        48,
        True,
    )
    assert find_ffn(bert())[0].inputs == ("encoder.layer.0.intermediate.dense",)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_heads": 3}, r"'toy': q \(wq\) has 16 output features, but num_heads=3.* need 15"),
        ({"num_kv_heads": 3}, r"'toy': num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
        ({"o": "nowhere"}, r"'toy': o='nowhere' is not an nn.Linear"),
        ({"heads": 4}, r"'toy': the mapping .* has unknown keys \['heads'\]"),
    ],
)
def test_inconsistent_head_mappings_are_refused_naming_the_layer(change, message):
    with pytest.raises(ValueError, match=message):
        Pruner(Toy(), 0.5, pattern=Head({"toy": {**TOY["toy"], **change}}), schedule=OneShot(step=0))


def test_a_model_without_recognisable_attention_is_refused_naming_what_to_pass():
    with pytest.raises(
        ValueError, match=r"pattern 'head' found no head in Toy.*pass the layout: Head\(layers=\{\.\.\.\}\)"
    ):
        Pruner(Toy(), 0.5, pattern="head", schedule=OneShot(step=0))
    pruner = Pruner(Toy(), 0.5, pattern=Head(TOY), criterion="magnitude", schedule=OneShot(step=0))
    pruner.before_optimizer_step(0)
    masks = pruner.masks
    assert len(dead_heads(masks["wq.weight"], 4)) == 2
    assert dead_heads(masks["wq.weight"], 4) == dead_heads(masks["wo.weight"], 4, columns=True)


# ---------------------------------------------------------------------------- pruning heads as units
@pytest.mark.parametrize("scope", ["local", "global"])
def test_head_masks_are_whole_heads_across_q_k_v_o_and_a_kv_head_goes_only_with_its_query_heads(scope):
    model = llama(heads=8, kv_heads=2, layers=3)
    pruner = Pruner(model, 0.6, pattern="head", criterion="magnitude", scope=scope, schedule=OneShot(step=0))
    assert all("self_attn" in fqn for fqn in pruner.targets), "only attention projections are targets"
    pruner.before_optimizer_step(0)
    masks, total = pruner.masks, 0
    for layer in range(3):
        prefix = f"model.layers.{layer}.self_attn"
        q = dead_heads(masks[f"{prefix}.q_proj.weight"], 8)
        assert q == dead_heads(masks[f"{prefix}.o_proj.weight"], 8, columns=True)
        kv = dead_heads(masks[f"{prefix}.k_proj.weight"], 8)
        assert kv == dead_heads(masks[f"{prefix}.v_proj.weight"], 8)
        assert kv == [g for g in range(2) if all(h in q for h in range(4 * g, 4 * g + 4))]
        assert len(q) < 8, "one head stays in every layer"
        if scope == "local":
            assert len(q) == 5  # the nearest whole count of heads to 60%
        total += len(q)
    assert total == (15 if scope == "local" else round(0.6 * 24))


def test_global_scope_ranks_heads_across_layers_and_keeps_one_per_layer():
    model = llama(heads=4, kv_heads=4, layers=2)
    with torch.no_grad():  # layer 1's heads are far weaker: a global ranking takes them first
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            model.model.layers[1].self_attn.get_submodule(name).weight.mul_(0.01)
    pruner = Pruner(model, 0.5, "head", "magnitude", OneShot(step=0), scope="global", max_sparsity_per_layer=1.0)
    pruner.before_optimizer_step(0)
    masks = pruner.masks
    assert len(dead_heads(masks["model.layers.1.self_attn.q_proj.weight"], 8)) == 3, "all but one of layer 1"
    assert len(dead_heads(masks["model.layers.0.self_attn.q_proj.weight"], 8)) == 1
    with pytest.raises(ValueError, match=r"target_sparsity 0.8 is above what pattern 'head' can prune while one head"):
        Pruner(model, 0.8, "head", "magnitude", OneShot(step=0), scope="global")


def test_a_target_that_would_remove_every_head_of_a_layer_is_refused():
    with pytest.raises(ValueError, match=r"would prune every head of 'model.layers.0.self_attn' \(4 heads; local"):
        Pruner(llama(), 0.9, "head", "magnitude", OneShot(step=0), scope="local")


def test_leaving_out_some_projections_of_a_head_is_refused_naming_them():
    with pytest.raises(ValueError, match=r"exclude leave out \['model.layers.0.self_attn.o_proj.weight'\]"):
        Pruner(llama(), 0.5, "head", schedule=OneShot(step=0), exclude=r".*layers\.0\.self_attn\.o_proj")
    pruner = Pruner(llama(), 0.5, "head", schedule=OneShot(step=0), exclude=r".*layers\.0\..*")
    assert all(".layers.1." in fqn for fqn in pruner.targets), "a layer excluded whole is fine"


def test_regularization_and_progressive_pruning_refuse_coupled_patterns():
    from lightning_prune import ProgressivePruner
    from lightning_prune.regularization import GroupLassoStep

    with pytest.raises(ValueError, match="does not apply to pattern 'head'"):
        Pruner(None, 0.5, "head", regularization=GroupLassoStep(1e-4))
    with pytest.raises(ValueError, match="pattern 'ffn' prunes units spanning several weights"):
        ProgressivePruner(None, 0.5, pattern="ffn", progressive_steps=2)


@pytest.mark.parametrize("criterion", ["magnitude", "gradient", "snip", "snip_momentum"])
def test_every_criterion_prunes_whole_heads_while_training_under_lightning(criterion):
    torch.manual_seed(0)
    model = Classifier(MiniLM(pretrained=False, config=TINY_BERT), num_classes=5)
    schedule = Iterative(start_step=0, end_step=4, frequency=2)
    cb = Pruning(0.5, pattern="head", criterion=criterion, schedule=schedule, scope="local", verbose=False)
    ids = torch.randint(0, 1000, (16, 2, 12))
    ids[:, 1] = 1
    data = torch.utils.data.TensorDataset(ids, torch.randint(0, 5, (16,)))
    make_trainer([cb], max_steps=6).fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    masks = {k.removeprefix("net."): v for k, v in cb.masks.items()}
    for layer in range(2):
        prefix = f"bert.encoder.layer.{layer}.attention"
        q = dead_heads(masks[f"{prefix}.self.query.weight"], 8)
        assert len(q) == 2 and q == dead_heads(masks[f"{prefix}.output.dense.weight"], 8, columns=True)
        assert q == dead_heads(masks[f"{prefix}.self.value.weight"], 8)
        weight = model.net.bert.encoder.layer[layer].attention.output.dense.weight
        assert not weight.reshape(32, 4, 8)[:, q].any(), "pruned heads stay exactly zero through training"
    with pytest.warns(UserWarning, match="BertConfig derives the head size"):  # found inside the wrapper
        small, report = slim(model.net, masks, ids[:4])  # outputs checked equal to the masked model's inside
    assert report["heads"] == {f"bert.encoder.layer.{i}.attention": 2 for i in range(2)}
    assert small.bert.encoder.layer[0].attention.self.num_attention_heads == 2


def test_head_pruning_resumes_from_a_state_dict_with_the_masks_of_an_uninterrupted_run():
    def run(stop: int | None, state: dict[str, Any] | None = None) -> Any:
        torch.manual_seed(1)
        model = llama(layers=1)
        pruner = Pruner(model, 0.5, "head", "snip_momentum", Iterative(start_step=0, end_step=6, frequency=2))
        start = 0
        if state is not None:
            model.load_state_dict(state["model"])
            pruner.load_state_dict(state["pruner"])
            start = state["step"]
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for step in range(8):
            ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(step))
            if step < start:
                continue
            if step == stop:
                return {"model": model.state_dict(), "pruner": pruner.state_dict(), "step": step}
            model(ids, labels=ids).loss.backward()
            pruner.before_optimizer_step(step, opt)
            opt.step()
            opt.zero_grad()
            pruner.after_optimizer_step()
        return pruner

    whole = run(None)
    resumed = run(None, run(3))
    assert all(torch.equal(whole.masks[k], resumed.masks[k]) for k in whole.masks)
    assert len(dead_heads(whole.masks["model.layers.0.self_attn.q_proj.weight"], 8)) == 2


def test_heads_that_straddle_a_shard_are_refused_alike_on_each_rank(fake_rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    messages = []
    for rank in (0, 1):
        fake_rank(rank)
        for heads, head_dim in ((3, 4), (4, 4)):  # 12 rows split 6/6 cut a head; 16 rows split 8/8 do not
            torch.manual_seed(0)
            net = Toy(heads, head_dim)
            mesh = init_device_mesh("cpu", (2,))
            for layer in (net.wq, net.wk, net.wv, net.wo):
                fully_shard(layer, mesh=mesh)
            layout = Head({"toy": {**TOY["toy"], "num_heads": heads}})
            if heads == 4:
                Pruner(net, 0.5, layout, schedule=OneShot(step=0))
                continue
            with pytest.raises(ValueError) as info:
                Pruner(net, 0.5, layout, schedule=OneShot(step=0))
            messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith("pattern '1xchannel[4]' cannot prune 'wq.weight' (12, 8) as it is sharded")


# ---------------------------------------------------------------------------- FFN neurons
def test_an_ffn_neuron_is_scored_once_across_gate_up_and_down_and_slimmed():
    model = llama()
    pruner = Pruner(model, 0.5, "ffn", "magnitude", OneShot(step=0), scope="local")
    assert all(".mlp." in fqn for fqn in pruner.targets)
    pruner.before_optimizer_step(0)
    masks = dict(pruner.masks)
    prefix = "model.layers.0.mlp"
    gate, up = ~masks[f"{prefix}.gate_proj.weight"].any(1), ~masks[f"{prefix}.up_proj.weight"].any(1)
    down = ~masks[f"{prefix}.down_proj.weight"].any(0)
    assert int(gate.sum()) == 24 and torch.equal(gate, up) and torch.equal(gate, down)
    weights = {n: p.detach().abs() for n, p in model.named_parameters()}
    score = torch.cat(
        [
            weights[f"{prefix}.gate_proj.weight"],
            weights[f"{prefix}.up_proj.weight"],
            weights[f"{prefix}.down_proj.weight"].T,
        ],
        dim=1,
    ).mean(dim=1)
    assert torch.equal(gate, score <= score.kthvalue(24).values), "the lowest mean |w| over the three matrices"
    ids = torch.randint(0, 64, (2, 10))
    small, report = slim(model, masks, {"input_ids": ids})
    assert report["neurons"] == {f"model.layers.{i}.mlp": 24 for i in range(2)}
    assert small.config.intermediate_size == 24


@pytest.mark.parametrize("pruned", [("gate_proj",), ("up_proj",), ("gate_proj", "up_proj")])
def test_slim_removes_a_swiglu_neuron_when_any_factor_is_zero(pruned):
    model = llama(layers=1)
    prefix = "model.layers.0.mlp"
    masks = {}
    for i, name in enumerate(pruned):  # gate and up pruned independently: different neurons
        keep = torch.ones(48, 32, dtype=torch.bool)
        keep[i * 8 : i * 8 + 16] = False
        masks[f"{prefix}.{name}.weight"] = keep
    small, report = slim(model, masks, {"input_ids": torch.randint(0, 64, (2, 10))})
    expected = 16 if len(pruned) == 1 else 24  # any neuron with a zero factor
    assert report["neurons"] == {prefix: expected}
    assert small.model.layers[0].mlp.down_proj.in_features == 48 - expected


# ---------------------------------------------------------------------------- slimming heads
def _head_masks(model: Any, layer: int, heads: list[int], head_dim: int = 8) -> dict[str, torch.Tensor]:
    attn = model.model.layers[layer].self_attn
    rows = torch.ones_like(attn.q_proj.weight, dtype=torch.bool)
    for h in heads:
        rows[h * head_dim : (h + 1) * head_dim] = False
    prefix = f"model.layers.{layer}.self_attn"
    return {f"{prefix}.q_proj.weight": rows, f"{prefix}.o_proj.weight": rows.T.clone()}


def test_a_llama_slimmed_by_heads_runs_with_the_hf_code_and_uneven_layers_are_said_not_to_round_trip():
    model = llama(heads=8, kv_heads=2)
    masks = {**_head_masks(model, 0, [0, 1, 2, 3, 4]), **_head_masks(model, 1, [1, 3, 5, 7])}
    ids = torch.randint(0, 64, (2, 10))
    with pytest.warns(UserWarning, match=r"different head counts \(\[\(3, 1\), \(4, 2\)\].*torch.save"):
        small, report = slim(model, masks, {"input_ids": ids})  # outputs checked equal to the masked model's
    assert report["heads"] == {"model.layers.0.self_attn": 5, "model.layers.1.self_attn": 4}
    assert report["params_after"] < report["params_before"]
    first = small.model.layers[0].self_attn  # kept heads 5-7, all of key/value head 1
    assert (first.q_proj.out_features, first.k_proj.out_features, first.num_key_value_groups) == (24, 8, 3)
    second = small.model.layers[1].self_attn  # kept 0, 2 (key/value head 0) and 4, 6 (key/value head 1)
    assert (second.q_proj.out_features, second.k_proj.out_features, second.num_key_value_groups) == (32, 16, 2)
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (8, 2), "left as it was"


def test_gqa_padding_is_said_and_equal_counts_round_trip(tmp_path):
    from transformers import LlamaForCausalLM

    model = llama(heads=8, kv_heads=2)
    ids = torch.randint(0, 64, (2, 10))
    uneven = {**_head_masks(model, 0, [0, 1, 4]), **_head_masks(model, 1, [0, 1, 4])}
    with pytest.warns(UserWarning, match=r"kept 2 pruned \(zero\) heads as padding"):
        small, report = slim(model, uneven, {"input_ids": ids})
    assert report["heads"] == {"model.layers.0.self_attn": 2, "model.layers.1.self_attn": 2}
    even = {**_head_masks(model, 0, [0, 1, 4, 5]), **_head_masks(model, 1, [2, 3, 6, 7])}
    small, _ = slim(model, even, {"input_ids": ids})
    assert (small.config.num_attention_heads, small.config.num_key_value_heads, small.config.head_dim) == (4, 2, 8)
    small.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.allclose(again.eval()(input_ids=ids).logits, small.eval()(input_ids=ids).logits, atol=1e-6)
    assert model.config.num_attention_heads == 8, "the original model is untouched"


def test_bert_heads_slim_to_equal_outputs_and_the_config_limit_is_said():
    model = bert()
    pruner = Pruner(model, 0.5, "head", "magnitude", OneShot(step=0), scope="local")
    pruner.before_optimizer_step(0)
    ids = torch.randint(0, 64, (2, 10))
    with pytest.warns(UserWarning, match=r"BertConfig derives the head size .* torch.save"):
        small, report = slim(model, dict(pruner.masks), {"input_ids": ids})
    assert small.encoder.layer[1].attention.self.query.out_features == 16
    assert report["params_after"] < report["params_before"] and report["macs_after"] < report["macs_before"]
    assert small.config.num_attention_heads == 4, "left as it was: it cannot describe the slimmed shapes"


def test_pattern_lock_keeps_pruned_heads_at_zero_and_refuses_zeros_that_are_not_whole_heads():
    from lightning_prune.engine import MaskLock

    model = llama(layers=1)
    pruner = Pruner(model, 0.5, "head", "magnitude", OneShot(step=0), scope="local")
    pruner.before_optimizer_step(0)
    lock = MaskLock(model, pattern="head")
    assert set(lock.targets) == set(pruner.targets), "the attention projections only"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 64, (2, 8))
    model(ids, labels=ids).loss.backward()
    lock.before_optimizer_step(0, opt)
    opt.step()
    lock.after_optimizer_step()
    assert all(torch.equal(model.get_parameter(f) != 0, pruner.masks[f]) for f in pruner.targets)
    kept = next(h for h in range(4) if h not in dead_heads(pruner.masks["model.layers.0.self_attn.q_proj.weight"], 8))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[8 * kept + 1, :] = 0  # one row of a kept head
    with pytest.raises(ValueError, match=r"the zeros of 'model.layers.0.self_attn.q_proj.weight' do not form whole"):
        MaskLock(model, pattern="head")


# ---------------------------------------------------------------------------- retrain-free (Kwon et al. 2022)
def calibration(n: int = 6, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 64, (4, 16), generator=generator)
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def test_refit_is_the_least_squares_solution_over_the_kept_columns():
    from lightning_prune.retrain_free import refit

    torch.manual_seed(0)
    x, w = torch.randn(200, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    kept = torch.tensor([True, False, True, True, False, True])
    new = refit(w, x.T @ x, kept, damp=0.0)
    expected = torch.linalg.lstsq(x[:, kept], x @ w.T).solution.T
    assert torch.allclose(new[:, kept], expected, atol=1e-8) and not new[:, ~kept].any()


@pytest.mark.parametrize(("pattern", "budget"), [("head", "flops"), ("ffn", "params")])
def test_retrain_free_removes_whole_units_to_the_budget_and_the_refit_beats_plain_masking(pattern, budget):
    from lightning_prune.oneshot import prune_oneshot

    model = llama(heads=4, kv_heads=4).eval()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    test = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = model(test).logits
    masks = prune_oneshot(model, calibration(), "retrain_free", 0.5, pattern, budget=budget)
    if pattern == "head":
        assert set(masks) == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkvo"}
        pruned = [len(dead_heads(masks[f"model.layers.{i}.self_attn.q_proj.weight"], 8)) for i in range(2)]
        assert sum(pruned) == 4 and all(n < 4 for n in pruned)  # half the heads' FLOPs: 4 of 8 equal heads
        for i in range(2):
            prefix = f"model.layers.{i}.self_attn"
            q = dead_heads(masks[f"{prefix}.q_proj.weight"], 8)
            assert q == dead_heads(masks[f"{prefix}.o_proj.weight"], 8, columns=True)
    else:
        assert sum(int((~masks[f"model.layers.{i}.mlp.up_proj.weight"].any(1)).sum()) for i in range(2)) == 48
    for name, mask in masks.items():
        assert not model.get_parameter(name)[~mask].any(), "pruned weights are exactly zero"
    with torch.no_grad():
        refitted = float((model(test).logits - reference).square().mean())
        plain = llama(heads=4, kv_heads=4).eval()
        plain.load_state_dict({k: v * masks[k] if k in masks else v for k, v in dense.items()})
        masked = float((plain(test).logits - reference).square().mean())
    assert refitted < masked, "the least-squares re-fit keeps the outputs closer than masking alone"


def test_retrain_free_removes_the_head_whose_mask_has_no_effect_first():
    from lightning_prune.oneshot import prune_oneshot

    model = llama(heads=4, kv_heads=4, layers=1).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, 16:24] *= 1e-6  # head 2's output barely counts
    masks = prune_oneshot(model, calibration(), "retrain_free", 0.25, "head", budget="params")
    assert dead_heads(masks["model.layers.0.self_attn.q_proj.weight"], 8) == [2]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"pattern": "unstructured"}, ValueError, "pattern 'unstructured' is not valid here; choose 'head' or 'ffn'"),
        ({"budget": "time"}, ValueError, "budget 'time' is not valid; choose one of 'flops', 'params'"),
        ({"target_sparsity": 0.95}, ValueError, "would prune every head|can prune while one head"),
        ({"scope": "layer"}, ValueError, "scope 'layer' is not valid"),
        ({"loss": 3}, TypeError, "loss must be a callable"),
        ({"batches": [{"input_ids": torch.randint(0, 64, (2, 8))}]}, ValueError, "no scalar loss.*pass loss="),
    ],
)
def test_retrain_free_bad_input_is_refused_before_any_weight_changes(kwargs, error, message):
    from lightning_prune.oneshot import prune_oneshot

    model = llama(layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = {"batches": calibration(2), "method": "retrain_free", "target_sparsity": 0.5, "pattern": "head", **kwargs}
    with pytest.raises(error, match=message):
        prune_oneshot(model, **args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_weight_methods_refuse_the_head_pattern_naming_retrain_free():
    from lightning_prune.oneshot import prune_oneshot

    with pytest.raises(ValueError, match="use method='retrain_free' for it"):
        prune_oneshot(llama(layers=1), calibration(1), "sparsegpt", 0.5, "head")


def test_one_shot_callback_prunes_heads_retrain_free_then_fine_tunes_them_locked():
    from lightning_prune import OneShotPruning

    torch.manual_seed(0)
    model = Classifier(MiniLM(pretrained=False, config=TINY_BERT), num_classes=5)
    cb = OneShotPruning("retrain_free", 0.5, "head", calibration_batches=2, scope="local", verbose=False)
    ids = torch.randint(0, 1000, (16, 2, 12))
    ids[:, 1] = 1
    data = torch.utils.data.TensorDataset(ids, torch.randint(0, 5, (16,)))
    make_trainer([cb], max_steps=3).fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    masks = {k.removeprefix("net."): v for k, v in cb.masks.items()}
    assert len(masks) == 8, "q, k, v and attention output of 2 layers"
    for layer in range(2):
        q = dead_heads(masks[f"bert.encoder.layer.{layer}.attention.self.query.weight"], 8)
        assert len(q) == 2
        weight = model.net.bert.encoder.layer[layer].attention.output.dense.weight
        assert not weight.reshape(32, 4, 8)[:, q].any() and weight.reshape(32, 4, 8).any()
