"""Streaming quantization (`lowbit quantize --stream`): the model on the meta device, the
checkpoint read tensor by tensor, one block in float32 at a time. Its artifact is byte for byte
the in-memory path's, for RTN and GPTQ, tied and untied, bf16 and fp32, sharded checkpoints; bad
checkpoints fail clearly with the output untouched."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.pipeline import quantize, save_job
from lowbit.recipe import Recipe
from lowbit.stream.quantize import StreamError, stream_quantize
from lowbit.stream.safetensors_io import CheckpointError, CheckpointReader, SafetensorsWriter



def files_of(art: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(art.iterdir())}


def both_ways(model_dir, tmp_path, spec) -> tuple[Path, Path]:
    recipe = Recipe.from_dict(spec)
    mem = save_job(quantize(str(model_dir), recipe, show_progress=False), recipe, tmp_path / "mem")
    streamed, _ = stream_quantize(str(model_dir), recipe, tmp_path / "stream", show_progress=False)
    return mem, streamed


def assert_same_artifact(a: Path, b: Path) -> None:
    fa, fb = files_of(a), files_of(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name == "lowbit.json":  # the header names no path of its own; compare it without the timing-free parts too
            ha, hb = json.loads(fa[name]), json.loads(fb[name])
            assert ha == hb, {k: (ha[k], hb.get(k)) for k in ha if ha[k] != hb.get(k)}
        assert fa[name] == fb[name], name


@pytest.fixture(scope="module")
def tied_bf16(tmp_path_factory):
    """A bf16 Qwen2-style model with tied embeddings and biases, saved in two shards."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=4096, max_position_embeddings=128, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    out = tmp_path_factory.mktemp("tied-bf16")
    model.save_pretrained(out, max_shard_size="300KB")
    assert (out / "model.safetensors.index.json").exists()
    return save_tiny_tokenizer(out)


def save_tiny_tokenizer(out: Path) -> Path:
    import shutil

    from conftest import SHAKESPEARE, TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        shutil.copy(SHAKESPEARE / name, out / name)
    return out


@pytest.mark.parametrize("spec", [
    {"method": "rtn", "format": "int4", "group_size": 32},
    {"method": "gptq", "format": "int4", "group_size": 32, "calib": {"n_samples": 4, "seq_len": 32}},
    {"method": "gptq", "target": "gguf:q4_0", "calib": {"n_samples": 4, "seq_len": 32},
     "overrides": [{"pattern": r"mlp\.down_proj", "method": "rtn"}]},
], ids=["rtn", "gptq", "gptq-target-mixed"])
def test_streamed_artifact_is_the_in_memory_one(tiny_llama, calib_text, tmp_path, spec):
    spec = {**spec, "calib": {**spec.get("calib", {}), "path": str(calib_text)}} if spec["method"] == "gptq" else spec
    mem, streamed = both_ways(tiny_llama, tmp_path, spec)
    assert_same_artifact(mem, streamed)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_tied_bf16_sharded_checkpoint(tied_bf16, calib_text, tmp_path, method):
    spec = {"method": method, "format": "int4", "group_size": 32}
    if method == "gptq":
        spec["calib"] = {"n_samples": 4, "seq_len": 32, "path": str(calib_text)}
    mem, streamed = both_ways(tied_bf16, tmp_path, spec)
    assert_same_artifact(mem, streamed)
    header = lowbit.read_header(streamed)
    assert header["dense_dtype"] == "bfloat16" and header["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    model = lowbit.load(streamed)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_bad_checkpoints_fail_clearly_and_write_nothing(tied_bf16, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tied_bf16, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="not in .*fetch the missing shards"):
        stream_quantize(str(broken), Recipe.from_dict({"method": "rtn"}), out, show_progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # a NaN in a block's weight: named, and nothing written
    nan = tmp_path / "nan"
    shutil.copytree(tied_bf16, nan)
    first = next(f for f in sorted(nan.glob("model-*.safetensors")) if any(k.endswith("q_proj.weight") for k in load_file(f)))
    tensors = load_file(first)
    key = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, first, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{key}.*NaN"):
        stream_quantize(str(nan), Recipe.from_dict({"method": "rtn"}), out, show_progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(StreamError, match="train the whole model"):
        stream_quantize(str(tied_bf16), Recipe.from_dict({"method": "rtn", "tune": {"steps": 2}}), out, show_progress=False)


def test_safetensors_writer_and_reader_round_trip(tmp_path):
    tensors = {"b": torch.randn(3, 4).bfloat16(), "a": torch.arange(10, dtype=torch.uint8), "c": torch.randn(5).half(),
               "d": torch.randn(2, 2, 2), "e": torch.zeros(0)}
    w = SafetensorsWriter(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        w.add(k, v)
    w.finish({"format": "pt"})
    got = load_file(tmp_path / "x.safetensors")  # the reference reader
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], v) for k, v in tensors.items())
    again = SafetensorsWriter(tmp_path / "y.safetensors")
    for k in reversed(list(tensors)):
        again.add(k, tensors[k])
    again.finish({"format": "pt"})
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()  # order-free
    assert not list(tmp_path.glob("*.data"))
    r = CheckpointReader(tmp_path)
    assert all(torch.equal(r.read(k), v) for k, v in tensors.items())
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "m.safetensors").write_bytes((tmp_path / "x.safetensors").read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="truncated"):
        CheckpointReader(cut)


