"""compressed-tensors export: compressed-tensors' own decompressors give lowbit's dequantized
weights bit for bit for every grid the writer maps; plain transformers (no lowbit import, in its
own process) loads the export in every mode that can work and matches `lowbit.load`; the modes
that cannot work fail as documented, and what the format or the loader cannot hold is refused."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import lowbit
from lowbit.cli import app
from lowbit.export._common import pack_int32, read_artifact
from lowbit.export.compressed_tensors import _fp4_tensors, write_compressed_tensors
from lowbit.export.errors import ExportError
from lowbit.formats import GroupLayout, MXFP4Grid, NVFP4Grid
from lowbit.pipeline import quantize, save_job
from lowbit.qtensor import QuantizedWeight
from lowbit.recipe import Recipe

from compressed_tensors.compressors import BaseCompressor  # the `test` extra pins compressed-tensors
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.utils.match import is_match

from conftest import save_tiny

runner = CliRunner(env={"COLUMNS": "200"})

INT = {f"int{b}-{'sym' if s else 'asym'}-g32": {"format": f"int{b}", "symmetric": s, "group_size": 32}
       for b in range(2, 9) for s in (True, False)}  # every bit width compressed-tensors packs that lowbit has
CASES = {
    **INT,
    "int4-sym-channel": {"format": "int4", "symmetric": True, "group_size": -1},
    "int6-asym-channel": {"format": "int6", "symmetric": False, "group_size": -1},
    "int8-asym-tensor": {"format": "int8", "symmetric": False, "group_size": 0},  # written per channel, repeated
    "int3-sym-tensor": {"format": "int3", "symmetric": True, "group_size": 0},
    "int4-asym-g64-ragged": {"format": "int4", "symmetric": False, "group_size": 64},  # down_proj: 96 = 64 + 32
    "int5-sym-g48-ragged": {"format": "int5", "symmetric": True, "group_size": 48},  # 64 = 48 + 16: written at g16
    "int4-sym-g32-clip": {"format": "int4", "symmetric": True, "group_size": 32, "format_options": {"clip": 0.9}},
    "ternary-g32": {"format": "ternary", "group_size": 32},
    "binary-g32": {"format": "binary", "group_size": 32},
    "nvfp4": {"format": "nvfp4"},
    "nvfp4-mse-tse-3": {"format": "nvfp4", "format_options": {"scale_rule": "mse", "tensor_scale_exp": -3}},
    "mxfp4": {"format": "mxfp4"},
    "mxfp4-mse": {"format": "mxfp4", "format_options": {"scale_rule": "mse"}},
    "mixed-sym": {"format": "int4", "symmetric": True, "group_size": 32,
                  "overrides": [{"pattern": r"mlp\.down_proj", "format": "int8", "group_size": -1}]},
    "gptq-int4-asym-g32": {"method": "gptq", "format": "int4", "symmetric": False, "group_size": 32},
    "qwen2-int4-asym-g32": {"format": "int4", "symmetric": False, "group_size": 32},  # biased q/k/v, tied embeddings
    "qwen2-nvfp4": {"format": "nvfp4"},
    # export-aware quantization for compressed-tensors (`--target`)
    "target-ct-w4a16-g64": {"target": "ct:w4a16-g64"},  # tiny layers: 64/96 wide
    "target-ct-w4a16-asym-g32": {"method": "gptq", "target": "ct:w4a16-asym-g32"},
    "target-ct-nvfp4": {"target": "ct:nvfp4"},
}
IDS = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(0))  # 80 tokens: lowbit decodes exactly


def make_artifact(src, out, calib_text=None, method="rtn", **kw):
    spec = {"method": method, **kw}
    if method in ("gptq", "ptq161"):
        spec["calib"] = {"path": str(calib_text), "n_samples": 8, "seq_len": 64}
    r = Recipe.from_dict(spec)
    return save_job(quantize(str(src), r, show_progress=False), r, out)


@pytest.fixture(scope="module")
def exports(tiny_llama, tiny_qwen2, calib_text, tmp_path_factory):
    """case name -> (artifact dir, compressed-tensors dir)."""
    root = tmp_path_factory.mktemp("ct")
    out = {}
    for name, spec in CASES.items():
        art = make_artifact(tiny_qwen2 if name.startswith("qwen2") else tiny_llama, root / name, calib_text, **spec)
        out[name] = (art, write_compressed_tensors(art, root / f"{name}-ct"))
    return out


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns of `t` (so -0.0 and 0.0 differ, as bit for bit means)."""
    return t.to(torch.float32).contiguous().view(torch.int32)


