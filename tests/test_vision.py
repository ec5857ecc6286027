"""Convolutional networks (`lowbit.vision`, `nn.quant_conv`): batch-norm folding is exact, a stored
conv computes the conv of its dequantized weight, GPTQ on unfolded inputs beats RTN, activation
ranges do what they claim, and a quantized MobileNetV2 round-trips through an artifact."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import load
from lowbit.calib.act_ranges import RangeObserver
from lowbit.nn import QuantConv2d
from lowbit.nn.quant_conv import conv_geometry
from lowbit.nn.static_act import fake_quantize, range_params
from lowbit.recipe import Recipe
from lowbit.vision.fold import fold_batchnorm
from lowbit.vision.images import image_paths, random_crops
from lowbit.vision.mobilenet_v2 import MobileNetV2
from lowbit.vision.quantize import VisionQuantizeError, _patches, calibrate, quantize_vision
from lowbit.algos import GPTQConfig, gptq_quantize, rtn_quantize
from lowbit.formats import GroupLayout, get_format


def _trained_bn_model(seed: int = 0) -> MobileNetV2:
    """A small-input MobileNetV2 whose batch norms hold non-trivial running statistics."""
    torch.manual_seed(seed)
    model = MobileNetV2(num_classes=10)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_batchnorm_folding_keeps_the_function_and_removes_every_bn():
    model = _trained_bn_model()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        folded = fold_batchnorm(model)
        after = model(x)
    assert len(folded) == 52
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_patch_rows_match_the_stored_weight_order():
    """unfold's patch columns are the conv weight's flattened (channel, ky, kx) order: the conv is
    patches @ W^T, so a Hessian over patches is the stored row's Hessian."""
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 5, 9, 9)
    y = conv(x)  # [2, 7, 5, 5]
    rows = _patches(conv, x) @ conv.weight.reshape(7, -1).T  # [2*25, 7]
    torch.testing.assert_close(rows, y.permute(0, 2, 3, 1).reshape(-1, 7), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 6])
def test_quant_conv_computes_the_conv_of_its_dequantized_weight(groups):
    conv = nn.Conv2d(6, 12, 3, stride=1, padding=1, groups=groups)
    w = conv.weight.detach().reshape(12, -1)
    qw = rtn_quantize(w, get_format("int4"), GroupLayout(12, w.shape[1], -1))
    layer = QuantConv2d.from_quantized_conv(qw, conv.bias.detach(), conv_geometry(conv))
    x = torch.randn(2, 6, 8, 8)
    expected = F.conv2d(x, qw.dequantize().reshape(conv.weight.shape), conv.bias, 1, 1, 1, groups)
    torch.testing.assert_close(layer(x), expected)
    # the int4 error bound: at most half a step per weight (step = row range / 15)
    step = (w.amax(1) - w.amin(1)) / 15
    assert ((qw.dequantize() - w).abs() <= step[:, None] / 2 + 1e-3 * step[:, None]).all()


def test_gptq_on_unfolded_inputs_beats_rtn_on_the_conv_output():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    # smooth, unevenly scaled channels, as images are: neighbouring pixels correlate
    x = F.interpolate(torch.randn(16, 16, 4, 4), size=12, mode="bilinear") * torch.linspace(0.2, 3, 16).view(1, 16, 1, 1)
    cols = _patches(conv, x)
    h = 2 * cols.T @ cols / cols.shape[0]
    w = conv.weight.detach().reshape(32, -1)
    layout, grid = GroupLayout(32, w.shape[1], -1), get_format("int3")
    err = lambda qw: ((cols @ (qw.dequantize() - w).T) ** 2).mean()  # noqa: E731
    assert err(gptq_quantize(w, h, grid, layout, GPTQConfig())) < 0.8 * err(rtn_quantize(w, grid, layout))


def test_depthwise_gptq_solves_each_channel_and_beats_rtn():
    model = _trained_bn_model()
    images = torch.randn(16, 3, 32, 32)
    x = torch.randn(4, 3, 32, 32)
    base = copy.deepcopy(model)
    fold_batchnorm(base)
    with torch.no_grad():
        ref = base(x)
    errs = {}
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(model)
        report = quantize_vision(m, Recipe(method=method, format="int4", group_size=-1, gptq={"act_order": False}), images)
        assert report.modules["features.1.conv.0.0"].get("depthwise") and report.modules["features.1.conv.0.0"]["method"] == method
        with torch.no_grad():
            errs[method] = float((m(x) - ref).pow(2).mean())
    assert errs["gptq"] < errs["rtn"]


