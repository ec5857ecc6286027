"""Quantized KV caches side by side: lowbit's KIVI cache against transformers' QuantizedCache
(quanto and HQQ backends), same model, text, windows and residual length.

    python -m bench.kv [--model smollm2-135m] [--context 1024] [--decode 64] [--windows 4]

Each window of held-out text: `--context` tokens prefilled, then `--decode` tokens fed one at a
time through the cache (teacher-forced). KL to the same calls with a full-precision cache, over
the decoded positions (`lowbit.kv.eval`). Bits per value count the scales and minimums. Writes
bench/results/kv-<model>.json and .md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


from lowbit.calib.text import read_text
from lowbit.kv import KIVICache, decoded_fidelity, kivi_bits_per_value
from lowbit.models import load_model

from .common import ASSETS, RESULTS, machine, markdown_table, write_results


def peer_cache(backend: str, config, bits: int, residual: int, group: int):
    from transformers import QuantizedCache

    return lambda: QuantizedCache(backend, config, nbits=bits, residual_length=residual, q_group_size=group)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default=str(ASSETS / "eval.txt"))
    ap.add_argument("--context", type=int, default=1024, help="tokens prefilled before the decoded ones")
    ap.add_argument("--decode", type=int, default=64, help="positions decoded through the cache per window")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--residual", type=int, default=128, help="full-precision window, the same for every cache")
    args = ap.parse_args()

    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    ids = tok(read_text(args.text), return_tensors="pt").input_ids[0]
    length = args.context + args.decode
    if ids.numel() < length * args.windows:
        raise SystemExit(f"{args.text} has {ids.numel()} tokens; {args.windows} windows of {length} need more")
    windows = ids[: length * args.windows].view(args.windows, length)
    layers = model.config.num_hidden_layers
    configs: dict[str, tuple[dict, object]] = {}
    for bits in (4, 2):
        for group in (64, 32):
            bpv = kivi_bits_per_value(bits, args.residual, group)
            configs[f"lowbit KIVI {bits}-bit (keys per channel / {args.residual} tokens, values per token / {group})"] = (
                {"tool": "lowbit", "kv_method": "kivi", "kv_bits": bits, "bits_per_value": bpv["mean"]},
                lambda b=bits, g=group: KIVICache(layers, b, args.residual, g))
        for backend in ("quanto", "hqq"):
            configs[f"transformers QuantizedCache {backend} {bits}-bit (group 64)"] = (
                {"tool": f"transformers+{backend}", "kv_method": "QuantizedCache", "kv_bits": bits,
                 "bits_per_value": bits + 32 / 64},
                peer_cache(backend, model.config, bits, args.residual, 64))
    makers = {}
    rows = []
    for name, (info, make) in configs.items():
        try:
            make()  # a backend that does not load here is a row with its error, not a crash
            makers[name] = make
        except Exception as exc:  # noqa: BLE001 (peer packages fail in many ways)
            rows.append({"config": name, **info, "status": f"error: {type(exc).__name__}: {str(exc)[:120]}"})
    t = time.perf_counter()
    results = decoded_fidelity(model, windows, args.context, makers)
    seconds = time.perf_counter() - t
    for name, r in results.items():
        rows.append({"config": name, **configs[name][0], "status": "ok", "kl": r["kl"], "top1": r["top1"],
                     "context": args.context, "positions": r["positions"]})
    rows.sort(key=lambda r: (-r["kv_bits"], r["config"]))
    ppl = next(iter(results.values()))["ppl_reference"] if results else None
    payload = {"machine": machine(), "model": args.model, "context": args.context, "decode": args.decode,
               "windows": args.windows, "residual": args.residual, "ppl_reference": ppl, "seconds": seconds, "rows": rows}
    name = f"kv-{Path(args.model).name}"
    write_results(name, payload)
    md = (f"# Quantized KV caches on {args.model}\n\n{args.windows} windows of `{Path(args.text).name}`: {args.context} tokens "
          f"prefilled, then {args.decode} decoded one at a time through the cache; KL to a full-precision cache over the "
          f"{args.windows * args.decode} decoded positions (reference perplexity there {ppl:.2f}). Residual window "
          f"{args.residual} tokens for every cache. {seconds:.0f} s.\n\n"
          + markdown_table(rows, [("config", "cache", ""), ("bits_per_value", "bits per value", ".3f"), ("kl", "KL", ".5f"),
                                  ("top1", "top-1", ".3f"), ("status", "status", "")]) + "\n")
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
