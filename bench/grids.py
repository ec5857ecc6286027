"""Every grid at 4 and 3 bits (and ternary, binary, PTQ1.61 at theirs; nested8 at 8/6/4/3) on the
reference causal LM, with RTN and GPTQ, group size 64 (formats with their own block keep it).
PTQ1.61 also with its quantization preprocessing (recipe `preprocess`: restorative LoRA trained on
the calibration windows, distilling the original or, as the paper, on the next-token loss).

    python -m bench.grids [--tokens 8192] [--calib-samples 128] [--only REGEX] [--no-write]

Each row quantizes ../shared/assets/shakespeare-llama by a recipe (calibration: 128 random
windows of 256 tokens of calib.txt, seed 0, for every method or format that needs Hessians: GPTQ,
PTQ1.61 and the per-layer searches), saves the artifact, loads it back and evaluates it on the
first 8192 tokens of eval.txt in windows of 256 (KL divergence to the original, perplexity,
top-1 agreement). bpw is the artifact's: every stored bit of the quantized layers (codes,
scales, zero points, masks) per weight. The nested8 artifact is one artifact loaded at 8, 6, 4
and 3 bits (its stored size is that of 8 bits); the direct int8/int6 sym rows are its references.

Writes bench/results/grids.json (rows) and bench/results/grids.md (tables).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lowbit.models import load_model
from lowbit.pipeline import QuantizeJob, calibration_batches, evaluate, save_job
from lowbit.quantize import quantize_model
from lowbit.recipe import Recipe

from .common import ASSETS, RESULTS, machine, markdown_table, write_results

ROOT = Path(__file__).resolve().parents[1]
GROUP = 64

# (label, bits, format, format_options / recipe extras, methods)
BOTH = ("rtn", "gptq")
GRIDS_4 = [
    ("int4 asym", "int4", {"symmetric": False}), ("int4 sym", "int4", {"symmetric": True}),
    ("fp4 e2m1", "fp4_e2m1", {}), ("fp4 e1m2", "fp4_e1m2", {}), ("fp4 e3m0", "fp4_e3m0", {}),
    ("fp4 search", "fp4_search", {}), ("mxfp4", "mxfp4", {}), ("nvfp4", "nvfp4", {}), ("nf4", "nf4", {}),
    ("power4 (a=1.25)", "power4", {}), ("power4 search", "power4_search", {}), ("post4", "post4", {}), ("log4", "log4", {}),
]
GRIDS_3 = [
    ("int3 asym", "int3", {"symmetric": False}), ("int3 sym", "int3", {"symmetric": True}),
    ("fp3 e1m1", "fp3_e1m1", {}), ("fp3 e2m0", "fp3_e2m0", {}), ("fp3 search", "fp3_search", {}), ("nf3", "nf3", {}),
    ("power3 (a=1.25)", "power3", {}), ("power3 search", "power3_search", {}), ("post3", "post3", {}), ("log3", "log3", {}),
]
GRIDS_LOW = [("ternary", "ternary", {}), ("binary", "binary", {})]
# (loss, steps, lr or None for the recipe's default) of the preprocessed PTQ1.61 rows; the lm loss at the paper's
# lr 1e-4: at 1e-3 it fits the calibration text (KL to the original 0.228 after 300 steps, 0.098 without preprocessing)
PREPROCESS = [("distill", 100, None), ("distill", 300, None), ("lm", 300, 1e-4)]


def configs() -> list[dict]:
    rows = []
    for bits, grids in ((4, GRIDS_4), (3, GRIDS_3), (2, GRIDS_LOW)):
        for label, fmt, extra in grids:
            for method in BOTH:
                rows.append({"label": label, "bits": bits, "method": method, "recipe": {"format": fmt, "group_size": GROUP, **extra}})
    for g in (-1, GROUP):  # the paper's per-channel setting, and blocks of 64
        label = f"ptq161 int4 salient 20%{' per-channel' if g < 0 else f' g{g}'}"
        recipe = {"format": "int4", "group_size": g, "ptq161": {"salient_fraction": 0.2}}
        rows.append({"label": label, "bits": 1, "method": "ptq161", "recipe": recipe})
        for loss, steps, lr in PREPROCESS:
            rows.append({
                "label": f"{label} + preprocess {loss} {steps}{f' lr {lr:.0e}'.replace('e-0', 'e-') if lr else ''}", "bits": 1, "method": "ptq161",
                "recipe": {**recipe, "preprocess": {"steps": steps, "loss": loss, **({"lr": lr} if lr else {})}},
            })
    for b in (8, 6):  # references of the nested8 rows
        rows.append({"label": f"int{b} sym", "bits": b, "method": "rtn", "recipe": {"format": f"int{b}", "group_size": GROUP, "symmetric": True}})
    rows.append({"label": "nested8", "bits": 8, "method": "rtn", "recipe": {"format": "nested8", "group_size": GROUP}, "precisions": [8, 6, 4, 3]})
    return rows


def run(cfg: dict, ref, calib: tuple, args, tmp: Path) -> list[dict]:
    recipe = Recipe.from_dict({"method": cfg["method"], **cfg["recipe"], "calib": calib[0]})
    start = time.perf_counter()
    loaded = load_model(str(args.model))
    batches, calib_info = calib[1] if recipe.needs_calibration else (None, {})
    report = quantize_model(loaded.model, recipe, loaded.kind, batches, show_progress=False)
    seconds = time.perf_counter() - start
    path = save_job(QuantizeJob(loaded, report, calib_info), recipe, tmp / "artifact", force=True)
    chosen = collections.Counter(
        " ".join(f"{k}={v}" for k, v in sorted(m["search"]["chosen"].items()) if k in ("format", "alpha", "clip"))
        for m in report.modules.values() if "search" in m
    )
    out = []
    for precision in cfg.get("precisions", [None]):
        res = evaluate(path, str(args.text), reference=ref, max_tokens=args.tokens, seq_len=256, bits=precision)
        row = {
            "label": cfg["label"] + (f" @ {precision} bits" if precision else ""), "bits": precision or cfg["bits"],
            "method": cfg["method"], "format": recipe.format, "group_size": recipe.group_size,
            "symmetric": recipe.symmetric, "bpw": res["bpw"], "kl": res["kl"], "ppl": res["ppl"],
            "ppl_reference": res["ppl_reference"], "top1": res["top1"], "tokens": res["tokens"],
            "quant_seconds": seconds, "chosen": dict(chosen.most_common()),
        }
        if report.preprocess:
            row["preprocess"] = report.preprocess
        if precision:
            row["precision"] = precision
        print(f"{row['label']:34s} {row['method']:6s} bpw {row['bpw']:.3f}  kl {row['kl']:.4g}  ppl {row['ppl']:.2f}  "
              f"top1 {row['top1']:.3f}  {seconds:.0f} s", flush=True)
        out.append(row)
    shutil.rmtree(path, ignore_errors=True)
    return out


def render(rows: list[dict], meta: dict) -> str:
    by = {(r["label"], r["method"]): r for r in rows}
    lines = [
        "# Grids on the reference model",
        "",
        f"{meta['model']}, eval {meta['tokens']} tokens of {meta['text']} (windows of 256), calibration "
        f"{meta['calib_samples']} x 256 tokens of {meta['calib']}; group size {GROUP} unless the format fixes its block "
        f"(mxfp4 32, nvfp4 16); fp16 reference perplexity {rows[0]['ppl_reference']:.2f}. "
        "KL: mean KL divergence of the next-token distribution to the original's. bpw: every stored bit of the quantized "
        "layers per weight. Generated by `python -m bench.grids`.",
        "",
    ]
    cols = [("label", "grid", ""), ("bpw", "bpw", ".3f"), ("kl_rtn", "KL rtn", ".4g"), ("kl_gptq", "KL gptq", ".4g"),
            ("ppl_rtn", "ppl rtn", ".2f"), ("ppl_gptq", "ppl gptq", ".2f"), ("top1_rtn", "top-1 rtn", ".3f"),
            ("top1_gptq", "top-1 gptq", ".3f")]
    for bits, title in ((4, "4 bits"), (3, "3 bits"), (2, "ternary and binary")):
        table = []
        for label in dict.fromkeys(r["label"] for r in rows if r["bits"] == bits and r["method"] in BOTH and "precision" not in r):
            rtn, gptq = by.get((label, "rtn")), by.get((label, "gptq"))
            any_ = rtn or gptq
            table.append({
                "label": label, "bpw": any_["bpw"],
                **{f"{k}_{m}": (r or {}).get(k) for m, r in (("rtn", rtn), ("gptq", gptq)) for k in ("kl", "ppl", "top1")},
            })
        lines += [f"## {title}", "", markdown_table(table, cols), ""]
    searched = [r for r in rows if r["chosen"]]
    if searched:
        lines += ["### Grids the searches chose (layers per choice)", ""]
        lines += [f"* {r['label']} {r['method']}: " + ", ".join(f"{k} ({n})" for k, n in r["chosen"].items()) for r in searched]
        lines.append("")
    other = [r for r in rows if r["method"] == "ptq161" or "precision" in r or r["bits"] in (8, 6)]
    if not other:
        return "\n".join(lines)
    lines += ["## PTQ1.61 and nested8 (Double Rounding)", "",
              "nested8 is one artifact (8.25 bpw stored) loaded at each precision; its references are direct RTN int "
              "sym at that width (int4/int3 sym rtn in the tables above).", "",
              markdown_table(other, [("label", "configuration", ""), ("method", "method", ""), ("bpw", "bpw stored", ".3f"),
                                     ("kl", "KL", ".4g"), ("ppl", "ppl", ".2f"), ("top1", "top-1", ".3f")]), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ASSETS / "shakespeare-llama")
    ap.add_argument("--calib", type=Path, default=ASSETS / "calib.txt")
    ap.add_argument("--text", type=Path, default=ASSETS / "eval.txt")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--only", help="regex on the row label: run only the matching configurations")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/grids.*")
    args = ap.parse_args()
    torch.manual_seed(0)

    ref = load_model(str(args.model))
    calib_opts = {"path": str(args.calib), "n_samples": args.calib_samples, "seq_len": 256}
    calib = (calib_opts, calibration_batches(ref, Recipe(calib=calib_opts)))
    todo = [c for c in configs() if not args.only or re.search(args.only, c["label"])]
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowbit-grids-") as tmp:
        for cfg in todo:
            rows += run(cfg, ref, calib, args, Path(tmp))
    meta = {
        "model": args.model.name, "text": args.text.name, "calib": args.calib.name, "tokens": args.tokens,
        "calib_samples": args.calib_samples, "group_size": GROUP, "machine": machine(),
        "seconds": time.perf_counter() - started,
    }
    md = render(rows, meta)
    print(md)
    if not args.no_write:
        write_results("grids", {"meta": meta, "rows": rows})
        (RESULTS / "grids.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
