"""One-layer post-training pruning: SparseGPT and Wanda against plain re-implementations of their papers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_prune.oneshot import prune_oneshot, sparsegpt_prune, wanda_mask
from lightning_prune.patterns import NM


def _data(rows: int = 16, cols: int = 32, n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and correlated inputs (so that the OBS update has something to compensate)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols) + torch.eye(cols)
    x = torch.randn(n, cols, generator=g) @ mix
    return torch.randn(rows, cols, generator=g), x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 / x.shape[0] * x.T @ x


def _reference_sparsegpt(w: torch.Tensor, h: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, block: int):
    """SparseGPT written as the paper's pseudo-code reads, one column at a time, no lazy batching."""
    w, h = w.clone().double(), h.clone().double()
    cols = w.shape[1]
    h += 0.01 * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    mask = torch.zeros_like(w, dtype=torch.bool)  # True = pruned
    for i in range(cols):
        if nm is None and i % block == 0:
            score = w[:, i : i + block] ** 2 / torch.diagonal(u)[i : i + block] ** 2
            k = int(score.numel() * sparsity)
            mask[:, i : i + block] = score <= torch.sort(score.flatten()).values[k]
        if nm is not None and i % nm[1] == 0:
            score = w[:, i : i + nm[1]] ** 2 / torch.diagonal(u)[i : i + nm[1]] ** 2
            count = nm[0] * score.shape[1] // nm[1]  # a last, partial group prunes its share, rounded down
            mask[:, i : i + nm[1]].scatter_(1, torch.topk(score, count, 1, largest=False).indices, True)
        err = torch.where(mask[:, i], w[:, i], 0.0) / u[i, i]
        w[:, i:] -= err[:, None] * u[i, i:][None, :]
        w[:, i] = torch.where(mask[:, i], 0.0, w[:, i])
    return w.float(), ~mask


@pytest.mark.parametrize(
    ("sparsity", "pattern", "block"),
    [(0.5, "unstructured", 8), (0.7, "unstructured", 32), (0.5, "2:4", 8), (0.5, "4:8", 16)],
)
def test_sparsegpt_equals_the_column_by_column_algorithm(sparsity, pattern, block):
    w, x = _data()
    nm = None if pattern == "unstructured" else tuple(int(v) for v in pattern.split(":"))
    new, kept = sparsegpt_prune(w, _hessian(x), sparsity, pattern, block_size=block)
    ref_new, ref_kept = _reference_sparsegpt(w, _hessian(x), sparsity, nm, block)
    assert torch.equal(kept, ref_kept)
    assert torch.allclose(new, ref_new, atol=1e-4)
    assert not new[~kept].any()
    assert not torch.equal(new[kept], w[kept])  # the kept weights were updated
    if nm is not None:
        assert NM(*nm).conforms(kept)
        assert int((~kept).sum()) == w.numel() * nm[0] // nm[1]
    else:  # per block the reference's `<=` rule: the count is exact up to ties
        assert abs(int((~kept).sum()) - round(sparsity * w.numel())) <= w.shape[1] // block


