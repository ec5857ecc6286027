"""W8A8 and W4A8 (`--act int8`) against weight-only int8 / int4 and the float model: KL and prefill speed.

    python -m bench.act [--model smollm2-135m] [--tokens 512] [--rounds 7]

Quantizes the model six ways (W8A8 by RTN, with and without SmoothQuant's migration, and by GPTQ
with it; weight-only int8 by RTN, the same weights as W8A8 RTN, each int8 symmetric with one scale
per row; W4A8 and weight-only int4, GPTQ int4 g64 asymmetric), measures each artifact's KL to
the original on held-out text, then times a prefill of `--tokens` tokens (one sequence, no
cache) and greedy decoding with the KV cache for every artifact and for the float model in float32
and bfloat16, in interleaved
rounds in this one process (the fastest round counts: the machine may be shared). Speeds are
ratios to the float32 model measured in the same rounds. Writes bench/results/act-<model>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from lowbit.artifact import load
from lowbit.pipeline import evaluate, load_model, quantize, save_job
from lowbit.recipe import Recipe

from .common import ASSETS, RESULTS, machine, markdown_table, write_results

INT8_ROWS = {"format": "int8", "symmetric": True, "group_size": -1}
CONFIGS = {
    "W8A8 RTN": {"method": "rtn", **INT8_ROWS, "act": "int8"},
    "W8A8 RTN + SmoothQuant 0.5": {"method": "rtn", **INT8_ROWS, "act": "int8", "scaling": "smooth"},
    "W8A8 GPTQ + SmoothQuant 0.5": {"method": "gptq", **INT8_ROWS, "act": "int8", "scaling": "smooth"},
    "W8A16 RTN (weight-only int8)": {"method": "rtn", **INT8_ROWS},
    "W4A8 GPTQ int4 g64 + SmoothQuant 0.5": {"method": "gptq", "format": "int4", "group_size": 64, "act": "int8",
                                             "scaling": "smooth"},
    "W4A16 GPTQ int4 g64 (weight-only)": {"method": "gptq", "format": "int4", "group_size": 64},
}


def _prefill_seconds(model: torch.nn.Module, ids: torch.Tensor) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t


def _decode_seconds(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> float:
    """Seconds per generated token: `steps` greedy tokens after `prompt`, with the KV cache."""
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default=str(ASSETS / "calib.txt"))
    ap.add_argument("--text", default=str(ASSETS / "eval.txt"))
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=512, help="prefill length timed")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--decode", type=int, default=32, help="greedy tokens timed per decode round (after a 64-token prompt)")
    args = ap.parse_args()

    reference = load_model(args.model)
    rows: list[dict] = []
    models: dict[str, torch.nn.Module] = {"float32 (original)": reference.model}
    bf16 = copy.deepcopy(reference.model).to(torch.bfloat16)
    models["bfloat16 (original)"] = bf16
    with tempfile.TemporaryDirectory() as tmp:
        for label, cfg in CONFIGS.items():
            recipe = Recipe.from_dict({**cfg, "calib": {"path": args.calib, "n_samples": args.n_samples,
                                                        "seq_len": args.seq_len}})
            t = time.perf_counter()
            path = save_job(quantize(args.model, recipe, show_progress=False), recipe, Path(tmp) / f"config{len(rows)}")
            seconds = time.perf_counter() - t
            m = evaluate(path, args.text, reference=reference, max_tokens=args.max_tokens, seq_len=args.seq_len)
            rows.append({"config": label, "bpw": m["bpw"], "kl": m["kl"], "top1": m["top1"], "ppl": m["ppl"],
                         "quantize_s": seconds})
            models[label] = load(path)
            print(f"{label}: KL {m['kl']:.5f} top-1 {m['top1']:.3f}", flush=True)
        ids = torch.randint(0, reference.model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
        best = {k: float("inf") for k in models}
        step = {k: float("inf") for k in models}
        for model in models.values():  # warm-up: weights unpacked, kernels picked
            _prefill_seconds(model, ids)
            _decode_seconds(model, ids[:, :64], 2)
        for _ in range(args.rounds):
            for k, model in models.items():
                best[k] = min(best[k], _prefill_seconds(model, ids))
                step[k] = min(step[k], _decode_seconds(model, ids[:, :64], args.decode))
    base, base_step = best["float32 (original)"], step["float32 (original)"]
    speed = [{"config": k, "prefill_ms": 1e3 * v, "tokens_per_s": args.tokens / v, "speedup": base / v,
              "decode_tokens_per_s": 1 / step[k], "decode_speedup": base_step / step[k]} for k, v in best.items()]
    for r in rows:
        r.update(next(s for s in speed if s["config"] == r["config"]))
    payload = {"machine": machine(), "model": args.model, "tokens": args.tokens, "rounds": args.rounds,
               "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len}, "max_tokens": args.max_tokens,
               "load_avg_1m": __import__("os").getloadavg()[0], "quality": rows, "prefill": speed}
    name = f"act-{Path(args.model).name}"
    write_results(name, payload)
    md = (f"# W8A8 on {args.model}\n\nKL to the original on the first {args.max_tokens} tokens of "
          f"`{Path(args.text).name}` (512-token windows); GPTQ calibrated on {args.n_samples} x {args.seq_len} tokens. "
          f"Prefill: one sequence of {args.tokens} tokens, no cache; decode: {args.decode} greedy tokens after a 64-token "
          f"prompt, with the KV cache; the fastest of {args.rounds} interleaved rounds in one "
          f"process ({torch.get_num_threads()} threads, load average {payload['load_avg_1m']:.1f} at the end).\n\n"
          + markdown_table(rows, [("config", "configuration", ""), ("bpw", "bpw", ".3f"), ("kl", "KL", ".5f"),
                                  ("top1", "top-1", ".3f"), ("ppl", "ppl", ".2f"), ("quantize_s", "quantize s", ".0f")])
          + "\n\n" + markdown_table(speed, [("config", "model", ""), ("prefill_ms", "prefill ms", ".1f"),
                                            ("tokens_per_s", "prefill tokens/s", ".0f"), ("speedup", "vs float32", ".2f"),
                                            ("decode_tokens_per_s", "decode tokens/s", ".1f"),
                                            ("decode_speedup", "vs float32", ".2f")]) + "\n")
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
