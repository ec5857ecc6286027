"""Nested integers with Double Rounding (nested8): lower precisions derived from the stored 8-bit
codes equal direct rounding, artifacts switch precision at load time, and on the reference model
one artifact at 8/6/4 bits is within 10% KL of direct RTN int sym at each width."""

import json

import pytest
import torch
from typer.testing import CliRunner

import lowbit
from lowbit.algos import rtn_quantize
from lowbit.artifact import ArtifactError, read_header
from lowbit.cli import app
from lowbit.formats import GroupLayout, NestedIntGrid, get_grid, grid_from_spec
from lowbit.formats.nested import double_round
from lowbit.nn import QuantLinear
from lowbit.pipeline import evaluate, quantize, save_job
from lowbit.recipe import Recipe


def test_double_rounding_equals_direct_rounding():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=gen) * torch.logspace(-3, 0, 32).unsqueeze(1)
    for fit in ("top", "joint"):
        grid = get_grid("nested8", fit=fit)
        params = grid.fit(w)
        codes = grid.encode(w, params)
        assert codes.dtype == torch.uint8
        for p in (7, 6, 5, 4, 3, 2):
            step = params["scale"] * 2 ** (8 - p)
            direct = torch.round(w / step).clamp(-(2 ** (p - 1)), 2 ** (p - 1) - 1) * step
            assert torch.equal(grid.with_precision(p).decode(codes, params), direct), (fit, p)
    # every stored code maps to the nearest p-bit level of its own value: never a tie
    m = torch.arange(-128, 128).float()
    for p in (6, 4, 2):
        k = 2 ** (8 - p)
        assert torch.equal(double_round(m, 8, p), torch.round((m + 0.5) / k).clamp(-(2 ** (p - 1)), 2 ** (p - 1) - 1))
        assert not torch.any(((m + 0.5) / k) % 1 == 0.5)


def test_top_precision_round_trips_and_spec():
    grid = get_grid("nested8")
    params = grid.fit(torch.randn(4, 64))
    codes = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    assert torch.equal(grid.encode(grid.decode(codes, params), params), codes)
    assert grid.spec() == {"format": "nested8", "precision": 8, "fit": "joint", "targets": [8, 6, 4]}
    four = grid.with_precision(4)
    assert isinstance(four, NestedIntGrid) and four.precision == 4 and four.bits == 8
    assert grid_from_spec(four.spec()).spec() == four.spec()
    assert get_grid("int4").with_precision(3) is None
    with pytest.raises(ValueError, match="precision"):
        grid.with_precision(9)


def test_joint_fit_serves_every_target():
    """The joint scale is no worse, summed over 8/6/4 bits in units of each step^2, than the top-bit fit."""
    w = torch.distributions.StudentT(4.0).sample((256, 64))
    layout = GroupLayout(256, 64, 64)

    def cost(fit):
        qw = rtn_quantize(w, get_grid("nested8", fit=fit), layout)
        base = 2 * w.abs().amax(dim=1, keepdim=True) / 255
        return sum((((qw.grid.with_precision(p).decode(qw.codes, qw.params) - w) / (base * 2 ** (8 - p))) ** 2).sum() for p in (8, 6, 4))

    assert cost("joint") <= cost("top")


@pytest.fixture(scope="module")
def nested_artifact(tiny_llama, tmp_path_factory):
    r = Recipe.from_dict({"method": "rtn", "format": "nested8", "group_size": 32,
                          "overrides": [{"pattern": r"layers\.1\.mlp", "format": "int4", "symmetric": True}]})
    job = quantize(str(tiny_llama), r, show_progress=False)
    return job, save_job(job, r, tmp_path_factory.mktemp("n") / "art")


