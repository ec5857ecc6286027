"""optimum-quanto weight quantization (qint8 / qint4 / qint2, no calibration data).

quanto.quantize() with `include` restricted to the decoder linears, then freeze(); the layers then
compute with quanto's dequantized weights (WeightQBytesTensor / WeightQBitsTensor.dequantize(),
float32), which avoids the C++ extension that quanto compiles on its first int4 forward.
Group size is quanto's own rule (128, stepping down by 32 until it divides in_features; qint8 is
per output channel). Bits per weight count the packed data and the scale/shift tensors quanto
keeps, which are in the model's dtype: float32 here.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import (
    PeerResult,
    bpw_of,
    decoder_linears,
    require,
    set_weight,
    stored_bytes,
)


def quantize(model: nn.Module, calib: torch.Tensor | None = None, weights: str = "qint4") -> PeerResult:
    quanto = require("optimum.quanto", "optimum-quanto")
    layers = decoder_linears(model)
    names = list(layers)
    quanto.quantize(model, weights=getattr(quanto, weights), include=names)
    quanto.freeze(model)
    total_bytes = n_weights = scale_bytes = 0
    groups = set()
    for name in names:
        qw = model.get_submodule(name).weight
        inner = qw.__tensor_flatten__()[0]
        total_bytes += stored_bytes(qw)
        scale_bytes += sum(stored_bytes(getattr(qw, n)) for n in inner if n != "_data")
        n_weights += qw.numel()
        if weights != "qint8":
            groups.add(qw.numel() // qw._scale.numel())
        set_weight(model, name, qw.dequantize())
    bpw = bpw_of(total_bytes, n_weights)
    half = bpw_of(total_bytes - scale_bytes / 2, n_weights)
    gs = f"group sizes {sorted(groups)}" if groups else "per output channel"
    notes = f"quanto {weights}, {gs}, scale/shift float32 (a 16-bit model would store {half:.3f} bpw); dequantized weights"
    return PeerResult(model, bpw, notes, bpw_16bit=half)


def warm_up() -> None:
    """quanto JIT-compiles its C++ extension the first time int4/int2 weights are packed (about a
    minute on 2 cores, cached in the package directory): do it once, outside any timing."""
    quanto = require("optimum.quanto", "optimum-quanto")
    for qtype in ("qint4", "qint2"):
        m = nn.Sequential(nn.Linear(256, 256, bias=False))
        quanto.quantize(m, weights=getattr(quanto, qtype))
        quanto.freeze(m)
        with torch.no_grad():
            m(torch.zeros(1, 256))
        m[0].weight.dequantize()
