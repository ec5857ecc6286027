"""Vector codebook formats (`vq{d}x{k}`, VPTQ/GPTVQ-style): k-means beats the best scalar quantizer
at the same rate on a Gaussian, the second-order assignment beats the nearest codeword and scalar
GPTQ int2 on a layer's output error with fewer bits, every stored byte is counted, and an artifact
loads back, is deterministic and is refused where a codebook cannot go."""

import pytest
import torch
from conftest import correlated_layer

from lowbit.algos import gptq_quantize
from lowbit.algos.gptq import output_error
from lowbit.algos.kmeans import assign, kmeans
from lowbit.algos.vq import vq_quantize
from lowbit.artifact import load, read_header
from lowbit.formats import GroupLayout, get_format, get_grid
from lowbit.formats.vq import VQFormat
from lowbit.pipeline import quantize, save_job
from lowbit.recipe import Recipe, RecipeError

LLOYD_MAX_2BIT = 0.1175  # MSE of the optimal 4-level scalar quantizer of N(0, 1)


def test_kmeans_beats_the_best_scalar_quantizer_at_two_bits_per_dimension():
    x = torch.randn(60_000, 4, generator=torch.Generator().manual_seed(0))
    c = kmeans(x, 256, seed=0)  # 8 bits per 4 dimensions
    mse = float((x - c[assign(x, torch.ones_like(x), c)]).pow(2).mean())
    assert mse < 0.9 * LLOYD_MAX_2BIT
    assert torch.equal(c, kmeans(x, 256, seed=0))


def test_second_order_assignment_beats_nearest_and_scalar_int2():
    w, h = correlated_layer()
    fmt = VQFormat(4, 8)
    nearest = vq_quantize(w, fmt, h, "rtn")
    gptq = vq_quantize(w, fmt, h, "gptq")
    int2 = gptq_quantize(w, h, get_grid("int2"), GroupLayout(256, 512, 64))
    assert output_error(w, gptq.dequantize(), h) < 0.8 * output_error(w, nearest.dequantize(), h)
    assert output_error(w, gptq.dequantize(), h) < 0.45 * output_error(w, int2.dequantize(), h)
    assert gptq.bits_per_weight() < int2.bits_per_weight()
    # everything stored: 8-bit indices per 4 weights, a 256 x 4 fp16 codebook, an fp16 scale per row
    assert gptq.bits_per_weight() == pytest.approx((256 * 128 * 8 + 256 * 4 * 16 + 256 * 16) / (256 * 512))
    assert gptq.codebook.equal(gptq.codebook.half().float()) and gptq.scales.equal(gptq.scales.half().float())


def test_group_scales_follow_column_groups_of_different_size():
    """Scales per group of columns (the recipe's group size) follow a block of outlier weights (some
    rows, one group of columns: as in SmolLM2's layer-0 o_proj), which one scale per row cannot;
    every scale is counted, a short last group too."""
    w, h = correlated_layer()
    w[:32, 128:192] *= 20
    fmt = VQFormat(4, 8)
    per_row, per_64 = vq_quantize(w, fmt, h, "gptq"), vq_quantize(w, fmt, h, "gptq", group_size=64)
    assert output_error(w, per_64.dequantize(), h) < 0.7 * output_error(w, per_row.dequantize(), h)
    assert per_64.scales.shape == (256, 8)
    assert per_64.bits_per_weight() == pytest.approx((256 * 128 * 8 + 256 * 4 * 16 + 256 * 8 * 16) / (256 * 512))
    ragged = vq_quantize(w[:, :480], fmt, None, "rtn", group_size=128)  # groups of 128, 128, 128, 96
    assert ragged.scales.shape == (256, 4)
    assert ragged.bits_per_weight() == pytest.approx((256 * 120 * 8 + 256 * 4 * 16 + 256 * 4 * 16) / (256 * 480))
    tail = w[:, 384:480]
    assert torch.allclose(ragged.scales[:, 3], tail.pow(2).mean(1).sqrt(), rtol=1e-3)
    with pytest.raises(ValueError, match="multiple of 4"):
        vq_quantize(w, fmt, h, "gptq", group_size=66)