def test_range_observers():
    torch.manual_seed(0)
    x = torch.randn(100_000)
    x[0] = 60.0  # one outlier
    ranges = {}
    for method in ("minmax", "percentile", "mse"):
        obs = RangeObserver(method, 8, seed=0)
        for part in x.split(10_000):
            obs.observe(part)
        ranges[method] = obs.range()
    assert ranges["minmax"][1] == 60.0
    assert ranges["percentile"][1] < 10 and ranges["mse"][1] < 60.0
    # the MSE range has the least squared error of the three on the data
    def err(r):
        s, z = range_params(*r, 8)
        return float((fake_quantize(x, torch.tensor(s), torch.tensor(z), 8) - x).pow(2).sum())
    assert err(ranges["mse"]) <= min(err(ranges["minmax"]), err(ranges["percentile"])) * 1.02
    # zero is on the grid: a ReLU's zeros stay exact
    s, z = range_params(0.1, 5.0, 8)
    assert fake_quantize(torch.zeros(3), torch.tensor(s), torch.tensor(z), 8).abs().max() == 0


def test_static_activation_quantization_is_applied_and_stored(tmp_path):
    model = _trained_bn_model()
    images = torch.randn(8, 3, 32, 32)
    m = copy.deepcopy(model)
    quantize_vision(m, Recipe(method="rtn", format="int8", group_size=-1, act="int4"), images, "int4", "minmax")
    layer = m.features[0][0]
    assert layer.act["format"] == "int4" and layer.bits_per_weight() > 8  # scales, zeros and the range counted
    x = torch.randn(2, 3, 32, 32)
    q_in = layer.quantize_input(x)
    assert q_in.unique().numel() <= 16  # 4-bit inputs


def test_mobilenet_artifact_round_trip_and_refusals(tmp_path):
    from lowbit.artifact import save

    model = _trained_bn_model()
    m = copy.deepcopy(model)
    images = torch.randn(8, 3, 32, 32)
    # the first blocks and the classifier quantized (the rest kept in float, stored dense): seconds, not minutes
    recipe = Recipe(method="gptq", format="int4", group_size=-1, act="int8", gptq={"act_order": False},
                    ignore=[r"features\.([4-9]|1\d)\."])
    report = quantize_vision(m, recipe, images, "int8", "mse")
    source = {"model": "test", "kind": "image-classifier", "factory": "mobilenet-v2", "num_classes": 10}
    out = save(m, tmp_path / "a", source=source, recipe={})
    loaded = load(out)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    header = json.loads((out / "lowbit.json").read_text())
    assert header["modules"]["features.1.conv.0.0"]["conv"]["groups"] == 32
    assert len(report.modules) == 10 and len(report.skipped) == 43
    # deterministic: the same inputs give the same bytes
    m2 = copy.deepcopy(model)
    quantize_vision(m2, recipe, images, "int8", "mse")
    out2 = save(m2, tmp_path / "b", source=source, recipe={})
    assert (out / "quantized.safetensors").read_bytes() == (out2 / "quantized.safetensors").read_bytes()
    with pytest.raises(VisionQuantizeError, match="calibration images"):
        quantize_vision(copy.deepcopy(model), Recipe(method="gptq", format="int4"), None)
    with pytest.raises(VisionQuantizeError, match="not available for convolutional"):
        quantize_vision(copy.deepcopy(model), Recipe(method="ptq161", format="int4"), images)
    with pytest.raises(VisionQuantizeError, match="not available for convolutional"):
        quantize_vision(copy.deepcopy(model), Recipe(method="gptq", format="vq2", group_size=128), images)


def test_photo_sets_are_disjoint_and_crops_are_seeded():
    calib, evals = set(image_paths("photos-calib")), set(image_paths("photos-eval"))
    assert calib and evals and not calib & evals
    a, b = random_crops(4, seed=3, source="photos-eval"), random_crops(4, seed=3, source="photos-eval")
    assert a.shape == (4, 3, 224, 224) and torch.equal(a, b)
    assert not torch.equal(a, random_crops(4, seed=4, source="photos-eval"))


def test_calibrate_gathers_hessians_of_the_unfolded_inputs():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    images = torch.randn(5, 3, 6, 6)
    h = calibrate(conv, {"0": conv[0]}, images, {"0"}, {}, batch_size=2)["0"]
    cols = _patches(conv[0], images)
    torch.testing.assert_close(h, 2 * cols.T @ cols / cols.shape[0], rtol=1e-4, atol=1e-5)


