"""`make demo`: a real model quantized with RTN and GPTQ, each saved as an artifact, loaded back,
measured against the original on held-out text, and asked the same question as the original.

Default: SmolLM2-135M-Instruct (alias smollm2-135m), int4 with groups of 128 (its 576-wide
layers get a shorter last group of 64). `--model minilm-l6` runs the encoder demo instead
(8/4/3 bits, cosine similarity of sentence embeddings).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .models import load_model
from .pipeline import evaluate, quantize, save_job
from .recipe import Recipe

PROMPT = "What is the capital of France?"


def _answer(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def run_demo(out_dir: Path, model: str = "smollm2-135m", fast: bool = False) -> list[dict]:
    console = Console()
    reference = load_model(model)
    causal = reference.kind == "causal-lm"
    if causal:
        configs = [("rtn", 4), ("gptq", 4)]
        group_size, calib = 128, {"n_samples": 8 if fast else 32, "seq_len": 512}
    else:
        configs = [(m, b) for b in (8, 4, 3) for m in ("rtn", "gptq")]
        group_size, calib = 128, {"n_samples": 16 if fast else 128, "seq_len": 128}
    rows = []
    answers = {"original": _answer(reference.model, reference.tokenizer, PROMPT)} if causal else {}
    for method, bits in configs:
        recipe = Recipe(method=method, format=f"int{bits}", group_size=group_size, calib=calib)
        console.print(f"[bold]{method} int{bits} g{group_size}[/]: quantizing {model} ...")
        start = time.perf_counter()
        job = quantize(model, recipe, show_progress=True)
        seconds = time.perf_counter() - start
        path = save_job(job, recipe, out_dir / f"{model}-{method}-int{bits}-g{group_size}", force=True)
        result = evaluate(path, reference=reference, max_tokens=1024 if fast else 4096, n_sentences=64 if fast else 512)
        rows.append({"method": method, "bits": bits, "seconds": seconds, "path": str(path), **result})
        if causal:
            from .artifact import load

            answers[f"{method} int{bits}"] = _answer(load(path, verify=False, cache_weights=True), reference.tokenizer, PROMPT)
    _print_table(console, model, group_size, rows, causal)
    for who, text in answers.items():
        console.print(f"[bold]{who:>10}[/] > {PROMPT}\n{'':>12} {text}")
    console.print(f"artifacts in {out_dir}/ (try `lowbit inspect {rows[-1]['path']}`)")
    return rows


def _print_table(console: Console, model: str, group_size: int, rows: list[dict], causal: bool) -> None:
    first = rows[0]
    if causal:
        title = (f"{model}, int g{group_size} asym, vs the original on {first['tokens']} held-out tokens "
                 f"(original ppl {first['ppl_reference']:.2f})")
        cols = ("method", "bits", "bpw", "MB", "KL", "ppl", "top-1", "time s")
    else:
        title = f"{model}, int g{group_size} asym, cosine to the original on {first['sentences']} held-out sentences"
        cols = ("method", "bits", "bpw", "MB", "cosine", "min cos", "time s")
    table = Table(title=title, caption="MB: the whole artifact directory; bpw: quantized layers, all stored bits")
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        common = [r["method"], str(r["bits"]), f"{r['bpw']:.3f}", f"{r['size_bytes'] / 1e6:.1f}"]
        if causal:
            quality = [f"{r['kl']:.4f}", f"{r['ppl']:.2f}", f"{r['top1']:.3f}"]
        else:
            quality = [f"{r['cosine']:.4f}", f"{r['cosine_min']:.4f}"]
        table.add_row(*common, *quality, f"{r['seconds']:.1f}")
    console.print(table)