def test_mapped_tensors_read_the_same_and_leave_the_file_alone(tmp_path):
    tensors = {"emb": torch.randn(300, 7).bfloat16(), "odd": torch.randn(5).half(), "e": torch.zeros(0)}
    save_file(tensors, tmp_path / "m.safetensors")
    before = (tmp_path / "m.safetensors").read_bytes()
    r = CheckpointReader(tmp_path)
    mapped = {k: r.map(k) for k in tensors}
    assert all(torch.equal(mapped[k], tensors[k]) for k in tensors)
    mapped["emb"][0, 0] = 7.0  # a private copy-on-write map: the file keeps its bytes
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert all(r.all_finite(k, chunk_bytes=16) for k in tensors)
    bad = tensors["emb"].clone()
    bad[299, 6] = float("nan")  # in the last chunk
    save_file({"emb": bad}, tmp_path / "m.safetensors")
    assert not CheckpointReader(tmp_path).all_finite("emb", chunk_bytes=16)


_MAP_PROBE = """
import sys, torch
from torch.nn import functional as F
from lowbit.stream.safetensors_io import CheckpointReader
def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))
r = CheckpointReader(sys.argv[1])
base = kib("RssAnon")
assert r.all_finite("emb")
table = r.map("emb")
rows = F.embedding(torch.arange(0, table.shape[0], table.shape[0] // 8), table).float()
print((kib("RssAnon") - base) / 1024, float(rows.abs().sum()) > 0)
"""


def test_a_mapped_embedding_is_resident_only_where_looked_up(tmp_path):
    """The streamed run maps the embedding table: looking up 8 rows copies none of it into the
    process's own memory (RssAnon: reading the 64 MB table would add 64 MB), and the finite check
    reads it through a small buffer that it gives back. The mapped file pages themselves are the
    page cache's, clean and droppable; how many a fault maps is the kernel's choice (4 KB here,
    256 KB per fault on CI, 50 MB once in a busy full suite), so they are not what is bounded."""
    import os
    import subprocess
    import sys

    save_file({"emb": torch.ones(16384, 2048, dtype=torch.bfloat16)}, tmp_path / "m.safetensors")
    with open(tmp_path / "m.safetensors", "rb") as f:  # a checkpoint is old and clean: dirty pages cannot be dropped
        os.fsync(f.fileno())
    out = subprocess.run([sys.executable, "-c", _MAP_PROBE, str(tmp_path)], capture_output=True, text=True, check=True)
    grown_mb, ok = out.stdout.split()
    assert ok == "True", out.stdout
    assert float(grown_mb) < 8, grown_mb


_HEAP_PROBE = """
import sys, torch
from lowbit.stream import quantize as S
def kib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
if sys.argv[1] == "fixed":
    S._fix_mmap_threshold()
base = kib()
for _ in range(3):
    big = torch.ones(5 << 20)  # 20 MB, mapped and unmapped: glibc's dynamic threshold rises to it
    del big
    held = [torch.ones(2 << 20) for _ in range(4)]  # 8 MB blocks: from the heap once the threshold rose
    del held
print((kib() - base) / 1024)
"""


