"""Acceptance on the trained reference causal LM (../shared/assets/shakespeare-llama), held-out text."""

import pytest

from lowbit.artifact import QUANTIZED, read_header
from lowbit.pipeline import evaluate, quantize, save_job
from lowbit.recipe import Recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(calib_text, eval_text, tmp_path_factory):
    from conftest import SHAKESPEARE

    root = tmp_path_factory.mktemp("e2e")
    out = {}
    for method in ("rtn", "gptq"):
        for bits in (4, 3):
            r = Recipe(method=method, format=f"int{bits}", group_size=64, calib={"path": str(calib_text), "n_samples": 64, "seq_len": 256})
            path = save_job(quantize(str(SHAKESPEARE), r, show_progress=False), r, root / f"{method}{bits}")
            out[(method, bits)] = (path, evaluate(path, str(eval_text), max_tokens=4096, seq_len=256))
    return out


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_has_lower_kl_than_rtn(results, bits):
    assert results[("gptq", bits)][1]["kl"] < results[("rtn", bits)][1]["kl"]


def test_int4_g64_bpw_and_size_on_disk(results):
    path, res = results[("gptq", 4)]
    header = read_header(path)
    assert res["bpw"] <= 4.35
    on_disk = (path / QUANTIZED).stat().st_size
    claimed = header["summary"]["bpw"] * header["summary"]["quantized_params"] / 8
    assert abs(on_disk - claimed) / claimed < 0.02
    assert len(header["modules"]) == 4 * 7  # every decoder linear layer
