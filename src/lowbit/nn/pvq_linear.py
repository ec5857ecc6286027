"""PVQLinear: a linear layer stored as pyramid-vector indices and amplitude codes (`formats.pvq`)
with fp16 row scales. Its state dict is exactly what the artifact stores. Decoding the
enumeration walks each vector's N coordinates, so the module keeps the dequantized weight after
the first forward (`cache_weight`, on by default here); no external format holds pyramid codes,
so exports refuse it."""

from __future__ import annotations

from typing import Any

import torch

from ..formats.pvq import PVQFormat
from ..pack import pack_codes, unpack_codes
from ..qtensor import PVQWeight
from .base import QuantModule, TensorSpec, bias_spec, entry_format, register_kind


def _format(entry: dict[str, Any]) -> PVQFormat:
    return entry_format(entry, PVQFormat, "pyramid vector")


@register_kind
class PVQLinear(QuantModule):
    kind = "pvq-linear"

    def __init__(self, fmt: PVQFormat, out_features: int, in_features: int, bias: bool) -> None:
        super().__init__()
        fmt.check_width(in_features)
        self.fmt, self.out_features, self.in_features = fmt, out_features, in_features
        for name, (shape, dtype) in self._specs(fmt, out_features, in_features).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))
        self._init_bias(bias)
        self.cache_weight = True

    @staticmethod
    def _specs(fmt: PVQFormat, out_f: int, in_f: int) -> dict[str, TensorSpec]:
        sizes = fmt.storage_bytes(out_f, in_f)
        return {"codes": ((sizes["codes"],), torch.uint8), "amps": ((sizes["amps"],), torch.uint8),
                "scales": ((out_f,), torch.float16)}

    @classmethod
    def from_quantized(cls, qw: PVQWeight, bias: torch.Tensor | None) -> "PVQLinear":
        out_f, in_f = qw.shape
        layer = cls(qw.fmt, out_f, in_f, bias is not None)
        layer.codes.copy_(pack_codes(qw.index, qw.fmt.index_bits))
        layer.amps.copy_(pack_codes(qw.amps, qw.fmt.amp_bits))
        layer.scales.copy_(qw.scales.to(torch.float16))
        layer._copy_bias(bias)
        return layer

    def quantized_weight(self) -> PVQWeight:
        n = self.out_features * self.in_features // self.fmt.dim
        index = unpack_codes(self.codes, self.fmt.index_bits, n).to(torch.int64).reshape(self.out_features, -1)
        amps = unpack_codes(self.amps, self.fmt.amp_bits, n).reshape(self.out_features, -1)
        return PVQWeight(index, amps, self.scales.float(), self.fmt)

    def _dequantize(self) -> torch.Tensor:
        return self.quantized_weight().dequantize()

    def entry(self) -> dict[str, Any]:
        return {"kind": self.kind, "grid": self.fmt.spec(), "bits": self.fmt.index_bits,
                "shape": [self.out_features, self.in_features], "group_size": -1, "bias": self.bias is not None}

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> "PVQLinear":
        out_f, in_f = entry["shape"]
        return cls(_format(entry), out_f, in_f, entry["bias"])

    @classmethod
    def state_specs(cls, entry: dict[str, Any]) -> dict[str, TensorSpec]:
        out_f, in_f = entry["shape"]
        return {**cls._specs(_format(entry), out_f, in_f), **bias_spec(out_f, entry["bias"])}

    def storage_bytes(self) -> dict[str, int]:
        return self.fmt.storage_bytes(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}, bias={self.bias is not None}"
