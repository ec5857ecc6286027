"""Learned rounding (SignRound, `rounding: learned`): the level spacing is the grid's step, the
learned codes lower a block's output error well below nearest rounding and never raise it, the
stored codes are the grid's own (bits per weight unchanged), GPTQ's codes are the starting point
for GPTQ, the artifact records it, loads back and is deterministic, and it is refused where it
cannot work."""

import pytest
import torch
from torch import nn

from lowbit.algos.gptq import GPTQConfig, gptq_quantize, gptq_quantize_rounded
from lowbit.algos.rtn import rtn_quantize
from lowbit.algos.signround import RoundConfig, learn_block_rounding, level_spacing
from lowbit.artifact import load, read_header
from lowbit.formats import GroupLayout, get_format
from lowbit.pipeline import quantize, save_job
from lowbit.recipe import Recipe, RecipeError
from lowbit.stream.quantize import StreamError, stream_quantize


class _Block(nn.Module):
    """Two linears with a nonlinearity between them: the error of the first reaches the output
    through the second, which per-layer rounding cannot see."""

    def __init__(self, g: torch.Generator) -> None:
        super().__init__()
        self.up = nn.Linear(64, 96, bias=False)
        self.down = nn.Linear(96, 64, bias=False)
        with torch.no_grad():
            self.up.weight.copy_(torch.randn(96, 64, generator=g) / 8)
            self.down.weight.copy_(torch.randn(64, 96, generator=g) / 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.up(x)))


def _block_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    block = _Block(g).eval().requires_grad_(False)
    x = torch.randn(4, 16, 64, generator=g)
    x[..., :3] *= 8  # a few strong input channels, as in LLMs
    inputs = [((x[:2],), {}), ((x[2:],), {})]
    with torch.no_grad():
        targets = [block(a[0]) for a, _ in inputs]
    return block, inputs, targets


def _mse(block, weights, inputs, targets) -> float:
    from torch.func import functional_call

    with torch.no_grad():
        return sum(float(torch.nn.functional.mse_loss(functional_call(block, weights, a, k), t))
                   for (a, k), t in zip(inputs, targets)) / len(inputs)


def test_level_spacing_is_the_integer_step():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    for name, sym in (("int3", False), ("int4", True)):
        grid = get_format(name, symmetric=sym) if sym else get_format(name)
        qw = rtn_quantize(w, grid, GroupLayout(8, 64, 32))
        torch.testing.assert_close(level_spacing(qw), qw.layout.expand(qw.params)["scale"].abs().expand(8, 64))


@pytest.mark.parametrize("fmt", ["int3", "nf4"])
def test_learned_codes_beat_nearest_rounding_on_the_block_output(fmt):
    block, inputs, targets = _block_problem()
    grid, layouts = get_format(fmt), {"up": GroupLayout(96, 64, 32), "down": GroupLayout(64, 96, 32)}
    weights = {n: getattr(block, n).weight for n in layouts}
    rtn = {n: rtn_quantize(w, grid, layouts[n]) for n, w in weights.items()}
    kept, record = learn_block_rounding(block, {n: (weights[n], rtn[n]) for n in rtn}, inputs, targets, 0.5,
                                        RoundConfig(steps=100, batch_size=2))
    nearest = _mse(block, {f"{n}.weight": q.dequantize() for n, q in rtn.items()}, inputs, targets)
    learned = _mse(block, {f"{n}.weight": q.dequantize() for n, q in kept.items()}, inputs, targets)
    assert record.loss_before == pytest.approx(nearest, rel=1e-4)  # it starts from nearest rounding
    assert record.kept and learned == pytest.approx(record.loss_after, rel=1e-4)
    assert learned < 0.85 * nearest  # the measured gain: about 0.6x here
    for n, q in kept.items():  # the grid's own codes and parameters: stored size unchanged
        assert q.params is rtn[n].params and q.codes.dtype == torch.uint8 and int(q.codes.max()) < 2**grid.bits
        assert q.bits_per_weight() == rtn[n].bits_per_weight()
        # every code moved by at most one level from nearest rounding (both grids' codes are in level order)
        assert (q.codes.int() - rtn[n].codes.int()).abs().max() <= 1


