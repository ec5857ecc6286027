"""HQQ (Half-Quadratic Quantization, no calibration data) through the `hqq` package.

Each decoder linear becomes an HQQLinear with HQQ's usual 16-bit meta data (compute dtype fp16:
scale and zero per group stored in fp16, unquantized), then the layer computes with HQQ's own
dequantized weight (cast to float32). HQQ groups the flattened weight, which here is the same as
groups along in_features because the group sizes divide the widths. Bits per weight count W_q as
HQQ packs it (4bit_u8, 3bit_32 = ten 3-bit codes per int32, 2bit_u8, 8bit_u8) plus the scale and
zero tensors; the few per-layer ints of meta data (shape, nbits) are left out (< 0.001 bpw).
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


def quantize(model: nn.Module, calib: torch.Tensor | None = None, nbits: int = 4, group_size: int = 64) -> PeerResult:
    require("hqq")
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
    total_bytes = n_weights = 0
    for name, lin in decoder_linears(model).items():
        hl = HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float16, device="cpu", del_orig=False)
        meta = hl.meta
        total_bytes += stored_bytes(hl.W_q) + stored_bytes(meta.get("scale")) + stored_bytes(meta.get("zero"))
        for key in ("scale_q", "zero_q", "meta_scale", "meta_zero"):  # only when scale/zero are quantized
            total_bytes += stored_bytes(meta.get(key))
        n_weights += lin.weight.numel()
        set_weight(model, name, hl.dequantize().float())
    notes = f"HQQ {nbits}-bit g{group_size}, fp16 scale+zero per group, optimizer defaults; dequantized weights"
    return PeerResult(model, bpw_of(total_bytes, n_weights), notes)
