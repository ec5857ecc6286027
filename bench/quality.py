"""Quality against size: lowbit (RTN and GPTQ on integer grids at 8/6/5/4/3/2 bits and on every
grid of the zoo, PTQ1.61, nested8 at each precision) side by side with peer quantizers (llama.cpp's
formats, HQQ, optimum-quanto, torchao, bitsandbytes, llm-compressor GPTQ), on the reference causal LM
(KL to the original) or on a sentence encoder such as MiniLM (cosine similarity to the original).

    python -m bench.quality [--model DIR|ALIAS] [--calib FILE] [--text FILE] [--only PATTERNS] [--out DIR]
    python -m bench.quality --model minilm-l6 --out bench/results/minilm

Each configuration runs in its own process (so its peak RSS is its own). lowbit rows quantize,
save the artifact, load it back and evaluate it; peer rows quantize the loaded float32 model with
the peer (bench/peers/) and evaluate the result in memory. Every row is measured by the same
evaluator (lowbit.eval) on the same consecutive windows of the same held-out text: KL divergence to
the original, perplexity, top-1 agreement (encoders: cosine similarity of mean-pooled sentence
embeddings, mean and minimum); bits per weight count everything
the tool stores for the quantized layers (codes, scales, zero points / mins, per-block metadata).
Quantize time covers loading the model, building calibration windows (if any) and quantizing, for
lowbit and peers alike; it is also given as a ratio to lowbit RTN int8 of the same run.
Peers whose package is missing or which cannot run here get a row with status "unavailable"
(or "failed") and the reason.

Writes bench/results/quality.json (a list of rows), quality.md (tables) and quality_pareto.png; while a
pass runs, quality.partial.json holds every row finished so far (a stopped pass keeps what it measured).
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .common import ASSETS, RESULTS, machine, markdown_table
from .peers import PEERS, get
from .peers.common import PeerUnavailable, version

ROOT = Path(__file__).resolve().parents[1]

INT_CONFIGS = [("rtn", 8, 64, False), ("gptq", 8, 64, False)] + [
    (method, bits, g, False) for bits in (6, 5) for g in (64,) for method in ("rtn", "gptq")
] + [
    (method, bits, g, False) for bits in (4, 3, 2) for g in (64, 32) for method in ("rtn", "gptq")
] + [("rtn", 4, 64, True), ("gptq", 4, 64, True)] + [
    # groups of 128: SmolLM2's 576-wide layers get a shorter last group (the shakespeare model's 192-wide ones too)
    (method, bits, 128, False) for bits in (4, 3) for method in ("rtn", "gptq")
]
AWQ_CONFIGS = [(method, bits, g) for bits in (4, 3) for g in (64, 128) for method in ("rtn", "gptq")]
# learned rounding (SignRound), alone on RTN (AutoRound's recipe) and on AWQ + GPTQ; then end-to-end tuning on top
LEARNED_CONFIGS = [("gptq", 3, 64, True, 0), ("gptq", 4, 64, True, 0), ("gptq", 4, 128, True, 0), ("rtn", 4, 64, False, 0),
                   ("rtn", 3, 64, False, 0), ("gptq", 3, 64, True, 40), ("gptq", 4, 64, True, 40)]
# loss-aware Hessians (GuidedQuant's Fisher-weighted tokens) against GPTQ's plain H on the same settings,
# alone and under AWQ; then end-to-end tuning on top (measured on SmolLM2: Fisher alone beats Fisher + AWQ)
FISHER_CONFIGS = [("gptq", 4, 64, False, True, 0), ("gptq", 3, 64, False, True, 0), ("gptq", 4, 64, True, True, 0),
                  ("gptq", 3, 64, True, True, 0), ("gptq", 4, 128, False, True, 0),
                  ("gptq", 4, 64, False, True, 40), ("gptq", 3, 64, False, True, 40)]
# `--preset quality` (GPTQ, Fisher Hessians, each group's parameters searched for the least rounding
# error: mse_fit), then on top of it GuidedQuant's output-channel groups, Hadamard rotation
# (incoherence processing), end-to-end tuning and entropy-coded storage; rotation alone on plain
# GPTQ/RTN at 3 and 2 bits. (id suffix, method, bits, group, label, recipe keys)
QUALITY = {"hessian": "fisher", "format_options": {"mse_fit": True}}
TUNE40 = {"tune": {"steps": 40, "batch_size": 2, "lr": 2e-4}}
MORE_CONFIGS = [
    ("fisher-mse", "gptq", 4, 64, "Fisher Hessians, MSE-fitted groups", QUALITY),
    ("fisher-mse-ans", "gptq", 4, 64, "Fisher Hessians, MSE-fitted groups, ANS-coded codes", {**QUALITY, "entropy_code": True}),
    ("fisher-mse-g4", "gptq", 4, 64, "Fisher Hessians (4 channel groups), MSE-fitted groups", {**QUALITY, "hessian_groups": 4}),
    ("fisher-mse-rot", "gptq", 4, 64, "Fisher Hessians, MSE-fitted groups, Hadamard-rotated inputs", {**QUALITY, "rotate": "hadamard"}),
    ("fisher-mse", "gptq", 3, 64, "Fisher Hessians, MSE-fitted groups", QUALITY),
    ("fisher-mse-rot", "gptq", 3, 64, "Fisher Hessians, MSE-fitted groups, Hadamard-rotated inputs", {**QUALITY, "rotate": "hadamard"}),
    ("rot", "gptq", 3, 64, "Hadamard-rotated inputs", {"rotate": "hadamard"}),
    ("rot", "gptq", 2, 64, "Hadamard-rotated inputs", {"rotate": "hadamard"}),
    ("fisher-mse-rot", "gptq", 2, 64, "Fisher Hessians, MSE-fitted groups, Hadamard-rotated inputs", {**QUALITY, "rotate": "hadamard"}),
    ("rot", "rtn", 3, 64, "Hadamard-rotated inputs", {"rotate": "hadamard"}),
    ("fisher-mse", "gptq", 4, 128, "Fisher Hessians, MSE-fitted groups", QUALITY),
    ("fisher-mse", "gptq", 5, 64, "Fisher Hessians, MSE-fitted groups", QUALITY),
    ("fisher-mse-tune40", "gptq", 3, 64, "Fisher Hessians, MSE-fitted groups, tuned 40 steps", {**QUALITY, **TUNE40}),
    ("fisher-mse-tune40-ans", "gptq", 3, 64, "Fisher Hessians, MSE-fitted groups, tuned 40 steps, ANS-coded codes",
     {**QUALITY, **TUNE40, "entropy_code": True}),
]
# vector codebooks (VPTQ/GPTVQ-style) and pyramid vectors (PVQ): (id, method, format, bits per weight in codes,
# scale group size, label, recipe keys)
VQ_CONFIGS = [
    ("lowbit:gptq-vq2", "gptq", "vq2", 2, -1, "vq4x8: 4-dim codewords, 256 per layer, row scales, GPTQ-style error feedback", {}),
    ("lowbit:gptq-vq2-g128", "gptq", "vq2", 2, 128, "vq4x8, scales per 128 columns", {}),
    ("lowbit:gptq-vq2-g64", "gptq", "vq2", 2, 64, "vq4x8, scales per 64 columns", {}),
    ("lowbit:gptq-vq2-g128-fisher", "gptq", "vq2", 2, 128, "vq4x8, scales per 128 columns, Fisher Hessians", {"hessian": "fisher"}),
    ("lowbit:gptq-vq2-fisher", "gptq", "vq2", 2, -1, "vq4x8, row scales, Fisher Hessians", {"hessian": "fisher"}),
    ("lowbit:rtn-vq2", "rtn", "vq2", 2, -1, "vq4x8, row scales, nearest codeword", {}),
    ("lowbit:gptq-vq3", "gptq", "vq3", 3, -1, "vq2x6: 2-dim codewords, 64 per layer, row scales, GPTQ-style error feedback", {}),
    ("lowbit:gptq-vq2-tune40", "gptq", "vq2", 2, -1, "vq4x8, row scales, codebooks and scales tuned 40 steps (PV-Tuning's "
     "continuous step)", TUNE40),
    ("lowbit:gptq-vq2-g128-tune40", "gptq", "vq2", 2, 128, "vq4x8, scales per 128 columns, codebooks and scales tuned "
     "40 steps", TUNE40),
    ("lowbit:gptq-vq2-g128-fisher-tune40", "gptq", "vq2", 2, 128, "vq4x8, scales per 128 columns, Fisher Hessians, "
     "codebooks and scales tuned 40 steps", {"hessian": "fisher", **TUNE40}),
    ("lowbit:gptq-vq3x9", "gptq", "vq3x9", 3, -1, "vq3x9: 3-dim codewords, 512 per layer, row scales, GPTQ-style error "
     "feedback", {}),
    ("lowbit:gptq-rvq8x8s2-g128", "gptq", "rvq8x8s2", 2, 128, "rvq8x8s2: 8-dim codewords, two residual stages of 256, "
     "scales per 128 columns", {}),
    ("lowbit:gptq-grvq4x8s1g4-g128", "gptq", "grvq4x8s1g4", 2, 128, "grvq4x8s1g4: vq4x8 with a codebook per quarter of "
     "the rows, scales per 128 columns", {}),
    ("lowbit:gptq-vq2o1-g128", "gptq", "vq4x8o1", 2, 128, "vq4x8o1: vq4x8 with 1% of the input columns (the most "
     "salient) on an outlier codebook, scales per 128 columns", {}),
    ("lowbit:gptq-vq2-g128-cd3", "gptq", "vq2", 2, 128, "vq4x8, scales per 128 columns, 3 coordinate-descent sweeps on "
     "the codes", {"gptq": {"sweeps": 3}}),
    ("lowbit:gptq-vq2-g128-fisher-cd3-tune40", "gptq", "vq2", 2, 128, "vq4x8, scales per 128 columns, Fisher Hessians, "
     "3 coordinate-descent sweeps, codebooks and scales tuned 40 steps", {"hessian": "fisher", "gptq": {"sweeps": 3}, **TUNE40}),
    ("lowbit:gptq-rvq6x9s2", "gptq", "rvq6x9s2", 3, -1, "rvq6x9s2: 6-dim codewords, two residual stages of 512, row "
     "scales", {}),
    ("lowbit:gptq-pvq2", "gptq", "pvq2", 2, -1, "pvq16k9a4: 16-dim pyramid directions (9 pulses, 27-bit index), 4-bit "
     "amplitudes, row scales, GPTQ-style error feedback", {}),
    ("lowbit:gptq-pvq3", "gptq", "pvq3", 3, -1, "pvq8k10a4: 8-dim pyramid directions (10 pulses, 20-bit index), 4-bit "
     "amplitudes, row scales, GPTQ-style error feedback", {}),
]
HOLDOUT = 4  # the tuning rows again, with 4 of the calibration windows held out to keep or discard the tuning
TUNE = {"batch_size": 2, "lr": 2e-4}  # the settings measured before on SmolLM2 (about 11 s a step there)
GRID_GROUP = 64  # the grid zoo's rows: groups of 64 unless the format fixes its own block (mxfp4, nvfp4)
NESTED_PRECISIONS = (8, 6, 4, 3)  # one nested8 artifact, loaded at each

BASELINE_ID = "lowbit:rtn-int8-g64"
BUDGETS = (8.5, 6.5, 5.5, 4.5, 4.25, 3.5, 2.5, 2.0)
ROW_KEYS = ("model", "tool", "method", "grid", "format", "bits", "group_size", "symmetric", "precision", "bpw", "bpw_16bit", "metric",
            "kl", "ppl", "ppl_reference", "top1", "cosine", "cosine_min", "source_grid",
            "quant_seconds", "quant_seconds_ratio", "quant_cpu_seconds", "quant_cpu_ratio", "load_avg_1m",
            "quant_seconds_runs", "baseline_quant_seconds", "timing", "peak_rss_mb", "tokens", "sentences", "n_samples", "seq_len", "status",
            "error", "notes", "version", "id")


def lowbit_id(method: str, bits: int, group_size: int, symmetric: bool) -> str:
    return f"lowbit:{method}-int{bits}-g{group_size}{'-sym' if symmetric else ''}"


def _group_tag(g: int) -> str:
    return "pc" if g == -1 else "pt" if g == 0 else f"g{g}"


def _lowbit(cid: str, method: str, fmt: str, bits: int, group_size: int, grid: str, symmetric: bool = False,
            recipe: dict | None = None, precision: int | None = None) -> dict:
    return {"id": cid, "tool": "lowbit", "method": method, "format": fmt, "bits": bits, "group_size": group_size,
            "symmetric": symmetric, "grid": grid, "recipe": recipe or {}, "precision": precision}


def lowbit_configs() -> list[dict]:
    """lowbit's rows: integer grids at 8/6/5/4/3/2 bits, then every grid of the zoo (bench.grids'
    lists: minifloats and their search, MXFP4/NVFP4, NF, power, POST/log2, ternary, binary) with RTN
    and GPTQ, PTQ1.61, and one nested8 artifact loaded at each precision."""
    from lowbit.formats.registry import get_format

    from .grids import GRIDS_3, GRIDS_4, GRIDS_LOW

    out = [_lowbit(lowbit_id(m, b, g, s), m, f"int{b}", b, g, f"int{b} g{g} {'sym' if s else 'asym'}", s)
           for m, b, g, s in INT_CONFIGS]
    for bits, grids in ((4, GRIDS_4), (3, GRIDS_3), (2, GRIDS_LOW)):
        for label, fmt, extra in grids:
            if fmt.startswith("int"):
                continue  # the integer rows above
            g = getattr(get_format(fmt), "fixed_group_size", None) or GRID_GROUP
            for method in ("rtn", "gptq"):
                out.append(_lowbit(f"lowbit:{method}-{fmt}-g{g}", method, fmt, bits, g, f"{label} g{g}", recipe=extra))
    for g in (-1, GRID_GROUP):  # the paper's per-channel setting, and blocks of 64
        where = "per channel" if g == -1 else f"g{g}"
        out.append(_lowbit(f"lowbit:ptq161-int4-{_group_tag(g)}", "ptq161", "int4", 1, g,
                           f"binary + 20% salient channels int4 {where}", recipe={"ptq161": {"salient_fraction": 0.2}}))
        out.append(_lowbit(f"lowbit:ptq161-int4-{_group_tag(g)}-pre100", "ptq161", "int4", 1, g,
                           f"binary + 20% salient int4 {where}, preprocessed (restorative LoRA, 100 steps)",
                           recipe={"ptq161": {"salient_fraction": 0.2}, "preprocess": {"steps": 100}}))
    for m, b, g in AWQ_CONFIGS:  # activation-aware scaling (AWQ) before RTN or GPTQ
        out.append(_lowbit(f"{lowbit_id(m, b, g, False)}-awq", m, f"int{b}", b, g, f"int{b} g{g} asym, AWQ scales",
                           recipe={"scaling": "awq"}))
    for m, b, g, awq, tune in LEARNED_CONFIGS:  # (method, bits, group, AWQ scales, tuning steps)
        recipe = {"rounding": "learned", **({"scaling": "awq"} if awq else {}), **({"tune": {"steps": tune, **TUNE}} if tune else {})}
        label = f"int{b} g{g} asym, {'AWQ scales, ' if awq else ''}learned rounding{f', tuned {tune} steps' if tune else ''}"
        cid = f"{lowbit_id(m, b, g, False)}{'-awq' if awq else ''}-sr{f'-tune{tune}' if tune else ''}"
        out.append(_lowbit(cid, m, f"int{b}", b, g, label, recipe=recipe))
    for m, b, g, awq, fisher, tune in FISHER_CONFIGS:  # (method, bits, group, AWQ scales, Fisher Hessians, tuning steps)
        recipe = {**({"scaling": "awq"} if awq else {}), **({"hessian": "fisher"} if fisher else {}),
                  **({"tune": {"steps": tune, **TUNE}} if tune else {})}
        parts = [f"int{b} g{g} asym"] + (["AWQ scales"] if awq else []) + (["Fisher Hessians"] if fisher else []) + (
            [f"tuned {tune} steps"] if tune else [])
        cid = (f"{lowbit_id(m, b, g, False)}{'-awq' if awq else ''}{'-fisher' if fisher else ''}"
               f"{f'-tune{tune}' if tune else ''}")
        out.append(_lowbit(cid, m, f"int{b}", b, g, ", ".join(parts), recipe=recipe))
        if tune:
            held = {**recipe, "tune": {**recipe["tune"], "holdout": HOLDOUT}}
            out.append(_lowbit(f"{cid}-hold{HOLDOUT}", m, f"int{b}", b, g,
                               ", ".join(parts) + f" (kept if {HOLDOUT} held-out windows agree)", recipe=held))
    for suffix, m, b, g, label, recipe in MORE_CONFIGS:
        out.append(_lowbit(f"{lowbit_id(m, b, g, False)}-{suffix}", m, f"int{b}", b, g, f"int{b} g{g} asym, {label}",
                           recipe=recipe))
    for cid, m, fmt, b, g, label, recipe in VQ_CONFIGS:
        out.append(_lowbit(cid, m, fmt, b, g, label, recipe=recipe))
    for p in NESTED_PRECISIONS:
        out.append(_lowbit(f"lowbit:rtn-nested8-g{GRID_GROUP}@{p}", "rtn", "nested8", p, GRID_GROUP,
                           f"nested8 g{GRID_GROUP} loaded at {p} bits", precision=p))
    return out


def all_configs() -> list[dict]:
    """Every configuration the benchmark knows, lowbit first, in run order."""
    out = lowbit_configs()
    for p in PEERS:
        out.append({"id": p.id, "tool": p.tool, "method": p.method, "bits": p.bits, "group_size": p.group_size,
                    "symmetric": p.symmetric if p.symmetric is not None else p.options.get("symmetric"), "grid": p.grid})
    return out


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _recipe(spec: dict, method: str = "rtn", fmt: str = "int8", group_size: int = 64, symmetric: bool = False,
            extra: dict | None = None):
    from lowbit.recipe import Recipe

    return Recipe.from_dict({
        "method": method, "format": fmt, "group_size": group_size, "symmetric": symmetric, **(extra or {}),
        "calib": {"path": spec["calib"], "n_samples": spec["n_samples"], "seq_len": spec["seq_len"]},
    })


def _fidelity_row(res: dict) -> dict:
    """The quality columns of a row, from lowbit's evaluator: KL/ppl/top-1 for a causal LM,
    cosine similarity of sentence embeddings for an encoder."""
    if "kl" in res:
        keys = ("kl", "ppl", "ppl_reference", "top1", "tokens")
        return {"metric": "kl", **{k: res[k] for k in keys}}
    return {"metric": "cosine", **{k: res[k] for k in ("cosine", "cosine_min", "sentences")}}


def run_lowbit(spec: dict) -> dict:
    """In a child process: quantize, save, load (at `precision` bits for nested grids), evaluate one
    lowbit configuration."""
    from lowbit.pipeline import evaluate, quantize, save_job

    recipe = _recipe(spec, spec["method"], spec["format"], spec["group_size"], spec["symmetric"], spec.get("recipe"))
    walls, cpus = [], []
    for _ in range(spec.get("repeat", 1)):
        start, cpu = time.perf_counter(), time.process_time()
        job = quantize(spec["model"], recipe, show_progress=False)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    timing = _timing(walls, cpus)
    if not spec.get("evaluate", True):
        return timing | {"status": "ok"}
    with tempfile.TemporaryDirectory() as tmp:
        path = save_job(job, recipe, Path(tmp) / "artifact")
        res = evaluate(path, spec["text"], max_tokens=spec["max_tokens"], seq_len=spec["seq_len"],
                       n_sentences=spec["n_sentences"], bits=spec.get("precision"))
    notes = "lowbit artifact saved, loaded back and evaluated"
    if spec.get("precision"):
        notes += f" at {spec['precision']} bits (bpw: the stored 8-bit artifact)"
    return {
        "bpw": res["bpw"], **_fidelity_row(res), "source_grid": res["source_grid"],
        **timing, "peak_rss_mb": _peak_rss_mb(), "status": "ok", "error": None, "notes": notes, "version": _version("lowbit"),
    }


def _timing(walls: list[float], cpus: list[float]) -> dict:
    """The fastest of the repeated runs (other work on the machine only ever adds time)."""
    return {"quant_seconds": min(walls), "quant_cpu_seconds": min(cpus), "quant_seconds_runs": [round(w, 3) for w in walls]}


def _version(dist: str) -> str | None:
    return version(dist)


def run_peer(spec: dict) -> dict:
    """In a child process: quantize the float32 model with one peer configuration and evaluate it
    exactly as lowbit's rows are evaluated."""
    import torch

    from lowbit.calib.sources import sentences
    from lowbit.calib.text import consecutive_windows, read_text
    from lowbit.eval import causal_lm_fidelity, encoder_fidelity
    from lowbit.models import load_model
    from lowbit.pipeline import calibration_batches

    cfg = get(spec["id"])
    row: dict = {"version": _version(cfg.dist)}
    try:
        adapter = importlib.import_module(f"bench.peers.{cfg.module}")
        walls, cpus = [], []
        for _ in range(spec.get("repeat", 1)):
            start, cpu = time.perf_counter(), time.process_time()
            loaded = load_model(spec["model"])
            calib = None
            if cfg.needs_calib:  # the very windows lowbit's GPTQ calibrates on
                batches, _ = calibration_batches(loaded, _recipe(spec, "gptq"))
                calib = torch.cat(batches)
            result = adapter.quantize(loaded.model, calib, **cfg.options)
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
        timing = _timing(walls, cpus)
        if not spec.get("evaluate", True):
            return row | timing | {"status": "ok"}
        ref = load_model(spec["model"])
        text = read_text(spec["text"])
        if ref.kind == "causal-lm":
            seq = min(spec["seq_len"], getattr(ref.model.config, "max_position_embeddings", spec["seq_len"]))
            windows = consecutive_windows(ref.tokenizer, text, seq, spec["max_tokens"])
            fid = causal_lm_fidelity(ref.model, result.model.eval(), windows)
        else:
            fid = encoder_fidelity(ref.model, result.model.eval(), ref.tokenizer, sentences(text, spec["n_sentences"]))
    except PeerUnavailable as exc:
        return row | {"status": "unavailable", "error": str(exc), "peak_rss_mb": _peak_rss_mb()}
    except Exception as exc:  # noqa: BLE001 - any failure of a peer is a row, not a crash
        traceback.print_exc()
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return row | {"status": "failed", "error": f"{exc.__class__.__name__}: {msg}"[:500], "peak_rss_mb": _peak_rss_mb()}
    if not all(math.isfinite(fid[k]) for k in ("kl", "ppl", "cosine") if k in fid):
        return row | {"status": "failed", "error": f"non-finite result ({fid})", "bpw": result.bpw}
    return row | {
        "bpw": result.bpw, "bpw_16bit": result.bpw_16bit, **_fidelity_row(fid), "source_grid": _peer_source_grid(ref.source_format, spec),
        **timing, "peak_rss_mb": _peak_rss_mb(), "status": "ok", "error": None, "notes": result.notes,
    }


