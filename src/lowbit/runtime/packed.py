"""A QuantLinear's integer weight in the layout the C kernels read, and the product with it.

The codes are the module's own packed buffer (4-bit: two codes per byte, LSB first; 8-bit: one
byte each) used in place, not copied; scales and zero points are widened once to fp32
[out, n_groups], plus scale * zero for the product kernel. For int4 with groups of 32 that is
0.875 bytes per weight against fp32's 4. Batch-few inputs (decode) run the product kernel;
more rows (prefill) dequantize once into fp32, bit for bit as lowbit decodes, then one matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..formats.clip import ClippedGrid
from ..formats.int import IntGrid
from ..pack import unpack_codes
from .kernels import MAX_BATCH, library

BLOCK = 32  # the kernels read whole blocks of 32 weights


def _int_grid(grid) -> IntGrid | None:
    inner = grid.inner if isinstance(grid, ClippedGrid) else grid  # clipping changes the fit, not the decode
    return inner if type(inner) is IntGrid else None


@dataclass
class PackedInt:
    bits: int
    out_features: int
    in_features: int
    group: int  # columns per group (the whole row for per-channel / per-tensor layouts)
    n_groups: int
    codes: torch.Tensor  # the module's packed buffer, uint8
    scale: torch.Tensor  # [out, n_groups] float32
    zero: torch.Tensor  # [out, n_groups] float32
    scale_zero: torch.Tensor  # [out, n_groups] float32, scale * zero

    @classmethod
    def from_module(cls, layer) -> "PackedInt | None":
        """The packed view of a QuantLinear, or None when the kernels do not cover its grid/layout."""
        grid = _int_grid(layer.grid)
        layout = layer.layout
        if grid is None or grid.bits not in (4, 8) or layout.in_features % BLOCK:
            return None
        group = layout.effective_group_size
        if group % BLOCK or library() is None:
            return None
        out_f, n_groups = layout.out_features, layout.n_groups
        scale = layer.scale.float().reshape(layout.param_rows, n_groups).expand(out_f, n_groups).contiguous()
        if grid.symmetric:
            zero = torch.full_like(scale, float(2 ** (grid.bits - 1)))
        else:
            zero = unpack_codes(layer.zero, grid.bits, layout.n_param_sets).float()
            zero = zero.reshape(layout.param_rows, n_groups).expand(out_f, n_groups).contiguous()
        return cls(grid.bits, out_f, layout.in_features, group, n_groups, layer.codes, scale, zero, (scale * zero).contiguous())

    def dequantize(self) -> torch.Tensor:
        """[out, in] float32, equal to the module's own decode bit for bit."""
        w = torch.empty(self.out_features, self.in_features)
        library().lowbit_dequant(self.codes.data_ptr(), self.bits, self.scale.data_ptr(), self.zero.data_ptr(), w.data_ptr(),
                                 self.out_features, self.in_features, self.group, self.n_groups)
        return w

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [rows, in] float32 contiguous, rows <= MAX_BATCH -> [rows, out]."""
        rows = x.shape[0]
        y = torch.empty(rows, self.out_features)
        x_sum = torch.empty(rows * self.n_groups)
        lib = library()
        args = (self.scale.data_ptr(), self.scale_zero.data_ptr(), y.data_ptr(), rows, self.out_features, self.in_features,
                self.group, self.n_groups, x_sum.data_ptr())
        if self.bits == 4:
            # per 32-block: the 16 even positions, then the 16 odd ones (low and high nibbles)
            xd = x.reshape(rows, -1, 16, 2).transpose(-1, -2).contiguous()
            lib.lowbit_gemv_int4(self.codes.data_ptr(), x.data_ptr(), xd.data_ptr(), *args)
        else:
            lib.lowbit_gemv_int8(self.codes.data_ptr(), x.data_ptr(), *args)
        return y

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None, weight=None) -> torch.Tensor:
        """F.linear(x, W, bias) for x: [..., in] float32; `weight()` gives W for many rows (the
        module's dequantize, which may cache it), default this view's own decode."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        if x2.shape[0] <= MAX_BATCH:
            y = self.matmul(x2)
            if bias is not None:
                y += bias
        else:
            y = F.linear(x2, (weight or self.dequantize)(), bias)
        return y.reshape(*lead, self.out_features)
