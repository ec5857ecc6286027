"""W8A8 (`--act int8`, nn/act_linear.py): per-token int8 activations, the integer product agrees
bit for bit with its float64 simulation and stays within the error the two roundings allow; the
artifact records it, loads back to the same outputs, and is refused where it cannot go."""

from __future__ import annotations

import pytest
import torch

from lowbit.artifact import load, read_header
from lowbit.formats.int import IntGrid
from lowbit.formats.layout import GroupLayout
from lowbit.nn.act_linear import IntActLinear, quantize_tokens
from lowbit.pipeline import quantize, save_job
from lowbit.recipe import Recipe, RecipeError
from lowbit.algos.rtn import rtn_quantize


def _layer(out: int, inp: int, bias: bool, bits: int = 8, symmetric: bool = True, group: int = -1,
           seed: int = 0) -> tuple[IntActLinear, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    b = torch.randn(out, generator=g) if bias else None
    qw = rtn_quantize(w, IntGrid(bits, symmetric=symmetric), GroupLayout(out, inp, group))
    return IntActLinear.from_quantized(qw, b), w, b


def test_tokens_quantize_within_half_a_step():
    x = torch.randn(37, 96) * torch.logspace(-3, 3, 37)[:, None]
    x[5] = 0.0  # an all-zero token
    q, s = quantize_tokens(x)
    assert q.abs().max() <= 127 and torch.equal(q, q.round())
    assert ((q * s - x).abs() <= s / 2 * (1 + 1e-6)).all()
    assert torch.equal(q[5], torch.zeros(96))
    assert torch.equal(quantize_tokens(-x)[0], -q)  # symmetric


@pytest.mark.parametrize("tokens,inp,out,bias,bits,symmetric,group", [
    (1, 64, 96, True, 8, True, -1), (37, 96, 64, False, 8, True, 0), (300, 576, 192, True, 8, True, -1),
    (37, 96, 64, True, 4, False, 64),  # W4A8, asymmetric, a shorter last group
    (5, 128, 32, False, 3, True, 32), (16, 64, 48, False, 8, False, -1)])
def test_integer_product_matches_its_simulation_and_the_rounding_bound(tokens, inp, out, bias, bits, symmetric, group):
    """The int8 kernel and the float64 simulation give the same bits; against the float layer
    every output is within sum_k |e_k||w_k| + |x_k||d_k| + |e_k||d_k| (e: the activation's
    rounding, at most s_t/2; d: the weight's, at most its group's step / 2)."""
    layer, w, b = _layer(out, inp, bias, bits, symmetric, group)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, inp, generator=g) * (1 + 20 * (torch.rand(inp, generator=g) < 0.02))  # outlier channels
    with torch.no_grad():
        fast = layer(x)
        layer.simulate = True
        slow = layer(x)
    assert torch.equal(fast, slow)
    _, s_x = quantize_tokens(x)
    iw = layer.integer_weight()
    step = torch.cat([iw["scale"][:, k:k + 1].abs().expand(out, hi - lo) for k, (lo, hi) in enumerate(iw["bounds"])], dim=1)
    exact = x @ w.T + (0 if b is None else b)
    bound = (s_x / 2) * w.abs().sum(1) + x.abs() @ (step / 2).T + (s_x / 2) * (step / 2).sum(1)
    assert ((fast - exact).abs() <= bound * (1 + 1e-4) + 1e-4).all()


def test_the_recipe_asks_for_int8_rows_and_names_the_fix():
    base = {"method": "rtn", "format": "int8", "symmetric": True, "group_size": -1, "act": "int8"}
    Recipe.from_dict(base)
    for ok in ({"group_size": 128}, {"symmetric": False}, {"format": "int4"}):  # W4A8 and friends
        Recipe.from_dict({**base, **ok})
    for bad in ({"format": "nf4"}, {"format": "fp4_e2m1"}, {"method": "ptq161"},
                {"overrides": [{"pattern": "down_proj", "format": "vq2"}]}):
        with pytest.raises(RecipeError, match="needs integer weights"):
            Recipe.from_dict({**base, **bad})
    with pytest.raises(RecipeError, match="rotate: hadamard"):
        Recipe.from_dict({**base, "rotate": "hadamard"})
    assert "act" not in Recipe.from_dict({**base, "act": "none"}).to_dict()


