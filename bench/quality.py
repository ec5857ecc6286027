"""Quality against size on the reference causal LM: lowbit RTN and GPTQ at 8/4/3/2 bits.

    python -m bench.quality [--model DIR] [--calib FILE] [--text FILE]

Each configuration runs in its own process (so its peak RSS is its own), quantizes, saves the
artifact, loads it back and evaluates it against the original on held-out text: KL divergence,
perplexity, top-1 agreement, true bits per weight. Timings are ratios to RTN int8 of the same run.
Writes bench/results/quality.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import machine, markdown_table, write_results

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"

CONFIGS = [("rtn", 8, 64, False), ("gptq", 8, 64, False)] + [
    (method, bits, g, False) for bits in (4, 3, 2) for g in (64, 32) for method in ("rtn", "gptq")
] + [("rtn", 4, 64, True), ("gptq", 4, 64, True)]


def run_one(spec: dict) -> dict:
    """In a child process: quantize, save, load, evaluate one configuration."""
    from lowbit.pipeline import evaluate, quantize, save_job
    from lowbit.recipe import Recipe

    recipe = Recipe(
        method=spec["method"], format=f"int{spec['bits']}", group_size=spec["group_size"], symmetric=spec["symmetric"],
        calib={"path": spec["calib"], "n_samples": spec["n_samples"], "seq_len": spec["seq_len"]},
    )
    start = time.perf_counter()
    job = quantize(spec["model"], recipe, show_progress=False)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = save_job(job, recipe, Path(tmp) / "artifact")
        res = evaluate(path, spec["text"], max_tokens=spec["max_tokens"], seq_len=spec["seq_len"])
    return {
        "tool": "lowbit", "method": spec["method"], "bits": spec["bits"], "group_size": spec["group_size"],
        "symmetric": spec["symmetric"], "bpw": res["bpw"], "kl": res["kl"], "ppl": res["ppl"],
        "ppl_reference": res["ppl_reference"], "top1": res["top1"], "quant_seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "tokens": res["tokens"],
        "status": "ok", "error": None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ASSETS / "shakespeare-llama"))
    ap.add_argument("--calib", default=str(ASSETS / "calib.txt"))
    ap.add_argument("--text", default=str(ASSETS / "eval.txt"))
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    rows = []
    for method, bits, g, sym in CONFIGS:
        spec = {"model": args.model, "calib": args.calib, "text": args.text, "method": method, "bits": bits, "group_size": g,
                "symmetric": sym, "n_samples": args.n_samples, "seq_len": args.seq_len, "max_tokens": args.max_tokens}
        proc = subprocess.run([sys.executable, "-m", "bench.quality", "--one", json.dumps(spec)], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode == 0:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            row = {"tool": "lowbit", "method": method, "bits": bits, "group_size": g, "symmetric": sym, "status": "failed",
                   "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
        row["model"] = Path(args.model).name
        rows.append(row)
        print(f"{method} int{bits} g{g}{' sym' if sym else ''}: {row.get('kl', row.get('error'))}", file=sys.stderr)
    base = next(r["quant_seconds"] for r in rows if r["method"] == "rtn" and r["bits"] == 8 and r["status"] == "ok")
    for r in rows:
        if r["status"] == "ok":
            r["quant_seconds_ratio"] = r["quant_seconds"] / base
            r["grid"] = f"int{r['bits']} g{r['group_size']} {'sym' if r['symmetric'] else 'asym'}"
    table = markdown_table(rows, [
        ("method", "method", "s"), ("grid", "grid", "s"), ("bpw", "bpw", ".3f"), ("kl", "KL", ".4f"), ("ppl", "ppl", ".2f"),
        ("top1", "top-1", ".3f"), ("quant_seconds", "quantize s", ".1f"), ("quant_seconds_ratio", "time / RTN int8", ".1f"),
        ("peak_rss_mb", "peak RSS MB", ".0f"),
    ])
    ref = next((r["ppl_reference"] for r in rows if r["status"] == "ok"), None)
    print(f"model {Path(args.model).name}; original ppl {ref:.2f}; {args.max_tokens} eval tokens of {Path(args.text).name}; "
          f"calibration {args.n_samples} x {args.seq_len} tokens of {Path(args.calib).name}")
    print(table)
    path = write_results("quality", {"machine": machine(), "settings": vars(args) | {"one": None}, "rows": rows})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
