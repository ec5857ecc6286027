"""Activation-aware scaling (AWQ, `scaling: awq`): folding leaves the float model's function
unchanged (grouped-query attention included), the search never loses to no scaling on its loss and
wins clearly where a few input channels dominate, the artifact records it and loads back, and it
is refused where it cannot work."""

import pytest
import torch

from lowbit.algos.awq import AWQConfig, fold_scales, llama_scale_groups, search_scales
from lowbit.algos.rtn import rtn_quantize
from lowbit.artifact import load, read_header
from lowbit.formats import GroupLayout, get_format
from lowbit.models import load_model
from lowbit.pipeline import quantize, save_job
from lowbit.recipe import Recipe, RecipeError
from lowbit.stream.quantize import StreamError, stream_quantize


def _rtn(grid, layout):
    return lambda _name, w: rtn_quantize(w, grid, layout).dequantize()


def _loss(w, w_hat, h):
    d = (w - w_hat).double()
    return float(((d @ h.double()) * d).sum())


def _outlier_layer(seed: int = 0):
    """w: [64, 128] and the Hessian of inputs whose first 4 channels are 30x larger."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=g)
    x = torch.randn(2048, 128, generator=g)
    x[:, :4] *= 30.0
    return w, 2 * x.T @ x / x.shape[0]


def test_search_never_loses_to_no_scaling_and_wins_on_outlier_channels():
    grid, layout = get_format("int3"), GroupLayout(64, 128, 32)
    w, h = _outlier_layer()
    s, alpha, before, after = search_scales({"l": w}, h, _rtn(grid, layout), group_size=32)
    assert after <= before
    assert before == pytest.approx(_loss(w, _rtn(grid, layout)("l", w), h), rel=1e-5)  # ranked in float32
    assert alpha is not None and after < 0.7 * before  # the outlier channels get a finer grid
    assert after == pytest.approx(_loss(w, _rtn(grid, layout)("l", w * s) / s, h), rel=1e-5)  # the loss it reports
    # isotropic inputs and weights: nothing to gain, and s = 1 stays a candidate
    g = torch.Generator().manual_seed(1)
    w2 = torch.randn(64, 128, generator=g)
    _, _, b2, a2 = search_scales({"l": w2}, 2 * torch.eye(128), _rtn(grid, layout), config=AWQConfig(grid=4))
    assert a2 <= b2


def test_folding_keeps_the_float_model(tiny_llama):
    """Every group of both blocks folded with random scales: logits unchanged (GQA: 4 query heads, 2 kv heads)."""
    model = load_model(str(tiny_llama)).model
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    n = 0
    for i, block in enumerate(model.model.layers):
        groups = llama_scale_groups(block, f"model.layers.{i}")
        assert [g.prev.rsplit(".", 1)[1] for g in groups] == ["input_layernorm", "v_proj", "post_attention_layernorm", "up_proj"]
        for g in groups:
            channels = g.heads[0] * g.heads[2] if g.heads else model.get_submodule(g.layers[0]).in_features
            s = torch.rand(channels, generator=torch.Generator().manual_seed(n)) * 3 + 0.2
            fold_scales(model, g, s, torch.float32)
            n += 1
    with torch.no_grad():
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_norm_rounding_is_absorbed_exactly(tiny_llama):
    """A bf16 norm: the stored weight is the rounded one, and the layers get the scales it implies."""
    model = load_model(str(tiny_llama)).model
    g = llama_scale_groups(model.model.layers[0], "model.layers.0")[0]
    norm = model.get_submodule(g.prev)
    q = model.get_submodule(g.layers[0])
    old_norm, old_q = norm.weight.detach().clone(), q.weight.detach().clone()
    s = torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5
    applied = fold_scales(model, g, s, torch.bfloat16)
    assert torch.equal(norm.weight, norm.weight.to(torch.bfloat16).float())  # saved as bf16 without change
    torch.testing.assert_close(norm.weight * q.weight, old_norm * old_q, rtol=1e-6, atol=1e-7)
    assert not torch.equal(applied, s)  # the rounding did move the scales


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_awq_artifact_records_scales_and_loads(tiny_llama, calib_text, tmp_path, method):
    r = Recipe.from_dict({"method": method, "format": "int3", "group_size": 32, "scaling": "awq",
                          "calib": {"path": str(calib_text), "n_samples": 8, "seq_len": 64}})
    assert r.needs_calibration and r.to_dict()["scaling"] == "awq"
    job = quantize(str(tiny_llama), r, show_progress=False)
    path = save_job(job, r, tmp_path / "a")
    scaling = read_header(path)["source"]["scaling"]
    assert scaling["method"] == "awq" and len(scaling["groups"]) == 8
    assert all(g["loss_ratio"] <= 1.0 for g in scaling["groups"])
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # what was saved (norms at the checkpoint's dtype) is what was quantized
        torch.testing.assert_close(load(path)(input_ids=ids).logits, job.loaded.model(input_ids=ids).logits,
                                   rtol=1e-3, atol=1e-3)
    again = save_job(quantize(str(tiny_llama), r, show_progress=False), r, tmp_path / "b")
    assert (path / "lowbit.json").read_bytes() == (again / "lowbit.json").read_bytes()  # deterministic


def test_off_by_default_and_bad_values_refused():
    plain = Recipe()
    assert plain.scaling == "none" and "scaling" not in plain.to_dict() and "awq" not in plain.to_dict()
    with pytest.raises(RecipeError, match="'scaling'"):
        Recipe.from_dict({"scaling": "smoothquant"})
    with pytest.raises(RecipeError, match="'awq.grid'"):
        Recipe.from_dict({"scaling": "awq", "awq": {"grid": 0}})


def test_refused_where_it_cannot_work(tmp_path, calib_text, tiny_llama):
    from transformers import BertConfig, BertModel

    from conftest import save_tiny
    from lowbit.quantize import QuantizeError

    torch.manual_seed(0)
    bert = save_tiny(BertModel(BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=96,
                                          vocab_size=4096)).eval(), tmp_path / "bert")
    r = Recipe.from_dict({"method": "rtn", "format": "int4", "group_size": 32, "scaling": "awq",
                          "calib": {"path": str(calib_text), "n_samples": 4, "seq_len": 32}})
    with pytest.raises(QuantizeError, match="Llama-style decoder blocks.*drop `scaling: awq`"):
        quantize(str(bert), r, show_progress=False)
    with pytest.raises(StreamError, match="does not stream"):
        stream_quantize(str(tiny_llama), r, tmp_path / "s")
    search = Recipe.from_dict({**r.to_dict(), "format": "fp4_search"})
    with pytest.raises(QuantizeError, match="not a format search"):
        quantize(str(tiny_llama), search, show_progress=False)


def test_presets_lie_under_the_recipe_file_and_the_flags(tmp_path):
    from lowbit.cli import build_recipe

    def build(**kw):
        args = dict(recipe_file=None, method=None, fmt=None, bits=None, group_size=None, symmetric=None, calib=None,
                    n_samples=None, seq_len=None, act_order=None, damp=None, ignore=None)
        return build_recipe(**{**args, **kw})

    q = build(preset_name="quality")
    assert (q.method, q.hessian, q.scaling, q.format_options) == ("gptq", "fisher", "none", {"mse_fit": True})
    # the grid-wide mse_fit follows a change of format wherever the new one takes it
    assert build(preset_name="quality", bits=3).format_options == {"mse_fit": True}
    assert build(preset_name="quality", fmt="nf4").grid().spec()["mse_fit"] is True
    assert build(preset_name="quality", fmt="fp4_search").format_options == {}
    assert build(preset_name="quality", format_options=["mse_fit=false"]).format_options == {"mse_fit": False}
    assert build(preset_name="fast").method == "rtn" and build(preset_name="fast").hessian == "inputs"
    assert build(preset_name="quality", method="rtn").hessian == "fisher"  # a flag changes one key only
    assert build(preset_name="quality", scaling="awq").hessian == "fisher"
    assert build(preset_name="quality", hessian="inputs").hessian == "inputs"
    f = tmp_path / "r.yaml"
    f.write_text("method: rtn\ngroup_size: 64\nhessian: inputs\n")
    r = build(preset_name="quality", recipe_file=f)
    assert (r.method, r.hessian, r.group_size) == ("rtn", "inputs", 64)
    with pytest.raises(RecipeError, match="unknown preset 'best'; known presets: quality, fast"):
        build(preset_name="best")
