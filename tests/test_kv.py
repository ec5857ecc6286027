"""The KIVI cache (`lowbit.kv`): what attention reads is the stored codes decoded, each value
within half a step of the original; chunks of the residual length are quantized once and never
again; the decoded-position KL falls as bits rise and vanishes at 8 bits."""

from __future__ import annotations

import pytest
import torch

from lowbit.kv import KIVICache, KIVILayer, decoded_fidelity, kivi_bits_per_value


def test_layer_keeps_a_full_precision_window_and_quantizes_whole_chunks_once():
    layer = KIVILayer(bits=2, residual=8, group=4)
    g = torch.Generator().manual_seed(0)
    k_all = torch.randn(1, 2, 21, 8, generator=g)
    v_all = torch.randn(1, 2, 21, 8, generator=g)
    k_all[..., 3] *= 20  # an outlier channel: per-channel groups keep it from swamping the others
    seen_k, seen_v = layer.update(k_all[:, :, :13], v_all[:, :, :13])  # prefill 13: one chunk of 8, 5 left
    assert torch.equal(seen_k, k_all[:, :, :13])  # the prefill's own attention reads full precision
    assert len(layer.chunks) == 1 and layer.keys.shape[-2] == 5 and layer.get_seq_length() == 13
    first = {k: v.clone() for k, v in layer.chunks[0]["keys"].items()}
    for t in range(13, 21):  # one token at a time: the window reaches 8 tokens at token 15 and flushes
        quantized = 8 * len(layer.chunks)
        seen_k, seen_v = layer.update(k_all[:, :, t:t + 1], v_all[:, :, t:t + 1])
        assert seen_k.shape[-2] == t + 1
        # the window, the new token included, is read at full precision, even on the step it is flushed
        assert torch.equal(seen_k[:, :, quantized:], k_all[:, :, quantized:t + 1])
        assert torch.equal(seen_v[:, :, quantized:], v_all[:, :, quantized:t + 1])
    assert len(layer.chunks) == 2 and layer.keys.shape[-2] == 5
    assert all(torch.equal(first[k], layer.chunks[0]["keys"][k]) for k in first)  # never quantized again
    # what attention reads for the quantized chunks is the stored codes decoded, within half a step
    grid = layer.grid
    for c, chunk in enumerate(layer.chunks):
        kq = chunk["keys"]
        k_rows = grid.decode(kq["codes"], {"scale": kq["scale"].float(), "min": kq["min"].float()})
        back = k_rows.reshape(1, 2, 8, 8).permute(0, 1, 3, 2)
        assert torch.equal(back, layer._past_k[:, :, 8 * c:8 * c + 8])
        orig = k_all[:, :, 8 * c:8 * c + 8].permute(0, 1, 3, 2).reshape(-1, 8)
        assert ((k_rows - orig).abs() <= kq["scale"].float() / 2 + 1e-2 * kq["scale"].float()).all()


def test_bits_per_value_count_scales_and_minimums():
    bpv = kivi_bits_per_value(2, residual=128, group=32)
    assert bpv == {"keys": 2 + 32 / 128, "values": 2 + 1.0, "mean": 2 + 0.125 + 0.5}
    assert KIVICache(2, 4, 64, 64).bits_per_value()["mean"] == pytest.approx(4 + 0.25 + 0.25)


def test_head_dim_the_value_groups_do_not_tile_is_refused():
    layer = KIVILayer(bits=2, residual=4, group=5)
    with pytest.raises(ValueError, match="head_dim 8"):
        layer.update(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8))


def test_decoded_kl_falls_with_bits_and_vanishes_at_8(tiny_llama):
    from lowbit.models import load_model

    model = load_model(str(tiny_llama)).model
    ids = torch.randint(0, 4096, (2, 80), generator=torch.Generator().manual_seed(0))
    layers = model.config.num_hidden_layers
    res = decoded_fidelity(model, ids, 48, {b: (lambda b=b: KIVICache(layers, b, residual=16, group=16)) for b in (2, 4, 8)})
    assert res[2]["positions"] == 2 * 32
    assert res[2]["kl"] > res[4]["kl"] > res[8]["kl"]
    assert abs(res[8]["kl"]) < 1e-3 * res[2]["kl"] + 1e-6 and res[8]["top1"] > 0.95
    # generate() takes the cache too
    out = model.generate(ids[:1, :20], max_new_tokens=20, do_sample=False, cache=KIVICache(layers, 8, 8, 16))
    ref = model.generate(ids[:1, :20], max_new_tokens=20, do_sample=False)
    assert out.shape == ref.shape and (out == ref).float().mean() > 0.9


def test_eval_measures_the_cache_on_an_artifact(tiny_llama, eval_text, tmp_path):
    import json

    from typer.testing import CliRunner

    from lowbit.cli import app

    runner = CliRunner(env={"COLUMNS": "200"})
    art = tmp_path / "a"
    assert runner.invoke(app, ["quantize", str(tiny_llama), "-o", str(art), "--method", "rtn", "--bits", "8"]).exit_code == 0
    res = runner.invoke(app, ["eval", str(art), "--text", str(eval_text), "--max-tokens", "256", "--json", "--kv", "2",
                              "--kv-context", "48", "--kv-decode", "8", "--kv-windows", "2", "--kv-residual", "16"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout[res.stdout.index("{"):])
    assert out["kv_positions"] == 16 and out["kv_kl"] > 0 and out["kv_group"] == 16  # head_dim 16 in the tiny model
    assert out["kv_bits_per_value"] == pytest.approx(2 + 16 / 16 + 16 / 16)


def test_reorder_follows_the_beams_and_reset_forgets():
    layer = KIVILayer(bits=4, residual=4, group=4)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(3, 2, 6, 8, generator=g), torch.randn(3, 2, 6, 8, generator=g)
    seen_k, _ = layer.update(k, v)  # one chunk of 4 quantized, 2 in the window
    past = layer._past_k.clone()
    codes = layer.chunks[0]["keys"]["codes"].clone()
    idx = torch.tensor([2, 0, 0])
    layer.reorder_cache(idx)
    assert torch.equal(layer._past_k, past[idx]) and torch.equal(layer.keys, k[idx, :, 4:])
    assert torch.equal(layer.chunks[0]["keys"]["codes"], codes.reshape(3, -1, 4)[idx].reshape(codes.shape))
    new_k, _ = layer.update(k[:, :, :1], v[:, :, :1])
    assert torch.equal(new_k[:, :, :4], past[idx])
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.chunks == [] and layer._past_k is None
