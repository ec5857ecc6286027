"""QuantLinear: a linear layer that holds its weight as packed codes plus grid parameters and
dequantizes it in forward. Its state dict is exactly what the artifact stores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import Grid, GroupLayout
from ..pack import pack_codes, unpack_codes
from ..qtensor import QuantizedWeight


class QuantLinear(nn.Module):
    def __init__(self, grid: Grid, layout: GroupLayout, bias: bool) -> None:
        super().__init__()
        self.grid = grid
        self.layout = layout
        self.in_features = layout.in_features
        self.out_features = layout.out_features
        n = layout.out_features * layout.in_features
        sets = layout.n_param_sets
        self.register_buffer("codes", torch.zeros(grid.packed_nbytes(n), dtype=torch.uint8))
        for f in grid.param_fields:
            if f.kind == "float16":
                self.register_buffer(f.name, torch.zeros(sets, dtype=torch.float16))
            else:
                self.register_buffer(f.name, torch.zeros(-(-sets * f.bits // 8), dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(layout.out_features), requires_grad=False) if bias else None
        self.cache_weight = False  # keep the dequantized weight between calls (faster, more memory)
        self._cached: torch.Tensor | None = None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None) -> "QuantLinear":
        layer = cls(qw.grid, qw.layout, bias is not None)
        layer.codes.copy_(qw.grid.pack(qw.codes))
        for f in qw.grid.param_fields:
            value = qw.params[f.name].reshape(-1)
            if f.kind == "float16":
                getattr(layer, f.name).copy_(value.to(torch.float16))
            else:
                getattr(layer, f.name).copy_(pack_codes(value.round().to(torch.uint8), f.bits))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().float())
        return layer

    def _load_from_state_dict(self, *args, **kwargs):
        self._cached = None  # new codes: forget the dequantized copy
        super()._load_from_state_dict(*args, **kwargs)

    def quantized_weight(self) -> QuantizedWeight:
        """Unpack the stored tensors into codes and parameters."""
        layout = self.layout
        n = layout.out_features * layout.in_features
        codes = self.grid.unpack(self.codes, n).reshape(layout.out_features, layout.in_features)
        params = {}
        for f in self.grid.param_fields:
            stored = getattr(self, f.name)
            value = stored.float() if f.kind == "float16" else unpack_codes(stored, f.bits, layout.n_param_sets).float()
            params[f.name] = value.reshape(layout.param_rows, -1)
        return QuantizedWeight(codes, params, self.grid, layout)

    def dequantize(self) -> torch.Tensor:
        """[out, in] float32 weight."""
        if self._cached is not None:
            return self._cached
        w = self.quantized_weight().dequantize()
        if self.cache_weight:
            self._cached = w
        return w

    def bits_per_weight(self) -> float:
        return self.quantized_weight().bits_per_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"grid={self.grid.spec()}, group_size={self.layout.group_size}, bias={self.bias is not None}"
        )
