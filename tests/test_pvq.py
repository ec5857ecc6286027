"""Pyramid vector quantization (`pvqNkKaB`, Fischer's PVQ as in "Pyramid Vector Quantization for
LLMs"): the enumeration is an exact bijection between the pyramid's points and [0, V(N, K)), the
count agrees with the closed form, indices fit their bit budget, the search finds (nearly) the
best direction, GPTQ's error feedback beats coding each vector alone and scalar int2 with fewer
bits, and an artifact loads back, is deterministic and is refused where pyramid codes cannot go."""

import itertools
from math import comb

import pytest
import torch
from conftest import correlated_layer

from lowbit.algos import gptq_quantize
from lowbit.algos.gptq import output_error
from lowbit.algos.pvq import pvq_quantize, pyramid_search
from lowbit.artifact import load, read_header
from lowbit.formats import GroupLayout, get_format, get_grid
from lowbit.formats.pvq import PVQFormat, pyramid_counts
from lowbit.pipeline import quantize, save_job
from lowbit.recipe import Recipe, RecipeError


def _points(n: int, k: int) -> torch.Tensor:
    return torch.tensor([p for p in itertools.product(range(-k, k + 1), repeat=n) if sum(map(abs, p)) == k])


@pytest.mark.parametrize("n,k", [(1, 3), (2, 5), (3, 4), (4, 3), (5, 2)])
def test_enumeration_is_a_bijection_onto_the_indices(n, k):
    fmt = PVQFormat(n, k, 4)
    pts = _points(n, k)
    assert fmt.count == len(pts)
    idx = fmt.encode(pts)
    assert sorted(idx.tolist()) == list(range(fmt.count))
    assert torch.equal(fmt.decode(idx), pts)


def test_counts_match_the_closed_form_and_indices_fit_the_budget():
    closed = lambda n, k: sum(2**i * comb(n, i) * comb(k - 1, i - 1) for i in range(1, min(n, k) + 1))  # noqa: E731
    v = pyramid_counts(16, 12)
    assert all(v[n][k] == closed(n, k) for n in range(1, 17) for k in range(1, 13))
    fmt = get_format("pvq2")
    assert fmt == PVQFormat(16, 9, 4) and fmt.count == closed(16, 9) and fmt.index_bits == 27
    assert 2 ** (fmt.index_bits - 1) < fmt.count <= 2**fmt.index_bits
    idx = torch.randint(0, fmt.count, (20_000,), generator=torch.Generator().manual_seed(0))
    y = fmt.decode(idx)
    assert bool((y.abs().sum(1) == 9).all()) and torch.equal(fmt.encode(y), idx)
    with pytest.raises(ValueError, match="outside"):
        fmt.decode(torch.tensor([fmt.count]))
    with pytest.raises(ValueError, match="32-bit"):
        PVQFormat(32, 9, 4)


def test_search_finds_the_best_direction_nearly_always():
    x = torch.randn(2000, 4, generator=torch.Generator().manual_seed(0))
    pts = _points(4, 5).float()
    best = (x @ (pts / pts.norm(dim=1, keepdim=True)).T).max(1).values  # brute force over all 192... points
    y = pyramid_search(x, 5)
    assert bool((y.abs().sum(1) == 5).all())
    got = (x * (y.float() / y.float().norm(dim=1, keepdim=True))).sum(1)
    assert bool((got <= best + 1e-5).all())
    assert float((got / best).mean()) > 0.999 and float((got >= best - 1e-5).float().mean()) > 0.95


def test_error_feedback_beats_each_vector_alone_and_scalar_int2():
    w, h = correlated_layer()
    fmt = get_format("pvq2")
    gptq, alone = pvq_quantize(w, fmt, h, "gptq"), pvq_quantize(w, fmt, h, "rtn")
    int2 = gptq_quantize(w, h, get_grid("int2"), GroupLayout(256, 512, 64))
    assert output_error(w, gptq.dequantize(), h) < 0.8 * output_error(w, alone.dequantize(), h)
    assert output_error(w, gptq.dequantize(), h) < output_error(w, int2.dequantize(), h)
    # everything stored: 27-bit index + 4-bit amplitude per 16 weights, an fp16 scale per row
    assert gptq.bits_per_weight() == pytest.approx((256 * 32 * 31 + 256 * 16) / (256 * 512), abs=1 / (256 * 512))
    assert gptq.bits_per_weight() < int2.bits_per_weight()


def test_pvq_artifact_loads_and_is_deterministic(tiny_llama, calib_text, tmp_path):
    from lowbit.export import ExportError, export_artifact

    r = Recipe.from_dict({"method": "gptq", "format": "pvq8k5a3", "calib": {"path": str(calib_text), "n_samples": 4, "seq_len": 64}})
    job = quantize(str(tiny_llama), r, show_progress=False)
    path = save_job(job, r, tmp_path / "a")
    entry = read_header(path)["modules"]["model.layers.0.mlp.down_proj"]
    assert entry["kind"] == "pvq-linear" and entry["grid"] == {"format": "pvq8k5a3"}
    out_f, in_f = entry["shape"]
    n = out_f * in_f // 8
    assert entry["bpw"] == pytest.approx(8 * (-(-n * 14 // 8) + -(-n * 3 // 8) + 2 * out_f) / (out_f * in_f))
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load(path)(input_ids=ids).logits, job.loaded.model(input_ids=ids).logits)
    again = save_job(quantize(str(tiny_llama), r, show_progress=False), r, tmp_path / "b")
    assert (path / "quantized.safetensors").read_bytes() == (again / "quantized.safetensors").read_bytes()
    with pytest.raises(ExportError, match="pvq-linear"):
        export_artifact(path, "compressed-tensors", tmp_path / "ct")
    with pytest.raises(RecipeError, match="vector formats"):
        Recipe.from_dict({"format": "pvq2", "rotate": "hadamard"})
