"""Nothing lost, nothing crashes: the defects a careless user and an attacker found, one test each.

Every case fails without its fix: --force that replaced anything, NaN accepted outside the
quantized weights, allocations from claimed shapes, header fields unchecked, output paths checked
only after the work, inputs silently accepted, pickles read, and unclear messages."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import lowbit
from bench.fuzz_artifacts import sign
from lowbit.artifact import ArtifactError, read_header, validate
from lowbit.checksum import sha256_file
from lowbit.cli import _finite_json, app

runner = CliRunner(env={"COLUMNS": "200"})
ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


def one_line(res) -> str:
    return " ".join(res.output.split())


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def art(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "art"
    res = cli("quantize", tiny_llama, "--method", "rtn", "--bits", "4", "--group-size", "32", "-o", out)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture()
def model_copy(tiny_llama, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_llama, dst)
    return dst


def resign(path: Path, edit) -> None:
    header = json.loads((path / "lowbit.json").read_text())
    edit(header)
    (path / "lowbit.json").write_bytes(sign(header))


def copy_art(art: Path, dst: Path) -> Path:
    shutil.copytree(art, dst)
    return dst


def rewrite_tensor(path: Path, file: str, key: str, fn) -> None:
    """Change one stored tensor and re-sign the file's checksum (what an attacker can do)."""
    tensors = load_file(str(path / file))
    tensors[key] = fn(tensors[key])
    save_file(tensors, str(path / file))
    resign(path, lambda h: h["files"].__setitem__(file, sha256_file(path / file)))


# 1. --force cannot destroy a model -----------------------------------------------------------

