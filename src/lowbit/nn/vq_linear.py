"""VQLinear: a linear layer stored as vector-codebook indices (`formats.vq`), per-layer fp16
codebooks (one, or one per residual stage and row group) and fp16 scales (per row: `[out]`, or per group of columns: `[out, n_groups]`); forward looks the codewords up (a gather), scales the rows and
multiplies. Its state dict is exactly what the artifact stores. No external format holds a learned
codebook, so exports refuse it."""

from __future__ import annotations

from typing import Any

import torch

from ..formats.vq import VQFormat
from ..pack import pack_codes, unpack_codes
from ..qtensor import VQWeight
from .base import QuantModule, TensorSpec, bias_spec, entry_format, register_kind



def _format(entry: dict[str, Any]) -> VQFormat:
    return entry_format(entry, VQFormat, "vector codebook")


@register_kind
class VQLinear(QuantModule):
    kind = "vq-linear"

    def __init__(self, fmt: VQFormat, out_features: int, in_features: int, bias: bool, group_size: int = -1) -> None:
        super().__init__()
        fmt.check_width(in_features)
        self.fmt, self.out_features, self.in_features, self.group_size = fmt, out_features, in_features, group_size
        for name, (shape, dtype) in self._specs(fmt, out_features, in_features, group_size).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))
        self._init_bias(bias)

    @staticmethod
    def _specs(fmt: VQFormat, out_f: int, in_f: int, group_size: int) -> dict[str, TensorSpec]:
        sizes = fmt.storage_bytes(out_f, in_f, group_size)
        scales = (out_f,) if group_size == -1 else (out_f, fmt.scale_groups(in_f, group_size))
        specs = {"codes": ((sizes["codes"],), torch.uint8),
                 "codebook": ((fmt.n_codebooks * fmt.codebook_size, fmt.dim), torch.float16), "scales": (scales, torch.float16)}
        if fmt.outlier_pct:  # the outlier codebook's input columns
            specs["columns"] = ((fmt.outlier_columns(in_f),), torch.int32)
        return specs

    @classmethod
    def from_quantized(cls, qw: VQWeight, bias: torch.Tensor | None) -> "VQLinear":
        out_f, in_f = qw.shape
        layer = cls(qw.fmt, out_f, in_f, bias is not None, qw.group_size)
        layer.codes.copy_(pack_codes(qw.codes, qw.fmt.bits))
        layer.codebook.copy_(qw.codebook.to(torch.float16))
        layer.scales.copy_(qw.scales.reshape(layer.scales.shape).to(torch.float16))
        if qw.columns is not None:
            layer.columns.copy_(qw.columns.to(torch.int32))
        layer._copy_bias(bias)
        return layer

    def quantized_weight(self) -> VQWeight:
        n = self.out_features * self.in_features // self.fmt.dim * self.fmt.stages
        codes = unpack_codes(self.codes, self.fmt.bits, n).reshape(self.out_features, -1)
        columns = self.columns.long() if self.fmt.outlier_pct else None
        return VQWeight(codes, self.codebook.float(), self.scales.float(), self.fmt, self.group_size, columns)

    def _dequantize(self) -> torch.Tensor:
        return self.quantized_weight().dequantize()

    def entry(self) -> dict[str, Any]:
        return {"kind": self.kind, "grid": self.fmt.spec(), "bits": self.fmt.bits,
                "shape": [self.out_features, self.in_features], "group_size": self.group_size, "bias": self.bias is not None}

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> "VQLinear":
        out_f, in_f = entry["shape"]
        return cls(_format(entry), out_f, in_f, entry["bias"], entry["group_size"])

    @classmethod
    def state_specs(cls, entry: dict[str, Any]) -> dict[str, TensorSpec]:
        out_f, in_f = entry["shape"]
        return {**cls._specs(_format(entry), out_f, in_f, entry["group_size"]), **bias_spec(out_f, entry["bias"])}

    def storage_bytes(self) -> dict[str, int]:
        return self.fmt.storage_bytes(self.out_features, self.in_features, self.group_size)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}, group_size={self.group_size}, bias={self.bias is not None}"
