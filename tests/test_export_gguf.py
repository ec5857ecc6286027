"""GGUF export: what gguf-py's own reader decodes from the file is lowbit's dequantized weights,
bit for bit, for every mapped target, with RTN and GPTQ; what cannot be written exactly is refused."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import lowbit
from lowbit.artifact import quantized_modules
from lowbit.cli import app
from lowbit.export import ExportError, export_artifact
from lowbit.export import gguf_blocks
from lowbit.export.gguf import unpermute_rows
from lowbit.export.targets import target_for_width
from lowbit.nn import QuantLinear

from conftest import require_llama_cpp, save_tiny

runner = CliRunner(env={"COLUMNS": "200"})


def cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


def read_gguf(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def decoded(t) -> np.ndarray:
    """[rows, cols] float32 as gguf-py decodes the stored tensor."""
    from gguf.quants import dequantize

    return np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(list(reversed([int(d) for d in t.shape])))


BLOCK32 = [("gguf:q4_0", "Q4_0"), ("gguf:q4_1", "Q4_1"), ("gguf:q5_0", "Q5_0"), ("gguf:q5_1", "Q5_1"),
           ("gguf:q8_0", "Q8_0"), ("gguf:mxfp4", "MXFP4")]
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def quantize(model, out, *args, calib=None):
    extra = ["--calib", calib, "--n-samples", "4", "--seq-len", "64"] if calib else []
    res = cli("quantize", model, *args, *extra, "-o", out)
    assert res.exit_code == 0, res.output
    return res


def assert_decodes_exactly(art, path, n_head=4, n_kv=2, permuted=True) -> dict[str, str]:
    """Every quantized module: gguf-py's decode of its tensor (q/k rows un-permuted) equals lowbit's
    dequantized weight; returns module -> GGUF type. (torch.equal counts -0 equal to +0: lowbit's
    MXFP4 decodes its negative-zero code to -0, ggml's kvalues table to +0; every other bit agrees.)"""
    model = lowbit.load(art)
    _, tensors = read_gguf(path)
    types = {}
    for name, layer in quantized_modules(model).items():
        i, hf = name.removeprefix("model.layers.").split(".", 1)
        t = tensors[f"blk.{i}.{HF_TO_GGUF[hf]}.weight"]
        got = decoded(t)
        if permuted and hf.endswith("q_proj"):
            got = unpermute_rows(got, n_head)
        elif permuted and hf.endswith("k_proj"):
            got = unpermute_rows(got, n_kv)
        assert torch.equal(torch.from_numpy(got), layer.dequantize()), (name, t.tensor_type.name)
        types[name] = t.tensor_type.name
    return types


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory):
    """A Llama whose attention and MLP inputs are 256 wide (TQ blocks) but whose down_proj input,
    320, is a multiple of 32 only: the TQ targets fall back to gguf:q4_0 there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=320, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=4096, max_position_embeddings=128, tie_word_embeddings=False)
    return save_tiny(LlamaForCausalLM(cfg).eval(), tmp_path_factory.mktemp("tiny256"))


@pytest.mark.parametrize("target,ggml", BLOCK32)
@pytest.mark.parametrize("method,group", [("rtn", None), ("gptq", "64")])
def test_export_decodes_bit_for_bit(tiny_llama, calib_text, tmp_path, target, ggml, method, group):
    art = tmp_path / "art"
    extra = ["--group-size", group] if group and target != "gguf:mxfp4" else []  # MXFP4: its own 32
    res = cli("quantize", tiny_llama, "--method", method, "--target", target, *extra, "--calib", calib_text,
              "--n-samples", "4", "--seq-len", "64", "-o", art)
    assert res.exit_code == 0, res.output
    header = lowbit.read_header(art)
    assert header["recipe"]["target"] == target
    assert {m["target"] for m in header["modules"].values()} == {target}
    # width 96 (down_proj input) is a multiple of 32: every decoder linear is quantized
    assert len(header["modules"]) == 14
    out = tmp_path / "m.gguf"
    res = cli("export", art, "--to", "gguf", "-o", out)
    assert res.exit_code == 0, res.output
    model = lowbit.load(art)
    reader, tensors = read_gguf(out)
    cfg = model.config
    for i in range(cfg.num_hidden_layers):
        for hf, gg in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                       ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                       ("mlp.down_proj", "ffn_down")]:
            t = tensors[f"blk.{i}.{gg}.weight"]
            assert t.tensor_type.name == ggml
            got = decoded(t)
            if hf.endswith("q_proj"):
                got = unpermute_rows(got, cfg.num_attention_heads)
            elif hf.endswith("k_proj"):
                got = unpermute_rows(got, cfg.num_key_value_heads)
            layer = model.get_submodule(f"model.layers.{i}.{hf}")
            assert isinstance(layer, QuantLinear)
            assert torch.equal(torch.from_numpy(got), layer.dequantize()), (i, hf)
    assert "output.weight" in tensors and tensors["token_embd.weight"].tensor_type.name == "F16"
    keys = {f.name for f in reader.fields.values()}
    for k in ("general.architecture", "llama.block_count", "llama.embedding_length", "llama.attention.head_count_kv",
              "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        assert k in keys, k


def test_export_is_deterministic_and_guards_its_output(tiny_llama, tmp_path):
    art = tmp_path / "art"
    assert cli("quantize", tiny_llama, "--method", "rtn", "--target", "gguf:q4_0", "-o", art).exit_code == 0
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert cli("export", art, "--to", "gguf", "-o", a).exit_code == 0
    assert cli("export", art, "--to", "gguf", "-o", b).exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    res = cli("export", art, "--to", "gguf", "-o", a)
    assert res.exit_code == 2 and "already exists" in res.output
    assert cli("export", art, "--to", "gguf", "-o", a, "--force").exit_code == 0
    res = cli("export", art, "--to", "onnx", "-o", tmp_path / "x")
    assert res.exit_code == 2 and "unknown export format" in res.output


def test_tied_embeddings_and_qwen2(tiny_qwen2, tmp_path):
    art = tmp_path / "art"
    assert cli("quantize", tiny_qwen2, "--method", "rtn", "--target", "gguf:q8_0", "-o", art).exit_code == 0
    out = tmp_path / "q.gguf"
    res = cli("export", art, "--to", "gguf", "-o", out, "--embeddings", "q8_0")
    assert res.exit_code == 0, res.output
    _, tensors = read_gguf(out)
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"
    model = lowbit.load(art)
    bias = model.get_submodule("model.layers.0.self_attn.q_proj").bias
    assert torch.equal(torch.from_numpy(decoded(tensors["blk.0.attn_q.bias"]).reshape(-1)), bias)  # qwen2: not permuted
    got = decoded(tensors["blk.1.attn_q.weight"])
    assert torch.equal(torch.from_numpy(got), model.get_submodule("model.layers.1.self_attn.q_proj").dequantize())


@pytest.mark.parametrize("args,message", [
    (["--bits", "4"], "integer zero point"),  # the default asymmetric grid
    (["--format", "nf4"], "no exact GGUF layout"),
])
def test_unmappable_grids_are_refused_with_the_fix(tiny_llama, tmp_path, args, message):
    art = tmp_path / "art"
    assert cli("quantize", tiny_llama, "--method", "rtn", "--group-size", "32", *args, "-o", art).exit_code == 0
    res = cli("export", art, "--to", "gguf", "-o", tmp_path / "m.gguf")
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and message in text and "--target gguf:q4_0" in text
    assert not (tmp_path / "m.gguf").exists()


def test_target_conflicts_are_refused(tiny_llama, tmp_path):
    res = cli("quantize", tiny_llama, "--target", "gguf:q4_0", "--bits", "8", "-o", tmp_path / "a")
    assert res.exit_code == 2 and "drop format" in " ".join(res.output.split())
    res = cli("quantize", tiny_llama, "--target", "gguf:q4_0", "--group-size", "48", "-o", tmp_path / "b")
    assert res.exit_code == 2 and "not a multiple" in " ".join(res.output.split())
    res = cli("quantize", tiny_llama, "--target", "gguf:q3_k", "-o", tmp_path / "c")
    assert res.exit_code == 2 and "unknown target" in res.output


@pytest.mark.parametrize("target,ggml", [("gguf:tq2_0", "TQ2_0"), ("gguf:tq1_0", "TQ1_0")])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_ternary_targets_with_the_q4_0_fallback(tiny256, calib_text, tmp_path, target, ggml, method):
    art, out = tmp_path / "art", tmp_path / "m.gguf"
    res = quantize(tiny256, art, "--method", method, "--target", target, calib=calib_text)
    assert "model.layers.0.mlp.down_proj: input width 320 is not a multiple of the " in " ".join(res.output.split())
    header = lowbit.read_header(art)
    down = header["modules"]["model.layers.0.mlp.down_proj"]
    assert down["target"] == "gguf:q4_0" and "quantized for gguf:q4_0" in down["target_note"]
    assert down["grid"] == {"format": "int4", "symmetric": True} and down["group_size"] == 32
    up = header["modules"]["model.layers.0.mlp.up_proj"]
    assert up["target"] == target and up["group_size"] == 256 and "target_note" not in up
    assert cli("export", art, "--to", "gguf", "-o", out).exit_code == 0
    types = assert_decodes_exactly(art, out)
    assert types.pop("model.layers.0.mlp.down_proj") == "Q4_0"
    assert len(types) == 6 and set(types.values()) == {ggml}


def test_widths_no_block_fits_stay_float(tmp_path):
    """down_proj's input width 80 is not a multiple of 32: kept in float, written as F16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=4096, max_position_embeddings=128)
    model_dir = save_tiny(LlamaForCausalLM(cfg).eval(), tmp_path / "tiny80")
    art, out = tmp_path / "art", tmp_path / "m.gguf"
    res = quantize(model_dir, art, "--method", "rtn", "--target", "gguf:tq1_0")
    assert "kept model.layers.0.mlp.down_proj: input width 80" in " ".join(res.output.split())
    assert "kept in float" in lowbit.read_header(art)["skipped"]["model.layers.0.mlp.down_proj"]
    assert cli("export", art, "--to", "gguf", "-o", out).exit_code == 0
    assert set(assert_decodes_exactly(art, out).values()) == {"Q4_0"}  # 64 < 256: every other layer fell back
    _, tensors = read_gguf(out)
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "F16"
    assert target_for_width("gguf:tq2_0", 80) is None and target_for_width("gguf:tq2_0", 512).name == "gguf:tq2_0"