def test_codebooks_beyond_256_entries_store_wide_indices_exactly():
    """vq3x9 (512 codewords, 3 bits per weight): 9-bit indices packed and read back bit-exactly
    through VQLinear; a larger codebook at the same dimension lowers the error."""
    from lowbit.nn import VQLinear

    w, h = correlated_layer()
    w = w[:, :510]
    h = h[:510, :510]
    wide = vq_quantize(w, VQFormat(3, 9), h, "gptq")
    assert int(wide.codes.max()) > 255
    layer = VQLinear.from_quantized(wide, None)
    assert layer.codes.numel() == -(-256 * 170 * 9 // 8)
    assert torch.equal(layer.quantized_weight().codes, wide.codes)
    assert torch.equal(layer.quantized_weight().dequantize(), wide.dequantize())
    narrow = vq_quantize(w, VQFormat(3, 6), h, "gptq")
    assert output_error(w, wide.dequantize(), h) < 0.5 * output_error(w, narrow.dequantize(), h)


def test_formats_and_refusals():
    assert get_format("vq2") == VQFormat(4, 8) and get_format("vq3") == VQFormat(2, 6)
    assert get_format("vq3x9") == VQFormat(3, 9)
    with pytest.raises(ValueError, match="2\\^12"):
        VQFormat(4, 13)
    with pytest.raises(ValueError, match="do not tile"):
        VQFormat(4, 8).check_width(66)
    vptq = Recipe.from_dict({"method": "vptq", "format": "rvq8x8s2o1"})
    assert (vptq.method, vptq.format) == ("gptq", "rvq8x8s2o1")
    assert Recipe.from_dict({"method": "vptq"}).format == "vq2"
    assert Recipe.from_dict({"format": "vq2", "gptq": {"sweeps": 2}}).to_dict()["gptq"]["sweeps"] == 2
    assert "sweeps" not in Recipe.from_dict({"format": "vq2"}).to_dict()["gptq"]  # artifacts read as before
    with pytest.raises(RecipeError, match="sweeps"):
        Recipe.from_dict({"format": "int4", "gptq": {"sweeps": 2}})
    with pytest.raises(RecipeError, match="vector codebooks"):
        Recipe.from_dict({"method": "vptq", "format": "int4"})
    for bad in ({"rotate": "hadamard"}, {"method": "ptq161"}, {"scaling": "awq"}):
        with pytest.raises(RecipeError, match="vector formats"):
            Recipe.from_dict({"format": "vq2", **bad})


def test_vq_artifact_loads_and_is_deterministic(tiny_llama, calib_text, tmp_path):
    from lowbit.export import ExportError, export_artifact

    r = Recipe.from_dict({"method": "gptq", "format": "vq2", "group_size": 32,
                          "calib": {"path": str(calib_text), "n_samples": 4, "seq_len": 64}})
    job = quantize(str(tiny_llama), r, show_progress=False)
    path = save_job(job, r, tmp_path / "a")
    entry = read_header(path)["modules"]["model.layers.0.mlp.down_proj"]
    assert entry["kind"] == "vq-linear" and entry["grid"] == {"format": "vq4x8"} and entry["group_size"] == 32
    out_f, in_f = entry["shape"]
    n_groups = -(-in_f // 32)
    assert entry["bpw"] == pytest.approx(8 * (out_f * in_f // 4 + 256 * 4 * 2 + 2 * out_f * n_groups) / (out_f * in_f))
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load(path)(input_ids=ids).logits, job.loaded.model(input_ids=ids).logits)
    again = save_job(quantize(str(tiny_llama), r, show_progress=False), r, tmp_path / "b")
    assert (path / "quantized.safetensors").read_bytes() == (again / "quantized.safetensors").read_bytes()
    with pytest.raises(ExportError, match="vq-linear"):
        export_artifact(path, "compressed-tensors", tmp_path / "ct")


@pytest.mark.parametrize("fmt", ["vq2", "rvq4x6s2o2"])
def test_tuning_trains_the_codebooks_and_lowers_the_kl(tiny_llama, calib_text, fmt):
    """PV-Tuning's continuous step: codebooks and row scales trained end to end (codes fixed) lower
    the KL on the calibration windows; the stored values stay fp16."""
    from lowbit.algos.e2e_tune import heldout_kl
    from lowbit.calib.text import random_windows, read_text
    from lowbit.models import load_model

    base = {"method": "gptq", "format": fmt, "calib": {"path": str(calib_text), "n_samples": 8, "seq_len": 64}}
    plain = quantize(str(tiny_llama), Recipe.from_dict(base), show_progress=False)
    tuned = quantize(str(tiny_llama), Recipe.from_dict({**base, "tune": {"steps": 20, "batch_size": 4, "lr": 1e-3}}),
                     show_progress=False)
    assert tuned.report.tune["layers"] == 14
    ref = load_model(str(tiny_llama))
    ids = random_windows(ref.tokenizer, read_text(str(calib_text)), 64, 8, seed=0)
    assert heldout_kl(ref.model, tuned.loaded.model, ids, 4) < 0.95 * heldout_kl(ref.model, plain.loaded.model, ids, 4)
    layer = tuned.loaded.model.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.codebook.dtype == torch.float16
    assert torch.equal(layer.codes, plain.loaded.model.get_submodule("model.layers.0.mlp.down_proj").codes)


def test_a_residual_stage_codes_what_the_first_left_and_every_codebook_is_counted():
    """RVQ (`rvq4x8s2`): a second 256-entry stage on the residual cuts GPTQ-VQ's output error far
    below one stage's; two indices per vector and two fp16 codebooks are stored and counted, and the
    stage indices read back bit-exactly through VQLinear."""
    from lowbit.nn import VQLinear

    w, h = correlated_layer()
    one, two = vq_quantize(w, get_format("vq4x8"), h, "gptq"), vq_quantize(w, get_format("rvq4x8s2"), h, "gptq")
    assert output_error(w, two.dequantize(), h) < 0.2 * output_error(w, one.dequantize(), h)
    assert two.codes.shape == (256, 256) and two.codebook.shape == (512, 4)
    assert two.bits_per_weight() == pytest.approx((256 * 128 * 2 * 8 + 2 * 256 * 4 * 16 + 256 * 16) / (256 * 512))
    # the format's sum: stage 0 from the first 256 codewords, stage 1 from the next 256
    c = two.codes.long().reshape(256, 128, 2)
    by_hand = (two.codebook[c[..., 0]] + two.codebook[256 + c[..., 1]]).reshape(256, 512) * two.column_scales()
    assert torch.equal(two.dequantize(), by_hand)
    layer = VQLinear.from_quantized(two, None)
    assert torch.equal(layer.quantized_weight().dequantize(), two.dequantize())


def test_group_residual_codebooks_fit_rows_that_differ():
    """GRVQ (`grvq4x6s1g2`): rows of two kinds (vectors along (1,1,1,1) in the first half, along
    (1,-1,1,-1) in the second) get a codebook each, which beats one codebook shared by both at the
    cost of one more codebook; each half's codes index its own codebook."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(128, 128, 1, generator=g)
    a = t * torch.tensor([1.0, 1.0, 1.0, 1.0]) + 0.1 * torch.randn(128, 128, 4, generator=g)
    b = t * torch.tensor([1.0, -1.0, 1.0, -1.0]) + 0.1 * torch.randn(128, 128, 4, generator=g)
    w = torch.cat([a, b]).reshape(256, 512)
    shared, grouped = vq_quantize(w, get_format("vq4x6"), None, "rtn"), vq_quantize(w, get_format("grvq4x6s1g2"), None, "rtn")
    err = lambda q: float((q.dequantize() - w).pow(2).mean())  # noqa: E731
    assert err(grouped) < 0.8 * err(shared)
    assert grouped.bits_per_weight() - shared.bits_per_weight() == pytest.approx(64 * 4 * 16 / (256 * 512))
    first, second = grouped.codebook[:64], grouped.codebook[64:]
    assert float((first[:, 0] * first[:, 1]).mean()) > 0 > float((second[:, 0] * second[:, 1]).mean())
    assert get_format("grvq4x6s1g2").name == "grvq4x6s1g2" and get_format("rvq8x8s2") == VQFormat(8, 8, 2)
    with pytest.raises(ValueError, match="4 groups"):
        vq_quantize(w[:3], get_format("grvq4x6s1g4"), None, "rtn")


@pytest.mark.parametrize("fmt", ["grvq4x6s2g2", "rvq4x6s2o2"])
def test_residual_and_outlier_artifacts_load_to_the_same_logits(tiny_llama, calib_text, tmp_path, fmt):
    r = Recipe.from_dict({"method": "gptq", "format": fmt, "group_size": 32,
                          "calib": {"path": str(calib_text), "n_samples": 4, "seq_len": 64}})
    job = quantize(str(tiny_llama), r, show_progress=False)
    path = save_job(job, r, tmp_path / "a")
    entry = read_header(path)["modules"]["model.layers.0.mlp.down_proj"]
    assert entry["grid"] == {"format": fmt}
    out_f, in_f = entry["shape"]
    n_out = get_format(fmt).outlier_columns(in_f)
    stored = out_f * in_f // 4 * 2 * 6 / 8 + 4 * 64 * 4 * 2 + 2 * out_f * -(-in_f // 32) + 4 * n_out
    assert entry["bpw"] == pytest.approx(8 * stored / (out_f * in_f), rel=1e-3)
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load(path)(input_ids=ids).logits, job.loaded.model(input_ids=ids).logits)


def test_an_outlier_codebook_takes_the_salient_columns():
    """VPTQ's outlier elimination (`vq4x8o2`): four input columns carrying most of the output
    energy (large Hessian diagonal) get a codebook of their own, which lowers GPTQ-VQ's output error
    well below one shared codebook's; their indices and codebook are stored and counted, and the
    weight reads back through VQLinear bit-exactly."""
    from lowbit.nn import VQLinear

    w, h = correlated_layer()
    heavy = torch.tensor([3, 100, 101, 400])
    w[:, heavy] *= 8.0
    h[heavy, heavy] *= 30.0  # diagonal only: still positive definite
    plain, split = vq_quantize(w, get_format("vq4x8"), h, "gptq"), vq_quantize(w, get_format("vq4x8o1"), h, "gptq")
    assert split.columns.tolist() == heavy.tolist()  # 1% of 512 -> one 4-dim vector
    assert output_error(w, split.dequantize(), h) < 0.7 * output_error(w, plain.dequantize(), h)
    assert split.bits_per_weight() - plain.bits_per_weight() == pytest.approx((256 * 4 * 16 + 4 * 32) / (256 * 512))
    layer = VQLinear.from_quantized(split, None)
    assert torch.equal(layer.columns, heavy.int())
    assert torch.equal(layer.quantized_weight().dequantize(), split.dequantize())
    # the stored order is "outlier columns, then the rest": undone exactly at dequantization
    assert torch.equal(split.column_order()[:4], heavy)
    with pytest.raises(ValueError, match="outlier"):
        VQFormat(4, 8, outlier_pct=60)


@pytest.mark.parametrize("fmt", ["vq4x8", "grvq4x6s2g2o2"])
def test_coordinate_descent_sweeps_lower_the_layer_error(fmt):
    """`gptq.sweeps`: each vector's codeword re-chosen with all others fixed on tr((W-Q)H(W-Q)^T).
    The current codeword is a candidate, so a sweep never raises the error; here two lower it by
    more than 5% below GPTQ's single pass, and more sweeps never do worse than fewer."""
    from lowbit.algos.gptq import GPTQConfig

    w, h = correlated_layer()
    errs = [output_error(w, vq_quantize(w, get_format(fmt), h, "gptq", GPTQConfig(sweeps=n)).dequantize(), h)
            for n in (0, 1, 2)]
    assert errs[2] <= errs[1] <= errs[0]
    assert errs[2] < 0.95 * errs[0]
