"""HF GPTQ export: an independent reference reader, written here from the GPTQ layout spec
(GPTQModel's `dequantize_weight` convention; not lowbit's packer), reproduces lowbit's weights bit
for bit; the config is one transformers' GPTQConfig accepts; v1/v2 zero points; refusals."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lowbit.export._common import ExportError, read_artifact
from lowbit.export.hf_gptq import export_hf_gptq
from lowbit.pipeline import quantize, save_job
from lowbit.recipe import Recipe

CASES = {
    "int4-sym-g32": {"format": "int4", "symmetric": True, "group_size": 32},
    "int4-asym-g32": {"format": "int4", "symmetric": False, "group_size": 32},
    "int4-sym-pc": {"format": "int4", "symmetric": True, "group_size": -1},
    "int8-sym-pc": {"format": "int8", "symmetric": True, "group_size": -1},
    "int8-asym-tensor": {"format": "int8", "symmetric": False, "group_size": 0},  # written per channel, repeated
    "int8-asym-g32": {"format": "int8", "symmetric": False, "group_size": 32},
    "int2-sym-g32": {"format": "int2", "symmetric": True, "group_size": 32},
    "int3-asym-g32": {"format": "int3", "symmetric": False, "group_size": 32},
    "int3-sym-pc": {"format": "int3", "symmetric": True, "group_size": -1},
    "int4-asym-g64-ragged": {"format": "int4", "symmetric": False, "group_size": 64},  # down_proj: 96 = 64 + 32
    "ternary-g32": {"format": "ternary", "group_size": 32},
    "binary-g32": {"format": "binary", "group_size": 32},
    "mixed-groups": {"format": "int4", "symmetric": True, "group_size": 64,
                     "overrides": [{"pattern": r"mlp\.down_proj", "group_size": 32}, {"pattern": r"o_proj", "group_size": -1}]},
    "gptq-int4-asym-g32": {"method": "gptq", "format": "int4", "symmetric": False, "group_size": 32},
    "target-gptq-int4-g64": {"target": "gptq:int4-g64"},
    "target-gptq-int3-g32": {"method": "gptq", "target": "gptq:int3-g32"},
}


def make_artifact(src, out, calib_text=None, method="rtn", **kw):
    spec = {"method": method, **kw}
    if method == "gptq":
        spec["calib"] = {"path": str(calib_text), "n_samples": 8, "seq_len": 64}
    r = Recipe.from_dict(spec)
    return save_job(quantize(str(src), r, show_progress=False), r, out)


@pytest.fixture(scope="module")
def exports(tiny_llama, calib_text, tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    out = {}
    for name, spec in CASES.items():
        art = make_artifact(tiny_llama, root / name, calib_text, **spec)
        out[name] = (art, export_hf_gptq(art, root / f"{name}-gptq"))
    return out


def unpack_reference(words: np.ndarray, bits: int, n: int, axis: int) -> np.ndarray:
    """int32 words packed along `axis` -> n codes along that axis: the words' little-endian bytes
    form one bit stream per line, element j at bits [j*bits, (j+1)*bits)."""
    w = np.ascontiguousarray(np.moveaxis(words, axis, -1)).astype("<i4")
    stream = np.unpackbits(w.view(np.uint8), axis=-1, bitorder="little")  # [..., n_words*32]
    elems = stream[..., : n * bits].reshape(*stream.shape[:-1], n, bits).astype(np.int64)
    codes = (elems << np.arange(bits)).sum(-1)
    return np.moveaxis(codes, -1, axis)


def reference_dequantize(tensors: dict, qc: dict, out_f: int, in_f: int) -> torch.Tensor:
    """[out, in] float32 from qweight/qzeros/scales/g_idx: W^T[i,o] = s[g_idx[i],o] * (q[i,o] - z[g_idx[i],o])."""
    b = qc["bits"]
    q = unpack_reference(tensors["qweight"].numpy(), b, in_f, axis=0)  # [in, out]
    z = unpack_reference(tensors["qzeros"].numpy(), b, out_f, axis=1)  # [G, out]
    if qc["checkpoint_format"] == "gptq":  # v1 stores zero - 1
        z = z + 1
    g = tensors["g_idx"].numpy().astype(np.int64)
    s = tensors["scales"].numpy().astype(np.float32)
    wt = s[g] * (q - z[g]).astype(np.float32)  # [in, out]
    return torch.from_numpy(np.ascontiguousarray(wt.T))


def check_exact(art_dir, gptq_dir):
    qc = json.loads((gptq_dir / "config.json").read_text())["quantization_config"]
    state = load_file(str(gptq_dir / "model.safetensors"))
    art = read_artifact(art_dir)
    for name, qw in art.weights.items():
        t = {k: state[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        out_f, in_f = qw.shape
        b = qc["bits"]
        assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (-(-in_f * b // 32), out_f)
        assert t["qzeros"].dtype == torch.int32 and t["scales"].dtype == torch.float16 and t["g_idx"].dtype == torch.int32
        g = qc["group_size"] if qc["group_size"] > 0 else in_f
        assert t["scales"].shape == (-(-in_f // g), out_f)
        assert torch.equal(t["g_idx"], (torch.arange(in_f) // g).to(torch.int32))
        assert torch.equal(reference_dequantize(t, qc, out_f, in_f), qw.dequantize()), name
    return qc


@pytest.mark.parametrize("name", list(CASES))
def test_reference_reader_is_bit_exact(exports, name):
    check_exact(*exports[name])


def test_config_is_a_valid_gptqconfig(exports):
    from transformers import GPTQConfig

    for name, (_, d) in exports.items():
        qc = json.loads((d / "config.json").read_text())["quantization_config"]
        cfg = GPTQConfig.from_dict(dict(qc))
        assert cfg.bits == qc["bits"] and cfg.group_size == qc["group_size"] and cfg.format == qc["checkpoint_format"]
        assert qc["desc_act"] is False and qc["lm_head"] is False
    get = lambda n: json.loads((exports[n][1] / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert get("int4-sym-g32")["sym"] is True and get("int4-sym-g32")["checkpoint_format"] == "gptq"
    assert get("int4-sym-pc")["group_size"] == -1
    assert get("int4-asym-g64-ragged")["group_size"] == 64  # the short last group is just the last g_idx value
    assert get("mixed-groups")["group_size"] == 32  # gcd: g64 layers and per-channel o_proj get repeated scales
    assert get("ternary-g32")["bits"] == 2 and get("ternary-g32")["sym"] is True
    # v1 stores zero - 1: symmetric 4-bit zero 8 is stored as 7 in every nibble
    state = load_file(str(exports["int4-sym-g32"][1] / "model.safetensors"))
    assert (state["model.layers.0.self_attn.q_proj.qzeros"] == 0x77777777).all()


def test_zero_point_zero_is_written_as_v2(tiny_llama, tmp_path):
    """An asymmetric group whose weights are all >= 0 has zero point 0: v1's zero - 1 would borrow
    into the neighbouring nibble for nibble-wise readers, so the export is gptq_v2."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.abs_()
    model.save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).write_bytes((tiny_llama / f).read_bytes())
    art = make_artifact(src, tmp_path / "art", format="int4", symmetric=False, group_size=32)
    assert int(read_artifact(art).weights["model.layers.0.self_attn.q_proj"].params["zero"].min()) == 0
    out = export_hf_gptq(art, tmp_path / "out")
    assert check_exact(art, out)["checkpoint_format"] == "gptq_v2"


