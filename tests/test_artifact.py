"""Save -> load round trips, sizes, checksums, determinism, and refusing bad artifacts."""

import json

import pytest
import torch

import lowbit
from lowbit.artifact import ArtifactError, QUANTIZED, read_header
from lowbit.pipeline import quantize, save_job
from lowbit.recipe import Recipe


def recipe(calib_text, **kw):
    base = {"method": "gptq", "format": "int4", "group_size": 32, "calib": {"path": str(calib_text), "n_samples": 8, "seq_len": 64}}
    return Recipe.from_dict({**base, **kw})


@pytest.fixture(scope="module")
def gptq_artifact(tiny_llama, calib_text, tmp_path_factory):
    r = recipe(calib_text)
    job = quantize(str(tiny_llama), r, show_progress=False)
    path = save_job(job, r, tmp_path_factory.mktemp("a") / "art")
    return job, path


def test_logits_identical_after_save_and_load(gptq_artifact):
    job, path = gptq_artifact
    ids = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = job.loaded.model(input_ids=ids).logits
        after = lowbit.load(path)(input_ids=ids).logits
    assert torch.equal(before, after)


def test_every_decoder_linear_is_quantized_and_lm_head_reported(gptq_artifact):
    _, path = gptq_artifact
    header = read_header(path)
    assert len(header["modules"]) == 2 * 7
    assert set(header["skipped"]) == {"lm_head"}
    # MLP width 96 is not a multiple of 32 * 2 = 64 but is of 32: groups of 32 -> 3 per down_proj row
    assert header["modules"]["model.layers.0.mlp.down_proj"]["n_groups_per_row"] == 3


def test_reported_bpw_is_exact_and_matches_file_size(gptq_artifact):
    _, path = gptq_artifact
    header = read_header(path)
    s = header["summary"]
    assert s["bpw"] == pytest.approx(4 + 16 / 32 + 4 / 32, rel=1e-3)  # codes + fp16 scale + 4-bit zero per 32
    raw = (path / QUANTIZED).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")  # safetensors: 8-byte length, JSON header, tensor data
    data_bytes = len(raw) - 8 - header_len
    assert data_bytes == s["quantized_bytes"]  # exactly the counted codes, scales and zero points
    assert 8 * data_bytes / s["quantized_params"] == pytest.approx(s["bpw"])


def test_save_is_deterministic(tiny_llama, calib_text, tmp_path):
    r = recipe(calib_text, method="gptq", format="int3", gptq={"act_order": True})
    paths = [save_job(quantize(str(tiny_llama), r, show_progress=False), r, tmp_path / f"run{i}") for i in range(2)]
    for f in sorted(p.name for p in paths[0].iterdir()):
        assert (paths[0] / f).read_bytes() == (paths[1] / f).read_bytes(), f


def test_existing_directory_is_not_overwritten(gptq_artifact, tmp_path):
    job, _ = gptq_artifact
    target = tmp_path / "mine"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(ArtifactError, match="already exists"):
        save_job(job, Recipe(), target)
    with pytest.raises(ArtifactError, match="replaces only a lowbit artifact"):  # a plain directory is never replaced
        save_job(job, Recipe(), target, force=True)
    assert (target / "keep.txt").read_text() == "user data"
    art = save_job(job, Recipe(), tmp_path / "art")
    save_job(job, Recipe(), art, force=True)  # an artifact is
    assert (art / "lowbit.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def copy_artifact(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_file_is_refused_by_name(gptq_artifact, tmp_path):
    path = copy_artifact(gptq_artifact[1], tmp_path / "t")
    data = (path / QUANTIZED).read_bytes()
    (path / QUANTIZED).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="quantized.safetensors.*truncated or edited"):
        lowbit.load(path)


def test_edited_file_is_refused_by_name(gptq_artifact, tmp_path):
    path = copy_artifact(gptq_artifact[1], tmp_path / "e")
    data = bytearray((path / "dense.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "dense.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="dense.safetensors"):
        lowbit.load(path)


def test_edited_header_is_refused(gptq_artifact, tmp_path):
    path = copy_artifact(gptq_artifact[1], tmp_path / "h")
    header = json.loads((path / "lowbit.json").read_text())
    header["modules"]["model.layers.0.mlp.up_proj"]["group_size"] = 64
    (path / "lowbit.json").write_text(json.dumps(header))
    with pytest.raises(ArtifactError, match="lowbit.json was edited"):
        lowbit.load(path)
    (path / "lowbit.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="lowbit.json is corrupt"):
        lowbit.load(path)


def test_missing_artifact_and_missing_file(tmp_path, gptq_artifact):
    with pytest.raises(ArtifactError, match="nothing not found"):
        lowbit.load(tmp_path / "nothing")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ArtifactError, match="not a directory"):
        lowbit.load(tmp_path / "afile")
    path = copy_artifact(gptq_artifact[1], tmp_path / "m")
    (path / QUANTIZED).unlink()
    with pytest.raises(ArtifactError, match="quantized.safetensors is missing"):
        lowbit.load(path)


def test_generate_runs_on_loaded_model(gptq_artifact):
    model = lowbit.load(gptq_artifact[1])
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)
