"""Intel's AutoRound (SignRound: signed-gradient tuning of the rounding and of the min/max range,
block by block), in an environment of its own, read back by lowbit.

auto-round pins its own transformers/accelerate stack, so it runs in its own venv
(LOWBIT_AUTOROUND_PYTHON, default /work/venvs/autoround/bin/python; see bench/peers/__init__.py
for the install) as a child process (autoround_child.py). The adapter saves the float32 model
(with its tokenizer) and the calibration windows, the very token windows lowbit's GPTQ
calibrates on, into a temporary directory; AutoRound(bits, group_size, sym=False) tunes with
nsamples and seqlen equal to those windows, batch size 8, `iters` steps per block and learning
rate `lr` (AutoRound's default: 200 steps, lr 1/iters; the bench's configurations take its "light"
recipe, 50 steps at lr 5e-3) and its other defaults, except two for this CPU: amp off (AutoRound
would cast the model to bfloat16 on a CPU with bf16; the peers all see the float32 model, and
bf16 was slower here) and torch.compile off (on 2 cores compiling costs more than it
saves). The result is saved with format `auto_round:gptqmodel`: GPTQ tensors (qweight, qzeros,
scales fp16, g_idx) with the zero points stored as they are (auto-round's `auto_gptq` export
stores zero - 1 clamped at 0, which shifts a group whose zero point is 0; its default asymmetric
int4 export is AWQ's packing).

The adapter reads those tensors with safetensors and dequantizes them itself (gptq_layout.py), and
the layers become plain nn.Linear computing with those weights. Bits per weight count every tensor
stored for the decoder linears (qweight, qzeros, scales, g_idx) at their stored dtype. With
`verify=True` the child also loads the checkpoint back through transformers (auto-round's torch
QuantLinear) and writes each layer's weight as that kernel computes it; the adapter then requires
its fp32 weight, rounded once to fp16, to equal it.

On this 2-core CPU a tuning step costs about as much as 8 forward and backward passes of a block
over one window (AutoRound takes the batch one sample at a time): with other work on the machine,
the bench's default model (4 blocks of 192, windows of 256) took 4 to 14 min per block at 200
steps, and SmolLM2 (30 blocks of 576, windows of 512) 5 s per step and block, i.e. about 8 h at
200 steps and 2 h at 50: beyond the bench's 30-minute timeout (pass --timeout).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from . import gptq_layout
from .common import PeerResult, bpw_of, decoder_linears, set_weight, stored_bytes
from .venv_peer import interpreter, run_child, save_inputs

DEFAULT_PYTHON = "/work/venvs/autoround/bin/python"
INSTALL = ("python3 -m venv /work/venvs/autoround && /work/venvs/autoround/bin/pip install torch==2.13.0 && "
           "echo torch==2.13.0 > /tmp/c.txt && /work/venvs/autoround/bin/pip install -c /tmp/c.txt auto-round")
FORMAT = "auto_round:gptqmodel"


def quantize(model: nn.Module, calib: torch.Tensor | None = None, bits: int = 4, group_size: int = 64,
             symmetric: bool = False, iters: int = 200, lr: float | None = None, batch_size: int = 8,
             amp: bool = False, torch_compile: bool = False, verify: bool = False) -> PeerResult:
    if calib is None:
        raise ValueError("AutoRound needs calibration windows")
    python = interpreter("LOWBIT_AUTOROUND_PYTHON", DEFAULT_PYTHON, INSTALL)
    layers = decoder_linears(model)
    with tempfile.TemporaryDirectory(prefix="lowbit-autoround-") as name:
        tmp = Path(name)
        model_dir, calib_path = save_inputs(model, calib, tmp)
        spec = {"model": str(model_dir), "calib": str(calib_path), "out": str(tmp), "bits": bits,
                "group_size": group_size, "sym": symmetric, "iters": iters, "lr": lr, "batch_size": batch_size,
                "amp": amp, "torch_compile": torch_compile, "verify": verify}
        run = run_child(python, "autoround_child.py", spec, tmp)
        ckpt = Path(run.report["checkpoint"])
        cfg = gptq_layout.quantization_config(ckpt)
        _check_config(cfg, bits, group_size, symmetric)
        stored = gptq_layout.read_layers(ckpt, set(layers))
        weights = {n: gptq_layout.dequantize(stored[n], bits, lin.in_features, lin.out_features, group_size, False)[0]
                   for n, lin in layers.items()}
        checked = None
        if verify:
            checked = (f"auto-round cannot load its own checkpoint back to check ({run.report['verify_error']})"
                       if "verify_error" in run.report else gptq_layout.verify_dequantized("auto-round", "auto-round's torch kernel", tmp / "autoround_dequant.safetensors", weights))
    total_bytes = sum(s.stored_bytes for s in stored.values())
    g_idx_bytes = sum(stored_bytes(s.g_idx) for s in stored.values())
    n_weights = sum(lin.weight.numel() for lin in layers.values())
    for lname, w in weights.items():
        set_weight(model, lname, w)
    parts = [
        f"auto-round {run.report['auto_round']} SignRound int{bits} g{group_size} {'sym' if symmetric else 'asym'}, "
        f"{calib.shape[0]}x{calib.shape[1]} calib tokens, batch {batch_size}, {iters} iters, lr {lr or 'default 1/iters'}, "
        f"amp {'on' if amp else 'off'}, torch.compile {'on' if torch_compile else 'off'}",
        f"saved as {cfg.get('packing_format')} (zero points as they are), fp16 scales, g_idx counted "
        f"(without: {bpw_of(total_bytes - g_idx_bytes, n_weights):.3f} bpw)",
        f"auto-round load+tune+save {run.report['seconds']:.1f}s",
    ]
    short = sorted({lin.in_features for lin in layers.values() if lin.in_features % group_size})
    if short:
        parts.append("in_features " + ", ".join(f"{w}: last group of {w % group_size}" for w in short))
    if checked:
        parts.append(checked)
    parts.append(f"own venv (child: {run.wall_seconds:.1f}s wall, {run.cpu_seconds:.1f}s CPU, peak RSS {run.peak_rss_mb:.0f} MB)")
    return PeerResult(model, bpw_of(total_bytes, n_weights), "; ".join(parts))


def _check_config(cfg: dict, bits: int, group_size: int, symmetric: bool) -> None:
    gptq_layout.check_saved_config("auto-round", cfg, bits, group_size, symmetric)
    if cfg.get("packing_format") != FORMAT:
        raise RuntimeError(f"auto-round saved packing {cfg.get('packing_format')!r}, expected {FORMAT!r}")