def decompress_all(ct_dir):
    """module name -> weight as compressed-tensors' own compressor for its config group decodes it;
    the config is parsed by compressed-tensors and modules are matched to groups by its matcher."""
    from transformers import AutoConfig, AutoModelForCausalLM

    qc = QuantizationConfig.model_validate(json.loads((ct_dir / "config.json").read_text())["quantization_config"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ct_dir))
    state = load_file(str(ct_dir / "model.safetensors"))
    decoded = {}
    for name, module in model.named_modules():
        groups = [g for g in qc.config_groups.values() if is_match(name, module, g.targets, qc.ignore or [])]
        if not groups:
            continue
        assert len(groups) == 1, name
        own = {k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".") and k != f"{name}.bias"}
        compressor = BaseCompressor.get_value_from_registry(groups[0].format or qc.format)
        decoded[name] = compressor.decompress(own, groups[0])["weight"]
    return decoded


@pytest.mark.parametrize("name", list(CASES))
def test_compressed_tensors_decompressor_is_bit_exact(exports, name):
    art_dir, ct_dir = exports[name]
    art = read_artifact(art_dir)
    decoded = decompress_all(ct_dir)
    assert set(decoded) == set(art.weights) and len(decoded) == 14
    for module, qw in art.weights.items():
        ref = qw.dequantize()  # [out, in] float32
        assert decoded[module].shape == ref.shape, module
        assert torch.equal(bits_of(decoded[module]), bits_of(ref)), (module, (decoded[module].float() - ref).abs().max())


@pytest.mark.parametrize("grid", [NVFP4Grid(), NVFP4Grid(tensor_scale_exp=0), NVFP4Grid(tensor_scale_exp=-40),
                                  NVFP4Grid(tensor_scale_exp=33), MXFP4Grid()], ids=lambda g: str(g.spec()))
