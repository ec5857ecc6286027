"""GGUF export: what gguf-py's own reader decodes from the file is lowbit's dequantized weights,
bit for bit, for every mapped target, with RTN and GPTQ; what cannot be written exactly is refused."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import lowbit
from lowbit.cli import app
from lowbit.export.gguf import unpermute_rows
from lowbit.nn import QuantLinear

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


@pytest.mark.parametrize("target,ggml", [("gguf:q4_0", "Q4_0"), ("gguf:q5_0", "Q5_0"), ("gguf:q8_0", "Q8_0")])
@pytest.mark.parametrize("method,group", [("rtn", None), ("gptq", "64")])
def test_export_decodes_bit_for_bit(tiny_llama, calib_text, tmp_path, target, ggml, method, group):
    art = tmp_path / "art"
    extra = ["--group-size", group] if group else []
    res = cli("quantize", tiny_llama, "--method", method, "--target", target, *extra, "--calib", calib_text,
              "--n-samples", "4", "--seq-len", "64", "-o", art)
    assert res.exit_code == 0, res.output
    header = lowbit.read_header(art)
    assert header["recipe"]["target"] == target
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
