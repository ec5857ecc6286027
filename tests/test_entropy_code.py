"""Entropy-coded storage (`entropy_code: true`, `lowbit.coding`): the ANS stream decodes to the very
symbols it was given at a rate within a hair of their entropy; an artifact whose codes are coded
is smaller than the packed one, states both sizes, loads to exactly the packed artifact's tensors
and model, is deterministic, streams to the same bytes, and corrupt streams are named."""

import numpy as np
import pytest
import torch

from lowbit.artifact import ArtifactError, decode_coded_modules, load, load_quantized, read_header
from lowbit.coding import CodedSymbols, CodingError, decode_symbols, encode_symbols, entropy_bits
from lowbit.pipeline import quantize, save_job
from lowbit.recipe import Recipe


def test_ans_round_trip_is_exact_and_near_the_entropy():
    rng = np.random.default_rng(0)
    for alphabet, symbols in ((16, np.clip(np.round(rng.normal(7.5, 2.0, 200_000)), 0, 15)),
                              (8, rng.integers(0, 8, 50_000)), (2, (rng.random(10_000) < 0.05))):
        symbols = symbols.astype(np.uint8)
        coded = encode_symbols(symbols, alphabet)
        assert np.array_equal(decode_symbols(coded), symbols)
        rate = 32 * coded.words.size / symbols.size
        assert entropy_bits(symbols, alphabet) <= rate < entropy_bits(symbols, alphabet) + 0.01
        again = encode_symbols(symbols, alphabet)
        assert np.array_equal(coded.words, again.words) and np.array_equal(coded.counts, again.counts)
    with pytest.raises(CodingError, match="outside"):
        encode_symbols(np.array([0, 1, 9]), 8)


def test_a_wrong_stream_is_named():
    symbols = np.random.default_rng(1).integers(0, 16, 5000).astype(np.uint8)
    coded = encode_symbols(symbols, 16)
    with pytest.raises(CodingError, match="counts"):
        decode_symbols(CodedSymbols(coded.words, coded.counts, coded.n + 1))
    other = encode_symbols(np.random.default_rng(2).integers(0, 16, 5000).astype(np.uint8), 16)
    with pytest.raises(CodingError, match="corrupt"):  # another stream under these counts
        decode_symbols(CodedSymbols(other.words[: other.words.size // 2], coded.counts, coded.n))


def _recipe(calib_text, **extra) -> Recipe:
    return Recipe.from_dict({"method": "gptq", "format": "int4", "group_size": 32,
                             "calib": {"path": str(calib_text), "n_samples": 4, "seq_len": 64}, **extra})


@pytest.mark.parametrize("fmt", ["int3", "int4"])
def test_coded_artifact_is_smaller_and_loads_to_the_packed_one(calib_text, tmp_path, fmt):
    """GPTQ on the reference model (192-wide layers: large enough that the saving outweighs the
    safetensors entries of the stream and its counts)."""
    from conftest import SHAKESPEARE

    job = quantize(str(SHAKESPEARE), _recipe(calib_text, format=fmt), show_progress=False)
    packed_r, coded_r = _recipe(calib_text, format=fmt), _recipe(calib_text, format=fmt, entropy_code=True)
    packed = save_job(job, packed_r, tmp_path / "packed")
    coded = save_job(job, coded_r, tmp_path / "coded")
    hp, hc = read_header(packed), read_header(coded)
    assert hc["recipe"]["entropy_code"] is True and "entropy_code" not in hp["recipe"]
    assert (coded / "quantized.safetensors").stat().st_size < (packed / "quantized.safetensors").stat().st_size
    assert hc["summary"]["bpw"] < hp["summary"]["bpw"]
    for name, entry in hc["modules"].items():
        if "coding" in entry:
            assert entry["bpw"] < entry["bpw_packed"] == pytest.approx(hp["modules"][name]["bpw"])
    assert all("coding" in e for e in hc["modules"].values())
    tp, tc = load_quantized(packed, hp), load_quantized(coded, hc)
    assert sorted(tp) == sorted(tc) and all(torch.equal(tp[k], tc[k]) for k in tp)
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load(coded)(input_ids=ids).logits, load(packed)(input_ids=ids).logits)
    again = save_job(job, coded_r, tmp_path / "again")
    assert (again / "quantized.safetensors").read_bytes() == (coded / "quantized.safetensors").read_bytes()


def test_coded_stream_matches_in_memory_and_corruption_is_named(tiny_llama, calib_text, tmp_path):
    from lowbit.stream.quantize import stream_quantize

    r = _recipe(calib_text, entropy_code=True)
    mem = save_job(quantize(str(tiny_llama), r, show_progress=False), r, tmp_path / "mem")
    streamed, _ = stream_quantize(str(tiny_llama), r, tmp_path / "stream", show_progress=False)
    assert (mem / "quantized.safetensors").read_bytes() == (streamed / "quantized.safetensors").read_bytes()
    header = read_header(mem)
    from safetensors.torch import load_file

    tensors = load_file(str(mem / "quantized.safetensors"))
    name = next(n for n, e in header["modules"].items() if "coding" in e)
    tensors[f"{name}.codes_ans_counts"] = tensors[f"{name}.codes_ans_counts"].flip(0).contiguous()
    with pytest.raises(ArtifactError, match=name):
        decode_coded_modules(header, tensors, "artifact")