def test_w8a8_artifact_records_loads_and_is_refused_by_exports(tiny_llama, calib_text, tmp_path):
    from lowbit.export import ExportError, export_artifact

    r = Recipe.from_dict({"method": "gptq", "format": "int8", "symmetric": True, "group_size": -1, "act": "int8",
                          "calib": {"path": str(calib_text), "n_samples": 4, "seq_len": 64}})
    job = quantize(str(tiny_llama), r, show_progress=False)
    path = save_job(job, r, tmp_path / "a")
    header = read_header(path)
    entry = header["modules"]["model.layers.1.mlp.down_proj"]
    assert entry["kind"] == "act-linear" and entry["act"]["granularity"] == "token"
    assert header["recipe"]["act"] == "int8"
    weight_only = Recipe.from_dict({**r.to_dict(), "act": "none"})
    plain = save_job(quantize(str(tiny_llama), weight_only, show_progress=False), weight_only, tmp_path / "w")
    # the first block's weights are the weight-only ones, stored the same way; later blocks are
    # calibrated on the W8A8 model's own (int8-rounded) activations, as it will run
    from safetensors.torch import load_file

    a, b = load_file(path / "quantized.safetensors"), load_file(plain / "quantized.safetensors")
    first = [k for k in a if k.startswith("model.layers.0.")]
    assert first and all(torch.equal(a[k], b[k]) for k in first)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("model.layers.1."))
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loaded = load(path)
        assert sum(isinstance(m, IntActLinear) for m in loaded.modules()) == 14
        a = loaded(input_ids=ids).logits
        torch.testing.assert_close(a, job.loaded.model(input_ids=ids).logits, rtol=0, atol=0)
        w = load(plain)(input_ids=ids).logits
        assert 0 < float((a - w).abs().max()) < 0.1 * float(w.abs().max())  # activations rounded, not broken
    with pytest.raises(ExportError, match="act-linear"):
        export_artifact(path, "compressed-tensors", tmp_path / "ct")


def test_w8a8_streams_to_the_same_bytes(tiny_llama, tmp_path):
    from lowbit.stream.quantize import stream_quantize

    r = Recipe.from_dict({"method": "rtn", "format": "int8", "symmetric": True, "group_size": -1, "act": "int8"})
    mem = save_job(quantize(str(tiny_llama), r, show_progress=False), r, tmp_path / "mem")
    streamed, _ = stream_quantize(str(tiny_llama), r, tmp_path / "stream", show_progress=False)
    for f in ("lowbit.json", "quantized.safetensors", "dense.safetensors"):
        assert (mem / f).read_bytes() == (streamed / f).read_bytes(), f


def test_smoothing_keeps_the_float_model_and_helps_int8_activations(tiny_llama, calib_text):
    """SmoothQuant's folding leaves the float model's outputs unchanged (up to float32 rounding);
    with an outlier input channel planted in every block, W8A8 with smoothing stays closer to the
    float model than W8A8 without."""
    from lowbit.algos.smoothquant import smooth_block
    from lowbit.models import find_blocks, load_model

    loaded = load_model(str(tiny_llama))
    model = loaded.model
    ids = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    _, blocks = find_blocks(model)
    for block in blocks:  # an outlier channel in both norms' outputs
        block.input_layernorm.weight.data[7] *= 30.0
        block.post_attention_layernorm.weight.data[3] *= 30.0
    with torch.no_grad():
        before = model(input_ids=ids).logits
    smoothed = load_model(str(tiny_llama)).model
    smoothed.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    names, blocks2 = find_blocks(smoothed)
    for i, block in enumerate(blocks2):
        prefix = f"{names}.{i}"
        hessians = {}
        for n, m in block.named_modules():
            if isinstance(m, torch.nn.Linear):
                d = torch.rand(m.in_features, generator=g) + 0.1
                d[:8] *= 100.0
                hessians[f"{prefix}.{n}"] = torch.diag(d)
        with torch.no_grad():
            smooth_block(smoothed, block, prefix, hessians, set(hessians), torch.float32, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(smoothed(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "outliers"
        model.save_pretrained(src)
        loaded.tokenizer.save_pretrained(src)
        errs = {}
        for scaling in ("none", "smooth"):
            r = Recipe.from_dict({"method": "rtn", "format": "int8", "symmetric": True, "group_size": -1, "act": "int8",
                                  "scaling": scaling, "calib": {"path": str(calib_text), "n_samples": 4, "seq_len": 64}})
            job = quantize(str(src), r, show_progress=False)
            with torch.no_grad():
                errs[scaling] = float((job.loaded.model(input_ids=ids).logits - before).pow(2).mean())
    assert errs["smooth"] < 0.7 * errs["none"], errs
