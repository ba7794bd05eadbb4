"""Export: permanent masks, slimmed models equal to masked ones, compact checkpoints, 2:4 kernels."""

from __future__ import annotations

import pytest
import torch
from conftest import make_trainer
from safetensors.torch import save_file
from torch import nn

from experiments.data import DigitsData
from experiments.models import Classifier, MiniLM, ResNetSmall
from lightning_prune import Pruning
from lightning_prune.export import load_sparse, make_permanent, save_sparse, slim, to_semi_structured
from lightning_prune.schedules import Iterative

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def train_pruned(net, pattern, target=0.5, include=None, data=None, steps=14):
    model = Classifier(net, num_classes=10 if data is None else 5)
    cb = Pruning(target, pattern=pattern, schedule=Iterative(start_step=0, end_step=10, frequency=2), include=include)
    make_trainer([cb], max_steps=steps).fit(model, datamodule=data or DigitsData(subset=128))
    return model, {k.removeprefix("net."): v for k, v in cb.masks.items()}, cb


def test_coupled_bias_and_batchnorm_of_pruned_filters_stay_zero():
    model, masks, cb = train_pruned(ResNetSmall(), "1xchannel")
    net = model.net
    checked = 0
    for conv_name, bn_name in [
        ("stem.0", "stem.1"),
        ("stages.0.conv1", "stages.0.bn1"),
        ("stages.2.conv2", "stages.2.bn2"),
    ]:
        dead = ~masks[f"{conv_name}.weight"].reshape(masks[f"{conv_name}.weight"].shape[0], -1).any(1)
        bn = net.get_submodule(bn_name)
        assert (bn.weight[dead] == 0).all() and (bn.bias[dead] == 0).all(), bn_name
        assert (bn.weight[~dead] != 0).any()
        checked += int(dead.sum())
    assert checked > 0


@pytest.mark.parametrize("pattern", ["1xchannel", "channelx1"])
def test_slimmed_cnn_equals_masked(pattern):
    model, masks, _ = train_pruned(ResNetSmall(), pattern)
    x = torch.randn(8, 1, 8, 8)
    small, report = slim(model.net, masks, x)
    assert report["params_after"] < report["params_before"] and report["macs_after"] < report["macs_before"]
    assert sum(report["removed"].values()) > 0
    masked = make_permanent(model.net, masks).eval()
    with torch.no_grad():
        assert torch.allclose(small.eval()(x), masked(x), atol=1e-5)


def test_slimmed_bert_ffn_equals_masked():
    torch.manual_seed(0)
    net = MiniLM(pretrained=False, config=TINY_BERT)
    ffn = r"net\.bert\.encoder\.layer\.\d+\.intermediate\.dense"
    model = Classifier(net, num_classes=5)
    schedule = Iterative(start_step=0, end_step=4, frequency=2)
    cb = Pruning(0.5, pattern="1xchannel", schedule=schedule, include=ffn, scope="local")
    ids = torch.randint(0, 1000, (16, 2, 12))
    ids[:, 1] = 1
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, torch.randint(0, 5, (16,))), batch_size=8)
    make_trainer([cb], max_steps=6).fit(model, loader)
    masks = {k.removeprefix("net."): v for k, v in cb.masks.items()}
    small, report = slim(model.net, masks, ids[:4])
    for i in range(2):
        assert small.bert.encoder.layer[i].intermediate.dense.out_features == 32, "half the FFN neurons removed"
        assert small.bert.encoder.layer[i].output.dense.in_features == 32
    masked = make_permanent(model.net, masks).eval()
    with torch.no_grad():
        assert torch.allclose(small.eval()(ids[:4]), masked(ids[:4]), atol=1e-5)
    assert report["params_after"] < report["params_before"]


def ffn_masks(layer: int, dead: torch.Tensor, width: int = 64, hidden: int = 32) -> dict[str, torch.Tensor]:
    """Masks pruning the same FFN neurons of a Llama layer in gate and up (rows) and down (columns)."""
    rows = torch.ones(width, hidden, dtype=torch.bool)
    rows[dead] = False
    prefix = f"model.layers.{layer}.mlp"
    return {f"{prefix}.gate_proj.weight": rows, f"{prefix}.up_proj.weight": rows, f"{prefix}.down_proj.weight": rows.T}


def test_slims_a_hugging_face_llama_with_its_default_kv_cache_and_leaves_the_setting_alone():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    llm = LlamaForCausalLM(config)
    assert llm.config.use_cache, "the default a new user gets"
    dead = torch.arange(0, 64, 2)
    masks = {**ffn_masks(0, dead), **ffn_masks(1, dead)}
    ids = torch.randint(0, 100, (2, 12))
    small, _ = slim(llm, masks, {"input_ids": ids})  # outputs checked equal to the masked model's inside
    for layer in small.model.layers:
        assert layer.mlp.up_proj.out_features == 32 and layer.mlp.down_proj.in_features == 32
    assert llm.config.use_cache and small.config.use_cache, "the cache setting is only off while slimming"
    assert small.config.intermediate_size == 32 and llm.config.intermediate_size == 64