def test_fp4_decode_matches_compressed_tensors_for_every_code(grid):
    """Every element code with every scale code (E4M3 0..126 for nvfp4, E8M0 0..254 for mxfp4):
    lowbit's decode (formats/minifloat.py) and compressed-tensors' decompressor agree bit for bit
    (down to the mxfp4 exponents so large that both overflow to the same infinity)."""
    kind, block, n_scales = ("nvfp4", 16, 127) if isinstance(grid, NVFP4Grid) else ("mxfp4", 32, 255)
    codes = torch.arange(block).remainder(16).to(torch.uint8).expand(n_scales, block).contiguous()
    scale = torch.arange(n_scales, dtype=torch.float32)[:, None]  # one block per row, row r has scale code r
    qw = QuantizedWeight(codes, {"scale" if kind == "nvfp4" else "scale_exp": scale}, grid, GroupLayout(n_scales, block, block))
    fmt = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}[kind]
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

    scheme = preset_name_to_scheme(f"{kind.upper()}A16", ["Linear"])
    assert isinstance(scheme, QuantizationScheme)
    got = BaseCompressor.get_value_from_registry(fmt).decompress(_fp4_tensors("w", kind, qw), scheme)["weight"]
    ref = qw.dequantize()
    assert torch.equal(bits_of(got), bits_of(ref)), (got.float() - ref).abs().max()
    assert ref[: n_scales // 2].isfinite().all() and (ref != 0).any()


def test_pack_matches_compressed_tensors_packer():
    g = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        u = torch.randint(0, 2**bits, (5, 77), generator=g)
        signed = (u - 2 ** (bits - 1)).to(torch.int8)
        assert torch.equal(pack_int32(u, bits), pack_to_int32(signed, bits)), bits
        assert torch.equal(pack_int32(u.T, bits).T, pack_to_int32(signed, bits, packed_dim=0)), bits


def test_config_groups_and_loader_settings(exports):
    def qc(n):
        return json.loads((exports[n][1] / "config.json").read_text())["quantization_config"]

    sym, asym, ragged, ragged5, mixed = qc("int4-sym-g32"), qc("int4-asym-g32"), qc("int4-asym-g64-ragged"), qc("int5-sym-g48-ragged"), qc("mixed-sym")
    assert sym["format"] == "pack-quantized" and "dequantize" not in sym and sym["ignore"] == ["lm_head"]
    assert sym["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert asym["dequantize"] is True and len(asym["config_groups"]) == 1  # asym loads only dequantized, one group
    assert ragged["config_groups"]["group_0"]["weights"]["group_size"] == 32  # gcd(64, 96): exact, no ragged group
    assert ragged5["config_groups"]["group_0"]["weights"]["group_size"] == 16  # gcd(48, 64, 96)
    assert qc("int4-sym-channel")["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    assert qc("int8-asym-tensor")["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    assert mixed["format"] == "mixed-precision" and len(mixed["config_groups"]) == 2 and "dequantize" not in mixed
    for fp4 in ("nvfp4", "mxfp4"):  # decompressed to bf16 in the compressed mode: a float32 model fails there
        assert qc(fp4)["format"] == f"{fp4}-pack-quantized" and qc(fp4)["dequantize"] is True
    state = load_file(str(exports["qwen2-int4-asym-g32"][1] / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.bias" in state and "lm_head.weight" not in state  # tied: stored once
    cfg = json.loads((exports["int4-sym-g32"][1] / "config.json").read_text())
    assert cfg["dtype"] == "float32" and (exports["int4-sym-g32"][1] / "tokenizer.json").is_file()


# Plain transformers in a process that never imports lowbit: every export loaded as written
# (`from_pretrained(dir)`), then forced into each mode transformers offers.
PLAIN = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    MODES = {"as written": {}, "compressed": {"quantization_config": CompressedTensorsConfig(dequantize=False)},
             "run_compressed=False": {"quantization_config": CompressedTensorsConfig(run_compressed=False)}}
    ids = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    out = {}
    for arg in sys.argv[2:]:
        path, mode = arg.split("|")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **MODES[mode]).eval()
            with torch.inference_mode():
                logits = model(input_ids=ids).logits
            weights = {n: m.weight.detach().float().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
            out[arg] = {"logits": logits, "weights": weights}
        except Exception as exc:
            out[arg] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    assert not any(m == "lowbit" or m.startswith("lowbit.") for m in sys.modules), "lowbit was imported"
    torch.save(out, sys.argv[1])
""")

# what each mode does with an export, in transformers 5.24 with compressed-tensors 0.19 / 0.20.1:
# "exact" = lowbit's weights bit for bit and its logits; "fails" = an exception at load or first
# forward; "wrong" = loads and runs with wrong weights, no error
MODE_TABLE = {
    "int4-sym-g32": {"as written": "exact", "compressed": "exact", "run_compressed=False": "exact"},
    "int8-sym-g32": {"as written": "exact", "compressed": "exact", "run_compressed=False": "exact"},
    "int4-asym-g32": {"as written": "exact", "compressed": "fails", "run_compressed=False": "exact"},  # packed zero vs unpacked
    "int6-asym-channel": {"as written": "exact", "compressed": "fails", "run_compressed=False": "exact"},
    "nvfp4": {"as written": "exact", "compressed": "fails", "run_compressed=False": "exact"},  # bf16 weight, fp32 input
    "mxfp4": {"as written": "exact", "compressed": "fails", "run_compressed=False": "exact"},
    "mixed-sym": {"as written": "exact", "compressed": "exact", "run_compressed=False": "wrong"},  # first group's scheme
}
AS_WRITTEN = [n for n in CASES if n not in MODE_TABLE]


def run_plain(exports, tmp_path, runs):
    result = tmp_path / "plain.pt"
    env = dict(os.environ)  # no lowbit on the path (other entries, such as another compressed-tensors, stay)
    keep = [e for e in env.get("PYTHONPATH", "").split(os.pathsep) if e and not os.path.isdir(os.path.join(e, "lowbit"))]
    env["PYTHONPATH"] = os.pathsep.join(keep)
    args = [f"{exports[n][1]}|{mode}" for n, mode in runs]
    proc = subprocess.run([sys.executable, "-c", PLAIN, str(result), *args], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(result)
    return {(n, mode): got[a] for (n, mode), a in zip(runs, args)}


def outcome(exports, name, res):
    """'exact', 'fails' or 'wrong' for one load result, against lowbit's own model."""
    if "error" in res:
        return "fails"
    model = lowbit.load(exports[name][0])
    art = read_artifact(exports[name][0])
    if not all(torch.equal(bits_of(res["weights"][m]), bits_of(qw.dequantize())) for m, qw in art.weights.items()):
        return "wrong"
    with torch.inference_mode():
        ref = model(input_ids=IDS).logits
    # the same weights bit for bit: only float32 summation order may differ (far inside fp16 rounding)
    assert (res["logits"] - ref).abs().max() <= 1e-5 * ref.abs().max(), (name, (res["logits"] - ref).abs().max())
    return "exact"


def test_plain_transformers_loads_every_export_and_matches_lowbit(exports, tmp_path):
    runs = [(n, "as written") for n in AS_WRITTEN]
    for (name, mode), res in run_plain(exports, tmp_path, runs).items():
        assert outcome(exports, name, res) == "exact", (name, res.get("error"))


def test_transformers_load_modes_behave_as_documented(exports, tmp_path):
    """The writer's config avoids each mode that fails or is wrong (dequantize for asym and fp4,
    several groups only for symmetric int); this pins down that those modes really fail."""
    runs = [(n, mode) for n, modes in MODE_TABLE.items() for mode in modes]
    got = {key: outcome(exports, key[0], res) for key, res in run_plain(exports, tmp_path, runs).items()}
    assert got == {(n, m): want for n, modes in MODE_TABLE.items() for m, want in modes.items()}


@pytest.fixture(scope="module")
def odd_llama(tmp_path_factory):
    """A Llama whose MLP width (88) is a whole number of neither 16- nor 32-blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=88, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=4096, max_position_embeddings=128)
    return save_tiny(LlamaForCausalLM(cfg).eval(), tmp_path_factory.mktemp("odd-llama"))


@pytest.mark.parametrize("spec, match", [
    ({"format": "nf4", "group_size": 32}, r"module model\.layers\.0\.\w+\.\w+: grid .*nf4.* non-uniform levels.*quantize with --format int4"),
    ({"format": "fp4_e2m1", "group_size": 32}, r"grid .*fp4_e2m1.*fp16 scale per group.*quantize with --format nvfp4 or --format mxfp4"),
    ({"format": "nested8", "group_size": 32}, r"grid .*nested8.*half-integer levels.*quantize with --format int8"),
    ({"format": "power4", "group_size": 32}, r"grid .*power4.*non-uniform"),
    ({"format": "int4", "symmetric": False, "group_size": 32, "overrides": [{"pattern": r"mlp\.down_proj", "format": "int8"}]},
     r"2 compressed-tensors config groups \(int4 asym g32, int8 asym g32\).*first group's scheme.*--sym"),
    ({"format": "int4", "symmetric": True, "group_size": 32, "overrides": [{"pattern": r"mlp\.down_proj", "format": "nvfp4"}]},
     r"2 compressed-tensors config groups \(int4 sym g32, nvfp4\)"),
    ({"format": "int4", "symmetric": True, "group_size": 32, "overrides": [{"pattern": r"mlp\.down_proj", "format": "mxfp4"}]},
     r"2 compressed-tensors config groups \(int4 sym g32, mxfp4\)"),
])
def test_refusals_say_which_grid_why_and_what_instead(tiny_llama, tmp_path, spec, match):
    art = make_artifact(tiny_llama, tmp_path / "a", **spec)
    with pytest.raises(ExportError, match=match):
        write_compressed_tensors(art, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["a"]


@pytest.mark.parametrize("fmt, block", [("nvfp4", 16), ("mxfp4", 32)])
def test_fp4_on_a_width_without_whole_blocks_is_refused(odd_llama, tmp_path, fmt, block):
    art = make_artifact(odd_llama, tmp_path / "a", format=fmt)
    with pytest.raises(ExportError, match=rf"mlp\.down_proj: grid {fmt} on a width of 88, not a whole number of {block}-blocks.*--ignore"):
        write_compressed_tensors(art, tmp_path / "out")


def test_ptq161_modules_are_refused(tiny_llama, calib_text, tmp_path):
    art = make_artifact(tiny_llama, tmp_path / "a", calib_text, method="ptq161", format="int4", group_size=32)
    with pytest.raises(ExportError, match=r"module model\.layers\.0\.\w+\.\w+ is a 'ptq161' module .*re-quantize without that method"):
        write_compressed_tensors(art, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


def test_cli_refusal_and_existing_directory_kept_earlier_export_replaced_with_force(tiny_llama, tmp_path):
    art = tmp_path / "art"
    assert cli("quantize", tiny_llama, "--method", "rtn", "--format", "nf4", "--group-size", "32", "-o", art).exit_code == 0
    res = cli("export", art, "--to", "compressed-tensors", "-o", tmp_path / "ct")
    assert res.exit_code == 2 and "has no compressed-tensors layout" in " ".join(res.output.split()), res.output
    assert not (tmp_path / "ct").exists()
    art = tmp_path / "art4"
    assert cli("quantize", tiny_llama, "--method", "rtn", "--bits", "4", "--group-size", "32", "-o", art).exit_code == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    res = cli("export", art, "--to", "compressed-tensors", "-o", mine, "--force")
    assert res.exit_code == 2 and mine.is_dir() and not list(mine.iterdir())
    ct = tmp_path / "ct"
    assert cli("export", art, "--to", "compressed-tensors", "-o", ct).exit_code == 0
    assert cli("export", art, "--to", "compressed-tensors", "-o", ct).exit_code == 2
    assert cli("export", art, "--to", "compressed-tensors", "-o", ct, "--force").exit_code == 0


def test_export_is_deterministic(exports, tmp_path):
    art, first = exports["int4-asym-g32"]
    again = write_compressed_tensors(art, tmp_path / "again")
    for f in ("model.safetensors", "config.json"):
        assert (first / f).read_bytes() == (again / f).read_bytes()


@pytest.mark.parametrize("name, fmt, sym, group", [
    ("ct:w4a16", "int4", True, 128), ("ct:w8a16-g32", "int8", True, 32), ("ct:w4a16-asym", "int4", False, 128),
    ("gptq:int4", "int4", True, 128), ("gptq:int3-g64-asym", "int3", False, 64), ("ct:nvfp4", "nvfp4", None, 16),
])
def test_compressed_tensors_and_gptq_targets_fix_the_scheme(name, fmt, sym, group):
    r = Recipe.from_dict({"method": "rtn", "target": name})
    assert (r.format, r.group_size) == (fmt, group)
    if sym is not None:
        assert r.symmetric is sym


def test_target_mistakes_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="fixes groups of 128"):
        Recipe.from_dict({"method": "rtn", "target": "ct:w4a16", "group_size": 64})
    with pytest.raises(ValueError, match="known targets: .*ct:w4a16"):
        Recipe.from_dict({"method": "rtn", "target": "ct:w5a8"})
    with pytest.raises(ValueError, match="unknown target"):
        Recipe.from_dict({"method": "rtn", "target": "gptq:int5"})  # GPTQ kernels take 2, 3, 4, 8 bits


def test_a_compressed_tensors_target_is_not_a_gguf_type(exports, tmp_path):
    from lowbit.export.gguf import write_gguf

    art, _ = exports["target-ct-w4a16-g64"]
    with pytest.raises(ExportError, match="not a GGUF type"):
        write_gguf(art, tmp_path / "m.gguf", to="ct:w4a16-g64")
    assert not (tmp_path / "m.gguf").exists()
    # int4 symmetric in groups of 64 (whole 32-blocks, a short last one of 32) is also exactly Q4_0
    assert cli("export", str(art), "--to", "gguf", "-o", str(tmp_path / "m.gguf")).exit_code == 0
