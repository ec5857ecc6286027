"""llama.cpp's formats through the `gguf` package's reference quantizer (numpy).

Each decoder linear weight [out, in] is quantized row by row in blocks along in_features (32
weights for the legacy and MXFP4 formats, 256 for K-quants and TQ*), dequantized back to float32,
and the model computes with those weights. Bits per weight are the bytes the format stores per
block (codes + fp16/E8M0 scales + mins) over the weights: exactly the size llama.cpp writes.

A width that the block does not divide gets llama.cpp's own fallback (llama_tensor_get_type in
llama-quant.cpp: TQ1_0/TQ2_0 -> Q4_0, Q2_K/Q3_K/IQ4_XS/IQ2_*/IQ3_*/IQ1_* -> IQ4_NL,
Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0); the notes say which layers fell back.
gguf 0.19.0 implements quantization only for F32/F16/BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, TQ1_0,
TQ2_0 and MXFP4 (the K-quants and IQ* only dequantize): asking for another type raises
PeerUnavailable.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .common import (
    PeerResult,
    PeerUnavailable,
    bpw_of,
    decoder_linears,
    require,
    set_weight,
)

#: llama.cpp's fallback for a tensor whose row length the block size does not divide
FALLBACK = {
    "TQ1_0": "Q4_0", "TQ2_0": "Q4_0",
    "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL",
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "IQ4_XS": "IQ4_NL",
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}


def block_size(qtype: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a GGML type."""
    gguf = require("gguf")
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]


def can_quantize(qtype: str) -> bool:
    gguf = require("gguf")
    from gguf.quants import quantize

    qt = gguf.GGMLQuantizationType[qtype]
    try:
        quantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qt][0]), dtype=np.float32), qt)
    except NotImplementedError:
        return False
    return True


def _quantize_weight(w: np.ndarray, qtype: str) -> tuple[np.ndarray, int]:
    gguf = require("gguf")
    from gguf.quants import dequantize, quantize

    qt = gguf.GGMLQuantizationType[qtype]
    q = quantize(w, qt)
    return dequantize(q, qt).reshape(w.shape), int(q.nbytes)


def quantize(model: nn.Module, calib: torch.Tensor | None = None, qtype: str = "Q4_0") -> PeerResult:
    gguf = require("gguf")
    if qtype not in gguf.GGMLQuantizationType.__members__:
        raise PeerUnavailable(f"the gguf package has no GGML type {qtype}")
    layers = decoder_linears(model)
    block = block_size(qtype)[0]
    needs = {qtype}
    plan: dict[str, str] = {}
    for name, lin in layers.items():
        t = qtype
        if lin.in_features % block:
            if qtype not in FALLBACK:
                raise ValueError(f"{name}: in_features {lin.in_features} is not a multiple of {qtype}'s {block}-weight block")
            t = FALLBACK[qtype]
        plan[name] = t
        needs.add(t)
    missing = [t for t in sorted(needs) if not can_quantize(t)]
    if qtype in missing:
        fb = ""
        if qtype in FALLBACK:
            odd = sorted({lin.in_features for lin in layers.values() if lin.in_features % block})
            if odd:
                fb = (f"; besides, in_features {odd} are not multiples of its {block}-weight block, "
                      f"for which llama.cpp would fall back to {FALLBACK[qtype]}")
        raise PeerUnavailable(f"gguf 0.19.0 implements dequantize but not quantize for {qtype} (NotImplementedError){fb}")
    if missing:
        raise PeerUnavailable(f"{qtype} needs llama.cpp's fallback type {missing} for some layers, which gguf cannot quantize")

    total_bytes = n_weights = 0
    for name, lin in layers.items():
        w = lin.weight.detach().float().numpy()
        deq, nbytes = _quantize_weight(w, plan[name])
        set_weight(model, name, torch.from_numpy(np.ascontiguousarray(deq)))
        total_bytes += nbytes
        n_weights += w.size
    fell_back = sorted({f"{n.split('.')[-1]}->{t}" for n, t in plan.items() if t != qtype})
    notes = f"gguf reference quantizer, {block}-weight blocks along in_features"
    if fell_back:
        notes += f"; llama.cpp fallback for non-dividing widths: {', '.join(fell_back)}"
    return PeerResult(model, bpw_of(total_bytes, n_weights), notes)
