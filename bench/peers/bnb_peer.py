"""bitsandbytes (CPU backend): NF4 / FP4 blockwise 4-bit and LLM.int8 row-wise 8-bit.

Uses bitsandbytes.functional directly (transformers' BitsAndBytesConfig fixes the block size at
64 and quantizes on load): quantize_4bit over the flattened weight in blocks of `blocksize`
(absmax in float32, or 8-bit with double quantization: `compress_statistics`), then the layer
computes with bitsandbytes' dequantize_4bit weight. Int8: int8_vectorwise_quant (absmax per output
row, threshold 0, i.e. no fp16 outlier columns) and int8_vectorwise_dequant. Bits per weight count
the packed codes plus the serialized quant state (absmax, nested absmax, code book, the packed
state record) per layer.
"""

from __future__ import annotations

import warnings

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


def quantize(model: nn.Module, calib: torch.Tensor | None = None, quant_type: str = "nf4", blocksize: int = 64,
             double_quant: bool = False) -> PeerResult:
    warnings.filterwarnings("ignore", module="bitsandbytes")
    require("bitsandbytes")
    import bitsandbytes.functional as F

    total_bytes = n_weights = 0
    for name, lin in decoder_linears(model).items():
        w = lin.weight.detach().float().contiguous()
        if quant_type == "int8":
            codes, stats, _ = F.int8_vectorwise_quant(w, threshold=0.0)
            total_bytes += stored_bytes(codes) + stored_bytes(stats)
            deq = F.int8_vectorwise_dequant(codes, stats)
        else:
            codes, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
            total_bytes += stored_bytes(codes) + sum(stored_bytes(v) for v in state.as_dict(packed=True).values())
            deq = F.dequantize_4bit(codes, state)
        n_weights += w.numel()
        set_weight(model, name, deq)
    if quant_type == "int8":
        notes = "LLM.int8 row-wise absmax (threshold 0), float32 row scales; dequantized weights"
    else:
        notes = (f"{quant_type} blocks of {blocksize} over the flattened weight, absmax "
                 f"{'8-bit (double quant)' if double_quant else 'float32'}; dequantized weights")
    return PeerResult(model, bpw_of(total_bytes, n_weights), notes)