def test_sequential_calibration_sees_the_quantized_prefix():
    """Layer by layer, a layer's input range comes from what the quantized layers before it output;
    in one pass, from the float model's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    images = torch.randn(6, 3, 8, 8)
    recipe = Recipe(method="rtn", format="int3", group_size=-1, act="int8")
    for sequential in (True, False):
        m = copy.deepcopy(net)
        quantize_vision(m, recipe, images, "int8", "minmax", sequential=sequential)
        with torch.no_grad():
            feeding = (m if sequential else net)[:2](images)  # what reached the second conv
        scale, zero = range_params(float(feeding.min()), float(feeding.max()), 8)
        assert m[2].act_scale.item() == pytest.approx(scale, rel=1e-6) and m[2].act_zero.item() == zero


def test_zeroq_distilled_inputs_match_the_batchnorm_statistics():
    from lowbit.calib.zeroq import DistillError, distill_images
    from lowbit.vision.run import calibration_images

    # a small CNN whose BatchNorms hold the statistics of a "training" distribution unlike N(0, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None))
    model.train()
    with torch.no_grad():
        for _ in range(10):
            model(F.interpolate(torch.randn(8, 3, 8, 8), size=32, mode="bilinear") * 2 + 0.5)
    model.eval()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    images, info = distill_images(model, 6, size=32, steps=30, lr=0.2, batch_size=3, seed=0, show_progress=False)
    assert images.shape == (6, 3, 32, 32)
    assert all(end < 0.5 * start for start, end in zip(info["bn_loss_start"], info["bn_loss_end"]))
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # the model is untouched
    again, _ = distill_images(model, 6, size=32, steps=30, lr=0.2, batch_size=3, seed=0, show_progress=False)
    assert torch.equal(images, again)  # seeded
    recipe = Recipe(method="gptq", format="int4", data_free="zeroq", calib={"n_samples": 2}, zeroq={"steps": 2, "batch_size": 2})
    with pytest.raises(DistillError, match="no BatchNorm2d"):
        folded = copy.deepcopy(model)
        fold_batchnorm(folded)
        distill_images(folded, 2, size=32, steps=1, show_progress=False)
    with pytest.raises(VisionQuantizeError, match="uses no images"):
        calibration_images(model, Recipe.from_dict({**recipe.to_dict(), "calib": {"path": "photos", "n_samples": 2}}))
    assert "data_free" in recipe.to_dict() and "data_free" not in Recipe().to_dict()


def test_language_models_refuse_cnn_only_options():
    from lowbit.quantize import QuantizeError, quantize_model

    lm = nn.Sequential(nn.Linear(4, 4))
    for keys in ({"data_free": "zeroq"}, {"act": "int4", "method": "rtn"}):
        with pytest.raises(QuantizeError, match="convolutional|BatchNorm"):
            quantize_model(lm, Recipe(**keys))


def test_zeroq_mixed_precision_allocates_within_the_budget():
    from lowbit.mixed.allocate import allocation_of
    from lowbit.vision.mixed import allocate_bits, mixed_recipe, sensitivities

    # a small CNN whose outputs depend on every layer (the random MobileNetV2's collapse to one output)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16, momentum=None), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16, momentum=None), nn.ReLU(),
                          nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32, momentum=None), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    inputs = torch.randn(8, 3, 16, 16)
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 3, 16, 16))
    model.eval()
    nn.init.normal_(model[-1].weight, 0, 2.0)  # confident outputs, so that KL measures something
    recipe = Recipe(method="rtn", format="int4", group_size=-1)
    costs = sensitivities(model, recipe, inputs, bits=(2, 4, 8))
    assert len(costs) == 4
    for cost in costs.values():  # more bits store more and damage the output less
        assert cost.bits["int2"] < cost.bits["int4"] < cost.bits["int8"]
        assert cost.damage["int8"] < cost.damage["int2"]
    uniform = allocation_of(costs, {n: "int4" for n in costs})
    mixed = allocate_bits(costs, uniform.bpw)
    assert mixed.bpw <= uniform.bpw + 1e-9 and mixed.damage <= uniform.damage
    r = mixed_recipe(recipe, mixed)
    for name, choice in mixed.choice.items():
        assert r.scheme_for(name).format == choice
    m = copy.deepcopy(model)
    report = quantize_vision(m, r, inputs)
    bits = sum(e["bpw"] * e["shape"][0] * e["shape"][1] for e in report.modules.values())
    assert bits / sum(e["shape"][0] * e["shape"][1] for e in report.modules.values()) == pytest.approx(mixed.bpw, rel=1e-9)


def test_python_api_quantizes_any_cnn_and_loads_into_a_fresh_skeleton(tmp_path):
    import lowbit

    def net() -> nn.Module:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5))
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
        return m.eval()

    model = net()
    images = torch.randn(8, 3, 12, 12)
    report = lowbit.quantize(model, lowbit.Recipe(format="int4", method="gptq", act="int8"), calib=images)
    assert set(report.modules) == {"0", "5"} and report.folded == ["1"]
    assert model[0].layout.group_size == -1  # per channel unless a group size is given
    out = lowbit.save(model, tmp_path / "a", source=model.lowbit_source)
    loaded = lowbit.load(out, model=net())
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("groups", [1, 4])
def test_bias_correction_restores_each_channels_mean_output(groups):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=groups, bias=False))
    images = torch.randn(6, 4, 10, 10) + 0.7  # inputs with a mean: the weight error shifts the output's
    with torch.no_grad():
        target = net(images).mean(dim=(0, 2, 3))
    shifts = {}
    for correct in (False, True):
        m = copy.deepcopy(net)
        quantize_vision(m, Recipe(method="rtn", format="int2", group_size=-1), images, bias_correction=correct)
        with torch.no_grad():
            shifts[correct] = (m(images).mean(dim=(0, 2, 3)) - target).abs().max().item()
    assert shifts[True] < 1e-4 < shifts[False]
