"""compressed-tensors export: plain transformers (no lowbit import, in its own process) loads it,
its decompressed weights are lowbit's dequantized weights bit for bit, and its logits match
`lowbit.load`; what the format (or transformers 5.24's loader) cannot hold exactly is refused."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import lowbit
from lowbit.cli import app
from lowbit.export.compressed_tensors import pack_rows
from lowbit.nn import QuantLinear

runner = CliRunner(env={"COLUMNS": "200"})

READER = """
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
assert "lowbit" not in sys.modules
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.tensor([[5, 9, 200, 31, 7, 1000, 42]])
with torch.inference_mode():
    logits = m(input_ids=ids).logits[0]
out = {"logits": logits.contiguous()}
for name, mod in m.named_modules():
    if isinstance(mod, torch.nn.Linear):
        out[name] = mod.weight.detach().float().contiguous()
assert "lowbit" not in sys.modules
save_file(out, sys.argv[2])
"""


def cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


@pytest.mark.parametrize("bits,group,method", [(4, "32", "rtn"), (4, "-1", "rtn"), (8, "32", "rtn"), (4, "32", "gptq"),
                                               (2, "32", "rtn"), (3, "32", "rtn")])
def test_plain_transformers_decodes_the_export_exactly(tiny_llama, calib_text, tmp_path, bits, group, method):
    art, ct = tmp_path / "art", tmp_path / "ct"
    res = cli("quantize", tiny_llama, "--method", method, "--bits", bits, "--sym", "--group-size", group, "--calib", calib_text,
              "--n-samples", "4", "--seq-len", "64", "-o", art)
    assert res.exit_code == 0, res.output
    res = cli("export", art, "--to", "compressed-tensors", "-o", ct)
    assert res.exit_code == 0, res.output
    proc = subprocess.run([sys.executable, "-c", READER, str(ct), str(tmp_path / "w.safetensors")],
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": "", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "w.safetensors"))
    model = lowbit.load(art)
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(got[name], mod.dequantize()), name
            n += 1
    assert n == 14
    with torch.inference_mode():
        want = model(input_ids=torch.tensor([[5, 9, 200, 31, 7, 1000, 42]])).logits[0]
    assert (got["logits"] - want).abs().max() < 1e-4


def test_pack_rows_layout():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15, 0, 9]], dtype=torch.uint8)
    words = pack_rows(codes, 4)  # 10 codes of 4 bits: 2 words, element i at bit 4i, LSB first
    assert words.shape == (1, 2)
    value = sum(int(c) << (4 * i) for i, c in enumerate(codes[0].tolist()))
    assert [w & 0xFFFFFFFF for w in words[0].tolist()] == [value & 0xFFFFFFFF, value >> 32]


@pytest.mark.parametrize("args,message", [
    (["--bits", "4", "--group-size", "32"], "--sym"),  # asymmetric: zero points
    (["--format", "nf4", "--group-size", "32"], "no compressed-tensors layout"),
    (["--bits", "4", "--sym", "--group-size", "64"], "does not divide the width 96"),
    (["--bits", "4", "--sym", "--group-size", "32", "--recipe", "{mixed}"], "mixes schemes"),
])
def test_refusals(tiny_llama, tmp_path, args, message):
    (tmp_path / "mixed.yaml").write_text("overrides:\n  - {pattern: down_proj, format: int8}\n")
    args = [a.format(mixed=tmp_path / "mixed.yaml") for a in args]
    art = tmp_path / "art"
    assert cli("quantize", tiny_llama, "--method", "rtn", *args, "-o", art).exit_code == 0
    res = cli("export", art, "--to", "compressed-tensors", "-o", tmp_path / "ct")
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    assert not (tmp_path / "ct").exists()


def test_existing_directory_kept_and_earlier_export_replaced_with_force(tiny_llama, tmp_path):
    art = tmp_path / "art"
    assert cli("quantize", tiny_llama, "--method", "rtn", "--bits", "4", "--sym", "--group-size", "32", "-o", art).exit_code == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    res = cli("export", art, "--to", "compressed-tensors", "-o", mine, "--force")
    assert res.exit_code == 2 and mine.is_dir() and not list(mine.iterdir())
    ct = tmp_path / "ct"
    assert cli("export", art, "--to", "compressed-tensors", "-o", ct).exit_code == 0
    assert cli("export", art, "--to", "compressed-tensors", "-o", ct).exit_code == 2
    assert cli("export", art, "--to", "compressed-tensors", "-o", ct, "--force").exit_code == 0
