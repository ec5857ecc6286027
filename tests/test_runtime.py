"""lowbit's packed runtime: the C kernels against dequantize + F.linear, the fallback, and a
loaded model's logits with and without them."""

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lowbit.algos import rtn_quantize
from lowbit.formats import GroupLayout, get_grid
from lowbit.nn import QuantLinear
from lowbit.runtime.kernels import library
from lowbit.runtime.packed import PackedInt


def make_layer(bits, symmetric, group, out_f=48, in_f=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    qw = rtn_quantize(w, get_grid(f"int{bits}", symmetric=symmetric), GroupLayout(out_f, in_f, group))
    return QuantLinear.from_quantized(qw, torch.randn(out_f, generator=gen)), qw


def test_the_kernels_are_built_here():
    assert library() is not None, "a C compiler exists on this machine and in CI: the kernels must build"


LAYOUTS = [(32, 256), (64, 256), (128, 256), (-1, 256), (0, 256), (64, 96), (128, 576)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group,in_f", LAYOUTS)
@pytest.mark.parametrize("rows", [1, 5, 8, 17])
def test_kernel_matches_dequantize_and_linear(bits, symmetric, group, in_f, rows):
    check_kernel(bits, symmetric, group, in_f, rows)


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7])  # the generic bit-stream kernel
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group,in_f", [(32, 256), (128, 576), (-1, 96)])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_generic_width_kernel_matches_dequantize_and_linear(bits, symmetric, group, in_f, rows):
    check_kernel(bits, symmetric, group, in_f, rows)


