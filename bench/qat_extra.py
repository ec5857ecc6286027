"""Three more QAT runs of int2 g32 on the reference model, with the settings of `bench.qat`
(4 x 256-token windows of calib.txt, distillation, KL on 8,192 tokens of eval.txt): starting from
GPTQ's codes at a lower learning rate (LSQ steps, and fixed steps), and from RTN for 300 steps.

    python -m bench.qat_extra      # writes bench/results/qat-extra.json
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from lowbit.pipeline import evaluate
from lowbit.recipe import Recipe
from lowbit.train import QATConfig, train_model

from .common import ASSETS, machine, write_results

RUNS = [  # (label, starting method, steps, learning rate, step rule)
    ("from GPTQ, lr 1e-4, lsq steps", "gptq", 100, 1e-4, "lsq"),
    ("from GPTQ, lr 1e-4, fixed steps", "gptq", 100, 1e-4, "fixed"),
    ("from RTN, 300 steps, lsq steps", "rtn", 300, 5e-4, "lsq"),
]


def main() -> None:
    torch.set_num_threads(1)
    model, calib, text = str(ASSETS / "shakespeare-llama"), str(ASSETS / "calib.txt"), str(ASSETS / "eval.txt")
    rows = []
    work = Path(tempfile.mkdtemp(prefix="lowbit-qat-extra-"))
    try:
        for i, (label, method, steps, lr, rule) in enumerate(RUNS):
            r = Recipe.from_dict({"method": method, "format": "int2", "group_size": 32,
                                  "calib": {"path": calib, "n_samples": 128, "seq_len": 256}})
            t = time.perf_counter()
            path, _ = train_model(model, r, QATConfig(steps=steps, batch_size=4, lr=lr, step_sizes=rule), work / f"r{i}",
                                  calib, seq_len=256, n_windows=256, show_progress=False)
            e = evaluate(path, text, max_tokens=8192, seq_len=256)
            rows.append({"format": "int2-g32", "method": f"QAT KD, {label}", "kl": e["kl"], "ppl": e["ppl"],
                         "bpw": e["bpw"], "seconds": time.perf_counter() - t})
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results("qat-extra", {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
