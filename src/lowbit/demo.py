"""`make demo`: the embedded default model (all-MiniLM-L6-v2 from PyPI), quantized with RTN and
GPTQ at 8, 4 and 3 bits, each saved as an artifact, loaded back and compared with the original
on held-out sentences."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .pipeline import evaluate, quantize, save_job
from .recipe import Recipe

MODEL = "minilm-l6"
CONFIGS = [(method, bits) for bits in (8, 4, 3) for method in ("rtn", "gptq")]


def run_demo(out_dir: Path, fast: bool = False, group_size: int = 128) -> list[dict]:
    console = Console()
    rows = []
    calib = {"n_samples": 16 if fast else 128, "seq_len": 128}
    for method, bits in CONFIGS:
        recipe = Recipe(method=method, format=f"int{bits}", group_size=group_size, calib=calib)
        start = time.perf_counter()
        job = quantize(MODEL, recipe, show_progress=not fast)
        seconds = time.perf_counter() - start
        path = save_job(job, recipe, out_dir / f"{method}-int{bits}-g{group_size}", force=True)
        result = evaluate(path, n_sentences=64 if fast else 512)
        rows.append({"method": method, "bits": bits, "seconds": seconds, **result})
        console.print(f"{method} int{bits}: cosine {result['cosine']:.4f}, {result['bpw']:.3f} bpw, {seconds:.1f} s")
    table = Table(title=f"all-MiniLM-L6-v2, int g{group_size} asymmetric, cosine to the original on {rows[0]['sentences']} held-out sentences")
    for col in ("method", "bits", "bpw", "linear MB", "artifact MB", "cosine", "min cosine", "quantize s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["method"], str(r["bits"]), f"{r['bpw']:.3f}", f"{r['quantized_file_bytes'] / 1e6:.2f}",
            f"{r['size_bytes'] / 1e6:.2f}", f"{r['cosine']:.4f}", f"{r['cosine_min']:.4f}", f"{r['seconds']:.1f}",
        )
    console.print(table)
    console.print(f"artifacts in {out_dir}/ (try `lowbit inspect {out_dir}/gptq-int4-g{group_size}`)")
    return rows