def check_kernel(bits, symmetric, group, in_f, rows):
    layer, qw = make_layer(bits, symmetric, group, in_f=in_f)
    packed = PackedInt.from_module(layer)
    assert packed is not None
    assert torch.equal(packed.dequantize(), qw.dequantize())  # the C decode is lowbit's decode, bit for bit
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = layer(x)
    want = F.linear(x, qw.dequantize(), layer.bias)
    scale = (x.abs() @ qw.dequantize().abs().T).max()
    assert (got - want).abs().max() <= 1e-5 * scale, (got - want).abs().max()


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_packed_view_reads_the_modules_own_buffers(symmetric):
    layer, _ = make_layer(4, symmetric, 32, out_f=64, in_f=512)
    p = PackedInt.from_module(layer)
    assert p.codes.data_ptr() == layer.codes.data_ptr()  # the module's buffers, not copies
    assert p.scale.data_ptr() == layer.scale.data_ptr() and p.scale.dtype == torch.float16
    extra = 0 if p.zero is None else p.zero.numel()  # asymmetric: zero points widened to a byte per group
    assert extra == (0 if symmetric else 64 * 512 // 32)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="-march=x86-64 names an x86 target")
@pytest.mark.parametrize("arch", ["x86-64", "skylake-avx512"])  # no AVX-512 at all; AVX-512 without VBMI
def test_the_portable_build_agrees(arch, tmp_path):
    """The C paths other CPUs run (built here for an older -march), in a fresh process."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import test_runtime as t\n"
        "from lowbit.runtime.kernels import library\n"
        "assert library() is not None\n"
        "for bits in (2, 3, 4, 5, 8):\n"
        "    for sym in (True, False):\n"
        "        for group, in_f in ((32, 256), (128, 576), (-1, 96)):\n"
        "            for rows in (1, 3, 12):\n"
        "                t.check_kernel(bits, sym, group, in_f, rows)\n"
        "import torch, torch.nn.functional as F\n"
        "from lowbit.runtime.dense import HalfLinear\n"
        "w = torch.randn(300, 96).bfloat16(); x = torch.randn(2, 96)\n"
        "assert torch.allclose(HalfLinear(w, None)(x), F.linear(x, w.float()), atol=1e-4)\n"
        "print('portable ok')\n"
    )
    env = {**os.environ, "LOWBIT_KERNEL_ARCH": arch, "LOWBIT_CACHE": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "portable ok" in res.stdout, res.stderr[-2000:]
    built = list((tmp_path / "kernels").glob("*.so"))
    assert len(built) == 1  # its own build, not the native one from the cache


def test_grids_and_layouts_the_kernels_do_not_cover_fall_back():
    for bits, group, in_f in [(4, 48, 96), (4, 32, 100), (3, 16, 96)]:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(16, in_f, generator=gen)
        qw = rtn_quantize(w, get_grid(f"int{bits}"), GroupLayout(16, in_f, group))
        layer = QuantLinear.from_quantized(qw, None)
        assert PackedInt.from_module(layer) is None
        x = torch.randn(2, in_f)
        assert torch.equal(layer(x), F.linear(x, qw.dequantize()))


def test_gradients_use_the_differentiable_path():
    layer, qw = make_layer(4, False, 32)
    x = torch.randn(3, 256, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, qw.dequantize().sum(0).expand(3, -1), atol=1e-5)


def test_loaded_model_logits_with_and_without_the_kernels(tiny_llama, tmp_path):
    from lowbit.pipeline import quantize, save_job
    from lowbit.recipe import Recipe

    art = tmp_path / "art"
    r = Recipe.from_dict({"method": "rtn", "format": "int4", "group_size": 32})
    save_job(quantize(str(tiny_llama), r, show_progress=False), r, art)
    code = (
        "import sys, torch, lowbit\n"
        "m = lowbit.load(sys.argv[1])\n"
        "ids = torch.tensor([[5, 9, 200, 31, 7]])\n"
        "with torch.inference_mode():\n"
        "    full = m(input_ids=ids).logits[0]\n"
        "    step = [m(input_ids=ids[:, : i + 1]).logits[0, -1] for i in range(ids.shape[1])]\n"
        "torch.save({'full': full, 'step': torch.stack(step)}, sys.argv[2])\n"
    )
    outs = {}
    for flag in ("0", "1"):
        path = tmp_path / f"out{flag}.pt"
        env = {**os.environ, "LOWBIT_NO_EXT": flag}
        subprocess.run([sys.executable, "-c", code, str(art), str(path)], check=True, env=env, timeout=300)
        outs[flag] = torch.load(path, weights_only=True)
    fast, slow = outs["0"], outs["1"]
    assert torch.allclose(fast["full"], slow["full"], atol=1e-4)  # 5 rows: the kernel path
    assert torch.allclose(fast["step"], slow["step"], atol=1e-4)


def test_generate_command(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    runner = CliRunner()
    art = tmp_path / "art"
    assert runner.invoke(app, ["quantize", str(tiny_llama), "--method", "rtn", "--group-size", "32", "-o", str(art)]).exit_code == 0
    res = runner.invoke(app, ["generate", str(art), "--prompt", "To be or not", "--max-new-tokens", "5"])
    assert res.exit_code == 0, res.output
    assert "decode 5 tokens at" in res.output and "tokens/s" in res.output


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
def test_half_linear_equals_the_widened_weight(dtype, rows):
    from lowbit.runtime.dense import SLICE_ROWS, HalfLinear

    gen = torch.Generator().manual_seed(0)
    out_f = SLICE_ROWS + 77  # more than one slice on many rows
    w = torch.randn(out_f, 200, generator=gen).to(dtype)
    b = torch.randn(out_f, generator=gen)
    x = torch.randn(rows, 200, generator=gen)
    with torch.inference_mode():
        got = HalfLinear(w, b)(x)
    want = F.linear(x, w.float(), b)
    assert (got - want).abs().max() <= 1e-5 * (x.abs() @ w.float().abs().T).max()


def test_half_embedding_widens_exactly():
    from lowbit.runtime.dense import HalfEmbedding

    w = torch.randn(50, 16).bfloat16()
    ids = torch.tensor([[3, 0, 49, 3]])
    assert torch.equal(HalfEmbedding(w, None)(ids), F.embedding(ids, w.float()))


def _bf16_artifact(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from lowbit.pipeline import quantize, save_job
    from lowbit.recipe import Recipe

    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(src)
    for f in tiny_llama.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (src / f.name).write_bytes(f.read_bytes())
    art = tmp_path / "art"
    r = Recipe.from_dict({"method": "rtn", "format": "int4", "group_size": 32, "symmetric": True})
    save_job(quantize(str(src), r, show_progress=False), r, art)
    return art


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen2"])  # untied and tied output layer
def test_loaded_model_keeps_half_precision_dense_tensors(family, request, tmp_path):
    import lowbit
    from lowbit.runtime.dense import HalfEmbedding, HalfLinear

    art = _bf16_artifact(request.getfixturevalue(family), tmp_path)
    assert lowbit.artifact.read_header(art)["dense_dtype"] == "bfloat16"
    fast, wide = lowbit.load(art), lowbit.load(art, widen_dense=True)
    emb = fast.get_input_embeddings()
    assert isinstance(emb, HalfEmbedding) and emb.weight.dtype == torch.bfloat16
    assert isinstance(fast.lm_head, HalfLinear)  # the recipe's default skips lm_head
    if fast.config.tie_word_embeddings:
        assert fast.lm_head.weight is emb.weight  # one tensor, tied
    assert fast.dtype == torch.float32 and wide.get_input_embeddings().weight.dtype == torch.float32
    ids = torch.tensor([[5, 9, 200, 31, 7, 11, 2, 90, 4, 8]])
    with torch.inference_mode():
        for n in (1, 10):  # decode-sized and prefill-sized inputs
            a, b = fast(input_ids=ids[:, :n]).logits, wide(input_ids=ids[:, :n]).logits
            assert (a - b).abs().max() <= 1e-4 * b.abs().max(), (a - b).abs().max()
    held = sum(t.numel() * t.element_size() for t in [*fast.parameters(), *fast.buffers()] if t.dim() == 2 or t.dtype == torch.uint8)
    widened = sum(t.numel() * t.element_size() for t in [*wide.parameters(), *wide.buffers()] if t.dim() == 2 or t.dtype == torch.uint8)
    assert held < widened