def test_a_streamed_run_hands_freed_blocks_back():
    """After `_fix_mmap_threshold` (called by every streamed run) freed multi-MB blocks leave the
    process; with glibc's dynamic threshold the same pattern keeps tens of MB resident."""
    import subprocess
    import sys

    grown = {m: float(subprocess.run([sys.executable, "-c", _HEAP_PROBE, m], capture_output=True, text=True,
                                     check=True).stdout.split()[-1]) for m in ("fixed", "default")}
    assert grown["fixed"] < 4 and grown["default"] > 16, grown


def _cli_env(**extra):
    import os

    return {**os.environ, "COLUMNS": "200", **extra}


def _lowbit(*args, env=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "lowbit", *map(str, args)], capture_output=True, text=True, env=env or _cli_env())


@pytest.mark.slow
@pytest.mark.parametrize("method,kill_after", [("gptq", 2), ("rtn", 9)])
def test_killed_run_resumes_to_the_same_bytes(tied_bf16, calib_text, tmp_path, method, kill_after):
    """A real run of the CLI killed with SIGKILL after `kill_after` recorded blocks (RTN: layers),
    then `--resume`: the artifact equals an uninterrupted run's, byte for byte."""
    from lowbit.stream.quantize import KILL_AFTER, work_dir

    args = ["quantize", tied_bf16, "--stream", "--method", method, "--bits", "4", "--group-size", "32"]
    if method == "gptq":
        args += ["--calib", calib_text, "--n-samples", "4", "--seq-len", "32"]
    whole = _lowbit(*args, "-o", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "resumed"
    killed = _lowbit(*args, "-o", out, env=_cli_env(**{KILL_AFTER: str(kill_after)}))
    assert killed.returncode == -9, (killed.returncode, killed.stderr)
    assert not out.exists() and (work_dir(out) / "progress.json").exists()
    again = _lowbit(*args, "-o", out)  # without --resume: refused, progress kept
    assert again.returncode == 2 and "--resume" in again.stdout + again.stderr
    done = json.loads((work_dir(out) / "progress.json").read_text())
    assert (done["next_block"] == kill_after) if method == "gptq" else (len(done["done"]) == kill_after)
    resumed = _lowbit(*args, "-o", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_artifact(tmp_path / "whole", out)
    assert not work_dir(out).exists()


def test_resume_refuses_other_arguments(tied_bf16, tmp_path):
    from lowbit.stream.quantize import work_dir

    out = tmp_path / "o"
    work = work_dir(out)
    work.mkdir()
    (work / "progress.json").write_text(json.dumps({"fingerprint": "another run"}))
    with pytest.raises(StreamError, match="another model, recipe"):
        stream_quantize(str(tied_bf16), Recipe.from_dict({"method": "rtn"}), out, resume=True, show_progress=False)
    assert work.exists() and not out.exists()


def test_out_of_disk_space_is_a_clear_error_and_resumable(tied_bf16, tmp_path, monkeypatch):
    """The disk fills while writing (simulated: the writer's data file raises ENOSPC on the third
    tensor): a one-line error, no output, the progress kept; --resume then finishes the same bytes."""
    import errno

    from lowbit.stream import safetensors_io
    from lowbit.stream.quantize import work_dir

    recipe = Recipe.from_dict({"method": "rtn", "format": "int4", "group_size": 32})
    whole, _ = stream_quantize(str(tied_bf16), recipe, tmp_path / "whole", show_progress=False)
    real, calls = safetensors_io._write_tensor, [0]

    def full_disk(f, t):
        calls[0] += 1
        if calls[0] == 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, t)

    monkeypatch.setattr(safetensors_io, "_write_tensor", full_disk)
    out = tmp_path / "out"
    with pytest.raises(StreamError, match="out of disk space .* rerun with --resume"):
        stream_quantize(str(tied_bf16), recipe, out, show_progress=False)
    assert not out.exists() and (work_dir(out) / "progress.json").exists()
    monkeypatch.setattr(safetensors_io, "_write_tensor", real)
    stream_quantize(str(tied_bf16), recipe, out, resume=True, show_progress=False)
    assert_same_artifact(whole, out)


def test_sharded_artifacts_load_export_and_match(tied_bf16, tmp_path):
    """--max-shard-size splits the quantized tensors into shards listed in the header: the same
    tensors, checked and loaded like one file, exported the same; a missing or extra shard fails."""
    import shutil

    from lowbit.artifact import ArtifactError
    from lowbit.export.compressed_tensors import write_compressed_tensors

    recipe = Recipe.from_dict({"method": "rtn", "format": "int4", "group_size": 32})
    one, _ = stream_quantize(str(tied_bf16), recipe, tmp_path / "one", show_progress=False)
    many, _ = stream_quantize(str(tied_bf16), recipe, tmp_path / "many", show_progress=False, max_shard_bytes=20_000)
    shards = lowbit.read_header(many)["quantized_shards"]
    assert len(shards) > 3 and not (many / "quantized.safetensors").exists()
    merged = {k: v for s in shards for k, v in load_file(many / s).items()}
    assert merged.keys() == load_file(one / "quantized.safetensors").keys()
    assert all(torch.equal(merged[k], v) for k, v in load_file(one / "quantized.safetensors").items())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(lowbit.load(one)(input_ids=ids).logits, lowbit.load(many)(input_ids=ids).logits)
    write_compressed_tensors(many, tmp_path / "ct")
    write_compressed_tensors(one, tmp_path / "ct1")
    assert (tmp_path / "ct" / "model.safetensors").read_bytes() == (tmp_path / "ct1" / "model.safetensors").read_bytes()
    assert not any(p.name.startswith("quantized") for p in (tmp_path / "ct").iterdir())
    broken = tmp_path / "broken"
    shutil.copytree(many, broken)
    (broken / shards[1]).unlink()
    with pytest.raises(ArtifactError, match=f"{shards[1]} is missing"):
        lowbit.load(broken)


def _torchrun(*args, n=2):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "lowbit", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_cli_env(OMP_NUM_THREADS="1"))


