"""torchao weight-only quantization on the CPU, with torchao's own runtime (quantize_ swaps the
weight for a quantized tensor subclass and the layer computes through torchao's kernels).

CPU-capable configs in torchao 0.18: Int8WeightOnlyConfig (per output channel),
PrototypeInt4WeightOnlyConfig (Int4OpaqueTensor, the CPU int4 kernel, groups along in_features),
IntxWeightOnlyConfig (int1..int8 codes kept unpacked in int8). The main Int4WeightOnlyConfig needs
the GPU kernel library mslk (or CUDA) and is reported unavailable. quantize_ would convert every
nn.Linear, lm_head included: filter_fn keeps it to the decoder linears. Bits per weight count the
inner tensors of each quantized weight (codes, scales, zero points) as torchao holds them; scales
follow the model's dtype (float32 here).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .common import (
    PeerResult,
    PeerUnavailable,
    bpw_of,
    decoder_linears,
    require,
    stored_bytes,
)


def _config(kind: str, group_size: int | None, bits: int | None):
    q = require("torchao.quantization", "torchao")
    from torchao.quantization.granularity import PerGroup

    if kind == "int8_weight_only":
        return q.Int8WeightOnlyConfig()
    if kind == "int4_weight_only":
        return q.Int4WeightOnlyConfig(group_size=group_size)
    if kind == "int4_opaque":
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=group_size)
    if kind == "intx_weight_only":
        return q.IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group_size))
    raise ValueError(f"unknown torchao config {kind!r}")


def quantize(model: nn.Module, calib: torch.Tensor | None = None, kind: str = "int8_weight_only",
             group_size: int | None = None, bits: int | None = None) -> PeerResult:
    warnings.filterwarnings("ignore", module="torchao")
    q = require("torchao.quantization", "torchao")
    layers = decoder_linears(model)
    names = set(layers)
    n_weights = sum(lin.weight.numel() for lin in layers.values())
    try:
        q.quantize_(model, _config(kind, group_size, bits), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in names)
    except ImportError as exc:  # Int4WeightOnlyConfig: "Requires mslk >= 1.0.0"
        raise PeerUnavailable(f"{kind} on CPU: {exc.__class__.__name__}: {exc} (GPU kernel library)") from None
    total_bytes = 0
    types = set()
    for name in names:
        w = model.get_submodule(name).weight
        if type(w) in (torch.Tensor, nn.Parameter):
            raise RuntimeError(f"{name} was left unquantized by torchao ({kind})")
        types.add(type(w).__name__)
        total_bytes += stored_bytes(w)
    notes = f"torchao {kind}{f' g{group_size}' if group_size else ''}, {'/'.join(sorted(types))}, own CPU runtime"
    if kind == "intx_weight_only":
        notes += "; codes stored unpacked in int8"
    return PeerResult(model, bpw_of(total_bytes, n_weights), notes)