def test_a_slimmed_llama_round_trips_through_save_pretrained(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llm = LlamaForCausalLM(
        LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    )
    masks = {**ffn_masks(0, torch.arange(0, 64, 4)), **ffn_masks(1, torch.arange(1, 64, 4))}  # 16 per layer
    ids = torch.randint(0, 100, (2, 12))
    small, _ = slim(llm, masks, {"input_ids": ids})
    small.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    assert again.config.intermediate_size == 48
    with torch.no_grad():
        assert torch.allclose(again.eval()(input_ids=ids).logits, small.eval()(input_ids=ids).logits, atol=1e-6)
    uneven = {**masks, **ffn_masks(1, torch.arange(8))}
    with pytest.warns(UserWarning, match=r"different FFN widths \(\[48, 56\]\).*torch.save"):
        lopsided, _ = slim(llm, uneven, {"input_ids": ids})
    assert lopsided.config.intermediate_size == 64


@pytest.mark.parametrize(("layer", "dim"), [("q_proj", 0), ("v_proj", 0), ("o_proj", 1)])
def test_slim_refuses_channels_of_attention_heads_up_front_naming_the_layer(layer, dim):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llm = LlamaForCausalLM(
        LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    )
    keep = torch.ones(32, 32, dtype=torch.bool)
    if dim == 0:
        keep[::2] = False
    else:
        keep[:, ::2] = False
    masks = {f"model.layers.0.self_attn.{layer}.weight": keep}
    with pytest.raises(ValueError, match=rf"'model.layers.0.self_attn.{layer}'.* not whole heads of 8.*pattern 'head'"):
        slim(llm, masks, {"input_ids": torch.randint(0, 100, (1, 8))})


def test_slim_refuses_masks_without_whole_channels():
    model, masks, _ = train_pruned(ResNetSmall(), "unstructured", steps=12)
    with pytest.raises(ValueError, match="1xchannel.*channelx1"):
        slim(model.net, masks, torch.randn(2, 1, 8, 8))


def test_permanent_model_is_plain_and_loads_strictly():
    model, masks, _ = train_pruned(ResNetSmall(), "4x1")
    plain = make_permanent(model.net, masks)
    fresh = ResNetSmall()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    for name, mask in masks.items():
        assert (fresh.get_parameter(name)[~mask] == 0).all()
    # torch.nn.utils.prune reparametrisations are removed: original names, no hooks
    lin = nn.Linear(4, 4)
    torch.nn.utils.prune.l1_unstructured(lin, "weight", amount=0.5)
    baked = make_permanent(lin, {})
    assert {n for n, _ in baked.named_parameters()} == {"weight", "bias"} and not baked._forward_pre_hooks
    assert int((baked.weight == 0).sum()) == 8


def test_make_permanent_leaves_the_original_alone():
    lin = nn.Linear(4, 4)
    before = lin.weight.detach().clone()
    make_permanent(lin, {"weight": torch.zeros(4, 4, dtype=torch.bool)})
    assert torch.equal(lin.weight, before)
    with pytest.raises(ValueError, match="does not have"):
        make_permanent(lin, {"nope.weight": torch.ones(4, 4, dtype=torch.bool)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse_checkpoint_round_trip_is_bit_exact(tmp_path, dtype):
    torch.manual_seed(0)
    state = {
        "a.weight": torch.randn(37, 53).to(dtype),
        "a.bias": torch.randn(37).to(dtype),
        "bn.running_var": torch.rand(5),
        "bn.num_batches_tracked": torch.tensor(7),
        "conv.weight": torch.randn(6, 3, 3, 3).to(dtype),
    }
    masks = {"a.weight": torch.rand(37, 53) > 0.9, "conv.weight": torch.rand(6, 3, 3, 3) > 0.5}
    for name, mask in masks.items():
        state[name] = state[name] * mask
    save_sparse(state, tmp_path / "m.safetensors", masks)
    loaded = load_sparse(tmp_path / "m.safetensors")
    assert set(loaded) == set(state)
    for name, value in state.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name


def test_sparse_checkpoint_at_90_percent_is_small(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 512))
    masks = {f"{i}.weight": torch.rand_like(model[i].weight) > 0.9 for i in (0, 1)}
    plain = make_permanent(model, masks)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, tmp_path / "dense.safetensors")
    info = save_sparse(plain, tmp_path / "sparse.safetensors", masks)
    ratio = info["bytes"] / (tmp_path / "dense.safetensors").stat().st_size
    assert ratio <= 0.15, ratio
    model2 = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 512))
    model2.load_state_dict(load_sparse(tmp_path / "sparse.safetensors"), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(model2.state_dict().values(), plain.state_dict().values()))


def test_semi_structured_on_cpu_is_a_clear_error():
    lin = nn.Linear(16, 16)
    mask = torch.tensor([True, True, False, False]).repeat(16, 4)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        to_semi_structured(lin, {"weight": mask})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_semi_structured_matches_dense_on_gpu():
    lin = nn.Linear(256, 256).cuda().half()
    mask = torch.tensor([True, False, True, False], device="cuda").repeat(256, 64)
    dense = make_permanent(lin, {"weight": mask})
    sparse = to_semi_structured(lin, {"weight": mask})
    x = torch.randn(128, 256, device="cuda", dtype=torch.half)
    with torch.no_grad():
        assert torch.allclose(sparse(x), dense(x), atol=1e-2, rtol=1e-2)


def test_slim_warns_about_the_sparsity_it_cannot_remove():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    keep = torch.rand(8, 6) > 0.5  # unstructured
    keep[2] = False  # by chance one whole output channel
    with torch.no_grad():
        net[0].bias[2] = 0.0
    removed = r"slim removed whole channels \(0 out \[2\]\) holding .* of the masks. pruned"
    with pytest.warns(UserWarning, match=removed):
        small, report = slim(net, {"0.weight": keep}, torch.randn(2, 6))
    assert report["removed"] == {"0": 1} and small[0].weight.shape == (7, 6)
