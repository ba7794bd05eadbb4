import pytest
import torch

from lightning_prune.patterns import NM, Block, Channel, Unstructured, as_matrix, from_matrix, parse_pattern


@pytest.mark.parametrize(
    ("text", "kind", "name"),
    [
        ("unstructured", Unstructured, "unstructured"),
        ("1x1", Unstructured, "unstructured"),
        ("4x1", Block, "4x1"),
        ("1x4", Block, "1x4"),
        ("8x2", Block, "8x2"),
        ("channelx1", Channel, "channelx1"),
        ("1xchannel", Channel, "1xchannel"),
        ("2:4", NM, "2:4"),
        ("1:8", NM, "1:8"),
    ],
    ids=lambda v: str(v),
)
def test_parse(text, kind, name):
    pattern = parse_pattern(text)
    assert isinstance(pattern, kind)
    assert str(pattern) == name


@pytest.mark.parametrize("text", ["5x", "0x4", "4x0", "blocks", "2-4", "", "x1"])
def test_parse_rejects_unknown(text):
    with pytest.raises(ValueError, match=r"is not valid.*'NxM'.*'channelx1'.*'1xchannel'.*'N:M'.*'unstructured'"):
        parse_pattern(text)


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4"])
def test_parse_rejects_bad_nm(text):
    with pytest.raises(ValueError, match="N:M"):
        parse_pattern(text)


def test_parse_rejects_type():
    with pytest.raises(TypeError, match="pattern must be a str or a Pattern"):
        parse_pattern(4)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(6, 5), (8, 3, 3, 3), (4, 2, 5)], ids=str)
def test_matrix_view_roundtrip_and_cin_innermost(shape):
    t = torch.arange(torch.Size(shape).numel()).reshape(shape)
    m = as_matrix(t)
    assert m.shape == (shape[0], torch.Size(shape[1:]).numel())
    assert torch.equal(from_matrix(m, shape), t)
    if len(shape) == 4:  # consecutive columns walk input channels of one kernel position
        assert torch.equal(m[0, : shape[1]], t[0, :, 0, 0])


def test_block_partial_edges_are_units():
    pattern = Block(4, 3)
    scores = torch.rand(10, 7)  # neither dim divides the block
    units = pattern.unit_scores(scores)
    assert units.shape == (3, 3)
    sizes = pattern.unit_sizes((10, 7))
    assert int(sizes.sum()) == 70
    assert sizes[-1, -1] == 2 * 1
    assert torch.isclose(units[-1, -1], scores[8:, 6:].mean())
    pruned = torch.zeros(3, 3, dtype=torch.bool)
    pruned[-1, -1] = True
    mask = pattern.expand(pruned, scores)
    assert mask.sum() == 2 and mask[8:, 6:].all()


def test_channel_input_covers_all_filters_and_kernel_positions():
    pattern = Channel("input")
    scores = torch.rand(8, 5, 3, 3)
    pruned = torch.zeros(5, dtype=torch.bool)
    pruned[2] = True
    mask = pattern.expand(pruned, scores)
    assert mask[:, 2].all() and mask.sum() == 8 * 9
    assert torch.allclose(pattern.unit_scores(scores)[2], scores[:, 2].mean())


def test_channel_output_is_whole_filters():
    pattern = Channel("output")
    pruned = torch.tensor([True, False, False, True])
    mask = pattern.expand(pruned, torch.rand(4, 3, 2, 2))
    assert mask[0].all() and mask[3].all() and not mask[1:3].any()


def test_linear_channels_are_columns_and_rows():
    scores = torch.rand(4, 6)
    assert Channel("input").unit_scores(scores).shape == (6,)
    assert Channel("output").unit_scores(scores).shape == (4,)


@pytest.mark.parametrize("shape", [(6, 16), (4, 8, 3, 3)], ids=str)
def test_nm_prunes_n_lowest_per_group(shape):
    pattern = NM(2, 4)
    scores = torch.rand(shape)
    units = pattern.unit_scores(scores)
    mask = pattern.expand(torch.ones_like(units, dtype=torch.bool), scores)
    groups = as_matrix(mask).reshape(shape[0], -1, 4)
    assert (groups.sum(-1) == 2).all()
    # the pruned ones are the two lowest of their group
    s = as_matrix(scores).reshape(shape[0], -1, 4)
    lowest = s.topk(2, dim=-1, largest=False).values.max(-1).values
    assert torch.all(s[groups].reshape(*groups.shape[:2], 2).max(-1).values <= lowest + 0)


def test_nm_partial_group_is_proportional():
    pattern = NM(2, 4)
    scores = torch.rand(3, 10)  # groups of 4, 4 and a partial 2
    sizes = pattern.unit_sizes((3, 10))
    assert sizes[:, -1].tolist() == [1, 1, 1]
    mask = pattern.expand(torch.ones(3, 3, dtype=torch.bool), scores)
    assert mask[:, 8:].sum(-1).tolist() == [1, 1, 1]
    assert mask.sum() == 3 * 5


@pytest.mark.parametrize(
    "pattern", [Unstructured(), Block(4, 1), Block(2, 2), Channel("input"), Channel("output"), NM(2, 4)], ids=str
)
def test_conforms_detects_partial_units(pattern):
    scores = torch.rand(8, 8)
    units = pattern.unit_scores(scores)
    pruned_units = torch.zeros_like(units, dtype=torch.bool)
    pruned_units.view(-1)[0] = True
    keep = ~pattern.expand(pruned_units, scores)
    assert pattern.conforms(keep)
    broken = keep.clone()
    broken.view(-1)[-1] = False
    assert pattern.conforms(broken) == isinstance(pattern, Unstructured)


def test_max_sparsity():
    assert NM(1, 4).max_sparsity == 0.25
    assert Block(4, 1).max_sparsity == 1.0


@pytest.mark.parametrize("pattern", [Block(4, 1), Channel("input"), NM(2, 4)], ids=str)
def test_check_rejects_1d(pattern):
    with pytest.raises(ValueError, match="at least 2 dimensions.*'bn.weight'"):
        pattern.check("bn.weight", (16,))