@pytest.mark.parametrize("spec, match", [
    ({"format": "nvfp4"}, r"module .*nvfp4.*compressed-tensors"),
    ({"format": "nf4", "group_size": 32}, r"module .*nf4.*what maps"),
    ({"format": "int5", "symmetric": True, "group_size": 32}, r"5-bit.*\(2, 3, 4, 8\)"),
    ({"format": "int4", "symmetric": True, "group_size": 32,
      "overrides": [{"pattern": r"mlp\.down_proj", "format": "int8"}]}, r"2 bit widths.*compressed-tensors"),
])
def test_refusals_say_why(tiny_llama, tmp_path, spec, match):
    art = make_artifact(tiny_llama, tmp_path / "a", **spec)
    with pytest.raises(ExportError, match=match):
        export_hf_gptq(art, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_existing_output_needs_force(exports, tmp_path):
    art, first = exports["int4-sym-g32"]
    (tmp_path / "mine").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_hf_gptq(art, tmp_path / "mine")
    with pytest.raises(ExportError, match="replaces only an earlier lowbit export"):  # a plain directory: never
        export_hf_gptq(art, tmp_path / "mine", force=True)
    export_hf_gptq(art, tmp_path / "out")
    again = export_hf_gptq(art, tmp_path / "out", force=True)
    assert (again / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()  # deterministic


def test_unquantized_block_layers_are_named_in_the_config(tiny_llama, tmp_path):
    art = make_artifact(tiny_llama, tmp_path / "a", format="int4", symmetric=True, group_size=32, ignore=["lm_head", r"o_proj"])
    out = export_hf_gptq(art, tmp_path / "out")
    qc = check_exact(art, out)
    assert qc["modules_in_block_to_quantize"] == [["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                                   "self_attn.q_proj", "self_attn.v_proj"]]
    state = load_file(str(out / "model.safetensors"))
    assert state["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float32  # kept dense, source dtype
