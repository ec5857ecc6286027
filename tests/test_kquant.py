"""K-quant grids (int4_k / int5_k / int6_k = llama.cpp's Q4_K / Q5_K / Q6_K): the super-block fit,
true storage, GPTQ on the super-block lattice, and GGUF export that gguf-py and llama.cpp decode
to lowbit's weights bit for bit, with llama.cpp's fallbacks for widths 256 does not divide."""

import numpy as np
import pytest
import torch

import lowbit
from lowbit.algos import gptq_quantize, rtn_quantize
from lowbit.algos.e2e_tune import TunableLinear
from lowbit.export import gguf_blocks
from lowbit.formats import GroupLayout, get_grid, grid_from_spec
from lowbit.formats.layout import GroupSizeError
from lowbit.nn import QuantLinear

from test_export_gguf import assert_decodes_exactly, cli, quantize, tiny256  # noqa: F401 (a fixture)

KQ = [("int4_k", "Q4_K", 4.5), ("int5_k", "Q5_K", 5.5), ("int6_k", "Q6_K", 6.5625)]


def layout_for(grid, out=16, width=512):
    return GroupLayout(out, width, grid.fixed_group_size)


def weights(out=16, width=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, width, generator=gen) * 0.02
    w *= torch.logspace(-1, 1, width // 32).repeat_interleave(32)  # blocks of a super-block at many scales
    w[0, :256] = 0.0  # an all-zero super-block
    w[1, 256:] = torch.rand(256, generator=gen) + 0.5  # a super-block with no negative weight
    return w


@pytest.mark.parametrize("name,ggml,bpw", KQ)
def test_storage_counts_every_bit(name, ggml, bpw):
    grid = get_grid(name)
    qw = rtn_quantize(weights(), grid, layout_for(grid))
    assert qw.bits_per_weight() == bpw  # codes + block scale/min codes + fp16 super-block scales
    layer = QuantLinear.from_quantized(qw, None)
    stored = sum(b.numel() * b.element_size() for b in layer.state_dict().values())
    assert stored == sum(qw.storage_bytes().values()) == 16 * 512 * bpw / 8
    back = layer.quantized_weight()
    assert torch.equal(back.codes, qw.codes) and all(torch.equal(back.params[k], qw.params[k]) for k in qw.params)
    x = torch.randn(3, 512)
    assert torch.allclose(layer(x), x @ qw.dequantize().T, atol=1e-5)
    again = grid_from_spec(grid.spec())
    assert (again.name, again.param_fields, again.fit_span) == (grid.name, grid.param_fields, grid.fit_span)


@pytest.mark.parametrize("name,ggml,bpw", KQ)
def test_fit_is_on_the_lattice_and_bounded(name, ggml, bpw):
    grid = get_grid(name)
    w = weights()
    qw = rtn_quantize(w, grid, layout_for(grid))
    p = qw.params
    assert torch.equal(p["d"], p["d"].half().float())
    assert torch.equal(p["d"][:, ::grid.fit_span].repeat_interleave(grid.fit_span, 1), p["d"])  # one d per 256
    assert torch.equal(p["sc"], p["sc"].round()) and p["sc"].min() >= 0 and p["sc"].max() < 2 ** (8 if name == "int6_k" else 6)
    assert torch.equal(qw.dequantize()[0, :256], torch.zeros(256))  # zero super-block stays zero
    # the error per weight is at most about one lattice step of its block: the block's own range / levels,
    # widened by rounding the block scale onto the super-block lattice (at most half a lattice step, d / 2)
    err = (qw.dequantize() - w).abs().reshape(16, -1, grid.fixed_group_size).amax(-1)
    span = (w.reshape(16, -1, grid.fixed_group_size).amax(-1) - w.reshape(16, -1, grid.fixed_group_size).amin(-1).clamp(max=0))
    levels = grid.maxq if grid.affine else 31
    d = p["d"].abs().reshape(16, -1)
    assert (err <= span / levels + grid.maxq * d + 1e-7).all()
    # and it beats the same-width symmetric int grid with fp16 scales per 32 (Q4_0-style) at the same or fewer bits
    same = get_grid(f"int{grid.bits}", symmetric=True)
    ref = rtn_quantize(w, same, GroupLayout(16, 512, 32))
    assert ((qw.dequantize() - w) ** 2).mean() < ((ref.dequantize() - w) ** 2).mean()


@pytest.mark.parametrize("name,ggml,bpw", KQ)
def test_gptq_beats_rtn_on_the_super_block_lattice(name, ggml, bpw):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 64, generator=gen) @ torch.randn(64, 512, generator=gen)  # correlated inputs
    h = 2 * x.T @ x / x.shape[0]
    w = weights(32)
    grid = get_grid(name)
    lay = layout_for(grid, 32)

    def err(q):
        d = w - q.dequantize()
        return float(((d @ h) * d).sum())

    rtn, gptq = err(rtn_quantize(w, grid, lay)), err(gptq_quantize(w, h, grid, lay))
    assert gptq < 0.9 * rtn, (gptq, rtn)


