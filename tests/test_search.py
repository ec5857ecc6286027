"""Per-layer format search (LLM-FP4 splits x clipping, NUPES alpha): it picks the candidate with the
least output error, beats the fixed E2M1 grid on heavy tails, and artifacts store each layer's choice."""

import pytest
import torch

import lowbit
from lowbit.algos import GPTQConfig, gptq_quantize, output_error, rtn_quantize, search_format
from lowbit.artifact import read_header
from lowbit.formats import ClippedGrid, FormatOptionError, GroupLayout, SearchSpace, get_format, get_grid, grid_from_spec
from lowbit.models import load_model
from lowbit.pipeline import quantize, save_job
from lowbit.quantize import QuantizeError, quantize_model
from lowbit.recipe import Recipe


def layer(out=48, n_in=128, seed=0):
    """Heavy-tailed weights (Student-t, df 3) and a Hessian of correlated inputs with outlier channels."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(3.0).sample((out, n_in)) * 0.02
    x = torch.randn(1024, n_in, generator=gen) @ (torch.eye(n_in) + torch.randn(n_in, n_in, generator=gen) / n_in**0.5)
    x[:, :4] *= 10
    return w, 2 * x.T @ x / x.shape[0]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", ["fp4_search", "fp3_search", "power4_search", "power3_search"])
def test_search_picks_a_candidate_with_the_least_error(name):
    w, h = layer()
    space = get_format(name)
    layout = GroupLayout(*w.shape, 32)
    found = search_format(w, h, space, layout)
    errors = [output_error(w, rtn_quantize(w, g, layout).dequantize(), h) for g in space.candidates]
    assert found.rtn_errors == pytest.approx(errors)
    assert found.error == min(errors) and all(found.error <= e for e in errors)
    assert found.grid.spec() == space.candidates[found.chosen].spec()
    assert output_error(w, found.qw.dequantize(), h) == pytest.approx(found.error)
    assert found.qw.bits_per_weight() == rtn_quantize(w, get_grid(f"{name[:-7]}_e1m{int(name[2]) - 2}" if name.startswith("fp") else name[:-7]), layout).bits_per_weight()


def test_searched_fp4_beats_fixed_e2m1_on_heavy_tails():
    w, h = layer(seed=1)
    for g in (64, -1):
        layout = GroupLayout(*w.shape, g)
        e2m1 = output_error(w, rtn_quantize(w, get_grid("fp4_e2m1"), layout).dequantize(), h)
        found = search_format(w, h, get_format("fp4_search"), layout)
        assert found.error <= e2m1
    # whole rows of Student-t weights: more exponent bits (E3M0) win clearly
    assert found.error < 0.9 * e2m1 and found.grid.name == "fp4_e3m0"
    gptq_e2m1 = output_error(w, gptq_quantize(w, h, get_grid("fp4_e2m1"), layout).dequantize(), h)
    assert search_format(w, h, get_format("fp4_search"), layout, "gptq").error <= gptq_e2m1
    # Gaussian blocks: more mantissa (E1M2), clipped
    gauss = torch.randn(w.shape, generator=torch.Generator().manual_seed(3)) * 0.02
    layout = GroupLayout(*w.shape, 64)
    found = search_format(gauss, h, get_format("fp4_search"), layout)
    assert found.grid.name == "fp4_e1m2" and found.grid.spec().get("clip", 1.0) < 1.0
    assert found.error < 0.9 * output_error(gauss, rtn_quantize(gauss, get_grid("fp4_e2m1"), layout).dequantize(), h)


def test_gptq_search_refines_the_best_rtn_candidates():
    w, h = layer(seed=2)
    layout = GroupLayout(*w.shape, 32)
    space = get_format("power4_search", refine=2)
    found = search_format(w, h, space, layout, "gptq", GPTQConfig())
    best_rtn = sorted(range(len(found.rtn_errors)), key=lambda i: found.rtn_errors[i])[:2]
    assert sorted(found.gptq_errors) == sorted(best_rtn)
    assert found.error == min(found.gptq_errors.values())
    assert found.error < found.rtn_errors[found.chosen]  # GPTQ improves on RTN for the chosen grid
    again = gptq_quantize(w, h, space.candidates[found.chosen], layout)
    assert torch.equal(again.codes, found.qw.codes)  # deterministic


def test_clip_option_fits_a_smaller_scale_and_round_trips():
    w = torch.randn(8, 64)
    grid = get_grid("fp4_e2m1", clip=0.8)
    assert isinstance(grid, ClippedGrid)
    full = get_grid("fp4_e2m1").fit(w)["scale"]
    assert torch.allclose(grid.fit(w)["scale"], full * 0.8, rtol=1e-3)
    assert grid_from_spec(grid.spec()).spec() == grid.spec()
    codes = torch.arange(16, dtype=torch.uint8).repeat(8, 1)
    params = grid.fit(w)
    assert torch.equal(grid.encode(grid.decode(codes, params), params), codes)
    assert get_grid("nf4", clip=1.0).spec() == {"format": "nf4"}  # no-op clip is not recorded
    with pytest.raises(FormatOptionError, match="zero"):
        get_grid("int4", clip=0.9)
    with pytest.raises(FormatOptionError, match="only parameter"):
        get_grid("mxfp4", clip=0.9)


def test_search_spaces_and_their_options():
    fp4 = get_format("fp4_search")
    assert isinstance(fp4, SearchSpace) and fp4.bits == 4 and len(fp4.candidates) == 3 * 7
    assert {g.name for g in fp4.candidates} == {"fp4_e1m2", "fp4_e2m1", "fp4_e3m0"}
    assert {g.name for g in get_format("fp3_search").candidates} == {"fp3_e1m1", "fp3_e2m0"}
    power = get_format("power3_search", alphas=[1.0, 2.0], clips=[1.0])
    assert [g.spec() for g in power.candidates] == [{"format": "power3", "alpha": 1.0}, {"format": "power3", "alpha": 2.0}]
    assert get_format("int4").name == "int4"  # a plain name is a grid
    for bad in ({"refine": 0}, {"clips": []}, {"clips": [1.2]}, {"splits": "e2m1"}, {"alphas": [1]}):
        with pytest.raises(FormatOptionError):
            get_format("fp4_search", **bad)


def test_artifact_stores_each_layers_choice(tiny_llama, calib_text, tmp_path):
    r = Recipe(method="rtn", format="fp4_search", format_options={"clips": [1.0, 0.8]}, group_size=32,
               calib={"path": str(calib_text), "n_samples": 4, "seq_len": 64})
    job = quantize(str(tiny_llama), r, show_progress=False)
    path = save_job(job, r, tmp_path / "a")
    header = read_header(path)
    candidates = [g.spec() for g in r.grid().candidates]
    for name, m in header["modules"].items():
        assert m["grid"] in candidates
        assert m["grid"] == job.report.modules[name]["search"]["chosen"]
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(job.loaded.model(input_ids=ids).logits, lowbit.load(path)(input_ids=ids).logits)
    loaded = load_model(str(tiny_llama))
    with pytest.raises(QuantizeError, match="calibration"):
        quantize_model(loaded.model, r, loaded.kind, None, show_progress=False)
