"""Quantization-aware training (`lowbit.train`): the fake-quantized model's outputs are the packed
artifact's, LSQ's step gradient is the paper's, distillation lowers the KL below the round-to-nearest
start, a stopped run resumes to the same artifact byte for byte, and bad requests are refused."""

import pytest
import torch
from conftest import SHAKESPEARE

from lowbit.artifact import load, read_header
from lowbit.formats import GroupLayout, get_grid
from lowbit.recipe import Recipe
from lowbit.train import FakeQuantLinear, QATConfig, TrainError, train_model
from lowbit.train.run import state_dir


def test_lsq_step_gradient_is_the_papers():
    """For int4 asym (zero point fixed), d w_hat / d s = (code - zero) - w / s inside the grid's
    range and (edge code - zero) outside; the weight's gradient is 1 inside, 0 outside; LSQ's
    gradient scale 1 / sqrt(n_group * levels) multiplies the step's."""
    torch.manual_seed(0)
    w = torch.randn(2, 8)
    layout = GroupLayout(2, 8, 8)
    fake = FakeQuantLinear(w, None, get_grid("int4"), layout, "lsq")
    with torch.no_grad():
        fake.learned["scale"].copy_(fake.learned["scale"] * 0.6)  # some weights now clip
    w_hat = fake.quantized()
    w_hat.sum().backward()
    s = fake.learned["scale"].detach().half().float()  # [2, 1], as stored
    zero = fake.fixed_zero.float()
    u = torch.round(w / s) + zero
    inside = (u >= 0) & (u <= 15)
    code = u.clamp(0, 15)
    expected = torch.where(inside, code - zero - w / s, code - zero).sum(1, keepdim=True) / (8 * 15) ** 0.5
    torch.testing.assert_close(fake.learned["scale"].grad, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(fake.weight.grad, inside.float())
    assert 0 < int((~inside).sum()) < 16


@pytest.mark.parametrize("fmt,group,qat,act", [("ternary", 0, "fixed", "none"), ("int2", 32, "lsq", "none"),
                                               ("ternary", 0, "lsq", "int8")])
def test_trained_model_and_artifact_give_the_same_outputs(tmp_path, calib_text, fmt, group, qat, act):
    """A few steps of QAT, then the packed artifact: its logits equal the fake-quantized model's
    (kept by stopping before conversion in a second, identical run); with int8 activations (BitNet
    b1.58's W1.58A8) the artifact runs integer products, the same up to float rounding."""
    from lowbit.train.qat import fingerprint, prepare, train

    r = Recipe.from_dict({"method": "rtn", "format": fmt, "group_size": group, "act": act})
    cfg = QATConfig(steps=4, batch_size=2, step_sizes=qat, save_every=0)
    path, result = train_model(str(SHAKESPEARE), r, cfg, tmp_path / "a", calib_text, seq_len=64, n_windows=8,
                               show_progress=False)
    assert result.layers == 28 and len(result.losses) == 4
    header = read_header(path)
    entry = header["modules"]["model.layers.0.mlp.down_proj"]
    assert entry["grid"]["format"] == fmt and header["source"]["train"]["step_sizes"] == qat
    assert entry["kind"] == ("act-linear" if act == "int8" else "linear")
    # the same training in memory, fake-quantized: same windows and settings, so the same weights
    from lowbit.calib.text import random_windows, read_text
    from lowbit.models import load_model

    loaded, teacher = load_model(str(SHAKESPEARE)), load_model(str(SHAKESPEARE)).model
    windows = random_windows(loaded.tokenizer, read_text(calib_text), 64, 8, 0)
    fakes, _ = prepare(loaded.model, r, qat)
    train(loaded.model, teacher, windows, fakes, cfg, None, fingerprint(windows, cfg, r, {}))
    ids = windows[:2]
    with torch.no_grad():
        packed, fake = load(path)(input_ids=ids).logits, loaded.model(input_ids=ids).logits
    if act == "none":
        torch.testing.assert_close(packed, fake, rtol=1e-5, atol=1e-5)
    else:  # integer products against a float matmul of the same values: a token's int8 rounding may flip
        from lowbit.algos.distill import distill_loss

        kl = float(distill_loss(packed, fake))  # measured 9e-7
        assert kl < 1e-5 and float((packed.argmax(-1) == fake.argmax(-1)).float().mean()) > 0.98
    assert not state_dir(tmp_path / "a").exists()  # spent once the artifact is written


def test_distillation_lowers_the_kl_below_round_to_nearest(tmp_path, calib_text):
    """QAT starts from round-to-nearest (its first forward is RTN's); 30 steps of distillation at
    int2 g32 end with a held-out KL well below the RTN artifact's (measured: 0.048 against 0.068)."""
    from lowbit.pipeline import evaluate, quantize, save_job

    r = Recipe.from_dict({"method": "rtn", "format": "int2", "group_size": 32})
    rtn = save_job(quantize(str(SHAKESPEARE), r, show_progress=False), r, tmp_path / "rtn")
    qat, _ = train_model(str(SHAKESPEARE), r, QATConfig(steps=30, batch_size=2, save_every=0), tmp_path / "qat",
                         calib_text, seq_len=128, n_windows=32, show_progress=False)
    kl = {p.name: evaluate(p, max_tokens=2048, seq_len=128)["kl"] for p in (rtn, qat)}
    assert kl["qat"] < 0.85 * kl["rtn"], kl
    assert read_header(qat)["summary"]["bpw"] == read_header(rtn)["summary"]["bpw"]  # the same format, counted alike


def test_a_stopped_run_resumes_to_the_same_artifact(tmp_path, calib_text):
    r = Recipe.from_dict({"method": "rtn", "format": "int3", "group_size": 32})
    cfg = QATConfig(steps=6, batch_size=2, step_sizes="lsq", save_every=2)
    kw = dict(seq_len=64, n_windows=8, show_progress=False)
    whole, _ = train_model(str(SHAKESPEARE), r, cfg, tmp_path / "whole", calib_text, **kw)
    none, first = train_model(str(SHAKESPEARE), r, cfg, tmp_path / "cut", calib_text, stop_after=3, **kw)
    assert none is None and len(first.losses) == 3 and (state_dir(tmp_path / "cut") / "state.json").is_file()
    cut, second = train_model(str(SHAKESPEARE), r, cfg, tmp_path / "cut", calib_text, **kw)
    assert second.resumed_at == 2  # the last saved state: step 3 was lost with the interruption
    assert (whole / "quantized.safetensors").read_bytes() == (cut / "quantized.safetensors").read_bytes()
    # a saved state of other settings is refused, with the fix
    train_model(str(SHAKESPEARE), r, cfg, tmp_path / "other", calib_text, stop_after=2, **kw)
    with pytest.raises(TrainError, match="another run"):
        train_model(str(SHAKESPEARE), r, QATConfig(steps=6, batch_size=2, lr=1e-3, save_every=2), tmp_path / "other",
                    calib_text, **kw)


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="evenly spaced"):
        FakeQuantLinear(torch.randn(4, 8), None, get_grid("fp4_e2m1"), GroupLayout(4, 8, 8), "lsq")
    with pytest.raises(TrainError, match="scalar grids"):
        from lowbit.train.qat import prepare
        from lowbit.models import load_model

        prepare(load_model(str(SHAKESPEARE)).model, Recipe.from_dict({"method": "gptq", "format": "vq2"}))
    with pytest.raises(TrainError, match="loss"):
        QATConfig(loss="mse")