def test_force_onto_the_source_refuses_before_loading_and_keeps_it(model_copy, monkeypatch):
    before = tree_digest(model_copy)
    import lowbit.pipeline

    monkeypatch.setattr(lowbit.pipeline, "load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    for target in (model_copy, model_copy / "sub", model_copy / "sub" / "deeper"):
        res = cli("quantize", model_copy, "--method", "rtn", "-o", target, "--force")
        assert res.exit_code == 2 and "source model" in one_line(res), res.output
    assert tree_digest(model_copy) == before


def test_force_replaces_only_an_artifact(art, tiny_llama, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "mine.txt").write_text("keep")
    afile = tmp_path / "file.txt"
    afile.write_text("keep")
    for target in (plain, afile):
        res = cli("quantize", tiny_llama, "--method", "rtn", "-o", target, "--force")
        assert res.exit_code == 2 and "replaces only a lowbit artifact" in one_line(res), res.output
    assert (plain / "mine.txt").read_text() == "keep" and afile.read_text() == "keep"
    mine = copy_art(art, tmp_path / "mine")
    res = cli("quantize", tiny_llama, "--method", "rtn", "--bits", "8", "--group-size", "32", "-o", mine, "--force")
    assert res.exit_code == 0, res.output
    assert read_header(mine)["modules"]["model.layers.0.mlp.up_proj"]["bits"] == 8


def test_output_dot_is_refused(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for target in (".", str(tmp_path.parent)):
        res = cli("quantize", tiny_llama, "--method", "rtn", "-o", target, "--force")
        assert res.exit_code == 2 and "current directory" in one_line(res), res.output


# 2. NaN anywhere -----------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["model.norm.weight", "model.embed_tokens.weight", "lm_head.weight",
                                 "model.layers.0.input_layernorm.weight"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nan_in_any_source_tensor_is_refused_up_front(model_copy, tmp_path, key, method):
    tensors = load_file(str(model_copy / "model.safetensors"))
    tensors[key][0] = float("nan")
    save_file(tensors, str(model_copy / "model.safetensors"), metadata={"format": "pt"})
    res = cli("quantize", model_copy, "--method", method, "--n-samples", "2", "--seq-len", "32", "-o", tmp_path / "out")
    assert res.exit_code == 2 and key in one_line(res) and "NaN" in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_eval_refuses_non_finite_logits_and_json_stays_json(art, tmp_path, eval_text):
    bad = copy_art(art, tmp_path / "nan")
    rewrite_tensor(bad, "dense.safetensors", "model.norm.weight", lambda t: t.fill_(float("nan")))
    res = cli("eval", bad, "--text", eval_text, "--max-tokens", "128", "--seq-len", "64", "--json")
    assert res.exit_code == 2 and "NaN or infinite logits" in one_line(res), res.output
    out = _finite_json({"kl": float("nan"), "ppl": float("inf"), "rows": [float("-inf"), 1.0]})
    assert json.loads(json.dumps(out, allow_nan=False)) == {"kl": None, "ppl": None, "rows": [None, 1.0]}


# 3. untrusted shapes allocate nothing --------------------------------------------------------

def test_forged_module_shape_is_refused_without_allocating(art, tmp_path):
    forged = copy_art(art, tmp_path / "forged")

    def edit(h):
        m = h["modules"]["model.layers.0.mlp.up_proj"]
        m["shape"], m["numel"] = [2**14, 2**17], 2**31
        m["stored_bytes"] = {"codes": 2**30, "scale": 2**14 * 2**12 * 2, "zero": 2**14 * 2**12 // 2}

    resign(forged, edit)
    code = (
        "import resource, sys, lowbit\n"
        "from lowbit.errors import LowbitError\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    lowbit.load(sys.argv[1])\nexcept LowbitError as e:\n    print('refused:', e)\n"
        "print('grew_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(forged)], capture_output=True, text=True, timeout=300)
    assert "refused:" in proc.stdout and "model.layers.0.mlp.up_proj" in proc.stdout, proc.stdout + proc.stderr
    grew_mb = int(proc.stdout.split("grew_kb")[1]) / 1024
    assert grew_mb < 100, f"peak RSS grew {grew_mb:.0f} MB while refusing a 1 GB claim"
    res = cli("inspect", forged)  # inspect refuses what load refuses
    assert res.exit_code == 2 and "up_proj" in one_line(res)


# 4. the header's structure -------------------------------------------------------------------

@pytest.mark.parametrize("edit,message", [
    (lambda h: h.__setitem__("modules", []), "modules"),
    (lambda h: h["modules"].__setitem__("model.layers.0.mlp.up_proj", "int4"), "up_proj"),
    (lambda h: h.__setitem__("source", "tiny"), "source"),
    (lambda h: h["modules"]["model.layers.0.mlp.up_proj"].__setitem__("shape", [96, -64]), "shape"),
    (lambda h: h["aliases"].__setitem__("lm_head.weight", "model.nothing.weight"), "alias"),
    (lambda h: h.pop("summary"), "summary"),
    (lambda h: h["recipe"].__setitem__("deep", json.loads("[" * 200 + "]" * 200)), "nested"),
    (lambda h: h["modules"]["model.layers.0.mlp.up_proj"].__setitem__("group_size", 10**40), "group_size"),
    (lambda h: h["files"].__setitem__("../outside.txt", "0" * 64), "files"),
    (lambda h: h["files"].__setitem__("/etc/passwd", "0" * 64), "files"),
    (lambda h: h["modules"]["model.layers.0.mlp.up_proj"].__setitem__("bias", "no"), "bias"),
])
def test_bad_header_fields_are_refused_by_load_and_inspect(art, tmp_path, edit, message):
    bad = copy_art(art, tmp_path / "bad")
    resign(bad, edit)
    with pytest.raises(ArtifactError, match=message):
        lowbit.load(bad)
    res = cli("inspect", bad)
    assert res.exit_code == 2 and "error" in res.output


def test_a_file_named_outside_is_never_read(art, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    bad = copy_art(art, tmp_path / "bad")
    resign(bad, lambda h: h["files"].__setitem__("../secret.txt", hashlib.sha256(b"private").hexdigest()))
    with pytest.raises(ArtifactError, match="files"):
        read_header(bad)
    os.symlink(secret, bad / "link.txt")
    resign(bad, lambda h: (h["files"].pop("../secret.txt"), h["files"].__setitem__("link.txt", hashlib.sha256(b"private").hexdigest())))
    with pytest.raises(ArtifactError, match="symbolic link"):
        read_header(bad)


# 5. output paths -----------------------------------------------------------------------------

def test_output_problems_are_found_before_loading(tiny_llama, tmp_path, monkeypatch):
    import lowbit.pipeline

    monkeypatch.setattr(lowbit.pipeline, "load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    (tmp_path / "afile").write_text("x")
    res = cli("quantize", tiny_llama, "--method", "rtn", "-o", tmp_path / "afile" / "out")
    assert res.exit_code == 2 and "is a file, not a directory" in one_line(res)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro" else real_access(p, mode))
    (tmp_path / "ro").mkdir()
    res = cli("quantize", tiny_llama, "--method", "rtn", "-o", tmp_path / "ro" / "out")
    assert res.exit_code == 2 and "not writable" in one_line(res)


def test_stale_work_dirs_of_killed_saves_are_cleaned(tiny_llama, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = [tmp_path / f".out.lowbit-{dead_pid}-abc.tmp", tmp_path / ".out.k2j4h5g6.tmp"]
    live = tmp_path / f".out.lowbit-{os.getpid()}-xyz.tmp"  # a save still running (this process)
    for d in (*stale, live):
        d.mkdir()
        (d / "quantized.safetensors").write_bytes(b"partial")
    res = cli("quantize", tiny_llama, "--method", "rtn", "--group-size", "32", "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert not any(d.exists() for d in stale) and live.exists()


def test_artifacts_follow_the_umask(art):
    mask = os.umask(0)
    os.umask(mask)
    assert (art.stat().st_mode & 0o777) == 0o777 & ~mask
    assert ((art / "lowbit.json").stat().st_mode & 0o777) == 0o666 & ~mask


# 6. inputs silently accepted -----------------------------------------------------------------

def test_missing_calib_file_is_refused_even_for_rtn(tiny_llama, tmp_path):
    res = cli("quantize", tiny_llama, "--method", "rtn", "--calib", tmp_path / "nope.txt", "-o", tmp_path / "o")
    assert res.exit_code == 2 and "nope.txt not found" in one_line(res)


def test_binary_calibration_file_is_refused(tiny_llama, tmp_path):
    blob = tmp_path / "weights.bin"
    blob.write_bytes(bytes(range(256)) * 64)
    res = cli("quantize", tiny_llama, "--method", "gptq", "--calib", blob, "-o", tmp_path / "o")
    assert res.exit_code == 2 and "binary file" in one_line(res)


@pytest.mark.parametrize("args,message", [
    (["--max-tokens", "-5"], "max-tokens"),
    (["--max-tokens", "0"], "max-tokens"),
    (["--seq-len", "1"], "seq-len"),
])
def test_eval_bounds(art, args, message):
    res = cli("eval", art, *args)
    assert res.exit_code == 2 and message in res.output


def test_group_size_wider_than_every_layer_is_refused(tiny_llama, tmp_path):
    res = cli("quantize", tiny_llama, "--method", "rtn", "--group-size", "100000", "-o", tmp_path / "o")
    assert res.exit_code == 2 and "--group-size -1" in one_line(res)


def test_format_options(tiny_llama, tmp_path):
    res = cli("quantize", tiny_llama, "--method", "rtn", "--format-option", "simmetric=true", "-o", tmp_path / "a")
    assert res.exit_code == 2 and "simmetric" in one_line(res)
    res = cli("quantize", tiny_llama, "--method", "rtn", "--group-size", "32", "--format-option", "symmetric=true", "-o", tmp_path / "b")
    assert res.exit_code == 0, res.output
    assert read_header(tmp_path / "b")["modules"]["model.layers.0.mlp.up_proj"]["grid"]["symmetric"] is True
    res = cli("quantize", tiny_llama, "--method", "rtn", "--format-option", "clip=0.9", "-o", tmp_path / "c")
    assert res.exit_code == 2 and "--sym" in one_line(res)  # the default grid has a zero point: the message says what to add
    res = cli("quantize", tiny_llama, "--method", "rtn", "--group-size", "32", "--sym", "--format-option", "clip=0.9", "-o", tmp_path / "d")
    assert res.exit_code == 0, res.output  # --help's example, as the message says


# 7. pickles and remote code ------------------------------------------------------------------

def test_pickle_only_checkpoint_needs_allow_pickle(tiny_llama, tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    torch.save(load_file(str(tiny_llama / "model.safetensors")), src / "pytorch_model.bin")  # as older tools wrote them
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, src / name)
    assert (src / "pytorch_model.bin").exists() and not list(src.glob("*.safetensors"))
    res = cli("quantize", src, "--method", "rtn", "--group-size", "32", "-o", tmp_path / "a")
    assert res.exit_code == 2 and "--allow-pickle" in one_line(res)
    res = cli("quantize", src, "--method", "rtn", "--group-size", "32", "--allow-pickle", "-o", tmp_path / "b")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.__setitem__("auto_map", {"AutoModelForCausalLM": "modeling_evil.Evil"}), "remote code"),
    (lambda c: c.__setitem__("model_type", "no-such-architecture"), "no-such-architecture"),
])
def test_remote_code_and_unknown_types_are_refused(model_copy, tmp_path, edit, message):
    cfg = json.loads((model_copy / "config.json").read_text())
    edit(cfg)
    (model_copy / "config.json").write_text(json.dumps(cfg))
    res = cli("quantize", model_copy, "--method", "rtn", "-o", tmp_path / "o")
    assert res.exit_code == 2 and message in one_line(res), res.output


def test_eval_says_which_reference_it_uses(art, eval_text):
    res = cli("eval", art, "--text", eval_text, "--max-tokens", "128", "--seq-len", "64", "--json")
    assert res.exit_code == 0, res.output
    header = read_header(art)
    assert f"reference: {header['source']['path']}" in one_line(res)
    assert json.loads(res.stdout.strip().splitlines()[-1])["reference_from_header"] is True


# 8. smaller ----------------------------------------------------------------------------------

def test_artifact_as_source_missing_eval_path_version_bits_range(art, tmp_path):
    res = cli("quantize", art, "--method", "rtn", "-o", tmp_path / "o")
    assert res.exit_code == 2 and "already quantized" in one_line(res) and "hub id" not in res.output
    res = cli("eval", tmp_path / "missing")
    assert res.exit_code == 2 and "not found" in one_line(res)
    res = cli("--version")
    assert res.exit_code == 0 and res.output.strip() == f"lowbit {lowbit.__version__}"
    res = cli("quantize", art, "--bits", "9", "-o", tmp_path / "o")
    assert res.exit_code == 2 and "less than or equal to 8" in one_line(res)
    assert "2-8" in one_line(cli("quantize", "--help"))


def test_help_writes_defaults_one_way():
    for cmd in ("quantize", "search", "eval", "demo"):
        res = cli(cmd, "--help")
        assert "[default:" not in res.output, cmd


def test_debug_shows_the_traceback(tmp_path):
    res = runner.invoke(app, ["--debug", "eval", str(tmp_path / "missing")])
    assert res.exit_code != 0 and isinstance(res.exception, ArtifactError)


def test_validate_passes_a_good_artifact(art):
    header, dense = validate(art)
    assert "model.embed_tokens.weight" in dense and header["summary"]["quantized_params"] > 0