def _peer_source_grid(source_format: str | None, spec: dict) -> bool | None:
    """The source-grid guard for a peer's integer-like grid (bits, zero point or not, group size);
    None where the adapter does not say whether its grid has a zero point."""
    from lowbit.eval.source_grid import contains_source_grid

    if source_format is None:
        return False
    if not spec.get("bits") or not spec.get("group_size") or spec.get("symmetric") is None:
        return None
    return contains_source_grid(source_format, f"int{spec['bits']}", bool(spec.get("symmetric")), spec["group_size"])


def refresh_peer_source_grid(rows: list[dict], model: str) -> None:
    """Re-derive the source-grid flag of the peer rows from the configurations as they are now
    (a row measured before its configuration said whether its grid has a zero point has None)."""
    from lowbit.models.loading import _source_format

    source_format = _source_format(model, model)
    configs = {c["id"]: c for c in all_configs() if c["tool"] != "lowbit"}
    for r in rows:
        if r.get("status") == "ok" and r.get("id") in configs:
            r["symmetric"] = configs[r["id"]]["symmetric"]
            r["source_grid"] = _peer_source_grid(source_format, configs[r["id"]])


def warm_up(module: str) -> None:
    """In a child process: let an adapter build what it builds once per install (quanto compiles its
    C++ extension on first use), so that no configuration's timing includes it."""
    adapter = importlib.import_module(f"bench.peers.{module}")
    if hasattr(adapter, "warm_up"):
        try:
            adapter.warm_up()
        except Exception as exc:  # noqa: BLE001 - the configurations themselves will report it
            print(f"warm-up of {module} failed: {exc}", file=sys.stderr)