def test_double_rounding_trains_one_code_for_every_precision(tmp_path, calib_text):
    """Double Rounding (`nested8`, precisions 8/4/2): one stored code; the artifact loaded at each
    precision gives the fake-quantized model's outputs at that precision."""
    from lowbit.calib.text import random_windows, read_text
    from lowbit.models import load_model
    from lowbit.train.qat import fingerprint, prepare, train

    r = Recipe.from_dict({"method": "rtn", "format": "nested8", "group_size": 32})
    cfg = QATConfig(steps=2, batch_size=2, save_every=0, precisions=(8, 4, 2))
    path, _ = train_model(str(SHAKESPEARE), r, cfg, tmp_path / "a", calib_text, seq_len=64, n_windows=8, show_progress=False)
    loaded, teacher = load_model(str(SHAKESPEARE)), load_model(str(SHAKESPEARE)).model
    windows = random_windows(loaded.tokenizer, read_text(calib_text), 64, 8, 0)
    fakes, _ = prepare(loaded.model, r)
    train(loaded.model, teacher, windows, fakes, cfg, None, fingerprint(windows, cfg, r, {}))
    ids = windows[:1]
    with torch.no_grad():
        for p in (8, 4, 2):
            for f in fakes.values():
                f.precision = p
            torch.testing.assert_close(load(path, bits=p)(input_ids=ids).logits, loaded.model(input_ids=ids).logits,
                                       rtol=1e-5, atol=1e-5)
    with pytest.raises(TrainError, match="nested"):
        train_model(str(SHAKESPEARE), Recipe.from_dict({"method": "rtn", "format": "int4"}), cfg, tmp_path / "b",
                    calib_text, seq_len=64, n_windows=8, show_progress=False)


def test_biper_binarizes_by_a_square_wave_with_the_sines_gradient():
    """BiPer: codes are the signs of sin(omega w) (at the start, the weights' own signs), the
    weight's gradient is scale * omega * cos(omega w), and the packed weight is the forward's."""
    torch.manual_seed(0)
    w = torch.randn(4, 16)
    fake = FakeQuantLinear(w, None, get_grid("binary"), GroupLayout(4, 16, 8), "biper")
    q = fake.quantized_weight()
    assert torch.equal(q.codes, (w >= 0).to(torch.uint8))
    w_hat = fake.quantized()
    torch.testing.assert_close(w_hat.detach(), q.dequantize())
    w_hat.sum().backward()
    s = q.layout.expand(q.params)["scale"]
    torch.testing.assert_close(fake.weight.grad, s * fake.omega * torch.cos(fake.omega * w))
    with pytest.raises(ValueError, match="binary grid"):
        FakeQuantLinear(w, None, get_grid("int2"), GroupLayout(4, 16, 8), "biper")


@pytest.mark.parametrize("fmt", ["int2", "int4_min"])
def test_training_can_start_from_gptqs_codes(fmt):
    """`from_quantized` (recipe method gptq): the latent weight is GPTQ's decoded weight and LSQ's
    steps start at GPTQ's parameters, so the first forward, and the packed weight before any step,
    is GPTQ's quantization exactly."""
    from conftest import correlated_layer

    from lowbit.algos import gptq_quantize

    w, h = correlated_layer()
    layout = GroupLayout(256, 512, 32)
    qw = gptq_quantize(w, h, get_grid(fmt), layout)
    fake = FakeQuantLinear.from_quantized(qw, None, "lsq")
    again = fake.quantized_weight()
    assert torch.equal(again.codes, qw.codes)
    assert all(torch.equal(again.params[k].float(), qw.params[k].float()) for k in qw.params)
    torch.testing.assert_close(fake.quantized().detach(), qw.dequantize(), rtol=0, atol=0)
