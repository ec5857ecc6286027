"""Hadamard incoherence processing (`rotate: hadamard`): the transform is the orthonormal
Walsh-Hadamard matrix (checked against scipy's), rotating a layer keeps its function exactly
before quantization, GPTQ on rotated weights beats GPTQ on the original ones where the inputs have
outlier channels, and a rotated artifact loads back to the in-memory model, counts its signs in
its size, is deterministic, streams to the same bytes, tunes, and is refused where it cannot go."""

import pytest
import torch
from scipy.linalg import hadamard

from lowbit.algos.gptq import GPTQConfig, gptq_quantize, output_error
from lowbit.artifact import load, read_header
from lowbit.formats import GroupLayout, get_format
from lowbit.pipeline import quantize, save_job
from lowbit.recipe import Recipe, RecipeError
from lowbit.rotate import HadamardRotation, RotateError, fwht, hadamard_block


def test_fwht_is_the_orthonormal_hadamard_matrix_blockwise():
    g = torch.Generator().manual_seed(0)
    for n, block in ((8, 8), (96, 32), (64, 16)):
        x = torch.randn(5, n, generator=g, dtype=torch.float64)
        h = torch.tensor(hadamard(block), dtype=torch.float64) / block**0.5
        ref = (x.reshape(5, n // block, block) @ h.T).reshape(5, n)
        torch.testing.assert_close(fwht(x, block), ref)
        torch.testing.assert_close(fwht(fwht(x, block), block), x)  # its own inverse
    assert [hadamard_block(n) for n in (576, 1536, 4096, 96, 8960)] == [64, 512, 4096, 32, 256]
    with pytest.raises(RotateError, match="odd"):
        HadamardRotation.for_layer(75, "layer", 0)
    with pytest.raises(RotateError, match="does not tile"):
        fwht(torch.zeros(2, 12), 8)


def test_rotation_keeps_the_layer_function_and_rotates_its_hessian():
    g = torch.Generator().manual_seed(0)
    rot = HadamardRotation.for_layer(96, "model.layers.0.mlp.down_proj", seed=0)
    assert torch.equal(rot.signs, HadamardRotation.for_layer(96, "model.layers.0.mlp.down_proj", seed=0).signs)
    assert not torch.equal(rot.signs, HadamardRotation.for_layer(96, "model.layers.1.mlp.down_proj", seed=0).signs)
    w, x = torch.randn(16, 96, generator=g), torch.randn(200, 96, generator=g)
    torch.testing.assert_close(rot.apply(x) @ rot.weight(w).T, x @ w.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rot.invert(rot.apply(x)), x, rtol=1e-5, atol=1e-6)
    h = x.T @ x
    torch.testing.assert_close(rot.hessian(h), rot.apply(x).T @ rot.apply(x), rtol=1e-4, atol=1e-3)
    grouped = torch.stack([h, 2 * h])
    torch.testing.assert_close(rot.hessian(grouped)[1], 2 * rot.hessian(h), rtol=1e-4, atol=1e-3)


def test_gptq_on_rotated_weights_beats_plain_gptq_with_outlier_channels():
    """A few input channels 30x larger (LLM activations) and a few large weights: rotated, the
    same int3 g32 GPTQ has a much lower output error (measured in the original basis: the error of
    Q T against W on H equals that of Q against W T^T on T H T^T, T orthogonal)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    w[:, 5] *= 8
    x = torch.randn(4096, 128, generator=g)
    x[:, :4] *= 30
    h = 2 * x.T @ x / x.shape[0]
    grid, layout = get_format("int3"), GroupLayout(64, 128, 32)
    plain = gptq_quantize(w, h, grid, layout, GPTQConfig())
    rot = HadamardRotation.for_layer(128, "layer", 0)
    rotated = gptq_quantize(rot.weight(w), rot.hessian(h), grid, layout, GPTQConfig())
    back = rot.invert(rotated.dequantize())
    assert output_error(w, back, h) < 0.7 * output_error(w, plain.dequantize(), h)


def _recipe(calib_text, **extra) -> Recipe:
    return Recipe.from_dict({"method": "gptq", "format": "int3", "group_size": 32, "rotate": "hadamard",
                             "calib": {"path": str(calib_text), "n_samples": 4, "seq_len": 64}, **extra})


def test_rotated_artifact_loads_counts_its_signs_and_is_deterministic(tiny_llama, calib_text, tmp_path):
    r = _recipe(calib_text)
    job = quantize(str(tiny_llama), r, show_progress=False)
    path = save_job(job, r, tmp_path / "a")
    header = read_header(path)
    assert header["recipe"]["rotate"] == "hadamard"
    entry = header["modules"]["model.layers.0.mlp.down_proj"]  # in 96: blocks of 32
    assert entry["kind"] == "rotated-linear" and entry["rotation"] == {"kind": "hadamard", "block": 32}
    plain = quantize(str(tiny_llama), _recipe(calib_text, rotate="none"), show_progress=False)
    name = "model.layers.0.mlp.down_proj"
    out, inp = entry["shape"]
    signs_bpw = 8 * (-(-inp // 8)) / (out * inp)
    assert entry["stored_bytes"]["signs"] == -(-inp // 8)
    assert job.report.modules[name]["bpw"] == pytest.approx(plain.report.modules[name]["bpw"] + signs_bpw)
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loaded = load(path)
        torch.testing.assert_close(loaded(input_ids=ids).logits, job.loaded.model(input_ids=ids).logits)
        # the rotated weight, turned back, is a quantized copy of the original layer's weight
        from lowbit.models import load_model

        original = load_model(str(tiny_llama)).model.get_submodule(name).weight
        back = loaded.get_submodule(name).original_weight()
        assert float((back - original).pow(2).mean()) < 0.05 * float(original.pow(2).mean())
    again = save_job(quantize(str(tiny_llama), r, show_progress=False), r, tmp_path / "b")
    for f in ("lowbit.json", "quantized.safetensors", "dense.safetensors"):
        assert (path / f).read_bytes() == (again / f).read_bytes()


def test_rotated_streams_to_the_same_bytes(tiny_llama, calib_text, tmp_path):
    from lowbit.stream.quantize import stream_quantize

    r = _recipe(calib_text)
    mem = save_job(quantize(str(tiny_llama), r, show_progress=False), r, tmp_path / "mem")
    streamed, _ = stream_quantize(str(tiny_llama), r, tmp_path / "stream", show_progress=False)
    for f in ("quantized.safetensors", "dense.safetensors"):
        assert (mem / f).read_bytes() == (streamed / f).read_bytes()


def test_tuning_trains_rotated_layers(tiny_llama, calib_text):
    r = _recipe(calib_text, tune={"steps": 2, "batch_size": 2, "lr": 1e-3})
    job = quantize(str(tiny_llama), r, show_progress=False)
    assert job.report.tune["layers"] == 14  # every quantized layer of the two blocks took part


def test_refused_where_it_cannot_go(tiny_llama, calib_text, tmp_path):
    from lowbit.export import ExportError, export_artifact as export

    with pytest.raises(RecipeError, match="rotate: hadamard does not combine with method: ptq161"):
        _recipe(calib_text, method="ptq161")
    with pytest.raises(RecipeError, match="target"):
        _recipe(calib_text, target="gguf:q4_0")
    with pytest.raises(RecipeError, match="'rotate'"):
        _recipe(calib_text, rotate="random")
    r = _recipe(calib_text, method="rtn", format="int4")
    path = save_job(quantize(str(tiny_llama), r, show_progress=False), r, tmp_path / "a")
    with pytest.raises(ExportError, match="rotated-linear.*drop --rotate"):
        export(path, "compressed-tensors", tmp_path / "ct")