@pytest.mark.parametrize("act_order", [True, False, "auto"])
def test_gptq_rounded_values_encode_to_gptqs_codes(act_order):
    """The values GPTQ hands learned rounding are the ones it rounded: the grid's encoding of them
    is GPTQ's codes, bit for bit, and they differ from the float weight (the error feedback)."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(48, 64, generator=g), torch.randn(256, 64, generator=g)
    x[:, :4] *= 6
    grid, layout = get_format("int3"), GroupLayout(48, 64, 16)
    cfg = GPTQConfig(act_order=act_order, block_size=16)
    qw, rounded = gptq_quantize_rounded(w, 2 * x.T @ x / 256, grid, layout, cfg)
    assert torch.equal(qw.codes, gptq_quantize(w, 2 * x.T @ x / 256, grid, layout, cfg).codes)
    assert torch.equal(grid.encode(rounded, layout.expand(qw.params)), qw.codes)
    assert not torch.allclose(rounded, w)


def test_never_worse_than_its_start_and_starts_from_gptq():
    block, inputs, targets = _block_problem(1)
    grid, layout = get_format("int3"), GroupLayout(96, 64, 32)
    w = block.up.weight
    h = sum(2 * a[0].reshape(-1, 64).T @ a[0].reshape(-1, 64) for a, _ in inputs) / 64
    g, rounded = gptq_quantize_rounded(w, h + 1e-3 * torch.eye(64), grid, layout, GPTQConfig())
    kept, record = learn_block_rounding(block, {"up": (rounded, g)}, inputs, targets, 0.5,
                                        RoundConfig(steps=1, lr=0.5, batch_size=1))  # one wild step
    start = _mse(block, {"up.weight": g.dequantize()}, inputs, targets)
    assert record.loss_before == pytest.approx(start, rel=1e-4)  # v = 0 is GPTQ's answer
    assert record.loss_after <= record.loss_before
    if not record.kept:
        assert kept["up"] is g


def _recipe(calib_text, **extra) -> Recipe:
    return Recipe.from_dict({"method": "rtn", "format": "int3", "group_size": 32,
                             "calib": {"path": str(calib_text), "n_samples": 8, "seq_len": 64}, **extra})


def test_artifact_records_rounding_loads_and_is_deterministic(tiny_llama, calib_text, tmp_path):
    r = _recipe(calib_text, rounding="learned", signround={"steps": 20})
    assert r.needs_calibration and r.to_dict()["rounding"] == "learned"
    job = quantize(str(tiny_llama), r, show_progress=False)
    path = save_job(job, r, tmp_path / "a")
    rounding = read_header(path)["source"]["rounding"]
    assert rounding["method"] == "signround" and len(rounding["blocks"]) == 2
    assert all(b["loss_after"] <= b["loss_before"] for b in rounding["blocks"].values())
    assert any(b["kept"] for b in rounding["blocks"].values())
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load(path)(input_ids=ids).logits, job.loaded.model(input_ids=ids).logits)
    plain = quantize(str(tiny_llama), _recipe(calib_text), show_progress=False)
    assert job.report.modules["model.layers.0.mlp.up_proj"]["bpw"] == plain.report.modules["model.layers.0.mlp.up_proj"]["bpw"]
    again = save_job(quantize(str(tiny_llama), r, show_progress=False), r, tmp_path / "b")
    for f in ("lowbit.json", "quantized.safetensors", "dense.safetensors"):
        assert (path / f).read_bytes() == (again / f).read_bytes()


def test_off_by_default_and_refused_where_it_cannot_work(tiny_llama, calib_text, tmp_path):
    from lowbit.quantize import QuantizeError

    assert "rounding" not in Recipe().to_dict() and "signround" not in Recipe().to_dict()
    with pytest.raises(RecipeError, match="'rounding'"):
        Recipe.from_dict({"rounding": "stochastic"})
    with pytest.raises(RecipeError, match="'signround.steps'"):
        Recipe.from_dict({"rounding": "learned", "signround": {"steps": 0}})
    with pytest.raises(QuantizeError, match="refines RTN or GPTQ codes.*ptq161"):
        quantize(str(tiny_llama), _recipe(calib_text, method="ptq161", format="int4", rounding="learned"), show_progress=False)
    with pytest.raises(StreamError, match="rounding: learned"):
        stream_quantize(str(tiny_llama), _recipe(calib_text, rounding="learned"), tmp_path / "s")
