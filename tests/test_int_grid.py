import pytest
import torch

from lowbit.formats import GroupLayout, IntGrid, IntMinGrid, get_grid
from lowbit.formats.layout import GroupSizeError
from lowbit.formats.registry import UnknownFormatError


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
def test_grid_points_round_trip_exactly(bits, symmetric):
    grid = IntGrid(bits, symmetric)
    w = torch.randn(16, 64)
    params = grid.fit(w)
    codes = torch.arange(2**bits, dtype=torch.uint8).repeat(16, 1)  # every code, every row
    points = grid.decode(codes, params)
    assert torch.equal(grid.encode(points, params), codes)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
def test_error_is_at_most_half_a_step_inside_the_range(bits, symmetric):
    grid = IntGrid(bits, symmetric)
    w = torch.randn(32, 128)
    params = grid.fit(w)
    err = (grid.quantize(w, params) - w).abs()
    step = params["scale"].abs().expand_as(w)  # a symmetric scale is negative where the block's largest weight is positive
    zero = 2 ** (bits - 1) if symmetric else params["zero"]
    a, b = (0 - zero) * params["scale"], (2**bits - 1 - zero) * params["scale"]
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    inside = (w >= lo) & (w <= hi)
    assert inside.float().mean() > 0.9
    assert (err[inside] <= step[inside] / 2 * (1 + 1e-5)).all()
    # outside, only the rounding of the zero point and of the fp16 scale can clip: about one step
    assert (err <= step * 1.25).all()


@pytest.mark.parametrize("bits", range(2, 9))
def test_symmetric_fit_puts_the_largest_weight_on_the_extra_level(bits):
    """ggml's Q4_0 rule: the weight of largest magnitude decodes exactly (up to the fp16 scale) at
    code 0, whichever its sign, and no weight clips by a step or more."""
    grid = IntGrid(bits, symmetric=True)
    w = torch.randn(64, 32)
    w[::2] *= -1
    params = grid.fit(w)
    codes = grid.encode(w, params)
    idx = w.abs().argmax(dim=1, keepdim=True)
    assert (codes.gather(1, idx) == 0).all()
    top = w.gather(1, idx)
    assert torch.allclose(grid.decode(codes, params).gather(1, idx), top, rtol=1e-3)
    assert ((grid.quantize(w, params) - w).abs() < params["scale"].abs()).all()
    # against the GPTQ convention (2 * absmax / (2^b - 1), extra level always negative): lower error
    old = torch.where(w.abs().amax(1, keepdim=True) > 0, 2 * w.abs().amax(1, keepdim=True) / (2**bits - 1), 1.0)
    old_q = ((torch.round(w / old) + 2 ** (bits - 1)).clamp(0, 2**bits - 1) - 2 ** (bits - 1)) * old
    assert ((grid.quantize(w, params) - w) ** 2).mean() < ((old_q - w) ** 2).mean()


def test_parameters_are_fp16_exact():
    grid = IntGrid(4)
    params = grid.fit(torch.randn(8, 32) * 1e-3)
    assert torch.equal(params["scale"], params["scale"].half().float())
    assert torch.equal(params["zero"], params["zero"].round())


def test_constant_block_decodes_without_nan():
    grid = IntGrid(4, symmetric=True)
    w = torch.zeros(2, 8)
    assert torch.equal(grid.quantize(w, grid.fit(w)), w)


def test_more_bits_less_error():
    w = torch.randn(64, 256)
    errs = [((IntGrid(b).quantize(w, IntGrid(b).fit(w)) - w) ** 2).mean() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


@pytest.mark.parametrize("bits", [4, 5])
def test_min_grid_needs_no_zero_in_its_range(bits):
    """int{b}_min: w = scale * q + min with fp16 scale and min; a block far from 0 still gets the full
    2^b levels, the error is at most about half a step, and the decode is the GGUF Q4_1 / Q5_1 one."""
    grid = IntMinGrid(bits)
    w = 5.0 + torch.rand(16, 32)  # all in [5, 6]: an int grid with an integer zero point wastes most levels
    params = grid.fit(w)
    assert torch.equal(params["min"], params["min"].half().float()) and (params["min"] > 4.9).all()
    assert torch.equal(params["scale"], params["scale"].half().float())
    codes = grid.encode(w, params)
    err = (grid.decode(codes, params) - w).abs()
    assert (err <= params["scale"] * 0.51 + 4e-3).all()  # fp16 rounding of min and scale: a little more than half
    expected = codes.float() * params["scale"]  # multiply, round, then add: as ggml decodes
    assert torch.equal(grid.decode(codes, params), expected + params["min"])
    assert ((IntGrid(bits).quantize(w, IntGrid(bits).fit(w)) - w) ** 2).mean() > 4 * (err**2).mean()
    assert get_grid(f"int{bits}_min").name == f"int{bits}_min" and grid.spec() == {"format": f"int{bits}_min"}


def test_registry_names_and_errors():
    assert get_grid("int3").bits == 3
    assert get_grid("INT8", symmetric=True).symmetric
    with pytest.raises(UnknownFormatError, match="unknown format 'int9'"):
        get_grid("int9")


def test_ragged_rule_short_last_group():
    layout = GroupLayout(4, 576, 128)
    assert layout.n_groups == 5
    assert layout.group_columns(4) == slice(512, 576)
    w = torch.randn(4, 576)
    grid = IntGrid(4)
    params = layout.fit(grid, w)
    assert params["scale"].shape == (4, 5)
    # the short group is fitted on its own 64 columns
    tail = grid.fit(w[:, 512:])
    assert torch.equal(params["scale"][:, 4:], tail["scale"])


def test_ragged_error_rule_and_bad_sizes():
    with pytest.raises(GroupSizeError, match="does not divide the input width 576"):
        GroupLayout(4, 576, 128, ragged="error")
    with pytest.raises(GroupSizeError, match="not valid"):
        GroupLayout(4, 576, -2)


def test_per_tensor_and_per_channel_layouts():
    w = torch.randn(8, 32)
    grid = IntGrid(8)
    t = GroupLayout(8, 32, 0)
    assert t.fit(grid, w)["scale"].shape == (1, 1)
    c = GroupLayout(8, 32, -1)
    assert c.fit(grid, w)["scale"].shape == (8, 1)
    assert (t.decode(grid, t.encode(grid, w, t.fit(grid, w)), t.fit(grid, w)) - w).abs().max() < 0.05
