"""GPTQModel's GPTQ (ModelCloud's GPTQModel, in an environment of its own), read back by lowbit.

GPTQModel pins its own stack (torchao, defuser, tokenicer ...), so it runs in its own venv
(LOWBIT_GPTQMODEL_PYTHON, default /work/venvs/gptqmodel/bin/python; see bench/peers/__init__.py
for the install) as a child process, with GPTQMODEL_CPU_WORKERS=2 (on a 2-core machine its
default of one CPU worker refuses to start the model loader's pool of two). The adapter saves the
float32 model (with its tokenizer) and the calibration windows, the very token windows lowbit's
GPTQ calibrates on, into a temporary directory; the child (gptqmodel_child.py) loads the model in
float32 (GPTQModel's CPU default would be bfloat16), quantizes with QuantizeConfig(bits,
group_size, sym=False, lm_head=False), GPTQModel's defaults otherwise (desc_act off, its
group-aware reordering "act_group_aware" on, damp 0.05, true-sequential), batch size 8 as lowbit,
and saves GPTQModel's checkpoint: GPTQ v1 (`checkpoint_format: gptq`), fp16 scales.

The adapter then reads qweight / qzeros / scales / g_idx of every decoder linear with safetensors
and dequantizes them itself (gptq_layout.py: zero point stored minus one in v1, added back per
field), and the layers become plain nn.Linear computing with those weights. Bits per weight count
every tensor GPTQModel stores for those layers (qweight, qzeros, scales, g_idx) at their stored
dtype. With `verify=True` the child also loads the checkpoint back with BACKEND.TORCH and writes
each layer's dequantize_weight(); the adapter then requires its fp32 weight, rounded once to fp16,
to equal GPTQModel's fp16 weight bit for bit (GPTQModel computes the product in fp16); on the
bench's default model every layer is (int4 g64 and g128, int3 g64; int2 and int8 too). Reading the
zero points without the +1 instead gives a weight 3x further from the float one: the modules that
GPTQModel holds in memory right after quantize() already carry the v1 zeros.

Group sizes that do not divide in_features (128 on SmolLM2's 576-wide layers) get a short last
group: ceil(in / group) groups, the last one of the remaining columns (576 = 4 x 128 + 64).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from . import gptq_layout
from .common import PeerResult, bpw_of, decoder_linears, set_weight, stored_bytes
from .venv_peer import interpreter, run_child, save_inputs

DEFAULT_PYTHON = "/work/venvs/gptqmodel/bin/python"
INSTALL = ("python3 -m venv /work/venvs/gptqmodel && /work/venvs/gptqmodel/bin/pip install torch==2.13.0 && "
           "echo torch==2.13.0 > /tmp/c.txt && /work/venvs/gptqmodel/bin/pip install -c /tmp/c.txt gptqmodel")


def quantize(model: nn.Module, calib: torch.Tensor | None = None, bits: int = 4, group_size: int = 64,
             symmetric: bool = False, batch_size: int = 8, verify: bool = False) -> PeerResult:
    if calib is None:
        raise ValueError("GPTQ needs calibration windows")
    python = interpreter("LOWBIT_GPTQMODEL_PYTHON", DEFAULT_PYTHON, INSTALL)
    layers = decoder_linears(model)
    with tempfile.TemporaryDirectory(prefix="lowbit-gptqmodel-") as name:
        tmp = Path(name)
        model_dir, calib_path = save_inputs(model, calib, tmp)
        spec = {"model": str(model_dir), "calib": str(calib_path), "out": str(tmp), "bits": bits,
                "group_size": group_size, "sym": symmetric, "batch_size": batch_size, "verify": verify}
        run = run_child(python, "gptqmodel_child.py", spec, tmp, env={"GPTQMODEL_CPU_WORKERS": "2"})
        ckpt = tmp / "quantized"
        cfg = gptq_layout.quantization_config(ckpt)
        gptq_layout.check_saved_config("GPTQModel", cfg, bits, group_size, symmetric)
        v1 = str(cfg.get("checkpoint_format", "gptq")).lower() == "gptq"
        stored = gptq_layout.read_layers(ckpt, set(layers))
        weights, underflows = {}, 0
        for lname, lin in layers.items():
            weights[lname], n = gptq_layout.dequantize(stored[lname], bits, lin.in_features, lin.out_features,
                                                       group_size, v1)
            underflows += n
        checked = gptq_layout.verify_dequantized("GPTQModel", "GPTQModel's dequantize_weight()", tmp / "gptqmodel_dequant.safetensors", weights) if verify else None
    total_bytes = sum(s.stored_bytes for s in stored.values())
    g_idx_bytes = sum(stored_bytes(s.g_idx) for s in stored.values())
    n_weights = sum(lin.weight.numel() for lin in layers.values())
    short = {lin.in_features: stored[n].scales.shape[0] for n, lin in layers.items() if lin.in_features % group_size}
    for lname, w in weights.items():
        set_weight(model, lname, w)
    meta = cfg.get("meta") or {}
    parts = [
        f"GPTQModel {run.report['gptqmodel']} GPTQ int{bits} g{group_size} {'sym' if symmetric else 'asym'}, "
        f"{calib.shape[0]}x{calib.shape[1]} calib tokens, batch {batch_size}, desc_act {cfg.get('desc_act')}, "
        f"act_group_aware {meta.get('act_group_aware')}, damp {meta.get('damp_percent')}",
        f"checkpoint {cfg.get('checkpoint_format')} (v1: zero point stored minus one), fp16 scales, g_idx counted "
        f"(without: {bpw_of(total_bytes - g_idx_bytes, n_weights):.3f} bpw)",
        f"GPTQModel load+quantize+save {run.report['seconds']:.1f}s",
    ]
    if short:
        parts.append("in_features " + ", ".join(f"{w}: {g} groups, the last of {w - (g - 1) * group_size} columns"
                                                 for w, g in sorted(short.items())))
    if underflows:
        parts.append(f"{underflows} zero points stored as 2^bits-1 (v1 underflow of a zero point 0)")
    if checked:
        parts.append(checked)
    parts.append(f"own venv (child: {run.wall_seconds:.1f}s wall, {run.cpu_seconds:.1f}s CPU, peak RSS {run.peak_rss_mb:.0f} MB)")
    return PeerResult(model, bpw_of(total_bytes, n_weights), "; ".join(parts))