def test_load_time_precision_switching(nested_artifact, tmp_path):
    job, path = nested_artifact
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = job.loaded.model(input_ids=ids).logits
        assert torch.equal(lowbit.load(path)(input_ids=ids).logits, full)
        assert torch.equal(lowbit.load(path, bits=8)(input_ids=ids).logits, full)
        m4 = lowbit.load(path, bits=4)
        assert m4.lowbit_precision == 4
        q = m4.model.layers[0].self_attn.q_proj
        assert q.grid.precision == 4
        assert m4.model.layers[1].mlp.up_proj.grid.spec() == {"format": "int4", "symmetric": True}  # not nested: unaffected
        stored = job.loaded.model.model.layers[0].self_attn.q_proj.quantized_weight()
        assert torch.equal(q.dequantize(), stored.grid.with_precision(4).decode(stored.codes, stored.layout.expand(stored.params)))
        logits4 = m4(input_ids=ids).logits
        assert not torch.equal(logits4, full)
        assert torch.equal(lowbit.load(path, bits=4, cache_weights=True)(input_ids=ids).logits, logits4)
    header = read_header(path)
    assert header["modules"]["model.layers.0.self_attn.q_proj"]["bpw"] == pytest.approx(8 + 16 / 32)


def test_bits_on_an_artifact_without_nested_modules_is_refused(nested_artifact, tiny_llama, tmp_path):
    _, path = nested_artifact
    with pytest.raises(ArtifactError, match="cannot be rebuilt.*precision"):
        lowbit.load(path, bits=9)
    r = Recipe(method="rtn", format="int4", group_size=32)
    plain = save_job(quantize(str(tiny_llama), r, show_progress=False), r, tmp_path / "plain")
    with pytest.raises(ArtifactError, match="nested modules.*has none.*int4"):
        lowbit.load(plain, bits=4)


def test_cli_eval_bits(nested_artifact, eval_text):
    _, path = nested_artifact
    runner = CliRunner(env={"COLUMNS": "200"})
    out = {}
    for bits in ("8", "3"):
        res = runner.invoke(app, ["eval", str(path), "--text", str(eval_text), "--max-tokens", "256", "--seq-len", "64", "--json", "--bits", bits])
        assert res.exit_code == 0, res.output
        out[bits] = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["3"]["precision"] == 3 and out["3"]["kl"] > out["8"]["kl"]


def test_quant_linear_switches_in_place():
    w = torch.randn(8, 64)
    qw = rtn_quantize(w, get_grid("nested8"), GroupLayout(8, 64, 32))
    layer = QuantLinear.from_quantized(qw, None)
    layer.cache_weight = True
    w8 = layer.dequantize()
    assert layer.set_precision(4) and not torch.equal(layer.dequantize(), w8)
    assert not QuantLinear.from_quantized(rtn_quantize(w, get_grid("int4"), GroupLayout(8, 64, 32)), None).set_precision(4)


@pytest.mark.slow
def test_one_artifact_within_10_percent_kl_of_direct_rtn(calib_text, eval_text, tmp_path):
    from conftest import SHAKESPEARE

    from lowbit.models import load_model

    ref = load_model(str(SHAKESPEARE))

    def kl(path, bits=None):
        return evaluate(path, str(eval_text), reference=ref, max_tokens=4096, seq_len=256, bits=bits)["kl"]

    r = Recipe(method="rtn", format="nested8", group_size=64)
    nested = save_job(quantize(str(SHAKESPEARE), r, show_progress=False), r, tmp_path / "nested")
    for bits in (8, 6, 4):
        d = Recipe(method="rtn", format=f"int{bits}", symmetric=True, group_size=64)
        direct = save_job(quantize(str(SHAKESPEARE), d, show_progress=False), d, tmp_path / f"int{bits}")
        k_nested, k_direct = kl(nested, bits), kl(direct)
        print(f"\n{bits} bits: nested8 KL {k_nested:.4g}, direct int{bits} sym KL {k_direct:.4g} ({k_nested / k_direct - 1:+.1%})")
        assert k_nested <= 1.10 * k_direct