def test_widths_without_whole_super_blocks_are_refused():
    grid = get_grid("int4_k")
    with pytest.raises(GroupSizeError, match="multiple of 256.*gguf:q4_k"):
        rtn_quantize(torch.randn(4, 320), grid, GroupLayout(4, 320, 32))
    with pytest.raises(GroupSizeError, match="multiple of 256"):
        gptq_quantize(torch.randn(4, 320), torch.eye(320), grid, GroupLayout(4, 320, 32))


@pytest.mark.parametrize("name,ggml,bpw", KQ)
def test_blocks_decode_in_gguf_py_bit_for_bit(name, ggml, bpw):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    grid = get_grid(name)
    qw = rtn_quantize(weights(), grid, layout_for(grid))
    raw = gguf_blocks.pack_blocks(qw, ggml)
    assert raw.shape == (16, 2 * {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[ggml])
    got = dequantize(raw, GGMLQuantizationType[ggml]).astype(np.float32)
    assert torch.equal(torch.from_numpy(got), qw.dequantize())
    with pytest.raises(ValueError, match="format int"):
        gguf_blocks.pack_blocks(rtn_quantize(weights(), get_grid("int4", symmetric=True), GroupLayout(16, 512, 32)), ggml)


def test_tuning_keeps_super_block_scales_shared():
    grid = get_grid("int4_k")
    layer = QuantLinear.from_quantized(rtn_quantize(weights(), grid, layout_for(grid)), None)
    t = TunableLinear(layer)
    assert t.tuned["d"].shape == (16, 2)  # one trainable d per super-block, not per block
    with torch.no_grad():
        t.tuned["d"].mul_(1.01)
    QuantLinear.from_quantized(t.quantized_weight(), None)  # storable: d still one value per 256


@pytest.mark.parametrize("target,ggml,fallback", [("gguf:q4_k", "Q4_K", "Q5_0"), ("gguf:q5_k", "Q5_K", "Q5_1"),
                                                  ("gguf:q6_k", "Q6_K", "Q8_0")])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_targets_export_exactly_with_llama_cpp_fallbacks(tiny256, calib_text, tmp_path, target, ggml, fallback, method):
    art, out = tmp_path / "art", tmp_path / "m.gguf"
    res = quantize(tiny256, art, "--method", method, "--target", target, calib=calib_text)
    assert "model.layers.0.mlp.down_proj: input width 320 is not a multiple of the " in " ".join(res.output.split())
    header = lowbit.read_header(art)
    up = header["modules"]["model.layers.0.mlp.up_proj"]
    assert up["target"] == target and up["grid"]["format"] == f"int{ggml[1]}_k"
    assert cli("export", art, "--to", "gguf", "-o", out).exit_code == 0
    types = assert_decodes_exactly(art, out)
    assert types.pop("model.layers.0.mlp.down_proj") == fallback
    assert len(types) == 6 and set(types.values()) == {ggml}
