"""PTQ1.61: salient input channels by activation statistics on int4, the rest binarized with
optimized block-wise scales. It beats plain binary RTN on the reference model's layers, every
stored bit is counted, and artifacts rebuild the module from its kind."""

import pytest
import torch

import lowbit
from lowbit.algos import PTQ161Config, gptq_quantize, output_error, ptq161_quantize, rtn_quantize
from lowbit.algos.ptq161 import fit_binary, salient_mask
from lowbit.artifact import QUANTIZED, read_header
from lowbit.calib.walker import whole_model_hessians
from lowbit.formats import GroupLayout, get_grid
from lowbit.models import linear_weight, load_model
from lowbit.nn import PTQ161Linear
from lowbit.pipeline import calibration_batches, quantize, save_job
from lowbit.quantize import QuantizeError, quantize_model
from lowbit.recipe import Recipe

LAYERS = ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.2.mlp.down_proj"]


@pytest.fixture(scope="module")
def real_layers(calib_text):
    """(weight, Hessian) of three layers of the reference model, from 8 calibration windows."""
    from conftest import SHAKESPEARE

    loaded = load_model(str(SHAKESPEARE))
    batches, _ = calibration_batches(loaded, Recipe(calib={"path": str(calib_text), "n_samples": 8, "seq_len": 128}))
    hessians = whole_model_hessians(loaded.model, batches, loaded.kind, set(LAYERS))
    return {n: (linear_weight(loaded.model.get_submodule(n)).detach().float(), hessians[n]) for n in LAYERS}


@pytest.mark.parametrize("name", LAYERS)
def test_beats_binary_rtn_on_real_layers(real_layers, name):
    w, h = real_layers[name]
    pw = ptq161_quantize(w, h, get_grid("int4"), -1)
    err = output_error(w, pw.dequantize(), h)
    for g in (-1, 64):
        binary = rtn_quantize(w, get_grid("binary"), GroupLayout(*w.shape, g))
        assert err < 0.5 * output_error(w, binary.dequantize(), h), g
    # and binary GPTQ at blocks of 64, which stores more scales than the per-channel PTQ1.61 binary part
    assert err < output_error(w, gptq_quantize(w, h, get_grid("binary"), GroupLayout(*w.shape, 64)).dequantize(), h)
    assert pw.bits_per_weight() < 1.9


def test_mask_is_the_top_activation_channels(real_layers):
    w, h = real_layers[LAYERS[1]]
    pw = ptq161_quantize(w, h, get_grid("int4"), -1, PTQ161Config(salient_fraction=0.1))
    n = round(0.1 * w.shape[1])
    assert int(pw.mask.sum()) == n
    diag = torch.diagonal(h)
    assert diag[pw.mask].min() >= diag[~pw.mask].max()
    assert torch.equal(pw.mask, salient_mask(h, n))


def test_scale_optimization_and_feedback_reduce_the_error(real_layers):
    w, h = real_layers[LAYERS[0]]
    hd = h + torch.eye(h.shape[0]) * 0.01 * torch.diagonal(h).mean()
    plain = torch.sign(w) * w.abs().mean(dim=1, keepdim=True)  # XNOR-Net / binary grid: sign * mean|w|

    def err(signs, alpha, beta, block):
        blk = torch.arange(w.shape[1]) // block
        return output_error(w, (2 * signs.float() - 1) * alpha[:, blk] * beta, h)

    fitted = err(*fit_binary(w, hd, w.shape[1], iters=4, feedback=False), w.shape[1])
    assert fitted < 0.8 * output_error(w, plain, h)
    assert err(*fit_binary(w, hd, w.shape[1], iters=4, feedback=True), w.shape[1]) < 0.8 * fitted
    assert err(*fit_binary(w, hd, 64, iters=4, feedback=False), 64) <= fitted  # finer blocks, more scales


def test_bpw_accounting_is_exact():
    out, n_in = 48, 200
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out, n_in, generator=gen)
    x = torch.randn(512, n_in, generator=gen)
    h = 2 * x.T @ x / 512
    pw = ptq161_quantize(w, h, get_grid("int4"), 64, PTQ161Config(salient_fraction=0.2))
    ks, kb = 40, 160
    expected = {
        "mask": 25,  # 200 bits
        "salient_codes": out * ks * 4 // 8, "salient_scale": 2 * out, "salient_zero": out * 4 // 8,  # one group of 40
        "signs": out * kb // 8, "alpha": 2 * out * 3, "beta": 2 * kb,  # 160 = 64 + 64 + 32
    }
    assert pw.storage_bytes() == expected
    assert pw.bits_per_weight() == pytest.approx(8 * sum(expected.values()) / (out * n_in))
    layer = PTQ161Linear.from_quantized(pw, torch.arange(out).float())
    assert layer.storage_bytes() == expected
    assert torch.equal(layer.dequantize(), pw.dequantize())
    back = layer.weight()
    assert torch.equal(back.mask, pw.mask) and torch.equal(back.signs, pw.signs) and torch.equal(back.salient.codes, pw.salient.codes)
    rebuilt = PTQ161Linear.from_entry(layer.entry())
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(3, n_in)
    assert torch.equal(rebuilt(x), layer(x))


def test_artifact_round_trip(tiny_llama, calib_text, tmp_path):
    r = Recipe(method="ptq161", format="int4", group_size=-1, calib={"path": str(calib_text), "n_samples": 4, "seq_len": 64},
               overrides=[{"pattern": r"layers\.1\.mlp", "method": "rtn", "group_size": 32}])
    job = quantize(str(tiny_llama), r, show_progress=False)
    path = save_job(job, r, tmp_path / "a")
    header = read_header(path)
    q = header["modules"]["model.layers.0.self_attn.q_proj"]
    assert q["kind"] == "ptq161" and q["grid"] == {"format": "ptq161", "salient": {"format": "int4", "symmetric": False}}
    assert q["n_salient"] == round(0.2 * 64) and q["method"] == "ptq161"
    assert header["modules"]["model.layers.1.mlp.up_proj"]["kind"] == "linear"
    raw = (path / QUANTIZED).read_bytes()
    assert len(raw) - 8 - int.from_bytes(raw[:8], "little") == header["summary"]["quantized_bytes"]
    model = lowbit.load(path)
    assert isinstance(model.model.layers[0].self_attn.q_proj, PTQ161Linear)
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(job.loaded.model(input_ids=ids).logits, model(input_ids=ids).logits)
    loaded = load_model(str(tiny_llama))
    with pytest.raises(QuantizeError, match="group_size > 0 or -1"):
        quantize_model(loaded.model, r.model_copy(update={"group_size": 0, "overrides": []}), loaded.kind,
                       calibration_batches(loaded, r)[0], show_progress=False)