@pytest.mark.slow
def test_two_process_gloo_run_equals_one_process(tiny_llama, calib_text, tmp_path):
    """`torchrun --nproc-per-node 2 -m lowbit quantize`: ranks split the calibration batches, the
    Hessians are all-reduced, the layer solves are shared. With two batches the all-reduced sums
    are the one-process sums exactly (a + b either way), so the artifact is the same bytes; with
    four the fp64 sums are added in another order and the codes may differ, by at most one grid
    step, in a few weights."""
    base = ["quantize", tiny_llama, "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib", calib_text,
            "--seq-len", "32"]
    for n_samples, exact in ((16, True), (32, False)):
        args = [*base, "--n-samples", n_samples]
        one = _lowbit(*args, "-o", tmp_path / f"one-{n_samples}")
        assert one.returncode == 0, one.stderr
        two = _torchrun(*args, "-o", tmp_path / f"two-{n_samples}")
        assert two.returncode == 0, two.stderr[-3000:]
        a, b = tmp_path / f"one-{n_samples}", tmp_path / f"two-{n_samples}"
        if exact:
            assert_same_artifact(a, b)
            continue
        ma, mb = lowbit.load(a), lowbit.load(b)
        from lowbit.artifact import quantized_modules

        for name, qa in quantized_modules(ma).items():
            qwa, qwb = qa.quantized_weight(), quantized_modules(mb)[name].quantized_weight()
            differ = (qwa.codes.int() - qwb.codes.int()).abs()
            assert differ.max() <= 1 and (differ > 0).float().mean() < 0.01, (name, differ.max(), (differ > 0).float().mean())


@pytest.mark.slow
def test_two_process_streamed_run_equals_one_process(tiny_llama, calib_text, tmp_path):
    """`torchrun --nproc-per-node 2 -m lowbit quantize --stream`: each rank reads the checkpoint
    block by block, the Hessians of its share of the batches are all-reduced, the solves shared,
    and rank 0 writes: with two batches the same bytes as one streamed process; --resume is refused
    (a data-parallel streamed run keeps no progress)."""
    args = ["quantize", tiny_llama, "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib", calib_text,
            "--seq-len", "32", "--n-samples", "16", "--stream"]
    one = _lowbit(*args, "-o", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = _torchrun(*args, "-o", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_artifact(tmp_path / "one", tmp_path / "two")
    again = _torchrun(*args, "--resume", "-o", tmp_path / "three")
    assert again.returncode != 0 and "keeps no progress to resume" in again.stderr
    assert not (tmp_path / "three").exists()