@pytest.mark.parametrize(("cols", "pattern"), [(10, "2:4"), (9, "2:4"), (13, "4:8")])
def test_widths_not_a_multiple_of_m_prune_the_last_partial_group_like_the_training_time_pattern(cols, pattern):
    w, x = _data(rows=6, cols=cols)
    n, m = (int(v) for v in pattern.split(":"))
    expected = n * (cols // m) + n * (cols % m) // m  # per row
    new, kept = sparsegpt_prune(w, _hessian(x), n / m, pattern, block_size=m)
    ref_new, ref_kept = _reference_sparsegpt(w, _hessian(x), n / m, (n, m), m)
    assert torch.equal(kept, ref_kept)
    assert torch.allclose(new, ref_new, atol=1e-4)
    wanda = wanda_mask(w, x.square().sum(0), n / m, pattern)
    for mask in (kept, wanda):
        assert ((~mask).sum(1) == expected).all()
        assert NM(n, m).conforms(mask), "the masks PatternLock(pattern) and the engine accept"


@pytest.mark.parametrize(("pattern", "block"), [("unstructured", 128), ("2:4", 64), ("4:8", 128), ("1:3", 96)])
def test_sparsegpt_with_sub_blocks_equals_the_column_by_column_algorithm(pattern, block):
    w, x = _data(rows=12, cols=200, n=1024)
    nm = None if pattern == "unstructured" else tuple(int(v) for v in pattern.split(":"))
    sparsity = 0.5 if nm is None else nm[0] / nm[1]
    new, kept = sparsegpt_prune(w, _hessian(x), sparsity, pattern, block_size=block)
    ref_new, ref_kept = _reference_sparsegpt(w, _hessian(x), sparsity, nm, block)
    assert torch.equal(kept, ref_kept)
    assert torch.allclose(new, ref_new, atol=1e-4)


def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude():
    w, x = _data(rows=32, cols=64, n=1024)
    h = _hessian(x)

    def error(new: torch.Tensor) -> float:
        return float((x @ (w - new).T).square().sum() / (x @ w.T).square().sum())

    sgpt, _ = sparsegpt_prune(w, h, 0.5)
    wanda = w * wanda_mask(w, x.square().sum(0), 0.5)
    magnitude = w * (w.abs() > w.abs().median(dim=1, keepdim=True).values)
    assert error(sgpt) < error(wanda) < error(magnitude)


def test_sparsegpt_dead_columns_and_convolutions():
    w, x = _data(rows=8, cols=36)
    x[:, 5] = 0.0  # an input that never fires: its weights go to zero, the rest is pruned as usual
    conv = w.reshape(8, 3, 3, 4).permute(0, 3, 1, 2)  # [Cout, Cin, kh, kw] whose matrix view is w
    new, kept = sparsegpt_prune(conv, _hessian(x), 0.5, block_size=12)
    assert new.shape == conv.shape and kept.shape == conv.shape
    flat_new, flat_kept = sparsegpt_prune(w, _hessian(x), 0.5, block_size=12)
    assert torch.equal(new.permute(0, 2, 3, 1).reshape(8, 36), flat_new)
    assert not flat_new[:, 5].any()
    assert torch.equal(kept.permute(0, 2, 3, 1).reshape(8, 36), flat_kept)


def test_wanda_prunes_exactly_per_row_by_weight_times_input_norm():
    w, x = _data(rows=12, cols=40)
    norms = x.square().sum(0)
    kept = wanda_mask(w, norms, 0.3)
    assert ((~kept).sum(dim=1) == math.floor(40 * 0.3)).all()  # exactly floor(cols * s) in every row
    score = w.abs() * norms.sqrt()
    for row in range(12):
        order = torch.argsort(score[row], stable=True)
        assert set(order[:12].tolist()) == set((~kept[row]).nonzero().flatten().tolist())
    two_four = wanda_mask(w, norms, 0.5, "2:4")
    assert NM(2, 4).conforms(two_four) and int((~two_four).sum()) == w.numel() // 2
    groups = score.reshape(12, 10, 4)
    lowest = torch.topk(groups, 2, dim=2, largest=False).indices
    assert torch.equal((~two_four).reshape(12, 10, 4).gather(2, lowest), torch.ones(12, 10, 2, dtype=torch.bool))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda w, h, n: wanda_mask(w, n, 1.0), ValueError, r"sparsity must be a number in \[0, 1\), got 1.0"),
        (lambda w, h, n: wanda_mask(w, n, 0.5, "4x1"), ValueError, "pattern '4x1' is not valid here"),
        (lambda w, h, n: wanda_mask(w, n, 0.6, "2:4"), ValueError, "prunes exactly 2/4 of the weights; sparsity 0.6"),
        (lambda w, h, n: wanda_mask(w, n[:-1], 0.5), ValueError, "input_sq_norms has 31 entries"),
        (lambda w, h, n: sparsegpt_prune(w, h[:-1], 0.5), ValueError, r"hessian has shape \(31, 32\)"),
        (lambda w, h, n: sparsegpt_prune(w, h, 0.5, "2:4", block_size=6), ValueError, "block_size"),
        (lambda w, h, n: sparsegpt_prune(w, h, 0.5, damp=-1.0), ValueError, "damp must be a number >= 0"),
        (lambda w, h, n: sparsegpt_prune(w, h * math.nan, 0.5), RuntimeError, "non-finite"),
        (lambda w, h, n: sparsegpt_prune(w, -h, 0.5, damp=0.0), RuntimeError, "not positive definite"),
    ],
)
def test_bad_input_is_refused_with_the_weight_untouched(call, error, match):
    w, x = _data()
    before = w.clone()
    with pytest.raises(error, match=match):
        call(w, _hessian(x), x.square().sum(0))
    assert torch.equal(w, before)


