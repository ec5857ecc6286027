"""Quantization-aware training against post-training quantization of the same format, on the
reference model, with a float fine-tune control.

    python -m bench.qat [--steps 100] [--only ternary,int2-g32]

Every row is an artifact evaluated the same way (`lowbit.pipeline.evaluate`): KL to the float model
and perplexity on the first `--max-tokens` tokens of the held-out eval.txt, in 256-token windows.
Training data: calib.txt (other plays), `--steps` steps of 4 windows x 256 tokens, AdamW 5e-4,
cosine schedule, seed 0. Rows per format: RTN and GPTQ (PTQ, GPTQ calibrated on 128 x 256 tokens
of the same text), then QAT from the float model with distillation (fixed or LSQ steps) and with
cross-entropy. "Gap closed" is 1 - KL(QAT) / KL(best PTQ). The control trains the float model with
cross-entropy on the same batches: how far the text alone moves it. Writes bench/results/qat.json
and qat.md.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lowbit.algos.distill import batches, lm_loss, optimizer_step
from lowbit.calib.text import consecutive_windows, random_windows, read_text
from lowbit.eval.metrics import causal_lm_fidelity
from lowbit.models import load_model
from lowbit.pipeline import evaluate, quantize, save_job
from lowbit.recipe import Recipe
from lowbit.train import QATConfig, train_model

from .common import ASSETS, RESULTS, machine, markdown_table, write_results

MODEL = ASSETS / "shakespeare-llama"
FORMATS = {  # name -> recipe keys
    "ternary": {"format": "ternary", "group_size": 0},  # BitNet b1.58: one absmean scale per tensor
    "ternary-median": {"format": "ternary", "group_size": 0, "format_options": {"scale": "median"}},  # b1.58 Reloaded
    "int2-g32": {"format": "int2", "group_size": 32},
    "int3-g32": {"format": "int3", "group_size": 32},
    "binary-g64": {"format": "binary", "group_size": 64},  # sign + STE (fixed absmean) against BiPer
}
SEQ, BATCH, WINDOWS = 256, 4, 256


def float_control(steps: int, calib: str, eval_text: str, max_tokens: int) -> dict:
    """The float model fine-tuned with cross-entropy on the QAT batches: KL to its own start."""
    ref, tuned = load_model(str(MODEL)), load_model(str(MODEL))
    windows = random_windows(tuned.tokenizer, read_text(calib), SEQ, WINDOWS, 0)
    params = [p for n, p in tuned.model.named_parameters() if "embed" not in n and "lm_head" not in n]
    for p in tuned.model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    tuned.model.eval()
    with torch.enable_grad():
        for step, idx in enumerate(batches(WINDOWS, BATCH, steps, torch.Generator().manual_seed(0))):
            ids = windows[idx]
            optimizer_step(opt, params, lm_loss(tuned.model(input_ids=ids, use_cache=False).logits, ids), 5e-4, step, steps)
    test = consecutive_windows(ref.tokenizer, read_text(eval_text), SEQ, max_tokens)
    return causal_lm_fidelity(ref.model, tuned.model, test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--only", default=",".join(FORMATS), help="comma-separated formats: " + ", ".join(FORMATS))
    ap.add_argument("--no-control", action="store_true", help="skip the float fine-tune control")
    ap.add_argument("--init", default="", help="only the QAT runs starting from these PTQ methods (rtn, gptq)")
    ap.add_argument("--merge", action="store_true", help="keep the rows of the results file that this run does not redo")
    ap.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens evaluated")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--nested", action="store_true", help="only the Double Rounding rows: nested8 trained at 8/6/4/2 "
                    "at once against nested8 trained at each precision alone (and RTN), each evaluated at every precision")
    ap.add_argument("--render-only", action="store_true", help="rewrite qat.md (or, with --nested, qat-nested.md) from "
                    "its JSON, no runs")
    args = ap.parse_args()
    if args.render_only:
        args.merge = True
        finish(args, [], "qat-nested" if args.nested else "qat")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    calib, eval_text = str(ASSETS / "calib.txt"), str(ASSETS / "eval.txt")
    rows = []
    work = Path(tempfile.mkdtemp(prefix="lowbit-qat-"))

    def measured(path: Path, bits: int | None = None) -> dict:
        e = evaluate(path, eval_text, max_tokens=args.max_tokens, seq_len=SEQ, bits=bits)
        return {"kl": e["kl"], "ppl": e["ppl"], "bpw": e["bpw"]}

    try:
        if args.nested:
            nested_rows(args, calib, measured, work, rows)
            finish(args, rows, "qat-nested")
            return
        if not args.no_control:
            t = time.perf_counter()
            control = float_control(args.steps, calib, eval_text, args.max_tokens)
            rows.append({"format": "float", "method": "float, fine-tuned with CE (control)", "kl": control["kl"],
                         "ppl": control["ppl"], "bpw": 32.0, "seconds": time.perf_counter() - t})
            print(rows[-1], flush=True)
        for name in args.only.split(","):
            keys = FORMATS[name]
            best_ptq = None
            for method in ("rtn", "gptq"):
                r = Recipe.from_dict({"method": method, **keys, "calib": {"path": calib, "n_samples": 128, "seq_len": SEQ}})
                t = time.perf_counter()
                path = save_job(quantize(str(MODEL), r, show_progress=False), r, work / f"{name}-{method}")
                row = {"format": name, "method": f"PTQ {method.upper()}", **measured(path), "seconds": time.perf_counter() - t}
                best_ptq = row["kl"] if best_ptq is None else min(best_ptq, row["kl"])
                rows.append(row)
                print(row, flush=True)
            recipe = Recipe.from_dict({"method": "rtn", **keys})
            runs = ([("kd", "fixed", "rtn")] if name.endswith("median") else
                    [("kd", "fixed", "rtn"), ("kd", "biper", "rtn")] if name.startswith("binary") else
                    [("kd", "fixed", "rtn"), ("kd", "lsq", "rtn"), ("ce", "lsq", "rtn"), ("kd", "lsq", "gptq")])
            for loss, steps, init in runs:
                if args.init and init not in args.init.split(","):
                    continue
                cfg = QATConfig(steps=args.steps, batch_size=BATCH, loss=loss, step_sizes=steps)
                t = time.perf_counter()
                start = Recipe.from_dict({**recipe.to_dict(), "method": init,
                                          "calib": {"path": calib, "n_samples": 128, "seq_len": SEQ}})
                path, result = train_model(str(MODEL), start, cfg, work / f"{name}-{loss}-{steps}-{init}", calib,
                                           seq_len=SEQ, n_windows=WINDOWS, show_progress=False)
                row = {"format": name, "method": f"QAT {loss.upper()}, {steps} steps, from {init.upper()}"
                       + (f", {args.steps} steps" if args.steps != 100 else ""), **measured(path),
                       "seconds": time.perf_counter() - t}
                row["gap_closed"] = 1 - row["kl"] / best_ptq
                rows.append(row)
                print(row, flush=True)
            for row in rows:
                if row["format"] == name and row["method"].startswith("PTQ"):
                    row["gap_closed"] = 1 - row["kl"] / best_ptq
    finally:
        shutil.rmtree(work, ignore_errors=True)
    finish(args, rows, "qat")


PRECISIONS = (8, 6, 4, 2)


def nested_rows(args, calib: str, measured, work: Path, rows: list[dict]) -> None:
    """nested8 g32: RTN, trained at every precision at once (Double Rounding), and trained at each
    precision alone; every artifact evaluated at every precision."""
    recipe = Recipe.from_dict({"method": "rtn", "format": "nested8", "group_size": 32})
    runs = [("RTN", None), ("QAT KD, 8/6/4/2 at once", PRECISIONS)] + [(f"QAT KD, {p}-bit alone", (p,)) for p in PRECISIONS]
    for label, precisions in runs:
        t = time.perf_counter()
        if precisions is None:
            path = save_job(quantize(str(MODEL), recipe, show_progress=False), recipe, work / "nested-rtn")
        else:
            cfg = QATConfig(steps=args.steps, batch_size=BATCH, precisions=precisions)
            path, _ = train_model(str(MODEL), recipe, cfg, work / f"nested-{'-'.join(map(str, precisions))}", calib,
                                  seq_len=SEQ, n_windows=WINDOWS, show_progress=False)
        seconds = time.perf_counter() - t
        for p in PRECISIONS:
            if precisions is not None and len(precisions) == 1 and p != precisions[0]:
                continue  # a single-precision model is compared at its own precision
            rows.append({"format": f"nested8 g32 @ {p}-bit", "method": label, **measured(path, p), "seconds": seconds})
            print(rows[-1], flush=True)


def finish(args, rows: list[dict], name: str) -> None:
    path = RESULTS / f"{name}.json"
    if args.merge and path.is_file():  # earlier rows this run did not redo, in their order, then the new ones
        import json

        redone = {(r["format"], r["method"]) for r in rows}
        rows[:0] = [r for r in json.loads(path.read_text())["rows"] if (r["format"], r["method"]) not in redone]
    order = ["float", *FORMATS]
    rows.sort(key=lambda r: order.index(r["format"]) if r["format"] in order else len(order))  # stable: runs in order
    payload = {"machine": machine(), "model": str(MODEL.name), "steps": args.steps, "batch": BATCH, "seq_len": SEQ,
               "max_tokens": args.max_tokens, "rows": rows}
    write_results(name, payload)
    md = (f"# QAT against PTQ on {MODEL.name}\n\n{args.steps} steps of {BATCH} x {SEQ} tokens of calib.txt; KL to the "
          f"float model and perplexity on the first {args.max_tokens} tokens of eval.txt ({SEQ}-token windows). "
          "Gap closed: 1 - KL / KL(best PTQ of the format).\n\n"
          + markdown_table(rows, [("format", "format", ""), ("method", "method", ""), ("bpw", "bpw", ".3f"),
                                  ("kl", "KL", ".4f"), ("ppl", "ppl", ".2f"), ("gap_closed", "gap closed", ".0%"),
                                  ("seconds", "s", ".0f")]) + "\n")
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
