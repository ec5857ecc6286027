"""The command line as a user drives it: quantize -> eval --json -> inspect, and its errors."""

import json

import pytest
from typer.testing import CliRunner

from lowbit.cli import app

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def artifact(tiny_llama, calib_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    res = runner.invoke(app, [
        "quantize", str(tiny_llama), "--method", "gptq", "--bits", "4", "--group-size", "32",
        "--calib", str(calib_text), "--n-samples", "4", "--seq-len", "64", "-o", str(out),
    ])
    assert res.exit_code == 0, res.output
    return out


def test_eval_json(artifact, eval_text):
    res = runner.invoke(app, ["eval", str(artifact), "--text", str(eval_text), "--max-tokens", "512", "--seq-len", "64", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("kl", "ppl", "top1", "bpw", "size_bytes"):
        assert key in data
    assert data["kl"] >= 0 and 0 <= data["top1"] <= 1
    assert data["bpw"] == pytest.approx(4 + 20 / 32)
    assert data["windows"] == 8 and data["seq_len"] == 64


def test_inspect_lists_modules_and_checksums(artifact):
    res = runner.invoke(app, ["inspect", str(artifact)])
    assert res.exit_code == 0, res.output
    assert "model.layers.1.mlp.down_proj" in res.output and "lm_head" in res.output
    assert "sha256" in res.output and "all checksums verified" in res.output
    res = runner.invoke(app, ["inspect", str(artifact), "--json"])
    assert json.loads(res.stdout)["summary"]["quantized_params"] > 0


def test_refuses_to_overwrite(artifact, tiny_llama):
    res = runner.invoke(app, ["quantize", str(tiny_llama), "--method", "rtn", "-o", str(artifact)])
    assert res.exit_code == 2 and "already exists" in res.output


@pytest.mark.parametrize("args,message", [
    (["quantize", "/no/such/model", "-o", "x"], "not found"),
    (["quantize", "{model}", "--format", "int9", "-o", "{tmp}/a"], "unknown format 'int9'"),
    (["quantize", "{model}", "--method", "awq", "-o", "{tmp}/b"], "unknown method 'awq'"),
    (["quantize", "{model}", "--method", "rtn", "--recipe", "{tmp}/r.yaml", "-o", "{tmp}/c"], "does not divide the input width 96"),
    (["eval", "{tmp}"], "not a lowbit artifact"),
])
def test_clear_errors(args, message, tiny_llama, tmp_path):
    (tmp_path / "r.yaml").write_text("group_size: 64\nragged: error\n")
    args = [a.format(model=tiny_llama, tmp=tmp_path) for a in args]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())


def test_formats_json():
    res = runner.invoke(app, ["formats", "--json"])
    assert res.exit_code == 0 and "int" in json.loads(res.stdout)[0]["pattern"]