# ---------------------------------------------------------------------------- whole models: prune_oneshot
class Stack(nn.Module):
    """Two blocks in a ModuleList and a head: the default blocks are the list's items."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(2)])
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _batches(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 16, generator=g) for _ in range(n)]


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_blocks_are_pruned_in_order_each_from_the_pruned_outputs_of_the_one_before(method):
    model, batches = Stack(), _batches()
    expected = Stack()  # the same, pruned by hand layer after layer
    x = torch.cat(batches)

    def prune(layer: nn.Linear, inputs: torch.Tensor) -> None:
        if method == "sparsegpt":
            new, _ = sparsegpt_prune(layer.weight, 2 / len(inputs) * inputs.T @ inputs, 0.5, block_size=8)
        else:
            new = layer.weight * wanda_mask(layer.weight, inputs.square().sum(0), 0.5)
        layer.weight.data.copy_(new)

    with torch.no_grad():
        for block in expected.layers:
            prune(block[0], x)
            x = block(x)
        prune(expected.head, x)
    masks = prune_oneshot(model, batches, method, 0.5, block_size=8)
    assert list(masks) == ["layers.0.0.weight", "layers.1.0.weight", "head.weight"]
    for (name, got), want in zip(model.named_parameters(), expected.parameters()):
        assert torch.allclose(got, want, atol=1e-5), name
    for name, mask in masks.items():
        assert not model.get_parameter(name)[~mask].any()
        assert int((~mask).sum()) == pytest.approx(mask.numel() / 2, abs=mask.shape[1] // 8 + 1)


def test_a_llama_from_transformers_with_mapping_batches_and_lm_head_excluded():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    head = model.lm_head.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (2, 16), generator=g)} for _ in range(3)]
    before = model(**batches[0]).logits
    masks = prune_oneshot(model, batches, "sparsegpt", 0.5, "2:4", exclude=r"lm_head", block_size=16)
    assert len(masks) == 14 and "lm_head.weight" not in masks  # 7 projections in each of 2 layers
    assert all(NM(2, 4).conforms(m) and not model.get_parameter(n)[~m].any() for n, m in masks.items())
    assert torch.equal(model.lm_head.weight, head)
    assert model.training  # the mode it had
    after = model(**batches[0]).logits
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    masks = prune_oneshot(model, batches, "wanda", 0.5)  # lm_head included by default: pruned last
    assert "lm_head.weight" in masks and int((~masks["lm_head.weight"]).sum()) == 64 * 32 // 2


def test_magnitude_one_shot_is_the_baseline_per_layer():
    model = Stack()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = prune_oneshot(model, _batches(1), "magnitude", 0.75)
    for name, mask in masks.items():
        w = weights[name]
        assert int((~mask).sum()) == round(0.75 * w.numel())
        assert w.abs()[~mask].max() <= w.abs()[mask].min()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "obs"}, ValueError, "method 'obs' is not valid; choose one of 'sparsegpt', 'wanda', 'magnitude'"),
        ({"pattern": "2:4", "target_sparsity": 0.7}, ValueError, "prunes exactly 2/4"),
        ({"pattern": "4x1"}, ValueError, "pattern '4x1' is not valid here"),
        ({"blocks": r"nothing\.\d+"}, ValueError, "blocks .* match no module"),
        ({"block_size": 0}, ValueError, "block_size must be a positive int"),
        ({"include": r"nope"}, ValueError, "include"),
        ({"forward": 3}, TypeError, "forward must be a callable"),
        ({"batches": []}, ValueError, "batches is empty"),
        (
            {"batches": [torch.full((4, 16), math.inf)]},
            RuntimeError,
            "non-finite calibration activations reach 'layers.0.0.weight'",
        ),
        ({"forward": lambda model, batch: None}, RuntimeError, "never reached the first block"),
    ],
)
def test_prune_oneshot_refuses_bad_input_and_leaves_the_model_as_it_was(kwargs, error, match):
    model = Stack()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    arguments = {"batches": _batches(2), **kwargs}
    with pytest.raises(error, match=match):
        prune_oneshot(model, **arguments)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_a_failure_in_a_later_block_restores_the_blocks_already_pruned():
    model = Stack()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.layers[1][0].bias.fill_(math.inf)  # the second block's outputs are not finite: the head fails
    before["layers.1.0.bias"] = model.layers[1][0].bias.detach().clone()
    with pytest.raises(RuntimeError, match="non-finite calibration activations reach 'head.weight'"):
        prune_oneshot(model, _batches(2), "wanda", 0.5)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def _oneshot_on_rank(rank: int, world: int, init: str, out: str, method: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = Stack()
        masks = prune_oneshot(model, _batches(4)[rank::world], method, 0.5, block_size=8)  # each rank its half
        torch.save({"masks": masks, "weights": dict(model.state_dict())}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["sparsegpt", pytest.param("wanda", marks=pytest.mark.slow)])
def test_under_ddp_ranks_split_the_batches_and_end_identical_to_one_process(tmp_path, method):
    out = str(tmp_path / "oneshot")
    init = f"file://{tmp_path / 'rdv'}"
    torch.multiprocessing.spawn(_oneshot_on_rank, args=(2, init, out, method), nprocs=2)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    alone = Stack()
    masks = prune_oneshot(alone, [_batches(4)[i] for i in (0, 2, 1, 3)], method, 0.5, block_size=8)
    for name in masks:
        assert torch.equal(ranks[0]["masks"][name], ranks[1]["masks"][name])  # every rank the same
        assert torch.equal(ranks[0]["masks"][name], masks[name])  # and the one-process masks
    for name, value in alone.state_dict().items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name])
        assert torch.allclose(ranks[0]["weights"][name], value, atol=1e-5)  # statistics summed in another order


def test_a_target_no_calibration_batch_reaches_is_named_and_nothing_stays_pruned():
    class WithUnused(Stack):
        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Linear(16, 16)  # after the blocks, never called

    model = WithUnused()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="no calibration input reached 'unused.weight'"):
        prune_oneshot(model, _batches(2), "sparsegpt", 0.5, block_size=8)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), "the blocks pruned are restored"


def test_a_singular_hessian_from_fewer_tokens_than_inputs_is_coped_with_by_the_dampening():
    w, x = _data(rows=8, cols=32, n=4)  # rank 4 of 32: X^T X is singular
    h = _hessian(x)
    assert torch.linalg.matrix_rank(h) == 4
    new, kept = sparsegpt_prune(w, h, 0.5, block_size=8)
    assert torch.isfinite(new).all()
    assert abs(int((~kept).sum()) - w.numel() // 2) <= 4
    ref_new, ref_kept = _reference_sparsegpt(w, h, 0.5, None, 8)
    assert torch.equal(kept, ref_kept)