def run_one(spec: dict) -> dict:
    return run_lowbit(spec) if spec["tool"] == "lowbit" else run_peer(spec)


def _child_env(threads: int | None) -> dict | None:
    if not threads:
        return None
    n = str(threads)
    return os.environ | {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "NUMEXPR_NUM_THREADS": n}


def run_child(spec: dict, timeout: float) -> dict:
    """Run one configuration in its own process; a crash or a timeout becomes a failed row."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.quality", "--one", json.dumps(spec | {"row_out": str(out)})],
                                  capture_output=True, text=True, cwd=ROOT, timeout=timeout, check=False,
                                  env=_child_env(spec.get("threads")))
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode == 0 and out.is_file():
            return json.loads(out.read_text())
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return {"status": "failed", "error": lines[-1][:500] if lines else f"exit {proc.returncode}"}


def finish_rows(rows: list[dict], timed: set[str] | None = None) -> None:
    """Time ratios of the rows timed in this pass (`timed` ids, default all) to this pass's baseline,
    which each such row records (`baseline_quant_seconds`); fill every key so rows share their fields.
    Rows from an earlier pass keep the ratios to their own pass's baseline."""
    base = next((r for r in rows if r.get("id") == BASELINE_ID and r["status"] == "ok"), {})
    for r in rows:
        if r.get("baseline_quant_seconds") is None and r.get("quant_seconds_ratio"):  # files from before the field
            r["baseline_quant_seconds"] = r["quant_seconds"] / r["quant_seconds_ratio"]
        if timed is None or r.get("id") in timed:
            for key, ratio in (("quant_seconds", "quant_seconds_ratio"), ("quant_cpu_seconds", "quant_cpu_ratio")):
                r[ratio] = r[key] / base[key] if base.get(key) and r.get(key) is not None else None
            r["baseline_quant_seconds"] = base.get("quant_seconds")
        for k in ROW_KEYS:
            r.setdefault(k, None)


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` with each row of `new` replacing the row of the same id, or appended in run order.
    The baseline of the newer pass replaces the older one; the older rows keep their ratios."""
    by_id = {r["id"]: r for r in new}
    merged = [by_id.pop(r["id"], r) for r in old]
    return merged + list(by_id.values())


# ---------------------------------------------------------------- reporting


def loss(row: dict) -> float | None:
    """The number a row is ranked by (lower is better): KL for a causal LM, 1 - cosine for an encoder."""
    if row.get("kl") is not None:
        return row["kl"]
    return 1.0 - row["cosine"] if row.get("cosine") is not None else None


def _metric(rows: list[dict]) -> str:
    return "cosine" if any(r.get("metric") == "cosine" for r in rows) else "kl"


_HALF_NOTE = re.compile(r"\(16-bit: ([0-9.]+) bpw\)|a 16-bit model would store ([0-9.]+) bpw")


def budget_bpw(row: dict) -> float:
    """The size a row is budgeted at: a peer that stores its scales in the model's dtype (float32 in
    this bench, where lowbit stores fp16) is counted at its 16-bit size, the one it has on the 16-bit
    checkpoints it is made for. Rows recorded before `bpw_16bit` existed carry it in their notes."""
    if row.get("bpw_16bit") is not None:
        return min(row["bpw"], row["bpw_16bit"])
    m = _HALF_NOTE.search(row.get("notes") or "") if row.get("tool") != "lowbit" else None
    return min(row["bpw"], float(m.group(1) or m.group(2))) if m else row["bpw"]


def best_at_budgets(rows: list[dict], budgets=BUDGETS) -> list[dict]:
    """For each budget: the lowest-loss peer row and lowbit row whose size (`budget_bpw`) is at or
    below it. Rows that re-quantize onto a grid holding the source model's own (`source_grid` true)
    are left out, a peer's as much as lowbit's: they reproduce the published weights and prove nothing."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("bpw") is not None and loss(r) is not None
          and not r.get("source_grid")]
    out = []
    for b in budgets:
        fits = [r for r in ok if budget_bpw(r) <= b + 1e-9]
        peer = min((r for r in fits if r["tool"] != "lowbit"), key=loss, default=None)
        low = min((r for r in fits if r["tool"] == "lowbit"), key=loss, default=None)
        out.append({"budget": b, "peer": peer, "lowbit": low})
    return out


def _fmt_kl(x: float) -> str:
    return f"{x:.4g}"


def _fmt_loss(r: dict) -> str:
    return _fmt_kl(r["kl"]) if r.get("kl") is not None else f"cosine {r['cosine']:.5f}"


def budget_table(rows: list[dict]) -> str:
    what = "KL" if _metric(rows) == "kl" else "cosine"
    ratio_head = "lowbit KL / peer KL" if what == "KL" else "lowbit (1 - cos) / peer (1 - cos)"
    lines = [f"| budget (bpw) | best peer (tool, method, bpw, {what}) | best lowbit (method, bpw, {what}) | {ratio_head} |",
             "|---|---|---|---|"]
    for item in best_at_budgets(rows):
        p, q = item["peer"], item["lowbit"]
        size = (f"{budget_bpw(p):.3f}" + (f" at 16 bits ({p['bpw']:.3f} as run)" if p and budget_bpw(p) < p["bpw"] else "")
                if p else "")
        ptxt = f"{p['tool']}, {p['method']} ({p['grid']}), {size}, {_fmt_loss(p)}" if p else "-"
        qtxt = f"{q['method']} {q['grid']}, {q['bpw']:.3f}, {_fmt_loss(q)}" if q else "-"
        ratio = f"{loss(q) / loss(p):.2f}" if p and q and loss(p) > 0 else "-"
        lines.append(f"| ≤ {item['budget']} | {ptxt} | {qtxt} | {ratio} |")
    return "\n".join(lines)


TIME_REFERENCE = "llm-compressor:gptq-int4-g64"  # what a lowbit method's quantization time is set against


def time_against_peer(rows: list[dict], ref_id: str = TIME_REFERENCE) -> str | None:
    """Each lowbit row's quantization time as a ratio to llm-compressor GPTQ's, for rows timed in the
    same pass as it (the same baseline time recorded): None when no such pass holds both."""
    ref = next((r for r in rows if r.get("id") == ref_id and r["status"] == "ok" and r.get("quant_seconds")), None)
    if ref is None or ref.get("baseline_quant_seconds") is None:
        return None
    same = [r for r in rows if r["tool"] == "lowbit" and r["status"] == "ok" and r.get("quant_seconds")
            and r.get("baseline_quant_seconds") == ref["baseline_quant_seconds"]]
    if not same:
        return None
    lines = [f"| lowbit method | grid | bpw | {_metric(rows)} | quantize s | time / llm-compressor GPTQ int4 g64 |",
             "|---|---|---|---|---|---|"]
    for r in sorted(same, key=lambda r: r["quant_seconds"]):
        lines.append(f"| {r['method']} | {r['grid']} | {r['bpw']:.3f} | {_fmt_loss(r)} | {r['quant_seconds']:.1f} | "
                     f"{r['quant_seconds'] / ref['quant_seconds']:.2f} |")
    lines.append(f"| (llm-compressor gptq) | {ref['grid']} | {ref['bpw']:.3f} | {_fmt_loss(ref)} | "
                 f"{ref['quant_seconds']:.1f} | 1.00 |")
    return "\n".join(lines)


def rows_table(rows: list[dict]) -> str:
    shown = []
    for r in rows:
        s = dict(r)
        s["what"] = r["error"] if r["status"] != "ok" else (r.get("notes") or "")
        s["what"] = (s["what"] or "").replace("|", "/")
        s["kl_s"] = _fmt_kl(r["kl"]) if r.get("kl") is not None else None
        shown.append(s)
    quality = [("kl_s", "KL", "s"), ("ppl", "ppl", ".2f"), ("top1", "top-1", ".3f")] if _metric(rows) == "kl" else [
        ("cosine", "cosine", ".5f"), ("cosine_min", "min cosine", ".4f")]
    return markdown_table(shown, [
        ("tool", "tool", "s"), ("method", "method", "s"), ("grid", "grid", "s"), ("bpw", "bpw", ".3f"), *quality,
        ("quant_seconds", "quantize s", ".3f"),
        ("quant_seconds_ratio", "time / RTN int8", ".1f"), ("baseline_quant_seconds", "RTN int8 s (its pass)", ".3f"),
        ("quant_cpu_seconds", "CPU s", ".3f"),
        ("quant_cpu_ratio", "CPU / RTN int8", ".1f"), ("load_avg_1m", "load", ".1f"),
        ("peak_rss_mb", "peak RSS MB", ".0f"), ("status", "status", "s"),
        ("what", "notes / error", "s"),
    ])


def lowbit_revision() -> str:
    """The commit the lowbit rows ran from, marked '+ local changes' if src/ differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + (" + local changes in src/" if dirty.stdout.strip() else "")


def _tool_version(row: dict) -> str:
    dist = "lowbit" if row["tool"] == "lowbit" else get(row["id"]).dist
    return f"{row['tool']} {row['version']}" if dist == row["tool"] else f"{row['tool']} ({dist} {row['version']})"


def _what_was_measured(rows: list[dict], settings: dict, ref_ppl: float | None) -> list[str]:
    model = f"Model `{Path(settings['model']).name}`"
    calib = (f"GPTQ calibration: {settings['n_samples']} x {settings['seq_len']} tokens of `{Path(settings['calib']).name}` "
             "(the same windows for every calibrated row, lowbit's and the peers').")
    if _metric(rows) == "cosine":
        return [
            (f"{model} (a sentence encoder): cosine similarity between the original's and the quantized model's "
            f"mean-pooled embeddings of the first {settings['n_sentences']} sentences of `{Path(settings['text']).name}` "
            f"(mean, and the lowest over the sentences); {calib} Quantized: every nn.Linear inside the encoder blocks; "
            "embeddings and the pooler stay float32.")]
    return [
        (f"{model}, original perplexity {ref_ppl:.2f}" if ref_ppl else model)
        + f" on the first {settings['max_tokens']} tokens of `{Path(settings['text']).name}` ({settings['seq_len']}-token "
        f"windows); {calib} Quantized: every nn.Linear inside the decoder blocks; embeddings and lm_head "
        "stay float32. KL = mean KL(original || quantized) of the next-token distributions; top-1 = agreement of the argmax."]


def measured_settings(rows: list[dict], settings: dict) -> dict:
    """`settings` with the calibration windows and evaluation tokens the ok rows record (each row
    keeps its pass's `n_samples`, `seq_len` and `tokens`), so that a re-render or a merge describes
    what was run, not the command line's defaults. Rows measured differently cannot share a table."""
    seen = {(r.get("n_samples"), r.get("seq_len"), r.get("tokens")) for r in rows if r["status"] == "ok" and r.get("n_samples")}
    if len(seen) > 1:
        raise SystemExit("these rows were measured with different calibration or evaluation settings "
                         f"(n_samples, seq_len, tokens): {sorted(seen, key=str)}; re-run the odd ones with the same "
                         "--n-samples / --seq-len / --max-tokens, or keep them in another --out")
    if not seen:
        return settings
    n, seq, tokens = seen.pop()
    return settings | {"n_samples": n, "seq_len": seq, **({"max_tokens": tokens} if tokens else {})}


def markdown_report(rows: list[dict], settings: dict, mach: dict, plot: str | None) -> str:
    ref = next((r["ppl_reference"] for r in rows if r["status"] == "ok" and r.get("ppl_reference")), None)
    versions = sorted({_tool_version(r) for r in rows if r.get("version")})
    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["status"] != "ok"]
    timings = sorted({r["timing"] for r in ok if r.get("timing")})
    repeat_note = f"Timing: {'; '.join(timings)} (per configuration, the baseline included). " if timings else ""
    if any("separate timing pass" in t for t in timings):
        repeat_note += ("The timing pass quantizes only (no evaluation) in a fresh process per configuration, after "
                        "the quality pass that produced every other column. ")
    parts = [
        "# Quality against size: lowbit and peers",
        "",
        *_what_was_measured(rows, settings, ref),
        "",
        ("bpw counts everything each tool stores for the quantized layers (codes, scales, zero points / mins, per-block "
        "metadata), as it stores it: peers that keep scales in the model's dtype store float32 scales here (the notes "
        "give the 16-bit figure where it differs). Quantize time = load + calibration windows + quantize, for every row; "
        "`time / RTN int8` is the ratio to lowbit RTN int8 timed in the same pass (its time in that pass: `RTN int8 s`; "
        "rows merged from different passes each keep the ratio to their own pass's baseline); `CPU s` is the process CPU time of the same "
        "span (all threads), `CPU / RTN int8` its ratio, and `load` the machine's 1-minute load average when the "
        "configuration started: other work on the machine inflates both (spinning worker threads count as CPU "
        f"time). One-time builds (quanto's C++ extension) are warmed up before timing. {repeat_note}"
        f"Machine: {mach['cores']} CPU cores, torch {mach['torch']}, Python {mach['python']}."),
        "",
        "Versions: " + ", ".join(versions) + f"; lowbit at commit {lowbit_revision()}.",
        "",
        "## Best at each budget",
        "",
        (f"Lowest {'KL' if _metric(rows) == 'kl' else '1 - cosine'} among rows at or below the budget (bpw as stored: "
        "a nested8 row loaded at fewer bits still stores 8-bit codes; a peer that keeps its scales in the model's dtype, "
        "float32 in this bench, is counted at the size it has on a 16-bit model, lowbit's scales being fp16). Rows "
        "flagged `source_grid` are left out: their grid holds the grid the source model was published in, so they "
        "give its weights back."),
        "",
        budget_table(rows),
        "",
        *(["## Quantization time against llm-compressor GPTQ", "",
           "Rows timed in one pass with llm-compressor's GPTQ int4 g64 (load + calibration + quantize, same windows).",
           "", timing, ""] if (timing := time_against_peer(rows)) else []),
        f"## All rows ({len(ok)} ran, {len(bad)} unavailable or failed)",
        "",
        rows_table(rows),
        "",
    ]
    if plot:
        parts += [f"![KL against bits per weight]({plot})", ""]
    return "\n".join(parts)


def pareto_plot(rows: list[dict], path: Path) -> str | None:
    """KL (log) against bpw, one series per tool; the line joins each tool's Pareto front."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (make bench-setup): no plot", file=sys.stderr)
        return None
    ok = [r for r in rows if r["status"] == "ok" and (loss(r) or 0) > 0 and r.get("bpw")]
    tools = list(dict.fromkeys(r["tool"] for r in ok))
    markers = "o^sDv<>Pp*hX"
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    for i, tool in enumerate(tools):
        pts = sorted((r["bpw"], loss(r)) for r in ok if r["tool"] == tool)
        front, best = [], math.inf
        for x, y in pts:
            if y < best:
                front.append((x, y))
                best = y
        style = {"marker": markers[i % len(markers)], "color": f"C{i}"}
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=40 if tool == "lowbit" else 28, alpha=0.75, **style)
        ax.plot([p[0] for p in front], [p[1] for p in front], lw=2.2 if tool == "lowbit" else 1.2, label=tool, **style)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (everything stored for the quantized layers)")
    what = "KL(original || quantized)" if _metric(rows) == "kl" else "1 - cosine(original, quantized embeddings)"
    ax.set_ylabel(f"{what}, log scale")
    ax.set_title(f"{what.split('(')[0].strip()} against size: lowbit and peers (lines: each tool's Pareto front)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def write_outputs(rows: list[dict], settings: dict, out_dir: Path) -> dict[str, Path]:
    """quality.json, quality.md and the plot; rows in the benchmark's configuration order."""
    settings = measured_settings(rows, settings)
    order = {c["id"]: i for i, c in enumerate(all_configs())}
    rows.sort(key=lambda r: order.get(r["id"], len(order)))
    out_dir.mkdir(parents=True, exist_ok=True)
    mach = machine()
    paths = {"json": out_dir / "quality.json", "md": out_dir / "quality.md"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps([{k: r.get(k) for k in ROW_KEYS} for r in rows], indent=2) + "\n")
    tmp.replace(paths["json"])
    plot = pareto_plot(rows, out_dir / "quality_pareto.png")
    if plot:
        paths["png"] = out_dir / plot
    paths["md"].write_text(markdown_report(rows, settings, mach, plot))
    return paths


def _threads(n: int | None) -> str:
    return f", {n} thread{'s' if n > 1 else ''}" if n else ""


def _run_config(cfg: dict, settings: dict, timeout: float, warmed: set[str]) -> dict:
    module = None if cfg["tool"] == "lowbit" else get(cfg["id"]).module
    if module and module not in warmed:
        warmed.add(module)
        if hasattr(importlib.import_module(f"bench.peers.{module}"), "warm_up"):
            subprocess.run([sys.executable, "-m", "bench.quality", "--warm-up", module], cwd=ROOT,
                           capture_output=True, timeout=timeout, check=False, env=_child_env(settings.get("threads")))
    t = time.perf_counter()
    load = os.getloadavg()[0]
    row = cfg | run_child(cfg | settings, timeout)
    row["load_avg_1m"] = load
    if row["status"] != "ok":
        what = f"{row['status']}: {row.get('error')}"
    elif "metric" in row:
        what = f"{_fmt_loss(row)} bpw {row['bpw']:.3f} quantize {row['quant_seconds']:.2f}s"
    else:
        what = f"quantize {row['quant_seconds']:.2f}s (runs {row['quant_seconds_runs']})"
    print(f"[{time.perf_counter() - t:5.1f}s] {cfg['id']}: {what}", file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ASSETS / "shakespeare-llama"))
    ap.add_argument("--calib", default=str(ASSETS / "calib.txt"))
    ap.add_argument("--text", default=str(ASSETS / "eval.txt"))
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens a causal LM is evaluated on")
    ap.add_argument("--n-sentences", type=int, default=256, help="held-out sentences an encoder is evaluated on")
    ap.add_argument("--only", help="comma-separated id patterns (fnmatch), e.g. 'lowbit:*,hqq:*,llama.cpp:Q4_0'; "
                                   f"{BASELINE_ID} (the time baseline) is always run")
    ap.add_argument("--list", action="store_true", help="print the configuration ids and exit")
    ap.add_argument("--out", default=str(RESULTS), help="results directory")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    ap.add_argument("--repeat", type=int, default=1,
                    help="quantize each configuration this many times and keep the fastest (evaluate once)")
    ap.add_argument("--retime", type=int, metavar="N",
                    help="only re-time the ok rows of the quality.json in --out: fastest of N quantizations each "
                         "(no evaluation), with the baseline re-timed in the same pass; rewrites the outputs")
    ap.add_argument("--threads", type=int, help="CPU threads per configuration process (default: torch's default)")
    ap.add_argument("--merge", action="store_true",
                    help="update the quality.json in --out: replace the rows run now (by id) and append new ones, "
                         "keep the others (run with the settings that produced the file)")
    ap.add_argument("--render-only", action="store_true",
                    help="rebuild quality.md and the plot from the quality.json in --out (no runs)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--warm-up", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.warm_up:
        warm_up(args.warm_up)
        return []
    if args.one:
        spec = json.loads(args.one)
        row = run_one(spec)
        Path(spec["row_out"]).write_text(json.dumps(row))
        return [row]
    configs = all_configs()
    if args.list:
        print("\n".join(c["id"] for c in configs))
        return []
    settings = {"model": args.model, "calib": args.calib, "text": args.text, "n_samples": args.n_samples,
                "seq_len": args.seq_len, "max_tokens": args.max_tokens, "n_sentences": args.n_sentences}
    if args.render_only:
        rows = json.loads((Path(args.out) / "quality.json").read_text())
        refresh_peer_source_grid(rows, args.model)
        finish_rows(rows, timed=set())
        paths = write_outputs(rows, settings, Path(args.out))
        print("rewrote: " + ", ".join(str(p) for p in paths.values()))
        return rows
    if args.only:
        pats = [p.strip() for p in args.only.split(",") if p.strip()] + [BASELINE_ID]
        configs = [c for c in configs if any(fnmatch.fnmatchcase(c["id"], p) for p in pats)]
    if args.retime:
        rows = json.loads((Path(args.out) / "quality.json").read_text())
        wanted = {c["id"] for c in configs}
        todo = [c for c in all_configs() if c["id"] in wanted]
        by_id = {r["id"]: r for r in rows}
        warmed: set[str] = set()
        todo = [c for c in todo if by_id.get(c["id"], {}).get("status") == "ok"]
        for cfg in todo:
            row = by_id[cfg["id"]]
            res = _run_config(cfg, settings | {"repeat": args.retime, "evaluate": False, "threads": args.threads},
                              args.timeout, warmed)
            if res["status"] == "ok":
                row.update({k: res[k] for k in ("quant_seconds", "quant_cpu_seconds", "quant_seconds_runs", "load_avg_1m")})
                row["timing"] = f"fastest of {args.retime} quantizations{_threads(args.threads)}, separate timing pass"
            else:
                print(f"re-timing {cfg['id']} failed: {res.get('error')}", file=sys.stderr)
        finish_rows(rows, timed={c["id"] for c in todo})
        paths = write_outputs(rows, settings, Path(args.out))
        print("re-timed: " + ", ".join(str(p) for p in paths.values()))
        return rows
    rows = []
    warmed = set()
    partial = Path(args.out) / "quality.partial.json"  # every row so far: a stopped pass keeps what it measured
    partial.parent.mkdir(parents=True, exist_ok=True)
    for cfg in configs:
        row = _run_config(cfg, settings | {"repeat": args.repeat, "threads": args.threads}, args.timeout, warmed)
        row["model"] = Path(args.model).name
        row["n_samples"], row["seq_len"] = args.n_samples, args.seq_len  # what the rows were measured with
        if row["status"] == "ok":
            row["timing"] = (f"fastest of {args.repeat} quantizations" if args.repeat > 1 else "single quantization") + (
                _threads(args.threads))
        rows.append(row)
        tmp = partial.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(partial)
    finish_rows(rows)
    if args.merge:
        old_path = Path(args.out) / "quality.json"
        rows = merge_rows(json.loads(old_path.read_text()) if old_path.is_file() else [], rows)
        finish_rows(rows, timed=set())
    paths = write_outputs(rows, settings, Path(args.out))
    partial.unlink(missing_ok=True)
    print(budget_table(rows))
    print()
    print(rows_table(rows))
    print("results: " + ", ".join(str(p) for p in paths.values()))
    return rows


if __name__ == "__main__":
    main()
