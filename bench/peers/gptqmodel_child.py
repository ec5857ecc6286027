"""Run by the GPTQModel environment's python, started by gptqmodel_peer.py (not imported by the
bench): GPTQ with GPTQModel on a saved float model and given token windows, saved as GPTQModel's
checkpoint. Standalone on purpose: it imports nothing of lowbit or bench.

    GPTQMODEL_CPU_WORKERS=2 /work/venvs/gptqmodel/bin/python bench/peers/gptqmodel_child.py SPEC.json

SPEC.json: {"model": dir, "calib": safetensors with input_ids [n, seq], "out": dir, "bits",
"group_size", "sym", "batch_size", "verify"}. Writes out/quantized (GPTQModel.save) and
out/report.json; with "verify", also out/gptqmodel_dequant.safetensors: every quantized layer's
dequantize_weight() ([out, in], fp16) after loading the checkpoint back with BACKEND.TORCH, the
reference the adapter checks its own dequantization against.
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
        import gptqmodel
        import torch
        from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
        from safetensors.torch import load_file, save_file
    except ImportError as exc:
        print(f"UNAVAILABLE: gptqmodel cannot be imported by {sys.executable} ({exc.__class__.__name__}: {exc})")
        sys.exit(3)

    ids = load_file(spec["calib"])["input_ids"]
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]
    qcfg = QuantizeConfig(bits=spec["bits"], group_size=spec["group_size"], sym=spec["sym"], lm_head=False,
                          offload_to_disk_path=str(out / "offload"))
    start = time.perf_counter()
    model = GPTQModel.load(spec["model"], qcfg, device="cpu", dtype=torch.float32)
    model.quantize(calib, batch_size=spec["batch_size"])
    quantized = out / "quantized"
    model.save(str(quantized))
    seconds = time.perf_counter() - start
    report = {"gptqmodel": gptqmodel.__version__, "torch": torch.__version__, "seconds": seconds,
              "calib": list(ids.shape)}
    if spec.get("verify"):
        loaded = GPTQModel.load(str(quantized), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16).model
        ref = {name: m.dequantize_weight().t().contiguous() for name, m in loaded.named_modules()
               if hasattr(m, "dequantize_weight") and hasattr(m, "qzeros")}
        save_file(ref, str(out / "gptqmodel_dequant.safetensors"))
        report["verify_module"] = type(loaded.get_submodule(next(iter(ref)))).__name__
    (out / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