@pytest.mark.parametrize("args,to,ggml", [
    (["--bits", "4", "--asym"], "gguf:q5_0", "Q5_0"),  # q - zero in [-15, 15]
    (["--bits", "3", "--sym"], "gguf:q4_0", "Q4_0"),
    (["--bits", "6", "--sym"], "gguf:q8_0", "Q8_0"),
    (["--format", "binary"], "gguf:q4_0", "Q4_0"),
    (["--format", "ternary2"], "gguf:q4_0", "Q4_0"),  # ternary in groups of 32: no TQ type, but Q4_0 holds it
])
def test_wider_exact_types_on_request(tiny_llama, tmp_path, args, to, ggml):
    art = tmp_path / "art"
    quantize(tiny_llama, art, "--method", "rtn", "--group-size", "32", *args)
    res = cli("export", art, "--to", "gguf", "-o", tmp_path / "auto.gguf")
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and f"it fits {to}" in text and f"--to {to}" in text and "--target gguf:" in text, text
    out = tmp_path / "m.gguf"
    res = cli("export", art, "--to", to, "-o", out)
    assert res.exit_code == 0, res.output
    assert set(assert_decodes_exactly(art, out).values()) == {ggml}


def test_a_type_that_does_not_hold_the_weight_is_refused(tiny_llama, tmp_path):
    art = tmp_path / "art"
    quantize(tiny_llama, art, "--method", "rtn", "--target", "gguf:q8_0")
    res = cli("export", art, "--to", "gguf:q4_0", "-o", tmp_path / "m.gguf")
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "Q4_0 holds integers in [-8, 7], int8 sym needs [-128, 127]" in text, text
    with pytest.raises(ExportError, match="does not map exactly to Q4_1"):
        export_artifact(art, to="gguf:q4_1", out=tmp_path / "m.gguf")
    with pytest.raises(ExportError, match="unknown target"):
        export_artifact(art, to="gguf:q3_k", out=tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("args,message", [
    (["--bits", "4", "--sym", "--group-size", "16"], "group size 16 is not a multiple of Q4_0's 32-weight block"),
    (["--format", "fp4_e2m1", "--group-size", "32"], "--target gguf:mxfp4"),
    (["--format", "ternary", "--group-size", "64"], "--target gguf:tq1_0"),
])
def test_more_refusals_name_the_grid_and_the_fix(tiny_llama, tmp_path, args, message):
    art = tmp_path / "art"
    quantize(tiny_llama, art, "--method", "rtn", *args)
    res = cli("export", art, "--to", "gguf", "-o", tmp_path / "m.gguf")
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and message in text, text


@pytest.mark.parametrize("args,message", [
    (["--target", "gguf:mxfp4", "--group-size", "64"], "one scale per 32 weights"),
    (["--target", "gguf:tq2_0", "--group-size", "128"], "not a multiple"),
    (["--target", "gguf:tq1_0", "--format", "ternary2"], "drop format"),
])
def test_target_settings_are_checked(tiny_llama, tmp_path, args, message):
    res = cli("quantize", tiny_llama, "--method", "rtn", *args, "-o", tmp_path / "a")
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output


def test_block_packers_match_gguf_py():
    """The packers, byte for byte, against gguf-py's own quantizer where that one is exact (TQ1_0,
    TQ2_0: d = absmax recovers the trits) and value for value through its decoder for the others."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize as gguf_quantize

    rng = np.random.default_rng(0)
    trits = rng.integers(-1, 2, size=(6, 256)).astype(np.int16)
    trits[:, 0] = 1  # absmax of each block is its d
    d = np.float16(rng.random((6, 1)) + 0.1).astype(np.float32)
    for pack, qtype in [(gguf_blocks.pack_tq1_0, T.TQ1_0), (gguf_blocks.pack_tq2_0, T.TQ2_0)]:
        assert np.array_equal(pack(trits, d), gguf_quantize(trits * d, qtype))
    for pack, qtype, lo, hi in [(gguf_blocks.pack_q4_0, T.Q4_0, -8, 7), (gguf_blocks.pack_q5_0, T.Q5_0, -16, 15),
                                (gguf_blocks.pack_q8_0, T.Q8_0, -128, 127)]:
        v = rng.integers(lo, hi + 1, size=(6, 32))
        assert np.array_equal(dequantize(pack(v, d), qtype), v * d)
    m = np.float16(-rng.random((6, 1))).astype(np.float32)
    for pack, qtype, hi in [(gguf_blocks.pack_q4_1, T.Q4_1, 15), (gguf_blocks.pack_q5_1, T.Q5_1, 31)]:
        u = rng.integers(0, hi + 1, size=(6, 32))
        assert np.array_equal(dequantize(pack(u, d, m), qtype), (u * d).astype(np.float32) + m)
    with pytest.raises(ValueError, match="not an fp16 number"):
        gguf_blocks.pack_q4_0(np.zeros((1, 32), dtype=np.int16), np.full((1, 1), 0.1, dtype=np.float32))


# ---- Gemma 3, and llama.cpp itself reading the files ----------------------------------------------

GEMMA_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
              "full_attention": {"rope_type": "default", "rope_theta": 500000.0}}


def tiny_gemma3_model(**overrides):
    """A Gemma 3 text model: a sliding-window layer then a global one, window 8 (shorter than the
    logit tests' 32 tokens), distinct local and global rope bases, and random norm weights (HF
    Gemma applies 1 + w: a writer that forgets the + 1 is caught)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(4)
    cfg = Gemma3TextConfig(**{
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32, "vocab_size": 4096,
        "max_position_embeddings": 128, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": GEMMA_ROPE, **overrides})
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    return save_tiny(tiny_gemma3_model(), tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="module")
def tiny_gemma3_capped(tmp_path_factory):
    """Global attention only (no sliding window written) and a final logit softcap that bites."""
    model = tiny_gemma3_model(final_logit_softcapping=0.5, layer_types=["full_attention"] * 2)
    return save_tiny(model, tmp_path_factory.mktemp("tiny-gemma3-capped"))


def test_gemma3_metadata_norms_and_codes(tiny_gemma3, calib_text, tmp_path):
    art, out = tmp_path / "art", tmp_path / "g.gguf"
    quantize(tiny_gemma3, art, "--method", "gptq", "--target", "gguf:q4_0", calib=calib_text)
    assert cli("export", art, "--to", "gguf", "-o", out).exit_code == 0
    types = assert_decodes_exactly(art, out, permuted=False)  # NEOX rope: no q/k permutation
    assert len(types) == 14 and set(types.values()) == {"Q4_0"}
    reader, tensors = read_gguf(out)
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "gemma3"
    expected = {"gemma3.block_count": 2, "gemma3.embedding_length": 64, "gemma3.feed_forward_length": 128,
                "gemma3.attention.head_count": 2, "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": 32,
                "gemma3.attention.value_length": 32, "gemma3.attention.sliding_window": 8,
                "gemma3.attention.sliding_window_pattern": [True, False], "gemma3.rope.freq_base": 500000.0,
                "gemma3.rope.freq_base_swa": 500.0, "gemma3.context_length": 128}
    assert {k: f.get(k) for k in expected} == expected
    assert "gemma3.final_logit_softcapping" not in f and "output.weight" not in tensors  # none set; tied
    model = lowbit.load(art)
    for hf, gg in [("model.layers.0.input_layernorm", "blk.0.attn_norm"), ("model.layers.1.post_attention_layernorm",
                   "blk.1.post_attention_norm"), ("model.layers.0.pre_feedforward_layernorm", "blk.0.ffn_norm"),
                   ("model.layers.0.post_feedforward_layernorm", "blk.0.post_ffw_norm"),
                   ("model.layers.1.self_attn.q_norm", "blk.1.attn_q_norm"), ("model.layers.1.self_attn.k_norm", "blk.1.attn_k_norm"),
                   ("model.norm", "output_norm")]:
        t = tensors[gg + ".weight"]
        assert t.tensor_type.name == "F32"
        assert torch.equal(torch.from_numpy(decoded(t).reshape(-1)), model.get_submodule(hf).weight.float() + 1), hf


def test_gemma3_what_llama_cpp_would_run_differently_is_refused(tmp_path):
    from lowbit.export.gguf import write_model_gguf

    tok = save_tiny(tiny_gemma3_model(), tmp_path / "tok")
    out = tmp_path / "g.gguf"
    with pytest.raises(ExportError, match=r"query_pre_attn_scalar 64: llama.cpp scales queries by 1/sqrt\(32\)"):
        write_model_gguf(tiny_gemma3_model(query_pre_attn_scalar=64), tok, out, {}, "g")
    with pytest.raises(ExportError, match="attn_logit_softcapping"):
        write_model_gguf(tiny_gemma3_model(attn_logit_softcapping=50.0), tok, out, {}, "g")
    # a tokenizer that is neither byte-level nor SentencePiece-style BPE (a Unigram model, as T5's)
    import json

    spec = json.loads((tok / "tokenizer.json").read_text())
    spec["model"]["type"] = "Unigram"
    (tok / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match="tokenizer is Unigram. Nothing was written"):
        write_model_gguf(tiny_gemma3_model(), tok, out, {}, "g")
    assert not out.exists() and not list(tmp_path.glob(".g.gguf.*"))


def sharpened(model_dir, out):
    """The same model with q/k projections 10x larger: random-init attention is otherwise nearly
    uniform, and a wrong rope layout (llama's q/k row order) would go unnoticed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(10.0)
    return save_tiny(model, out)


@pytest.fixture(scope="module")
def sharp_llama(tiny_llama, tmp_path_factory):
    return sharpened(tiny_llama, tmp_path_factory.mktemp("sharp-llama"))


@pytest.fixture(scope="module")
def sharp_qwen2(tiny_qwen2, tmp_path_factory):
    return sharpened(tiny_qwen2, tmp_path_factory.mktemp("sharp-qwen2"))


@pytest.mark.parametrize("fixture,target,method", [
    ("tiny_llama", "gguf:q4_0", "gptq"), ("sharp_llama", "gguf:q4_0", "gptq"), ("sharp_llama", "gguf:mxfp4", "rtn"),
    ("tiny_qwen2", "gguf:q8_0", "rtn"), ("sharp_qwen2", "gguf:q5_1", "gptq"), ("tiny256", "gguf:tq1_0", "rtn"),
    ("tiny256", "gguf:q4_k", "gptq"), ("tiny256", "gguf:q5_k", "rtn"), ("tiny256", "gguf:q6_k", "gptq"),
    ("tiny_gemma3", "gguf:q4_0", "gptq"), ("tiny_gemma3", "gguf:q4_1", "rtn"), ("tiny_gemma3", "gguf:tq2_0", "rtn"),
    ("tiny_gemma3_capped", "gguf:q8_0", "rtn"),
])
def test_llama_cpp_logits_agree_with_lowbit(request, calib_text, tmp_path, fixture, target, method):
    """llama.cpp (llama-cpp-python) runs the exported file and its logits match lowbit's own
    dequantized model on the same tokens, up to llama.cpp quantizing activations to 8 bits inside
    quantized matmuls: measured 4e-3 to 1.3e-2 relative for Llama/Qwen2, about 2e-2 for Gemma 3 (an
    F32 file of the same Gemma weights agrees to 6e-4, so the rest is activation quantization, which
    Gemma's post-norms carry into the residual at full size). Measured controls: Gemma without the
    norm + 1, without the layer pattern or the local rope base, or llama without its q/k row order
    (the sharpened models) give 0.3 to 0.8."""
    llama_cpp = require_llama_cpp()
    art, out = tmp_path / "art", tmp_path / "m.gguf"
    quantize(request.getfixturevalue(fixture), art, "--method", method, "--target", target, calib=calib_text)
    assert cli("export", art, "--to", "gguf", "-o", out).exit_code == 0
    ids = list(range(10, 42))
    with torch.no_grad():
        ref = lowbit.load(art)(input_ids=torch.tensor([ids])).logits[0].float()
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    rel = ((got - ref).norm() / ref.norm()).item()
    worst = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f" rel {rel:.2e}, max {worst:.2e} of the logit scale", end="")
    assert rel < 0.05 and worst < 0.1, (rel, worst)


@pytest.fixture(scope="module")
def spm_llama(tmp_path_factory, calib_text):
    """A tiny Llama with a SentencePiece BPE tokenizer trained here on the calibration text (1000
    pieces, byte fallback, "▁" spaces; identity normalization and spaces kept, as Llama 2's:
    llama.cpp applies no SentencePiece normalization), saved the way Hugging Face saves it:
    tokenizer.json only."""
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    raw = tmp_path_factory.mktemp("spm-raw")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(calib_text.read_text().splitlines()[:4000]), model_writer=buf,
                                   vocab_size=1000, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1, minloglevel=2,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity")  # as Llama 2
    (raw / "tokenizer.model").write_bytes(buf.getvalue())
    out = tmp_path_factory.mktemp("spm-llama")
    AutoTokenizer.from_pretrained(raw).save_pretrained(out)
    assert not (out / "tokenizer.model").exists()  # the export must work from tokenizer.json alone
    torch.manual_seed(5)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=1000, max_position_embeddings=128, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    return out


def test_sentencepiece_tokenizer_runs_in_llama_cpp(spm_llama, eval_text, tmp_path):
    """llama.cpp tokenizes text as the Hugging Face tokenizer does (scores from the merge ranks,
    byte pieces, the "▁" prefix), and its logits on those tokens match lowbit's."""
    from transformers import AutoTokenizer

    llama_cpp = require_llama_cpp()
    art, out = tmp_path / "art", tmp_path / "m.gguf"
    quantize(spm_llama, art, "--method", "rtn", "--target", "gguf:q8_0")
    assert cli("export", art, "--to", "gguf", "-o", out).exit_code == 0
    reader, _ = read_gguf(out)
    field = reader.fields["tokenizer.ggml.model"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama" and "tokenizer.ggml.scores" in reader.fields
    hf = AutoTokenizer.from_pretrained(spm_llama)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, n_threads=1, verbose=False)
    lines = [ln for ln in eval_text.read_text().splitlines() if ln.strip()][:200] + ["naïve café — 1234 ☃ tab\there"]
    mismatched = [ln for ln in lines if llm.tokenize(ln.encode(), add_bos=False, special=False) !=
                  hf(ln, add_special_tokens=False).input_ids]
    assert not mismatched, mismatched[:3]
    ids = hf(" ".join(lines[:6]), add_special_tokens=False).input_ids[:48]
    with torch.no_grad():
        ref = lowbit.load(art)(input_ids=torch.tensor([ids])).logits[0].float()
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    assert ((got - ref).norm() / ref.norm()).item() < 0.05
