"""Run by the auto-round environment's python, started by autoround_peer.py (not imported by the
bench): Intel's AutoRound (SignRound) on a saved float model and given token windows, saved in
auto-round's `auto_round:gptqmodel` packing. Standalone on purpose: it imports nothing of lowbit
or bench.

    /work/venvs/autoround/bin/python bench/peers/autoround_child.py SPEC.json

SPEC.json: {"model": dir, "calib": safetensors with input_ids [n, seq], "out": dir, "bits",
"group_size", "sym", "iters", "lr" (null: AutoRound's 1/iters), "batch_size", "amp",
"torch_compile", "verify"}. Writes out/report.json (with the checkpoint's path); with "verify",
also out/autoround_dequant.safetensors: every quantized layer's weight as auto-round's own CPU
kernel computes it ([out, in], the layer applied to the identity, bias taken off), after loading
the checkpoint back through transformers (or report.json's verify_error when that load fails).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    try:
        import auto_round
        import torch
        import transformers
        from auto_round import AutoRound
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        print(f"UNAVAILABLE: auto-round cannot be imported by {sys.executable} ({exc.__class__.__name__}: {exc})")
        sys.exit(3)

    ids = load_file(spec["calib"])["input_ids"]
    n, seq = ids.shape
    bs = spec["batch_size"]
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    except (OSError, ValueError):
        tokenizer = None
    extra = {} if spec.get("lr") is None else {"lr": spec["lr"]}
    ar = AutoRound(model, tokenizer, bits=spec["bits"], group_size=spec["group_size"], sym=spec["sym"],
                   iters=spec["iters"], nsamples=n, seqlen=seq, batch_size=bs,
                   dataset=[ids[i:i + bs] for i in range(0, n, bs)], device_map="cpu", amp=spec["amp"],
                   enable_torch_compile=spec["torch_compile"], **extra)
    _, saved = ar.quantize_and_save(str(out / "quantized"), format="auto_round:gptqmodel")
    seconds = time.perf_counter() - start
    report = {"auto_round": auto_round.__version__, "transformers": transformers.__version__, "seconds": seconds,
              "checkpoint": str(saved), "calib": [n, seq]}
    if spec.get("verify"):
        try:
            loaded = AutoModelForCausalLM.from_pretrained(saved, device_map="cpu", dtype=torch.float32)
        except (ValueError, RuntimeError) as exc:  # e.g. no kernel for group sizes that do not divide in_features
            report["verify_error"] = f"{exc.__class__.__name__}: {str(exc).splitlines()[0].split(' with config')[0]}"[:300]
            (out / "report.json").write_text(json.dumps(report))
            return
        ref = {}
        with torch.no_grad():
            for name, m in loaded.named_modules():
                if hasattr(m, "qweight") and hasattr(m, "qzeros"):
                    w = m(torch.eye(m.infeatures, dtype=torch.float32))
                    if getattr(m, "bias", None) is not None:
                        w = w - m.bias.float()
                    ref[name] = w.t().contiguous()
        save_file(ref, str(out / "autoround_dequant.safetensors"))
        report["verify_module"] = type(loaded.get_submodule(next(iter(ref)))).__name__
    (out / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
